"""``unetlab run`` end to end: MLflow runs, statuses, artifacts, failures, determinism, resume, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unetlab.runs.execution import usable_cores

from conftest import run_cli

TINY = """
name: tiny
data:
  dataset: {name: shapes, image_size: 32, n_train: 24, n_val: 8, seed: 3}
  batch_size: 8
model:
  encoder: {name: classic, depth: 2, base_channels: 4}
train:
  epochs: EPOCHS
  lr: 0.01
  device: cpu  # these tests mean the CPU (exact resume, params["device"]); on a GPU machine too
  loss: bce_iou
  metrics: [iou, dice]
tracking:
  uri: sqlite:///STORE
  checkpoint_dir: CKPT
  log_model: LOGMODEL
  figures: LOGMODEL
"""

KILLER = '''
import os, signal, unetlab

@unetlab.hookimpl
def on_epoch_end(run_name, epoch, metrics, tracker):
    tracker.log_metric("hook_epoch_seen", epoch, step=epoch)
    when = os.environ.get("KILL_AT")  # "run_name:epoch:SIGNAL"
    if when:
        name, at, sig = when.split(":")
        if run_name == name and epoch == int(at):
            os.kill(os.getpid(), getattr(signal, sig))
'''


def experiment(tmp_path: Path, epochs: int = 2, log_model: bool = False, extra: str = "", store: str = "mlflow.db",
               ckpt: str = "ckpt") -> Path:
    import yaml

    text = (TINY.replace("EPOCHS", str(epochs)).replace("STORE", str(tmp_path / store))
            .replace("CKPT", str(tmp_path / ckpt)).replace("LOGMODEL", str(log_model).lower()))
    config = merge(yaml.safe_load(text), yaml.safe_load(textwrap.dedent(extra)) or {})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge ``extra`` into ``base`` (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def client_for(tmp_path: Path, store: str = "mlflow.db"):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / store}")


def runs_of(client, name="tiny"):
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def history(client, run, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_end_to_end_two_variants_two_seeds(tmp_path):
    path = experiment(tmp_path, epochs=2, log_model=True, extra="""
        variants:
          concat: {model.fusion: concat}
          add: {model.fusion: add}
        seeds: [1, 2]
    """)
    proc = run_cli("run", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "concat/seed=1" in proc.stdout and "FINISHED" in proc.stdout
    client = client_for(tmp_path)
    parents, children = runs_of(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["add/seed=1", "add/seed=2", "concat/seed=1", "concat/seed=2"]
    import mlflow
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # models:/ URIs resolve against it
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["unetlab.variant"] == child.info.run_name.split("/")[0]
        params = child.data.params
        assert params["model.fusion.name"] == child.data.tags["unetlab.variant"]
        assert params["train.seed"] == child.info.run_name.split("=")[-1]
        assert int(params["model.num_params"]) > 0 and float(params["model.gflops_per_image"]) > 0
        assert params["device"] == "cpu" and "plugin.unetlab_std.fusions" in params
        for key in ("train_loss", "val_loss", "val_iou", "val_dice", "lr", "images_per_s", "epoch_time_s"):
            assert [s for s, _ in history(client, child, key)] == [1, 2], key
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "learning_curves.png", "predictions.png"} <= artifacts
        model = mlflow.pytorch.load_model(child.data.tags["unetlab.model_uri"])
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    # the best checkpoint is what got logged: its monitor equals the logged best
    child = children[0]
    best = max(v for _, v in history(client, child, "val_iou"))
    assert child.data.metrics["best_val_iou"] == pytest.approx(best)


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        path = experiment(folder, epochs=2, extra="data: {augment: [hflip, {name: elastic, alpha: 2.0}]}\n")
        assert run_cli("run", str(path), "--quiet", cwd=folder).returncode == 0
    (_, [a]), (_, [b]) = runs_of(client_for(first)), runs_of(client_for(second))
    for key in ("train_loss", "val_loss", "val_iou"):
        assert history(client_for(first), a, key) == history(client_for(second), b, key)


def test_nan_loss_fails_that_run_and_the_others_go_on(tmp_path):
    (tmp_path / "nan_loss.py").write_text(textwrap.dedent('''
        import torch, unetlab

        class NanAfter:
            """Returns NaN from the given step on."""
            def __init__(self, num_classes: int, after: int = 2):
                self.after, self.calls = after, 0
            def __call__(self, logits, target):
                self.calls += 1
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).float())
                return loss * float("nan") if self.calls > self.after else loss

        @unetlab.hookimpl
        def register_losses(register):
            register("nan_after", NanAfter)
    '''))
    path = experiment(tmp_path, epochs=2, extra="""
        plugins: [nan_loss.py]
        variants:
          broken: {train.loss: {name: nan_after, after: 1}}
          fine: {}
    """)
    proc = run_cli("run", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "1 run(s) FAILED" in proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("broken/"))
    assert "FAILED" in line and "loss became nan" in line
    parents, children = runs_of(client_for(tmp_path))
    status = {c.info.run_name: c.info.status for c in children}
    assert status == {"broken/seed=0": "FAILED", "fine/seed=0": "FINISHED"}
    broken = next(c for c in children if c.info.run_name == "broken/seed=0")
    assert "loss became nan" in broken.data.tags["unetlab.error"]
    assert parents[0].info.status == "FAILED"


def _killed_then_resumed(tmp_path: Path, sig: str, expected_rc: int, env: dict | None = None):
    (tmp_path / "killer.py").write_text(KILLER)
    path = experiment(tmp_path, epochs=4, extra="plugins: [killer.py]\nseeds: [5]\n")
    proc = run_cli("run", str(path), "--quiet", cwd=tmp_path, env={"KILL_AT": f"base/seed=5:2:{sig}", **(env or {})})
    assert proc.returncode == expected_rc, (proc.returncode, proc.stderr)
    return path, proc


@pytest.mark.slow
def test_kill_then_resume_matches_an_uninterrupted_run(tmp_path):
    path, _ = _killed_then_resumed(tmp_path, "SIGKILL", -signal.SIGKILL)
    assert (tmp_path / "ckpt").exists()
    client = client_for(tmp_path)
    _, [child] = runs_of(client)
    assert child.info.status == "RUNNING"  # SIGKILL cannot be handled; --resume picks it up
    proc = run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, children = runs_of(client)
    assert len(children) == 1 and children[0].info.run_id == child.info.run_id  # the same MLflow run
    assert children[0].info.status == "FINISHED"
    resumed = {k: history(client, children[0], k)[-1] for k in ("val_iou", "val_loss", "train_loss")}
    assert history(client, children[0], "val_iou")[-1][0] == 4

    reference = tmp_path / "ref"
    reference.mkdir()
    (reference / "killer.py").write_text(KILLER)
    ref_path = experiment(reference, epochs=4, extra="plugins: [killer.py]\nseeds: [5]\n")
    assert run_cli("run", str(ref_path), "--quiet", cwd=reference).returncode == 0
    _, [ref] = runs_of(client_for(reference))
    uninterrupted = {k: history(client_for(reference), ref, k)[-1] for k in ("val_iou", "val_loss", "train_loss")}
    assert resumed == uninterrupted

    # a second --resume skips the finished run
    proc = run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path)
    assert proc.returncode == 0 and "SKIPPED" in proc.stdout


@pytest.mark.parametrize("sig, rc", [("SIGINT", 128 + signal.SIGINT), ("SIGTERM", 128 + signal.SIGTERM)])
def test_interrupt_marks_killed_and_keeps_checkpoint(tmp_path, sig, rc):
    _, proc = _killed_then_resumed(tmp_path, sig, rc)
    assert "Traceback" not in proc.stderr and "--resume" in proc.stderr
    parents, [child] = runs_of(client_for(tmp_path))
    assert child.info.status == "KILLED" and parents[0].info.status == "KILLED"
    ckpts = list((tmp_path / "ckpt").rglob("last.pt"))
    assert len(ckpts) == 1
    import torch

    assert torch.load(ckpts[0], weights_only=True)["epoch"] == 1


def test_lifecycle_hook_logs_an_extra_metric(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    path = experiment(tmp_path, epochs=2, extra="plugins: [killer.py]\n")
    assert run_cli("run", str(path), "--quiet", cwd=tmp_path).returncode == 0
    client = client_for(tmp_path)
    _, [child] = runs_of(client)
    assert history(client, child, "hook_epoch_seen") == [(1, 1.0), (2, 2.0)]


VALID_MODEL = {"encoder": {"name": "classic", "depth": 2, "base_channels": 4, "padding": "valid", "norm": "none"},
               "block": {"name": "double_conv", "norm": "none"}, "upsampler": "transpose"}


def test_valid_padding_crops_targets(tmp_path):
    import torch

    import unetlab
    from unetlab.model.unet import crop_target

    # the target a valid-padding model's logits are scored against is the masks' centre, cut by hand here
    logits = unetlab.build_model(VALID_MODEL, 3, 2)(torch.zeros(2, 3, 44, 44))
    height, width = logits.shape[-2:]
    assert height < 44 and width < 44  # valid padding shrank the output: there is something to crop
    masks = torch.arange(2 * 44 * 44).reshape(2, 44, 44)
    top, left = (44 - height) // 2, (44 - width) // 2
    assert torch.equal(crop_target(masks, logits), masks[:, top:top + height, left:left + width])

    path = experiment(tmp_path, epochs=1, extra="""
        data: {dataset: {name: blobs, image_size: 44, n_train: 8, n_val: 4}, batch_size: 4}
        model:
          encoder: {name: classic, depth: 2, base_channels: 4, padding: valid, norm: none}
          block: {name: double_conv, norm: none}
          upsampler: transpose
          out_channels: 2
        train: {loss: cross_entropy}
    """)
    proc = run_cli("run", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, [child] = runs_of(client_for(tmp_path))
    assert child.info.status == "FINISHED"


def test_bad_input_writes_nothing(tmp_path):
    path = experiment(tmp_path, epochs=1, extra="train: {monitor: val_iuo}\n")
    proc = run_cli("run", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.monitor: 'val_iuo' is not logged by this run; did you mean 'val_iou'?" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ckpt").exists()


def test_jsonl_output(tmp_path):
    path = experiment(tmp_path, epochs=2)
    proc = run_cli("run", str(path), "--jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "run_start", "epoch", "epoch", "run_end", "end"]
    assert events[3]["epoch"] == 2 and "val_iou" in events[3]
    assert events[4]["status"] == "FINISHED"


@pytest.mark.slow
def test_against_a_real_mlflow_server(tmp_path):
    from conftest import free_port, wait_for_http

    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
        uri = f"http://127.0.0.1:{port}"
        path = experiment(tmp_path, epochs=1, log_model=True)
        proc = run_cli("run", str(path), "--quiet", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
        assert proc.returncode == 0, proc.stderr
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        parents, [child] = runs_of(client)
        assert child.info.status == "FINISHED" and parents[0].info.status == "FINISHED"
        assert history(client, child, "val_iou")[0][0] == 1
        assert "config.yaml" in {a.path for a in client.list_artifacts(child.info.run_id)}
        assert not (tmp_path / "mlflow.db").exists()  # MLFLOW_TRACKING_URI won over tracking.uri
        proc = run_cli("compare", "tiny", "--tracking-uri", uri, "--format", "json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["rows"][0]["seeds"] == 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_jobs_trains_runs_in_parallel_processes_under_one_parent(tmp_path, monkeypatch):
    # no OMP_NUM_THREADS: before train.threads, --jobs 2 gave each run half the cores and a sequential run all
    # of them, and the numbers differed (pytest -n sets one, which would hide that)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    path = experiment(tmp_path, epochs=2, extra="""
        variants:
          concat: {model.fusion: concat}
          add: {model.fusion: add}
        seeds: [1, 2]
    """)
    proc = run_cli("run", str(path), "--jobs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("FINISHED") == 4
    # 2 runs x 2 threads need 4 cores: on fewer, one line says the runs go fewer at a time
    assert ("so 1 run(s) train at once" in proc.stderr) == (usable_cores() < 4), proc.stderr
    parents, children = runs_of(client_for(tmp_path))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["add/seed=1", "add/seed=2", "concat/seed=1", "concat/seed=2"]
    assert all(c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for c in children)
    # parallel runs give the same numbers as sequential ones
    sequential = tmp_path / "seq"
    sequential.mkdir()
    seq_path = experiment(sequential, epochs=2, extra="""
        variants:
          concat: {model.fusion: concat}
          add: {model.fusion: add}
        seeds: [1, 2]
    """)
    # a run's thread count is its train.threads (default 2) however it is scheduled: --jobs reserves it
    assert all(c.data.params["train.threads"] == c.data.params["torch.threads"] == "2" for c in children)
    assert run_cli("run", str(seq_path), "--quiet", cwd=sequential).returncode == 0
    _, seq_children = runs_of(client_for(sequential))
    by_name = {c.info.run_name: c for c in seq_children}
    for child in children:
        for key in ("val_iou", "val_dice", "val_loss", "train_loss"):
            assert child.data.metrics[key] == by_name[child.info.run_name].data.metrics[key], (child.info.run_name, key)


def test_an_error_after_training_marks_the_run_failed_not_running(tmp_path):
    (tmp_path / "bad_end.py").write_text(textwrap.dedent('''
        import unetlab

        @unetlab.hookimpl
        def on_run_end(run_name, status):
            if run_name.startswith("first/") and status == "FINISHED":
                raise RuntimeError("on_run_end exploded")
    '''))
    path = experiment(tmp_path, epochs=1, extra="""
        plugins: [bad_end.py]
        variants: {first: {}, second: {model.fusion: add}}
    """)
    proc = run_cli("run", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "on_run_end exploded" in proc.stdout
    parents, children = runs_of(client_for(tmp_path))
    assert {c.info.run_name: c.info.status for c in children} == {"first/seed=0": "FAILED",
                                                                  "second/seed=0": "FINISHED"}
    assert parents[0].info.status == "FAILED"
    failed = next(c for c in children if c.info.run_name == "first/seed=0")
    assert "error.txt" in {a.path for a in client_for(tmp_path).list_artifacts(failed.info.run_id)}


def test_only_runs_the_named_runs(tmp_path):
    path = experiment(tmp_path, epochs=1, extra="variants: {concat: {}, add: {model.fusion: add}}\n")
    proc = run_cli("run", str(path), "--quiet", "--only", "add/", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, children = runs_of(client_for(tmp_path))
    assert [c.info.run_name for c in children] == ["add/seed=0"]
    line = run_cli("run", str(path), "--only", "nope", cwd=tmp_path).stderr
    assert "--only nope: matches no run (runs: concat/seed=0, add/seed=0)" in line


# --- faults: settings that cannot train here, signals, kills, corrupt checkpoints ------------------------

CONTROL = KILLER + '''
from pathlib import Path

@unetlab.hookimpl
def on_run_start(run_name):
    if "MARKER_DIR" in os.environ:  # tells the test that this run trains now (its MLflow run exists)
        Path(os.environ["MARKER_DIR"], run_name.replace("/", "_")).write_text(str(os.getpid()))
    if os.environ.get("KILL_AT_START") == run_name:  # killed in epoch 1, before any checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
'''


def _wait_for(predicate, process, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("setting, message", [
    ("train.amp=fp16", "train.amp: fp16 needs a CUDA device"),
    ("train.sync_batchnorm=true", "train.sync_batchnorm: true needs CUDA and several processes"),
    ("train.device=cuda:7", "train.device: 'cuda:7' asked for"),
])
def test_settings_that_cannot_train_here_are_one_line_before_any_mlflow_run(tmp_path, capsys, setting, message):
    from unetlab.cli.main import main

    path = experiment(tmp_path, epochs=1)
    assert main(["run", str(path), "--quiet", "--set", "train.device=cpu", "--set", setting]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unetlab: error: ") and message in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists()  # no store, so no run in it


def test_more_processes_per_node_than_gpus_is_one_line_naming_both(tmp_path, capsys, monkeypatch):
    import torch

    from unetlab.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = experiment(tmp_path, epochs=1)
    args = ["run", str(path), "--nproc-per-node", "2", "--set", "train.device=cuda", "--set", "train.amp=bf16"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--nproc-per-node 2: only 1 CUDA device(s) are visible" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_sigterm_under_jobs_reaches_every_worker_and_leaves_nothing_running(tmp_path):
    psutil = pytest.importorskip("psutil")
    (tmp_path / "control.py").write_text(CONTROL)
    # 1 thread per run: --jobs 2 reserves train.threads cores per run, and 2 runs must train at once on 2 cores
    path = experiment(tmp_path, epochs=500, extra="plugins: [control.py]\nseeds: [1, 2, 3]\ntrain: {threads: 1}\n")
    proc = subprocess.Popen([sys.executable, "-m", "unetlab", "run", str(path), "--jobs", "2", "--quiet"], cwd=tmp_path,
                            env={**os.environ, "MARKER_DIR": str(tmp_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list(tmp_path.glob("base_seed=*"))) == 2, proc)  # two workers train, one run waits
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    import time

    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # a second signal soon after the first must not break off the cleanup
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    parents, children = runs_of(client_for(tmp_path))
    assert [p.info.status for p in parents] == ["KILLED"]
    assert len(children) == 2 and {c.info.status for c in children} == {"KILLED"}  # the third never started
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, alive


@pytest.mark.slow
def test_sigkill_then_resume_reuses_the_run_and_a_corrupt_checkpoint_restarts_it(tmp_path):
    (tmp_path / "control.py").write_text(CONTROL)
    path = experiment(tmp_path, epochs=3, extra="plugins: [control.py]\nseeds: [5]\n")
    killed = run_cli("run", str(path), "--quiet", cwd=tmp_path, env={"KILL_AT_START": "base/seed=5"})
    assert killed.returncode == -signal.SIGKILL
    client = client_for(tmp_path)
    _, [child] = runs_of(client)
    assert child.info.status == "RUNNING" and child.data.tags["unetlab.owner.pid"].isdigit()
    # --resume: the owner is gone, so the run is KILLED and then continued, in the same MLflow run
    killed = run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path, env={"KILL_AT": "base/seed=5:2:SIGKILL"})
    assert killed.returncode == -signal.SIGKILL
    parents, children = runs_of(client)
    assert len(parents) == 1 and [c.info.run_id for c in children] == [child.info.run_id]
    [last] = (tmp_path / "ckpt").rglob("last.pt")  # epoch 1's
    last.write_bytes(last.read_bytes()[:100])  # truncated
    proc = run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "moved aside" in line]) == 1, proc.stderr
    assert len(list(last.parent.glob("last.pt.corrupt-*"))) == 1
    parents, children = runs_of(client)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert [(c.info.run_id, c.info.status) for c in children] == [(child.info.run_id, "FINISHED")]
    assert [step for step, _ in history(client, children[0], "val_iou")][-1] == 3
