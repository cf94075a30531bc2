"""The command line's shape: fast help without torch/mlflow, version, exit codes."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli


def test_help_does_not_import_torch_or_mlflow():
    code = ("import sys\nfrom unetlab.cli.main import main\n"
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
    import json
    import os
    import signal
    import urllib.request

    import psutil
    from mlflow.tracking import MlflowClient

    from conftest import free_port, wait_for_http

    store = f"sqlite:///{tmp_path / 'ui.db'}"
    experiment_id = MlflowClient(store).create_experiment("seen-through-the-ui")  # in the store before the UI starts
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unetlab", "ui", "--port", str(port), "--tracking-uri", store],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=seen-through-the-ui"
        with urllib.request.urlopen(url, timeout=10) as answer:  # the store given, not another one
            assert json.load(answer)["experiment"]["experiment_id"] == experiment_id
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        assert listening == {"127.0.0.1"}  # localhost only: nothing on 0.0.0.0 or another interface
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_exception_text_is_one_line_even_for_empty_messages():
    # copies of str(exc).splitlines()[0] raised IndexError on exceptions without a message
    from unetlab.errors import exception_text

    assert exception_text(OSError()) == "OSError"
    assert exception_text(ValueError("first\nsecond")) == "ValueError: first"
