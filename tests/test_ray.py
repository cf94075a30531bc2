"""``unetlab run FILE --ray``: runs as Ray tasks on a real local Ray instance (127.0.0.1, shut down after)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import one_line_error, run_cli
from test_run import client_for, experiment, runs_of

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'unetlab[ray]')")

pytestmark = pytest.mark.xdist_group("ray")  # under pytest -n, one worker runs these: one local Ray instance at a time

# Kills the Ray worker that runs the task (the trainer's parent process) once, at the end of an epoch.
WORKER_KILLER = '''
import os, signal, unetlab
from pathlib import Path

@unetlab.hookimpl
def on_epoch_end(run_name, epoch):
    marker = Path(os.environ["KILL_MARKER"])
    if os.environ.get("UNETLAB_RAY") and run_name == "add/seed=0" and epoch == 2 and not marker.exists():
        marker.write_text(str(os.getppid()))
        os.kill(os.getppid(), signal.SIGKILL)
'''

TWO_VARIANTS = """
    plugins: [killer.py]
    variants:
      concat: {model.fusion: concat}
      add: {model.fusion: add}
"""


def _summaries(stdout: str) -> dict[str, str]:
    """Run name -> its summary line without the trailing wall time."""
    import re

    return {line.split()[0]: re.sub(r"\s+[0-9.]+s$", "", line.strip()) for line in stdout.splitlines()
            if re.match(r"^\S+/seed=\d+\s+(FINISHED|FAILED|KILLED)\s", line)}


def _trainers_of(parent_id: str) -> list[int]:
    """PIDs of live processes training under ``parent_id`` (none may outlive the command)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent_id.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_ray_runs_finish_with_sequential_metrics_and_a_killed_worker_resumes(tmp_path, monkeypatch):
    # no OMP_NUM_THREADS (pytest -n sets one): a run's thread count is its train.threads wherever it runs
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "killer.py").write_text(WORKER_KILLER)
    path = experiment(tmp_path, epochs=3, extra=TWO_VARIANTS)
    marker = tmp_path / "killed"
    proc = run_cli("run", str(path), "--ray", "--quiet", cwd=tmp_path, env={"KILL_MARKER": str(marker)}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert marker.exists(), "the worker of add/seed=0 was never killed"
    parents, children = runs_of(client_for(tmp_path))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # the retry continued the same MLflow run: one run per name, all FINISHED
    assert sorted(c.info.run_name for c in children) == ["add/seed=0", "concat/seed=0"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert not _trainers_of(parents[0].info.run_id)

    sequential = tmp_path / "seq"
    sequential.mkdir()
    (sequential / "killer.py").write_text(WORKER_KILLER)
    seq_path = experiment(sequential, epochs=3, extra=TWO_VARIANTS)
    # a task reserves its run's train.threads (default 2) and the run uses exactly that many
    assert all(c.data.params["train.threads"] == c.data.params["torch.threads"] == "2" for c in children)
    seq_proc = run_cli("run", str(seq_path), "--quiet", cwd=sequential, env={"KILL_MARKER": str(marker)})
    assert seq_proc.returncode == 0, seq_proc.stderr
    # the same per-run summary lines as the sequential runs (best value and epoch, final value, epochs), the
    # wall time aside
    assert _summaries(proc.stdout) == _summaries(seq_proc.stdout) and len(_summaries(proc.stdout)) == 2, proc.stdout
    _, seq_children = runs_of(client_for(sequential))
    expected = {c.info.run_name: c.data.metrics for c in seq_children}
    for child in children:
        for key in ("val_iou", "val_dice", "val_loss", "train_loss"):
            assert child.data.metrics[key] == expected[child.info.run_name][key], (child.info.run_name, key)


# Holds every run at the end of epoch 1 until a signal arrives, and records which signal reached the trainer.
HOLDER = '''
import os, time, unetlab
from pathlib import Path

@unetlab.hookimpl
def on_epoch_end(run_name, epoch):
    folder = Path(os.environ["HOLD_DIR"])
    if epoch != 1:
        return
    (folder / f"held-{os.getpid()}").write_text(run_name)
    try:
        while True:
            time.sleep(0.1)
    except BaseException as exc:
        (folder / f"signal-{os.getpid()}").write_text(str(getattr(exc, "signum", type(exc).__name__)))
        raise
'''


@pytest.mark.slow
def test_ctrl_c_reaches_every_trainer_at_once_and_reports_true_statuses(tmp_path):
    (tmp_path / "holder.py").write_text(HOLDER)
    holds = tmp_path / "holds"
    holds.mkdir()
    path = experiment(tmp_path, epochs=200, extra="""
        plugins: [holder.py]
        train: {threads: 1}
        variants:
          concat: {model.fusion: concat}
          add: {model.fusion: add}
    """)  # 1 thread each: both tasks fit on 2 CPUs and train at once
    driver = subprocess.Popen([sys.executable, "-m", "unetlab", "run", str(path), "--ray", "--quiet"], cwd=tmp_path,
                              env={**os.environ, "HOLD_DIR": str(holds)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(list(holds.glob("held-*"))) < 2:  # both trainers wait in epoch 1's hook
        assert driver.poll() is None, driver.communicate()
        assert time.time() < deadline, "the runs never started"
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 130, (out, err)
    assert "Traceback" not in err
    # the interrupt reached each trainer as the cancelled task's SIGINT, not (after a grace period) as the
    # SIGTERM a trainer gets when its force-killed Ray worker dies
    assert sorted(p.read_text() for p in holds.glob("signal-*")) == [str(int(signal.SIGINT))] * 2
    parents, children = runs_of(client_for(tmp_path))
    assert parents[0].info.status == "KILLED"
    assert {c.info.status for c in children} == {"KILLED"} and len(children) == 2
    assert "Ray tasks cancelled: add/seed=0 KILLED, concat/seed=0 KILLED;" in err, err
    time.sleep(1)
    assert not _trainers_of(parents[0].info.run_id)


@pytest.mark.parametrize("cpus_per_run, threads, cpus, gpus, width", [
    (None, 2, 16, 0, 8),     # CPUs over train.threads
    (None, 2, 16, 1, 1),     # each task reserves one GPU: one GPU trains one trial at a time
    (None, 2, 16, 4, 4),
    (0.1, 1, 1, 0, 10),      # --ray-cpus 0.1 on one CPU: ten tasks fit (no float floor error)
    (None, 4, 2, 0, 1),      # a run wanting more threads than the cluster has: reserved capped, one at a time
    (None, 1, 3, 0, 3),
])
def test_a_batch_of_trials_is_as_wide_as_the_cluster_trains_at_once(cpus_per_run, threads, cpus, gpus, width):
    from unetlab.runs.ray_runs import RayPlan, fitting_tasks, reservations

    plan = RayPlan(None, cpus_per_run)
    assert fitting_tasks(plan, threads, cpus, gpus) == width
    if not gpus:  # the same count as the note run_on_ray prints for that many runs
        _, note = reservations(plan, [threads] * (width + 1), cpus)
        assert note is not None and f"Ray trains {width} at once" in note


def test_a_tasks_environment_does_not_set_its_thread_count(monkeypatch):
    from unetlab.runs.ray_runs import task_env

    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    monkeypatch.setenv("UNETLAB_CACHE_DIR", "/cache")
    env = task_env("http://h:5000")
    assert "OMP_NUM_THREADS" not in env and env["UNETLAB_CACHE_DIR"] == "/cache"


@pytest.mark.parametrize("settings, message", [
    ([], "cannot reach the local store"),
    (["--set", "tracking.uri=http://127.0.0.1:9"], "tracking.checkpoint_dir 'ckpt-relative' is a local relative path"),
])
def test_cluster_address_refuses_local_store_and_local_checkpoints(tmp_path, settings, message):
    path = experiment(tmp_path, epochs=1)
    proc = run_cli("run", str(path), "--ray", "ray://127.0.0.1:10001", "--set", "tracking.checkpoint_dir=ckpt-relative",
                   *settings, cwd=tmp_path)
    assert message in one_line_error(proc)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ckpt-relative").exists()


def test_a_bad_ray_address_is_one_line(tmp_path):
    path = experiment(tmp_path, epochs=1)
    assert "expected 'auto', 'ray://HOST:PORT'" in one_line_error(run_cli("run", str(path), "--ray", "tcp://x",
                                                                         cwd=tmp_path))
    assert not os.path.exists(tmp_path / "mlflow.db")


def test_an_unreachable_cluster_is_one_line_before_any_run(tmp_path):
    path = experiment(tmp_path, epochs=1)
    proc = run_cli("run", str(path), "--ray", "auto", "--set", "tracking.uri=http://127.0.0.1:9",
                   "--set", f"tracking.checkpoint_dir={tmp_path / 'shared'}", cwd=tmp_path,
                   env={"RAY_ADDRESS": "", "UNETLAB_TRACKING_TIMEOUT": "1"})
    assert "cannot start or reach Ray" in one_line_error(proc)
    assert not (tmp_path / "shared").exists()
