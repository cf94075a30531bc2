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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unetlab.config.experiment import Experiment, Run
from unetlab.errors import UnetlabError, exception_text
from unetlab.plugin_api.host import PluginHost
from unetlab.runs.progress import Reporter
from unetlab.runs.worker_command import worker_run_args
from unetlab.tracking import tags as run_tags
from unetlab.training.distributed import DistContext
from unetlab.training.preflight import Prepared, config_hash

__all__ = ["Interrupted", "Invocation", "checkpoint_dir", "jobs_at_once", "run_parallel", "run_rank", "run_sequential",
           "run_torchrun", "signals_interrupt", "stop_processes", "torch_threads", "usable_cores",
           "warn_if_omp_threads_ignored"]


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
    claimed: dict[str, Any] = field(default_factory=dict)  # run id -> RunLock taken before the parent reopened
    # after each validation (epoch, step, record) -> why to stop early, or "": a tuning trial's pruner
    on_validation: Callable[[int, int, dict], str] | None = None


# A --jobs worker or a Ray retry may start while the process before it on the same run is still ending
# (marking it KILLED after SIGTERM): it waits this long for that one's folder lock.
CLAIM_WAIT_S = 60.0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)


def checkpoint_dir(experiment: Experiment, run: Run, run_id: str) -> Path:
    """Where a run's last/best checkpoints live: a folder of its own MLflow run (``run_id``), under one per
    config. Two runs of one config never share a file, so starting the same command twice cannot delete
    or overwrite the first one's checkpoints, and --resume finds the run's folder by its run id."""
    return (Path(run.settings.tracking.checkpoint_dir) / _safe(experiment.name) /
            f"{_safe(run.name)}-{config_hash(run.config)[:12]}" / _safe(run_id))


@contextlib.contextmanager
def torch_threads(threads: int):
    """While inside, torch computes with ``threads`` intra-op threads (a run's ``train.threads``); the count
    before is restored after, so a run trained through the API leaves the caller's setting as it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warn_if_omp_threads_ignored(threads: set[int]) -> None:
    """One line when ``OMP_NUM_THREADS`` is set to another count than the runs' ``train.threads``: it used
    to decide a run's thread count (and so its numbers on a CPU) and no longer does."""
    import os

    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value and {value} != {str(t) for t in threads}:
        print(f"unetlab: warning: OMP_NUM_THREADS={value} is ignored for training: each run uses its train.threads "
              f"({', '.join(str(t) for t in sorted(threads))}), which is part of its config (--set train.threads=N "
              "to change it)", file=sys.stderr)


