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


def test_ui_serves_the_store_on_localhost(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "unetlab", "ui", "--port", str(port),
                             "--tracking-uri", f"sqlite:///{tmp_path / 'ui.db'}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the MLflow UI did not start"
                time.sleep(0.5)
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
