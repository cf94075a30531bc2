"""Distributed training on CPU (gloo): 2 processes vs 1 process of the same global batch; resume."""

from __future__ import annotations

import pytest

from conftest import run_cli
from test_run import KILLER, client_for, experiment, history, runs_of

DDP = """
data: {dataset: {name: blobs, image_size: 32, n_train: 32, n_val: 8}, batch_size: BATCH}
model: {encoder: {name: classic, depth: 2, base_channels: 4, norm: none}, block: {name: double_conv, norm: none}}
train: {loss: bce, metrics: [iou, dice], device: cpu}
"""

TOLERANCE = 1e-5  # float summation order differs between the all-reduce and one big batch


def ddp_experiment(tmp_path, batch: int, epochs: int = 3, extra: str = ""):
    return experiment(tmp_path, epochs=epochs, extra=DDP.replace("BATCH", str(batch)) + extra)


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir(), single_dir.mkdir()
    proc = run_cli("run", str(ddp_experiment(ddp_dir, 4)), "--nproc-per-node", "2", "--quiet", cwd=ddp_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("FINISHED") == 1  # one summary line: only rank 0 reports
    assert run_cli("run", str(ddp_experiment(single_dir, 8)), "--quiet", cwd=single_dir).returncode == 0
    parents, children = runs_of(client_for(ddp_dir))
    assert len(parents) == 1 and len(children) == 1  # exactly one MLflow run, logged by rank 0
    ddp_run = children[0]
    assert ddp_run.info.status == "FINISHED" and ddp_run.data.params["distributed.world_size"] == "2"
    _, [single_run] = runs_of(client_for(single_dir))
    for key in ("train_loss", "val_loss", "val_iou", "val_dice"):
        a, b = history(client_for(ddp_dir), ddp_run, key), history(client_for(single_dir), single_run, key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
        assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=TOLERANCE), key
    assert len(list((ddp_dir / "ckpt").rglob("last.pt"))) == 1  # one writer


@pytest.mark.slow
def test_resume_a_killed_distributed_run(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    path = ddp_experiment(tmp_path, 4, epochs=4, extra="plugins: [killer.py]\nseeds: [5]\n")
    proc = run_cli("run", str(path), "--nproc-per-node", "2", "--quiet", cwd=tmp_path,
                   env={"KILL_AT": "base/seed=5:2:SIGKILL"})
    assert proc.returncode != 0
    proc = run_cli("run", str(path), "--nproc-per-node", "2", "--quiet", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, children = runs_of(client_for(tmp_path))
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    resumed = history(client_for(tmp_path), children[0], "val_loss")[-1]

    reference = tmp_path / "ref"
    reference.mkdir()
    (reference / "killer.py").write_text(KILLER)
    ref_path = ddp_experiment(reference, 4, epochs=4, extra="plugins: [killer.py]\nseeds: [5]\n")
    assert run_cli("run", str(ref_path), "--nproc-per-node", "2", "--quiet", cwd=reference).returncode == 0
    _, [ref] = runs_of(client_for(reference))
    expected = history(client_for(reference), ref, "val_loss")[-1]
    assert resumed[0] == expected[0] == 4 and resumed[1] == pytest.approx(expected[1], abs=TOLERANCE)


def test_bad_file_with_nproc_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("trian: {}\n")
    proc = run_cli("run", "bad.yaml", "--nproc-per-node", "2", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "did you mean 'train'" in proc.stderr


@pytest.mark.slow
def test_sigterm_reaches_torchrun_and_its_ranks(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from test_run import CONTROL, _wait_for

    psutil = pytest.importorskip("psutil")
    (tmp_path / "control.py").write_text(CONTROL)
    path = ddp_experiment(tmp_path, 4, epochs=500, extra="plugins: [control.py]\n")
    proc = subprocess.Popen([sys.executable, "-m", "unetlab", "run", str(path), "--nproc-per-node", "2", "--quiet"],
                            cwd=tmp_path, env={**os.environ, "MARKER_DIR": str(tmp_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(tmp_path.glob("base_seed=*")), proc)  # rank 0 trains: the MLflow run exists
    family = psutil.Process(proc.pid).children(recursive=True)  # torchrun and both ranks
    assert len(family) >= 3, family
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err
    parents, [child] = runs_of(client_for(tmp_path))
    assert child.info.status == "KILLED" and [p.info.status for p in parents] == ["KILLED"]
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, alive
