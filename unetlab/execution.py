"""Executing prepared runs, in one of three ways: one after another in this process, in a pool of
worker processes (``--jobs N``), or as a rank > 0 of a distributed job (``--nproc-per-node N``).
Whatever the way, each run ends FINISHED, FAILED or KILLED, and Ctrl-C or SIGTERM stops every run.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed import DistContext
from .errors import exception_text
from .experiment import Experiment, Run
from .plugins import PluginHost
from .preflight import Prepared, config_hash
from .report import Reporter

__all__ = ["Interrupted", "Invocation", "checkpoint_dir", "run_parallel", "run_rank", "run_sequential"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: stop the current run, mark it KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class Invocation:
    """One ``unetlab run``: the file, its prepared runs, and where they log."""

    path: Path
    overrides: tuple[str, ...]
    resume: bool
    experiment: Experiment
    prepared: list[Prepared]
    host: PluginHost
    ctx: DistContext
    reporter: Reporter
    tracker: Any = None          # tracking.Tracker (rank 0 only)
    parent_id: str | None = None
    owns_parent: bool = True     # False in a --jobs worker: the parent belongs to the process that started it
    base_tags: dict[str, str] | None = None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)


def checkpoint_dir(experiment: Experiment, run: Run) -> Path:
    """Where a run's last/best checkpoints live: keyed by its config, so --resume finds them."""
    return (Path(run.config["tracking"]["checkpoint_dir"]) / _safe(experiment.name) /
            f"{_safe(run.name)}-{config_hash(run.config)[:12]}")


