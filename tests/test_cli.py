"""The command line's shape: fast help without torch/mlflow, version, exit codes."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli


def test_help_does_not_import_torch_or_mlflow():
    code = ("import sys\nfrom unetlab.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'mlflow', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "unetlab run" in out  # the examples are in the help


def test_version_and_bare_command():
    assert run_cli("--version", check=True).stdout.strip().startswith("unetlab ")
    assert "usage: unetlab" in run_cli(check=True).stdout


def test_unknown_command_exits_2():
    assert run_cli("frobnicate").returncode == 2
