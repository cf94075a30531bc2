"""Shared test helpers: run the CLI in a subprocess, make fake plugin distributions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in N worker processes (pytest -n N), and every run trains with its train.threads (default 2)
    # whatever OMP_NUM_THREADS says (it would only add a warning line to every CLI's stderr), so the cores
    # are shared by more threads than there are: OpenMP threads that wait then sleep instead of spinning,
    # which keeps the oversubscription cheap. Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Generated datasets go to a per-session cache, never the user's home; module-scoped fixtures run in a
    scratch folder (tests get their own, below), so nothing lands in the repository's working directory."""
    os.environ["UNETLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.chdir(tmp_path_factory.mktemp("cwd"))
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    yield


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path, monkeypatch):
    """Each test runs in its own folder: whatever it writes relative to the working directory (MLflow's
    default ./mlruns artifact root, checkpoints) lands there, never in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """A developer's MLFLOW_TRACKING_URI (or one set by mlflow.set_tracking_uri in a test) must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import sys as _sys

    if "mlflow" in _sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def run_cli(*args: str, cwd: Path | str | None = None, env: dict | None = None, timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m unetlab ARGS`` and capture its output (text)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "unetlab", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"unetlab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_distribution(root: Path, dist_name: str, version: str, entry_points: dict[str, str],
                      modules: dict[str, str]) -> Path:
    """Write an importable fake distribution (modules + a .dist-info with entry points) under ``root``.

    ``importlib.metadata`` finds it when ``root`` is on ``sys.path`` (``PYTHONPATH`` in a subprocess):
    exactly how an installed third-party plugin is found, without pip.
    """
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[unetlab]\n{lines}\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the process failed the unetlab way (exit 2, one line, no traceback) and return the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith("unetlab: warning:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("unetlab: error: ")
    return lines[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    """Poll ``url`` until it answers; fail if ``process`` exits or ``timeout`` passes first."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError as exc:
            if process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"{url} did not answer (process exit code: {process.poll()})") from exc
            time.sleep(0.5)