@contextlib.contextmanager
def signals_interrupt():
    """While inside, SIGINT and SIGTERM raise ``Interrupted`` (the default SIGTERM would skip all cleanup).

    The first signal also ignores any later one until the block is left, so that a second Ctrl-C cannot
    break off the cleanup that marks runs KILLED.
    """
    def on_signal(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _end_quietly(tracker, run_id: str | None, status: str) -> None:
    """Set a final status when something has already gone wrong: a second failure must not hide the first."""
    if run_id is None:
        return
    with contextlib.suppress(Exception):  # the store may be what failed; the first error is the one to report
        tracker.end(run_id, status)


def _end_children_quietly(inv: Invocation, status: str, reason: str) -> None:
    """When this process owns the parent: end its children still RUNNING. This catches a run that a signal or
    an error hit after it was created and before ``run_sequential`` took charge of it (while its params,
    config or dataset were being logged, or while it was reopened)."""
    if inv.owns_parent and inv.parent_id is not None:
        with contextlib.suppress(Exception):  # the store may be what failed; the first error is the one to report
            inv.tracker.end_running_children(inv.parent_id, status, reason)


def _plugin_versions(host: PluginHost) -> dict[str, str]:
    return {f"plugin.{info.name}": f"{info.distribution or 'local'} {info.version or ''}".strip()
            for info in host.plugins.values() if not info.broken}


def run_sequential(inv: Invocation) -> int:
    """Train every prepared run here, one after another (rank 0 of a distributed job too)."""
    import os

    from unetlab.runs.resume_checks import CODE_DIGEST_TAG, code_digest
    from unetlab.tracking.run_ownership import RunBusy, claim_run_folder, owner_tags
    from unetlab.training.trainer import mark_finished

    tracker, reporter, ctx = inv.tracker, inv.reporter, inv.ctx
    reporter.emit("start", experiment=inv.experiment.name, runs=len(inv.prepared), tracking_uri=tracker.uri,
                  parent_run_id=inv.parent_id)
    extra_params = {**_plugin_versions(inv.host), "distributed.world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    code = code_digest(inv.host)  # of the local plugins' source: --resume refuses a run whose code changed
    failed, current, lock = 0, None, None
    with signals_interrupt():
        try:
            for index, prep in enumerate(inv.prepared, 1):
                run = prep.run
                found = tracker.find_runs(run_tags.RUN_KEY, prep.key) if inv.resume else []
                if found and found[0].info.status == "FINISHED":
                    ctx.broadcast({"skip": True, "resume": False})  # the other ranks follow rank 0's plan
                    reporter.run_end(run.name, "SKIPPED", {}, "finished in an earlier invocation")
                    continue
                if found:  # --resume continues in the same MLflow run, from its checkpoint or from the start
                    ckpt_dir = checkpoint_dir(inv.experiment, run, found[0].info.run_id)
                    try:  # before the run is touched: a second process resuming it at the same moment stops here
                        lock = _claim(inv, run.name, found[0], ckpt_dir)
                    except RunBusy as exc:  # not ours: nothing of it is touched, not even its status
                        ctx.broadcast({"skip": True, "resume": False})  # the other ranks skip it too
                        print(f"unetlab: error: {exc}", file=sys.stderr)
                        failed += 1
                        continue
                    child = current = tracker.child(found[0].info.run_id)  # in charge before it is RUNNING again
                    tracker.reopen(child.run_id)
                    child.set_tags(owner_tags())
                    for stale in (run_tags.STATUS_REASON, run_tags.ERROR):  # said of the attempt before
                        if stale in found[0].data.tags:
                            tracker.client.delete_tag(child.run_id, stale)
                    state = _resumable_state(ckpt_dir)
                else:
                    # torch.threads (= train.threads): the param runs of older versions logged their count in
                    threads = {"torch.threads": run.settings.train.threads}
                    tags = {**(inv.base_tags or {}), **owner_tags(), CODE_DIGEST_TAG: code}
                    child = current = tracker.start_prepared_run(prep, tags, {**extra_params, **threads})
                    ckpt_dir = checkpoint_dir(inv.experiment, run, child.run_id)
                    lock, state = claim_run_folder(ckpt_dir, run.name), None
                ctx.broadcast({"skip": False, "resume": state is not None, "dir": str(ckpt_dir)})
                if state is None:  # from epoch 1: what an earlier attempt of this run left must not leak in
                    for stale in ("last.pt", "best.pt"):
                        (ckpt_dir / stale).unlink(missing_ok=True)
                reporter.run_start(run.name, run.settings.train.epochs, index, len(inv.prepared))
                with torch_threads(run.settings.train.threads):
                    status, message, summary = _train_one(inv, prep, child, ckpt_dir, state)
                if status == "FINISHED":
                    mark_finished(ckpt_dir)
                else:
                    failed += 1
                current = None  # first: a signal while ending must not turn a FINISHED run KILLED (the sweep
                tracker.end(child.run_id, status)  # of the parent's RUNNING children catches it instead)
                lock.release()
                reporter.run_end(run.name, status, summary, message)
            if inv.owns_parent:
                tracker.end(inv.parent_id, "FAILED" if failed else "FINISHED")
        except KeyboardInterrupt as exc:
            tracker.fail_fast()
            if current is not None:
                with contextlib.suppress(Exception):  # a dead store must not stop the cleanup below
                    current.set_tags({run_tags.STATUS_REASON: "interrupted"})
                _end_quietly(tracker, current.run_id, "KILLED")
            _end_children_quietly(inv, "KILLED", "interrupted")
            if inv.owns_parent:
                _end_quietly(tracker, inv.parent_id, "KILLED")
            signum = getattr(exc, "signum", signal.SIGINT)
            print(f"unetlab: interrupted by {signal.Signals(signum).name}; run(s) marked KILLED, last checkpoints "
                  f"kept: resume with 'unetlab run {inv.path} --resume'", file=sys.stderr)
            return 128 + int(signum)
        except BaseException:  # the store went away, a checkpoint could not be written...: nothing left RUNNING
            tracker.fail_fast()
            _end_quietly(tracker, current.run_id if current is not None else None, "FAILED")
            _end_children_quietly(inv, "FAILED", "the invocation stopped on an error")
            if inv.owns_parent:
                _end_quietly(tracker, inv.parent_id, "FAILED")
            raise
        finally:
            for held in [lock, *inv.claimed.values()]:
                if held is not None:
                    held.release()
    reporter.emit("end", failed=failed, parent_run_id=inv.parent_id)
    if failed:
        print(f"unetlab: {failed} run(s) FAILED (see above and the runs' 'unetlab.error' tag)", file=sys.stderr)
    return 1 if failed else 0


def check_not_trained_elsewhere(name: str, run) -> None:
    """Refuse (``RunBusy``, one line naming the owner) to resume a run that a live process on this host is
    training: RUNNING, and its owner tags name a process that is still there."""
    from unetlab.tracking.run_ownership import RunBusy, describe_owner, live_owner_here

    if run.info.status == "RUNNING" and live_owner_here(run.data.tags):
        raise RunBusy(f"run '{name}' (MLflow run {run.info.run_id}) is being trained by "
                      f"{describe_owner(run.data.tags)}; not resuming it (wait for it, or stop it first)")


def _claim(inv: Invocation, name: str, run, ckpt_dir: Path):
    """The folder lock of a run to resume: taken already (``claim_resumed_runs``), or taken now. A ``--jobs``
    worker or a Ray retry waits a little for a predecessor on the same run that is still ending."""
    from unetlab.tracking.run_ownership import claim_run_folder

    held = inv.claimed.pop(run.info.run_id, None)
    if held is not None:
        return held
    worker = not inv.owns_parent
    if not worker:
        check_not_trained_elsewhere(name, run)
    return claim_run_folder(ckpt_dir, name, wait_s=CLAIM_WAIT_S if worker else 0.0)


def claim_resumed_runs(inv: Invocation, lock: bool) -> None:
    """For ``--resume``, before the parent run is reopened, refuse in one line a run to be continued that a
    live process trains, or whose data or local plugin code changed since (``resume_checks``); with ``lock``
    (this process trains them) take each such run's folder lock now (``inv.claimed``), so that of two
    ``--resume`` started together the second changes nothing. Says in one line when no run matched."""
    from unetlab.runs.resume_checks import check_unchanged, code_digest
    from unetlab.tracking.run_ownership import claim_run_folder

    code, unmatched = code_digest(inv.host), []
    for prep in inv.prepared:
        found = inv.tracker.find_runs(run_tags.RUN_KEY, prep.key)
        if not found:
            unmatched.append(prep.run.name)
        if not found or found[0].info.status == "FINISHED":
            continue
        check_not_trained_elsewhere(prep.run.name, found[0])
        check_unchanged(found[0], prep, inv.host, code)
        if lock:
            run_id = found[0].info.run_id
            try:
                inv.claimed[run_id] = claim_run_folder(checkpoint_dir(inv.experiment, prep.run, run_id),
                                                       prep.run.name)
            except BaseException:
                for held in inv.claimed.values():
                    held.release()
                inv.claimed.clear()
                raise
    if unmatched:
        which = "no run" if len(unmatched) == len(inv.prepared) else f"{len(unmatched)} of {len(inv.prepared)} runs"
        print(f"unetlab: --resume: {which} of {inv.path} matched an earlier run in experiment "
              f"'{inv.experiment.name}' at {inv.tracker.uri} (same name and config), so "
              f"{'they start' if len(unmatched) > 1 else 'it starts'} from epoch 1"
              f"{'' if len(unmatched) == len(inv.prepared) else ': ' + ', '.join(unmatched)}", file=sys.stderr)


def _resumable_state(ckpt_dir: Path) -> dict | None:
    """The 'last' checkpoint to resume from, or None to start from epoch 1: there is none yet, or it cannot
    be read (then it is moved aside, said in one line, and the run starts again)."""
    import os

    from unetlab.checkpoint import CheckpointError, load_checkpoint

    path = ckpt_dir / "last.pt"
    if not path.exists():
        return None
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        aside = path.with_name(f"last.pt.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        print(f"unetlab: warning: {exc}; moved aside to {aside}, the run starts again from epoch 1", file=sys.stderr)
        return None


def _failure(child, exc: Exception) -> str:
    """Record why ``child`` failed and return the line to show. A ``UnetlabError`` of its own (``no space left
    on device writing PATH``) is the whole story; one raised from another error (a plugin's bug) and any
    other error also get their traceback as error.txt."""
    text = exception_text(exc)
    if isinstance(exc, UnetlabError) and exc.__cause__ is None:
        child.record_failure(text)
        return text
    child.record_failure(text, traceback.format_exc())
    return text + " (traceback in the run's error.txt artifact)"


def _train_one(inv: Invocation, prep: Prepared, child, ckpt_dir: Path, state) -> tuple[str, str, dict]:
    """Train one run and log its outputs; return (status, message, summary). Any error makes the run FAILED
    (a plugin's bug must not stop the other runs); interrupts and a lost tracking server propagate."""
    from unetlab.tracking.store_client import TrackingUnavailable

    try:
        return _train_and_log(inv, prep, child, ckpt_dir, state)
    except TrackingUnavailable:
        raise  # not this run's failure, and nothing can be recorded: the invocation stops, --resume continues
    except Exception as exc:  # noqa: BLE001 -- in training, or after it: logging the model, figures, a plugin's on_run_end...
        return "FAILED", _failure(child, exc), {}


def _train_and_log(inv: Invocation, prep: Prepared, child, ckpt_dir: Path, state) -> tuple[str, str, dict]:
    from unetlab.runs.run_outputs import log_run_outputs, run_summary
    from unetlab.tracking.store_client import TrackingUnavailable
    from unetlab.training.determinism import report_nondeterministic_ops
    from unetlab.training.trainer import RunFailed, TrainSetup, train_run

    run, host = prep.run, inv.host
    setup = TrainSetup(prepared=prep, registry=host.registry, checkpoint_dir=ckpt_dir, tracker=child,
                       on_progress=inv.reporter.progress, lifecycle=host.call_lifecycle, resume=state, dist=inv.ctx,
                       stop_check=inv.on_validation)
    monitor = None
    if prep.runtime.system_metrics:  # CPU/GPU utilisation and memory in the run's system/ metrics
        from unetlab.training.system_metrics import start_system_metrics

        monitor = start_system_metrics(child.run_id, tracking_uri=child.tracker.uri)
    try:
        with report_nondeterministic_ops():  # an op without a deterministic kernel: one line, once
            result = train_run(setup)
    except TrackingUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 -- any error in training fails this run only
        if isinstance(exc, RunFailed):
            failure = str(exc)
            child.record_failure(failure)
        else:
            failure = _failure(child, exc)
        host.call_lifecycle("on_run_end", run_name=run.name, status="FAILED", metrics={}, model=None, tracker=child)
        return "FAILED", failure, {}
    finally:
        if monitor is not None:
            monitor.finish()
    log_run_outputs(child, result, prep, host.registry)
    host.call_lifecycle("on_run_end", run_name=run.name, status="FINISHED", metrics=result.final,
                        model=result.model, tracker=child)
    return "FINISHED", result.message, run_summary(result, run.settings.train.monitor)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, else all of the machine's)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def jobs_at_once(jobs: int, threads: list[int], cores: int) -> int:
    """How many of the runs (``threads``: each one's ``train.threads``, in start order) ``--jobs N`` trains at
    once when each reserves as many cores as it has threads: at most N, at least one."""
    running, free = 0, cores
    for need in threads[:jobs]:
        if running and need > free:
            break
        running, free = running + 1, free - need
    return max(1, running)


def _serialising_note(jobs: int, threads: list[int], cores: int) -> str | None:
    """The line that says ``--jobs N`` trains fewer runs at once than asked, and why; None when it does not."""
    wanted = min(jobs, len(threads))
    fits = jobs_at_once(jobs, threads, cores)
    if fits >= wanted:
        return None
    per_run = "/".join(str(t) for t in sorted(set(threads)))
    return (f"unetlab: --jobs {jobs}: each run reserves its train.threads ({per_run}) of this machine's {cores} "
            f"core(s), so {fits} run(s) train at once; a smaller train.threads trains more at once (and changes "
            "the numbers on a CPU)")


def run_parallel(inv: Invocation, jobs: int) -> int:
    """Train runs in up to ``jobs`` worker processes under one parent run; one GPU per job when there are several.

    Each run reserves as many cores as its ``train.threads``: a run starts when that many are free (or when
    nothing else trains), so ``--jobs`` never changes a run's thread count, and so never its numbers.

    Signals: the handlers are in place before the first worker starts. Workers run in their own sessions
    (a terminal's Ctrl-C reaches only this process), and on SIGINT or SIGTERM each is sent SIGTERM once,
    marks its own run KILLED and exits; later runs never start; a worker that does not stop in time is
    killed, and any run it left RUNNING is marked KILLED here.
    """
    import os
    import subprocess

    import torch

    gpus = torch.cuda.device_count()
    pending = [(p.run.name, p.run.settings.train.threads) for p in inv.prepared]
    cores = usable_cores()
    note = _serialising_note(jobs, [t for _, t in pending], cores)
    if note:
        print(note, file=sys.stderr)
    active: dict[subprocess.Popen, tuple[str, int]] = {}
    codes: dict[str, int] = {}
    slot = 0
    with signals_interrupt():
        try:
            while pending or active:
                while pending and len(active) < jobs and (
                        not active or pending[0][1] <= cores - sum(t for _, t in active.values())):
                    name, threads = pending.pop(0)
                    env = dict(os.environ)
                    if gpus > 1:
                        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                    slot += 1
                    command = [sys.executable, *worker_run_args(inv.path, inv.overrides, resume=inv.resume,
                                                                output="quiet", parent_run_id=inv.parent_id,
                                                                run_name=name)]
                    active[subprocess.Popen(command, env=env, start_new_session=True)] = (name, threads)
                time.sleep(0.2)
                for proc in [p for p in active if p.poll() is not None]:
                    codes[active.pop(proc)[0]] = proc.returncode
        except KeyboardInterrupt as exc:
            signum = int(getattr(exc, "signum", signal.SIGINT))
            stop_processes(list(active))
            inv.tracker.fail_fast()
            try:
                inv.tracker.end_running_children(inv.parent_id, "KILLED", "interrupted")  # a worker killed first
            finally:
                _end_quietly(inv.tracker, inv.parent_id, "KILLED")
            print(f"unetlab: interrupted by {signal.Signals(signum).name}; running jobs stopped and marked KILLED, "
                  f"later runs not started: resume with 'unetlab run {inv.path} --resume'", file=sys.stderr)
            return 128 + signum
    failed = [n for n, c in codes.items() if c != 0]
    if inv.owns_parent:  # not for a batch of tuning trials: their parent (study) run is ended by the tuner
        # every worker has exited: a run still RUNNING is one a worker created and could not end (it crashed)
        inv.tracker.end_running_children(inv.parent_id, "FAILED", "its worker process exited without ending it")
        inv.tracker.end(inv.parent_id, "FAILED" if failed else "FINISHED")
    inv.reporter.emit("end", failed=len(failed), parent_run_id=inv.parent_id)
    if failed:
        print(f"unetlab: {len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def stop_processes(processes: list, grace: float = 60.0) -> None:
    """SIGTERM each process once, wait up to ``grace`` seconds in all, then SIGKILL whatever is left."""
    import subprocess

    for proc in processes:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in processes:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_rank(inv: Invocation) -> int:
    """Ranks > 0: train each run's shards as rank 0 decides; no MLflow, no checkpoints, no output."""
    from unetlab.checkpoint import load_checkpoint
    from unetlab.training.trainer import RunFailed, TrainSetup, train_run

    for prep in inv.prepared:
        plan = inv.ctx.broadcast(None)
        if plan["skip"]:
            continue
        ckpt_dir = Path(plan["dir"])  # rank 0's run folder (keyed by its MLflow run id)
        state = load_checkpoint(ckpt_dir / "last.pt") if plan["resume"] else None
        try:
            with torch_threads(prep.run.settings.train.threads):
                train_run(TrainSetup(prepared=prep, registry=inv.host.registry, checkpoint_dir=ckpt_dir,
                                     resume=state, dist=inv.ctx))
        except RunFailed:
            pass  # rank 0 saw the same reduced loss and marks the run FAILED
    return 0


def run_torchrun(command: list[str], env: dict[str, str], path: str) -> int:
    """Run ``torchrun`` (``--nproc-per-node``) and wait for it; SIGINT and SIGTERM are forwarded to it, and it
    stops its ranks (rank 0 marks the run KILLED). Returns torchrun's exit code, or 128 + the signal."""
    import subprocess

    received: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, frame):
        received.append(signum)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # its own session: a terminal's Ctrl-C reaches this process only, which tells torchrun once
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        if received:
            proc.send_signal(received[0])
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        print(f"unetlab: interrupted by {signal.Signals(received[0]).name}; the ranks were stopped and the run "
              f"marked KILLED: resume with 'unetlab run {path} --resume'", file=sys.stderr)
        return 128 + received[0]
    return code
