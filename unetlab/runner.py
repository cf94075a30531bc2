"""``unetlab run``: check every run first, then train each into MLflow with an explicit final status.

Order of work, so that bad input leaves nothing behind and a crash never leaves a run RUNNING:

1. load and validate the experiment; build every run's dataset and model size check (no MLflow yet);
2. create the MLflow experiment and one parent run for this invocation (or reopen it for --resume);
3. per run: a nested MLflow run, training, then FINISHED / FAILED; Ctrl-C or SIGTERM marks the
   current run and the parent KILLED and keeps the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import build_source, model_io
from .errors import ConfigError, UnetlabError, did_you_mean, exception_text
from .experiment import Experiment, Run, load_experiment
from .plugins import PluginHost, default_host
from .report import Reporter
from .tracking import Tracker, git_commit, resolve_tracking_uri

__all__ = ["run_experiment", "config_hash"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: stop the current run, mark it KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def config_hash(config: dict) -> str:
    """A stable hash of a resolved config: the identity of a run for --resume and checkpoints."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Prepared:
    """A run checked and ready to train: its data source, channels, size and cost."""

    run: Run
    source: Any
    in_channels: int
    out_channels: int
    num_classes: int
    params: int
    gflops: float
    key: str


def _monitor_keys(run: Run, num_classes: int, registry) -> list[str]:
    from .trainer import build_metrics

    keys = ["train_loss", "val_loss"]
    for metric in build_metrics(run.config["train"], num_classes, registry):
        keys += [f"val_{k}" for k in metric.compute()]
    return keys