@contextlib.contextmanager
def signals_interrupt():
    """While inside: SIGTERM raises ``Interrupted`` like Ctrl-C does (the default SIGTERM would skip cleanup)."""
    def on_signal(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _plugin_versions(host: PluginHost) -> dict[str, str]:
    return {f"plugin.{info.name}": f"{info.distribution or 'local'} {info.version or ''}".strip()
            for info in host.plugins.values() if not info.broken}


def run_sequential(inv: Invocation) -> int:
    """Train every prepared run here, one after another (rank 0 of a distributed job too)."""
    import os

    from .trainer import mark_finished

    tracker, reporter, ctx = inv.tracker, inv.reporter, inv.ctx
    reporter.emit("start", experiment=inv.experiment.name, runs=len(inv.prepared), tracking_uri=tracker.uri,
                  parent_run_id=inv.parent_id)
    extra_params = {**_plugin_versions(inv.host), "distributed.world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    failed, current = 0, None
    try:
        with signals_interrupt():
            for index, prep in enumerate(inv.prepared, 1):
                run = prep.run
                ckpt_dir = checkpoint_dir(inv.experiment, run)
                state, child = None, None
                found = tracker.find_runs("unetlab.run_key", prep.key) if inv.resume else []
                skip = bool(found) and found[0].info.status == "FINISHED"
                resumed = bool(found) and not skip and (ckpt_dir / "last.pt").exists()
                ctx.broadcast({"skip": skip, "resume": resumed})  # the other ranks follow rank 0's plan
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
                    child = tracker.start_prepared_run(prep, inv.base_tags or {}, extra_params)
                current = child
                reporter.run_start(run.name, run.config["train"]["epochs"], index, len(inv.prepared))
                status, message, summary = _train_one(inv, prep, child, ckpt_dir, state)
                if status == "FINISHED":
                    mark_finished(ckpt_dir)
                else:
                    failed += 1
                tracker.end(child.run_id, status)
                current = None
                reporter.run_end(run.name, status, summary, message)
            if inv.owns_parent:
                tracker.end(inv.parent_id, "FAILED" if failed else "FINISHED")
    except KeyboardInterrupt as exc:
        if current is not None:
            current.set_tags({"unetlab.status_reason": "interrupted"})
            tracker.end(current.run_id, "KILLED")
        if inv.owns_parent:
            tracker.end(inv.parent_id, "KILLED")
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"unetlab: interrupted; run(s) marked KILLED, last checkpoints kept: resume with "
              f"'unetlab run {inv.path} --resume'", file=sys.stderr)
        return 128 + int(signum)
    reporter.emit("end", failed=failed, parent_run_id=inv.parent_id)
    if failed:
        print(f"unetlab: {failed} run(s) FAILED (see above and the runs' 'unetlab.error' tag)", file=sys.stderr)
    return 1 if failed else 0


def _train_one(inv: Invocation, prep: Prepared, child, ckpt_dir: Path, state) -> tuple[str, str, dict]:
    """Train one run and log its outputs; return (status, message, summary). Any error makes the run FAILED
    (a plugin's bug must not stop the other runs); interrupts propagate."""
    try:
        return _train_and_log(inv, prep, child, ckpt_dir, state)
    except Exception as exc:  # noqa: BLE001 -- in training, or after it: logging the model, figures, a plugin's on_run_end...
        text = exception_text(exc)
        child.record_failure(text, traceback.format_exc())
        return "FAILED", text + " (traceback in the run's error.txt artifact)", {}


def _train_and_log(inv: Invocation, prep: Prepared, child, ckpt_dir: Path, state) -> tuple[str, str, dict]:
    from .run_outputs import log_run_outputs, run_summary
    from .trainer import RunFailed, TrainSetup, train_run

    run, host = prep.run, inv.host
    setup = TrainSetup(prepared=prep, registry=host.registry, checkpoint_dir=ckpt_dir, tracker=child,
                       on_progress=inv.reporter.progress, lifecycle=host.call_lifecycle, resume=state, dist=inv.ctx)
    try:
        result = train_run(setup)
    except Exception as exc:  # noqa: BLE001 -- any error in training fails this run only
        failure = str(exc) if isinstance(exc, RunFailed) else None
        if failure is None:
            failure = exception_text(exc) + " (traceback in the run's error.txt artifact)"
            child.record_failure(exception_text(exc), traceback.format_exc())
        else:
            child.record_failure(failure)
        host.call_lifecycle("on_run_end", run_name=run.name, status="FAILED", metrics={}, model=None, tracker=child)
        return "FAILED", failure, {}
    log_run_outputs(child, result, prep, host.registry)
    host.call_lifecycle("on_run_end", run_name=run.name, status="FINISHED", metrics=result.final,
                        model=result.model, tracker=child)
    return "FINISHED", result.message, run_summary(result, run.config["train"]["monitor"])


def run_parallel(inv: Invocation, jobs: int) -> int:
    """Train runs in up to ``jobs`` worker processes under one parent run; one GPU per job when there are several."""
    import os
    import subprocess

    import torch

    gpus = torch.cuda.device_count()
    pending = [p.run.name for p in inv.prepared]
    active: dict[subprocess.Popen, str] = {}
    codes: dict[str, int] = {}
    slot = 0
    try:
        with signals_interrupt():
            while pending or active:
                while pending and len(active) < jobs:
                    name = pending.pop(0)
                    env = dict(os.environ)
                    if gpus > 1:
                        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                    slot += 1
                    command = [sys.executable, "-m", "unetlab", "run", str(inv.path), "--quiet", "--parent-run-id",
                               inv.parent_id, "--run-name", name, *[a for s in inv.overrides for a in ("--set", s)]]
                    if inv.resume:
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
        inv.tracker.end(inv.parent_id, "KILLED")
        print("unetlab: interrupted; running jobs stopped and marked KILLED", file=sys.stderr)
        return 130
    failed = [n for n, c in codes.items() if c != 0]
    inv.tracker.end(inv.parent_id, "FAILED" if failed else "FINISHED")
    inv.reporter.emit("end", failed=len(failed), parent_run_id=inv.parent_id)
    if failed:
        print(f"unetlab: {len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_rank(inv: Invocation) -> int:
    """Ranks > 0: train each run's shards as rank 0 decides; no MLflow, no checkpoints, no output."""
    from .checkpoint import load_checkpoint
    from .trainer import RunFailed, TrainSetup, train_run

    for prep in inv.prepared:
        ckpt_dir = checkpoint_dir(inv.experiment, prep.run)
        plan = inv.ctx.broadcast(None)
        if plan["skip"]:
            continue
        state = load_checkpoint(ckpt_dir / "last.pt") if plan["resume"] else None
        try:
            train_run(TrainSetup(prepared=prep, registry=inv.host.registry, checkpoint_dir=ckpt_dir, resume=state,
                                 dist=inv.ctx))
        except RunFailed:
            pass  # rank 0 saw the same reduced loss and marks the run FAILED
    return 0
