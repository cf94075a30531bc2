"""Runs of one config started at the same time never destroy each other's work: each MLflow run has its own
checkpoint folder, and a run is trained by one process at a time (a second ``--resume`` is refused)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from test_run import client_for, experiment, history, runs_of

# Holds a run at the end of epoch HOLD_EPOCH (after its best checkpoint is written, before last.pt) until the
# test creates HOLD_DIR/release: the window in which a second start used to delete the first one's files.
HOLDER = '''
import os, signal, time, unetlab
from pathlib import Path

@unetlab.hookimpl
def on_run_start(run_name):
    folder = os.environ.get("HOLD_DIR")
    if folder:
        Path(folder, f"started-{os.getpid()}").write_text(run_name)

@unetlab.hookimpl
def on_epoch_end(run_name, epoch):
    folder = os.environ.get("HOLD_DIR")
    if not folder or epoch != int(os.environ.get("HOLD_EPOCH", "0")):
        return
    Path(folder, f"held-{os.getpid()}").write_text(str(epoch))
    while not Path(folder, "release").exists():
        time.sleep(0.1)
'''

KILL_AT_EPOCH = '''
import os, signal, unetlab

@unetlab.hookimpl
def on_epoch_end(run_name, epoch):
    if os.environ.get("KILL_EPOCH") == str(epoch):
        os.kill(os.getpid(), signal.SIGKILL)
'''


def _start(path: Path, cwd: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unetlab", "run", str(path), "--quiet", *extra], cwd=cwd,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_file(folder: Path, pattern: str, process: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {pattern} in {folder}"
        time.sleep(0.1)


def _state_dicts_equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_same_command_started_twice_leaves_the_first_runs_model_its_own(tmp_path):
    import mlflow
    import mlflow.pytorch
    import torch

    (tmp_path / "holder.py").write_text(HOLDER)
    path = experiment(tmp_path, epochs=2, log_model=True, extra="plugins: [holder.py]\n")
    holds = tmp_path / "holds"
    holds.mkdir()
    env = {"HOLD_DIR": str(holds), "HOLD_EPOCH": "2"}
    first = _start(path, tmp_path, env=env)
    _wait_for_file(holds, f"held-{first.pid}", first)  # its best checkpoint of epoch 2 is written
    second = _start(path, tmp_path, env=env)
    _wait_for_file(holds, f"started-{second.pid}", second)  # past the point where it used to delete them
    second.send_signal(signal.SIGINT)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 130, err
    (holds / "release").write_text("")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err

    client = client_for(tmp_path)
    parents, children = runs_of(client)
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
    [mine] = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(c.info.status for c in children) == ["FINISHED", "KILLED"]  # nothing left RUNNING
    # its best checkpoint is its own: the epoch and value its metrics say, and the model it logged
    values = history(client, mine, "val_iou")
    best_epoch, best_value = max(values, key=lambda sv: (sv[1], -sv[0]))
    [best] = [p for p in (tmp_path / "ckpt").rglob("best.pt") if mine.info.run_id in str(p)]
    state = torch.load(best, weights_only=True)
    assert (state["epoch"], state["value"]) == (best_epoch, mine.data.metrics["best_val_iou"])
    assert state["value"] == pytest.approx(best_value)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = mlflow.pytorch.load_model(mine.data.tags["unetlab.model_uri"])
    assert _state_dicts_equal(logged.state_dict(), state["model"])


@pytest.mark.slow
def test_two_resumes_of_one_killed_run_train_it_once_and_the_second_names_the_first(tmp_path):
    (tmp_path / "holder.py").write_text(HOLDER)
    (tmp_path / "killer.py").write_text(KILL_AT_EPOCH)
    path = experiment(tmp_path, epochs=3, extra="plugins: [holder.py, killer.py]\n")
    killed = run_cli("run", str(path), "--quiet", cwd=tmp_path, env={"KILL_EPOCH": "2"})
    assert killed.returncode == -signal.SIGKILL
    holds = tmp_path / "holds"
    holds.mkdir()
    first = _start(path, tmp_path, "--resume", env={"HOLD_DIR": str(holds), "HOLD_EPOCH": "2"})
    _wait_for_file(holds, f"held-{first.pid}", first)
    second = run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path, timeout=120,
                     env={"HOLD_DIR": str(holds), "HOLD_EPOCH": "2"})
    lines = [line for line in second.stderr.strip().splitlines() if not line.startswith("unetlab: warning:")]
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"is being trained by pid {first.pid} on host " in lines[0] and ", started " in lines[0], lines
    (holds / "release").write_text("")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    client = client_for(tmp_path)
    parents, [child] = runs_of(client)
    assert [p.info.status for p in parents] == ["FINISHED"] and child.info.status == "FINISHED"
    # trained once: the killed process logged epochs 1-2, the resumed one 2 (again: it was killed before its
    # checkpoint) and 3; a second trainer would have logged 2 and 3 once more
    steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "train_loss"))
    assert steps == [1, 2, 2, 3]
