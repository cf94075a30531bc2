"""A run's CPU thread count is part of its config (``train.threads``), never of how runs are scheduled:
``--jobs`` and ``--ray`` reserve that many cores per run, and ``OMP_NUM_THREADS`` no longer changes it."""

from __future__ import annotations

import pytest

from unetlab.runs.execution import jobs_at_once
from unetlab.runs.ray_runs import RayPlan, reservations

from conftest import one_line_error, run_cli
from test_run import client_for, experiment, runs_of


@pytest.mark.parametrize("jobs, threads, cores, expected", [
    (2, [2, 2, 2], 2, 1),     # each run needs both cores: one at a time
    (2, [1, 1, 1], 2, 2),
    (4, [2, 2, 2, 2], 8, 4),
    (4, [3, 3, 3], 8, 2),     # 3 + 3 fit in 8, a third does not
    (2, [16, 16], 4, 1),      # a run wider than the machine still trains, alone
    (3, [1], 8, 1),
])
def test_jobs_reserve_each_runs_threads(jobs, threads, cores, expected):
    assert jobs_at_once(jobs, threads, cores) == expected


def test_ray_tasks_reserve_each_runs_threads_capped_at_the_cluster():
    cpus, note = reservations(RayPlan(None), [2, 2, 2], 2.0)
    assert cpus == [2.0, 2.0, 2.0]
    assert note == "runs reserve 2 CPU(s) each (their train.threads) of the cluster's 2: Ray trains 1 at once"
    cpus, note = reservations(RayPlan(None), [1, 1], 4.0)
    assert cpus == [1.0, 1.0] and note is None
    cpus, _ = reservations(RayPlan(None), [8], 4.0)  # more than the cluster has would wait forever
    assert cpus == [4.0]
    cpus, note = reservations(RayPlan(None, cpus_per_run=0.5), [2, 2], 2.0)  # --ray-cpus reserves, threads stay
    assert cpus == [0.5, 0.5] and note is None


def test_train_threads_is_checked_like_every_key(tmp_path):
    path = experiment(tmp_path, epochs=1)
    line = one_line_error(run_cli("run", str(path), "--set", "train.threads=0", cwd=tmp_path))
    assert "train.threads" in line and "[1, 1024]" in line, line
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_omp_num_threads_no_longer_changes_a_run_and_says_so(tmp_path, monkeypatch):
    """The same config with and without OMP_NUM_THREADS=1 in the environment gives the same numbers (before,
    the variable set the thread count, which changes a CPU run's sums), and one line says it is ignored."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    results = []
    for folder, env in (("plain", {}), ("omp1", {"OMP_NUM_THREADS": "1"})):
        (tmp_path / folder).mkdir()
        path = experiment(tmp_path / folder, epochs=2)
        proc = run_cli("run", str(path), "--quiet", cwd=tmp_path / folder, env=env)
        assert proc.returncode == 0, proc.stderr
        warned = "OMP_NUM_THREADS=1 is ignored for training: each run uses its train.threads (2)" in proc.stderr
        assert warned == bool(env), proc.stderr
        _, [child] = runs_of(client_for(tmp_path / folder))
        assert child.data.params["train.threads"] == child.data.params["torch.threads"] == "2"
        results.append({k: child.data.metrics[k] for k in ("train_loss", "val_loss", "val_iou", "val_dice")})
    assert results[0] == results[1]