def prepare(run: Run, registry) -> Prepared:
    """Everything that can be checked before training: data, channels, sizes, the monitored metric."""
    from .model import build_unet, count_parameters, forward_flops, output_shape

    try:
        source = build_source(run.config, registry)
        for split in ("train", "val"):  # data problems (bad masks, sizes) surface now, before MLflow
            source.split(split)
        in_ch, out_ch, num_classes = model_io(run.config, source)
        model = build_unet(run.config["model"], in_ch, out_ch, registry)
        size = getattr(source, "image_size", None) or (64, 64)
        for spec in run.config["data"]["augment"]:  # a random crop changes the training size
            if spec["name"] == "crop":
                size = (spec["size"], spec["size"])
        output_shape(model, in_ch, *size)
        gflops = forward_flops(model, in_ch, *size) / 1e9
        keys = _monitor_keys(run, num_classes, registry)
    except UnetlabError as exc:
        raise UnetlabError(f"run '{run.name}': {exc}") from None
    monitor = run.config["train"]["monitor"]
    if monitor not in keys:
        raise ConfigError(f"run '{run.name}': train.monitor: '{monitor}' is not logged by this run"
                          f"{did_you_mean(monitor, keys)} (logged: {', '.join(keys)})")
    return Prepared(run, source, in_ch, out_ch, num_classes, count_parameters(model), gflops,
                    f"{run.name}@{config_hash(run.config)}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)


def checkpoint_dir(experiment: Experiment, run: Run) -> Path:
    """Where a run's last/best checkpoints live: keyed by its config, so --resume finds them."""
    return (Path(run.config["tracking"]["checkpoint_dir"]) / _safe(experiment.name) /
            f"{_safe(run.name)}-{config_hash(run.config)[:12]}")


def _versions(host: PluginHost) -> dict[str, str]:
    return {f"plugin.{info.name}": f"{info.distribution or 'local'} {info.version or ''}".strip()
            for info in host.plugins.values() if not info.broken}


def run_experiment(path: str | Path, overrides: Sequence[str] = (), resume: bool = False, output: str = "bar",
                   only: Sequence[str] = (), jobs: int = 1, parent_run_id: str | None = None,
                   exact: Sequence[str] = ()) -> int:
    """Train every run of an experiment file; return the exit code (0 all finished, 1 any failed, 130 killed).

    ``jobs > 1`` trains independent runs in that many processes (one GPU each when there are several),
    all under one parent run. ``parent_run_id`` and ``exact`` are how those worker processes are told
    which parent to log under and which run to train.
    """
    from . import distributed
    from .trainer import pick_device

    ctx = distributed.current()
    if ctx.enabled and jobs > 1:
        raise UnetlabError("--jobs and several processes per run (--nproc-per-node, torchrun) do not combine")
    if not ctx.is_main:
        output = "silent"
    host = default_host()
    experiment = load_experiment(path, overrides, host=host)
    for info in host.broken() if ctx.is_main else []:
        print(f"unetlab: warning: {info.error} (skipped; see 'unetlab plugins')", file=sys.stderr)
    runs = [r for r in experiment.runs if (not only or any(r.name.startswith(o) for o in only))
            and (not exact or r.name in exact)]
    if not runs:
        raise UnetlabError(f"--only {' '.join(only)}: matches no run (runs: {', '.join(r.name for r in experiment.runs)})")
    uris = {r.config["tracking"]["uri"] for r in runs}
    if len(uris) > 1:
        raise ConfigError("tracking.uri: every run of one invocation must log to the same store; set it in the base "
                          "config, not in variants or the matrix")
    for run in runs:
        pick_device(run.config["train"]["device"])
    prepared = [prepare(r, host.registry) for r in runs]  # bad input stops here: nothing written yet
    distributed.init(ctx)
    try:
        return _run_all(path, overrides, resume, output, jobs, parent_run_id, experiment, runs, prepared, host, ctx)
    finally:
        distributed.shutdown(ctx)


def _run_all(path, overrides, resume: bool, output: str, jobs: int, parent_run_id: str | None,
             experiment: Experiment, runs: list[Run], prepared: list[Prepared], host: PluginHost, ctx) -> int:
    """Everything after the checks: MLflow (rank 0 only), then each run."""
    from . import __version__
    from .trainer import mark_finished

    reporter = Reporter(output, runs[0].config["train"]["monitor"])
    if not ctx.is_main:
        return _run_worker_rank(path, resume, experiment, prepared, host, ctx, reporter)
    tracker = Tracker(experiment.name, resolve_tracking_uri(runs[0].config["tracking"]["uri"]))
    invocation = hashlib.sha256("\n".join(p.key for p in prepared).encode()).hexdigest()[:16]
    commit = git_commit(Path(path).resolve())
    base_tags = {"unetlab.experiment_file": str(Path(path).resolve()), "unetlab.invocation": invocation,
                 "unetlab.version": __version__, **({"mlflow.source.git.commit": commit} if commit else {})}
    parent_id = parent_run_id
    if parent_id is not None:  # a worker of --jobs: the parent belongs to the process that started us
        tracker.parent_id = parent_id
    elif resume:
        parents = [r for r in tracker.find_runs("unetlab.invocation", invocation) if r.data.tags.get("unetlab.parent")]
        if parents:
            parent_id = parents[0].info.run_id
            tracker.parent_id = parent_id
            tracker.reopen(parent_id)
    if parent_id is None:
        parent_id = tracker.start_parent(f"{experiment.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                         {**base_tags, "unetlab.parent": "true"}, experiment.description)
        tracker.client.log_text(parent_id, Path(path).read_text(encoding="utf-8"), "experiment.yaml")
    if parent_run_id is None:
        reporter.info(f"{experiment.name}: {len(prepared)} run(s), tracking at {tracker.uri} "
                      f"(experiment '{experiment.name}', parent run {parent_id})")
    if jobs > 1 and len(prepared) > 1:
        return _run_parallel(path, overrides, resume, prepared, jobs, tracker, parent_id, reporter)
    reporter.emit("start", experiment=experiment.name, runs=len(prepared), tracking_uri=tracker.uri,
                  parent_run_id=parent_id)

    def on_signal(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_signal)
    failed, current = 0, None
    try:
        for index, prep in enumerate(prepared, 1):
            run = prep.run
            ckpt_dir = checkpoint_dir(experiment, run)
            state, child = None, None
            found = tracker.find_runs("unetlab.run_key", prep.key) if resume else []
            skip = bool(found) and found[0].info.status == "FINISHED"
            resumed = bool(found) and not skip and (ckpt_dir / "last.pt").exists()
            ctx.broadcast({"skip": skip, "resume": resumed})  # the other ranks follow rank 0's plan
            if resume:
                if skip:
                    reporter.run_end(run.name, "SKIPPED", {}, "finished in an earlier invocation")
                    continue
                if resumed:
                    from .checkpoint import load_checkpoint

                    state = load_checkpoint(ckpt_dir / "last.pt")
                    child = tracker.child(found[0].info.run_id)
                    tracker.reopen(child.run_id)
            if child is None:  # a fresh start: old checkpoints of the same config must not leak in
                for stale in ("last.pt", "best.pt"):
                    (ckpt_dir / stale).unlink(missing_ok=True)
                child = _start_child(tracker, prep, base_tags, host)
            current = child
            reporter.run_start(run.name, run.config["train"]["epochs"], index, len(prepared))
            try:
                status, message, summary = _train_one(prep, host, child, ckpt_dir, state, reporter, ctx)
            except Exception as exc:  # after training: logging the model, figures, a plugin's on_run_end...
                text = exception_text(exc)
                child.set_tags({"unetlab.error": text})
                child.log_text(traceback.format_exc(), "error.txt")
                status, message, summary = "FAILED", text + " (traceback in the run's error.txt artifact)", {}
            if status == "FINISHED":
                mark_finished(ckpt_dir)
            else:
                failed += 1
            tracker.end(child.run_id, status)
            current = None
            reporter.run_end(run.name, status, summary, message)
        if parent_run_id is None:
            tracker.end(parent_id, "FAILED" if failed else "FINISHED")
    except KeyboardInterrupt as exc:
        if current is not None:
            current.set_tags({"unetlab.status_reason": "interrupted"})
            tracker.end(current.run_id, "KILLED")
        if parent_run_id is None:
            tracker.end(parent_id, "KILLED")
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"unetlab: interrupted; run(s) marked KILLED, last checkpoints kept: resume with "
              f"'unetlab run {path} --resume'", file=sys.stderr)
        return 128 + int(signum)
    finally:
        signal.signal(signal.SIGTERM, previous)
    reporter.emit("end", failed=failed, parent_run_id=parent_id)
    if failed:
        print(f"unetlab: {failed} run(s) FAILED (see above and the runs' 'unetlab.error' tag)", file=sys.stderr)
    return 1 if failed else 0


def _run_parallel(path, overrides, resume: bool, prepared: list[Prepared], jobs: int, tracker: Tracker,
                  parent_id: str, reporter: Reporter) -> int:
    """Train runs in up to ``jobs`` worker processes under one parent run; one GPU per job when there are several."""
    import os
    import subprocess

    import torch

    gpus = torch.cuda.device_count()
    pending = [p.run.name for p in prepared]
    active: dict[subprocess.Popen, str] = {}
    codes: dict[str, int] = {}
    slot = 0
    try:
        while pending or active:
            while pending and len(active) < jobs:
                name = pending.pop(0)
                env = dict(os.environ)
                if gpus > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                slot += 1
                command = [sys.executable, "-m", "unetlab", "run", str(path), "--quiet", "--parent-run-id", parent_id,
                           "--run-name", name, *[a for s in overrides for a in ("--set", s)]]
                if resume:
                    command.append("--resume")
                active[subprocess.Popen(command, env=env)] = name
            time.sleep(0.2)
            for proc in [p for p in active if p.poll() is not None]:
                codes[active.pop(proc)] = proc.returncode
    except KeyboardInterrupt:
        for proc in active:  # each worker marks its own run KILLED on SIGTERM
            proc.terminate()
        for proc in active:
            proc.wait()
        tracker.end(parent_id, "KILLED")
        print("unetlab: interrupted; running jobs stopped and marked KILLED", file=sys.stderr)
        return 130
    failed = [n for n, c in codes.items() if c != 0]
    tracker.end(parent_id, "FAILED" if failed else "FINISHED")
    reporter.emit("end", failed=len(failed), parent_run_id=parent_id)
    if failed:
        print(f"unetlab: {len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _run_worker_rank(path, resume: bool, experiment: Experiment, prepared: list[Prepared], host: PluginHost, ctx,
                     reporter: Reporter) -> int:
    """Ranks > 0: train each run's shards as rank 0 decides; no MLflow, no checkpoints, no output."""
    from .checkpoint import load_checkpoint
    from .trainer import RunFailed, TrainSetup, train_run

    for prep in prepared:
        run = prep.run
        ckpt_dir = checkpoint_dir(experiment, run)
        plan = ctx.broadcast(None)
        if plan["skip"]:
            continue
        state = load_checkpoint(ckpt_dir / "last.pt") if plan["resume"] else None
        setup = TrainSetup(run_name=run.name, config=run.config, source=prep.source, in_channels=prep.in_channels,
                           out_channels=prep.out_channels, num_classes=prep.num_classes, registry=host.registry,
                           checkpoint_dir=ckpt_dir, resume=state, dist=ctx)
        try:
            train_run(setup)
        except RunFailed:
            pass  # rank 0 saw the same reduced loss and marks the run FAILED
    return 0


def _start_child(tracker: Tracker, prep: Prepared, base_tags: dict, host: PluginHost):
    """Create a run's nested MLflow run with its tags, params and resolved config."""
    import torch
    import yaml

    from . import __version__
    from .trainer import pick_device

    run = prep.run
    child = tracker.start_child(run.name, {
        **base_tags, "unetlab.run_key": prep.key, "unetlab.run_name": run.name, "unetlab.variant": run.variant,
        "unetlab.seed": str(run.seed), "unetlab.config_hash": config_hash(run.config),
        **{f"unetlab.matrix.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in run.matrix.items()}})
    child.log_params({**run.flat(), "model.num_params": prep.params, "model.gflops_per_image": f"{prep.gflops:.4f}",
                      "unetlab.version": __version__, "torch.version": torch.__version__,
                      "device": str(pick_device(run.config["train"]["device"])), "data.num_classes": prep.num_classes,
                      "model.in_channels_resolved": prep.in_channels,
                      "model.out_channels_resolved": prep.out_channels, **_versions(host),
                      "distributed.world_size": int(__import__("os").environ.get("WORLD_SIZE", 1))})
    child.log_text(yaml.safe_dump(run.config, sort_keys=False), "config.yaml")
    return child


def _train_one(prep: Prepared, host: PluginHost, child, ckpt_dir: Path, state, reporter: Reporter, ctx=None):
    """Train one run; return (status, message, summary). Errors become FAILED, interrupts propagate."""
    from .distributed import DistContext
    from .trainer import RunFailed, TrainSetup, train_run

    run = prep.run
    setup = TrainSetup(run_name=run.name, config=run.config, source=prep.source, in_channels=prep.in_channels,
                       out_channels=prep.out_channels, num_classes=prep.num_classes, registry=host.registry,
                       checkpoint_dir=ckpt_dir, tracker=child, on_progress=reporter.progress,
                       lifecycle=lambda hook, **kw: host.call_lifecycle(hook, **kw), resume=state,
                       dist=ctx or DistContext())
    monitor = run.config["train"]["monitor"]
    try:
        result = train_run(setup)
    except RunFailed as exc:
        child.set_tags({"unetlab.error": str(exc)})
        host.call_lifecycle("on_run_end", run_name=run.name, status="FAILED", metrics={}, model=None, tracker=child)
        return "FAILED", str(exc), {}
    except (UnetlabError, Exception) as exc:  # a plugin's bug must not stop the other variants
        text = exception_text(exc)
        child.set_tags({"unetlab.error": text})
        child.log_text(traceback.format_exc(), "error.txt")
        host.call_lifecycle("on_run_end", run_name=run.name, status="FAILED", metrics={}, model=None, tracker=child)
        return "FAILED", text + " (traceback in the run's error.txt artifact)", {}
    final_metrics = {"train_time_s": result.seconds}
    if result.best is not None:
        final_metrics[f"best_{monitor}"] = result.best
        final_metrics["best_epoch"] = result.best_epoch
    child.log_metrics(final_metrics, step=result.epochs)
    if run.config["tracking"]["figures"]:
        _log_figures(child, result, prep)
    if run.config["tracking"]["log_model"]:
        import torch

        from . import __version__

        uri = child.log_model(result.model.cpu(), [f"torch=={torch.__version__.split('+')[0]}",
                                                   f"unetlab=={__version__}"])
        child.set_tags({"unetlab.model_uri": uri})
    host.call_lifecycle("on_run_end", run_name=run.name, status="FINISHED", metrics=result.final,
                        model=result.model, tracker=child)
    summary = {"best": result.best, "best_epoch": result.best_epoch, "final_monitor": result.final.get(monitor),
               "epochs": result.epochs, "seconds": result.seconds}
    return "FINISHED", result.message, summary


def _log_figures(child, result, prep: Prepared) -> None:
    """Learning curves and image | truth | prediction for the first (fixed) validation images."""
    import matplotlib.pyplot as plt
    import torch

    from .figures import learning_curves, prediction_figure
    from .model import logits_to_classes
    from .trainer import crop_target, predict_logits

    figure = learning_curves(result.history, prep.run.config["train"]["monitor"])
    child.log_figure(figure, "learning_curves.png")
    plt.close(figure)
    val = prep.source.split("val")
    n = min(4, len(val))
    if not n:
        return
    images = torch.stack([val[i][0] for i in range(n)])
    masks = torch.stack([val[i][1] for i in range(n)])
    logits = predict_logits(result.model, images)
    figure = prediction_figure(images.numpy(), crop_target(masks, logits).numpy(),
                               logits_to_classes(logits).numpy(), prep.num_classes)
    child.log_figure(figure, "predictions.png")
    plt.close(figure)
