"""``unetlab run FILE --ray [ADDRESS]``: an experiment's runs as Ray tasks, on one machine or a cluster.

The driver (this process) has already done what every ``unetlab run`` does first: load and check the
file, create the MLflow experiment and the parent run. Each resolved run then becomes one Ray task,
and that task trains through the very entry point a ``--jobs`` worker uses (``python -m unetlab run
FILE --run-name NAME --parent-run-id ID``) in a child process, so where a run trained never changes
its numbers.

Faults, in Ray's terms (see Ray's fault-tolerance guide):

- the worker process dies (killed, node lost): Ray retries the task (``max_retries``); the retry finds
  this run's MLflow run under the parent and continues it from its last checkpoint (``--resume``);
- the run fails for its own reasons (a non-finite loss, a plugin's bug): the child exits 1, the run
  is FAILED in MLflow, and the task returns normally, so Ray does not retry it;
- Ctrl-C / SIGTERM on the driver: every task is cancelled, each child is told to stop (its run
  becomes KILLED), and whatever is still RUNNING under the parent afterwards is marked KILLED.

Ray is an optional dependency (``pip install 'unetlab[ray]'``) and is imported only here.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from unetlab.errors import UnetlabError, exception_text
from unetlab.runs.worker_command import worker_run_args
from unetlab.tracking import tags as run_tags

if TYPE_CHECKING:
    from unetlab.runs.progress import Reporter
    from unetlab.tracking.run_tracker import Tracker

__all__ = ["RayPlan", "check_ray_settings", "connect", "die_with_ray_worker", "disconnect", "parse_address",
           "fitting_tasks", "reservations", "run_on_ray", "task_env", "tasks_at_once"]

INSTALL_HINT = "--ray needs Ray: pip install 'unetlab[ray]'"
# How long cancelled tasks get to mark their runs KILLED before they are force-cancelled.
CANCEL_GRACE_S = 20.0
# The driver's stop request, a tag of the parent run that every task reads (every CANCEL_POLL_S seconds):
# it reaches a task on any node through the store, whether or not Ray's own cancel gets through to the
# task (measured here: it often did not, and the run trained on until the grace period was over).
CANCEL_TAG, CANCEL_POLL_S = run_tags.RAY_CANCEL, 1.0


@dataclass(frozen=True)
class RayPlan:
    """Where and how the runs go: the cluster address (None: a local instance), the CPUs each task reserves
    (None: its run's ``train.threads``) and how often a task whose worker died is retried."""

    address: str | None
    cpus_per_run: float | None = None
    max_retries: int = 3


def parse_address(value: str | None) -> str | None:
    """``--ray`` alone means a local instance (None); otherwise ``auto`` or ``ray://host:port``."""
    if value in (None, "", "local"):
        return None
    if value == "auto" or value.startswith("ray://"):
        return value
    raise UnetlabError(f"--ray {value}: expected 'auto', 'ray://HOST:PORT' or nothing (a local Ray instance)")


def check_ray_settings(plan: RayPlan, tracking_uri: str | None, checkpoint_dirs: Sequence[str]) -> None:
    """Refuse, before anything is submitted, settings that cannot work across a cluster's nodes.

    With a cluster address every node must reach the same store and the same checkpoints: the
    tracking URI must be a server (``http(s)://``), and ``tracking.checkpoint_dir`` an absolute path
    (a shared folder mounted at the same place on every node).
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UnetlabError(INSTALL_HINT) from None
    if plan.cpus_per_run is not None and plan.cpus_per_run <= 0:
        raise UnetlabError(f"--ray-cpus must be > 0, got {plan.cpus_per_run:g}")
    if plan.address is None:
        return
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        raise UnetlabError(f"--ray {plan.address}: runs on other nodes cannot reach the local store "
                           f"'{tracking_uri or 'sqlite:///mlflow.db (MLflow default)'}'; start an MLflow tracking "
                           "server and set tracking.uri (or MLFLOW_TRACKING_URI) to its http:// address")
    for folder in sorted(set(checkpoint_dirs)):
        if not Path(folder).expanduser().is_absolute():
            raise UnetlabError(f"--ray {plan.address}: tracking.checkpoint_dir '{folder}' is a local relative path; "
                               "set it to a shared folder mounted at the same absolute path on every node")


def die_with_ray_worker() -> None:
    """In a run started by a Ray task: unblock SIGINT (which the task forwards when it is cancelled), and get
    SIGTERM when that Ray worker dies, so no trainer is orphaned.

    Called first thing by ``unetlab run`` when ``UNETLAB_RAY_WORKER_PID`` is set (not as a Popen
    ``preexec_fn``: Ray's workers are multi-threaded, where that is unsafe). Linux only; elsewhere a
    killed worker may leave its run to finish on its own.
    """
    import ctypes
    import signal

    worker = os.environ.get("UNETLAB_RAY_WORKER_PID")
    if not worker:
        return
    # Ray's worker blocks SIGINT in its threads and a child inherits the mask: unblocked, or the SIGINT a
    # cancelled task forwards would stay pending while the run trained on
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(worker):  # the worker died before the signal was armed
        raise SystemExit(143)


def _train_task(command: list[str], env: dict[str, str], tracking_uri: str | None, parent_id: str,
                run_key: str, cancel_token: str = "", runs_parent: str = "") -> dict:
    """Body of one Ray task: train one run in a child process (``--jsonl``); return its exit code and the
    ``run_end`` event it printed (``{"code": N, "run_end": {...} or None}``), which the driver prints as a
    sequential run's summary line.

    A retry (the previous worker died) finds this run's MLflow run under ``runs_parent`` (the parent, or a
    tuning trial's study run) and adds ``--resume``, which continues it from its last checkpoint in the same
    MLflow run.

    The child is polled, not waited for: ``ray.cancel`` interrupts this task between Python bytecodes
    (``_thread.interrupt_main``), which a blocking ``wait()`` would not see until the child ended on its own;
    and the parent run's ``CANCEL_TAG`` set to ``cancel_token`` (the driver's stop request) is read every
    ``CANCEL_POLL_S`` seconds. Either way the child gets SIGINT at once and marks its run KILLED.
    """
    import subprocess
    import threading

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    earlier = client.search_runs([parent.info.experiment_id], max_results=1, filter_string=(
        f"tags.`mlflow.parentRunId` = '{runs_parent or parent_id}' and tags.`{run_tags.RUN_KEY}` = '{run_key}'"))
    if earlier and "--resume" not in command:
        command = [*command, "--resume"]
    child_env = {**os.environ, **env}
    child_env["UNETLAB_RAY_WORKER_PID"] = str(os.getpid())
    child = subprocess.Popen([sys.executable, *command], env=child_env, stdout=subprocess.PIPE, text=True)
    events: list[dict] = []
    reader = threading.Thread(target=_read_events, args=(child.stdout, events), daemon=True)
    reader.start()
    def cancelled() -> bool:
        try:
            return bool(cancel_token) and client.get_run(parent_id).data.tags.get(CANCEL_TAG) == cancel_token
        except Exception:  # noqa: BLE001 -- a store that does not answer now: asked again next time
            return False

    try:
        code = _poll(child, cancelled=cancelled)
    except KeyboardInterrupt:  # ray.cancel or the driver's request: the run is told at once, marks itself KILLED
        child.send_signal(signal.SIGINT)
        try:
            code = _poll(child, CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
    reader.join(timeout=5)
    ends = [e for e in events if e.get("event") == "run_end"]
    return {"code": code, "run_end": ends[-1] if ends else None}


def _poll(child, timeout: float | None = None, cancelled: Callable[[], bool] | None = None) -> int:
    """``child.wait()`` in short sleeps, so that an interrupt of this thread is seen within 0.1 s; raises
    ``KeyboardInterrupt`` as soon as ``cancelled()`` (asked every ``CANCEL_POLL_S`` s) says so."""
    import subprocess

    deadline = None if timeout is None else time.monotonic() + timeout
    asked = time.monotonic()
    while child.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(child.args, cast(float, timeout))  # deadline set: timeout given
        if cancelled is not None and time.monotonic() - asked >= CANCEL_POLL_S:
            asked = time.monotonic()
            if cancelled():
                raise KeyboardInterrupt
        time.sleep(0.1)
    return child.returncode


def _read_events(stream, events: list[dict]) -> None:
    """Collect the JSON events a ``--jsonl`` run prints (a line that is not one is ignored)."""
    import json

    for line in stream:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)


def connect(plan: RayPlan) -> None:
    """Start a local Ray instance or join the cluster, before any MLflow run exists: one line if it fails."""
    import ray

    try:
        if plan.address is None:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                     logging_level="WARNING",  # type: ignore[arg-type]  # ray's stub says int, but its own default is "info" and it takes level names
                     log_to_driver=False)
        else:
            ray.init(address=plan.address, log_to_driver=False,
                     logging_level="WARNING")  # type: ignore[arg-type]  # ray's stub says int, but its own default is "info" and it takes level names
    except Exception as exc:  # noqa: BLE001 -- Ray raises ConnectionError, RuntimeError, ValueError...
        raise UnetlabError(f"--ray {plan.address or '(local instance)'}: cannot start or reach Ray: "
                           f"{exception_text(exc)}") from None


def disconnect() -> None:
    """Leave Ray (stops the local instance this process started)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def task_env(tracking_uri: str) -> dict[str, str]:
    """The environment a task's run gets besides its Ray worker's: where to log, the driver's cache and
    import path. Its thread count is not in it: the run sets its own ``train.threads``, as it does anywhere."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "UNETLAB_RAY": "1"}
    for name in ("UNETLAB_CACHE_DIR", "PYTHONPATH"):  # the same data and plugins as a local run
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def reservations(plan: RayPlan, threads: Sequence[int], cluster_cpus: float) -> tuple[list[float], str | None]:
    """The CPUs each run's task asks Ray for (``--ray-cpus``, else the run's ``train.threads``), and the line
    that says so when fewer runs than submitted can train at once. A reservation is capped at the cluster's
    CPUs: a task asking for more would wait forever; its run still uses its ``train.threads``."""
    total = max(cluster_cpus, 1.0)
    asked = [float(plan.cpus_per_run if plan.cpus_per_run is not None else t) for t in threads]
    cpus = [min(a, total) for a in asked]
    at_once, free = 0, total
    for need in cpus:
        if need > free + 1e-9:
            break
        at_once, free = at_once + 1, free - need
    note = None
    if at_once < len(cpus):
        per_run = "/".join(f"{c:g}" for c in sorted(set(cpus)))
        source = "--ray-cpus" if plan.cpus_per_run is not None else "their train.threads"
        note = (f"runs reserve {per_run} CPU(s) each ({source}) of the cluster's {total:g}: Ray trains "
                f"{max(at_once, 1)} at once")
    return cpus, note


def tasks_at_once(plan: RayPlan, threads: int) -> int:
    """How many runs of ``threads`` threads the connected cluster trains at once (at least 1): the width of a
    batch of tuning trials on Ray. A task reserves one GPU when the cluster has any (``run_on_ray``), so the
    GPUs cap it too. Call ``connect`` first."""
    import ray

    resources = ray.cluster_resources()
    return fitting_tasks(plan, threads, resources.get("CPU", 1.0), resources.get("GPU", 0.0))


def fitting_tasks(plan: RayPlan, threads: int, cluster_cpus: float, cluster_gpus: float) -> int:
    """``tasks_at_once`` for a cluster of ``cluster_cpus`` CPUs and ``cluster_gpus`` GPUs (at least 1)."""
    total = max(float(cluster_cpus), 1.0)
    cpus, _ = reservations(plan, [threads], total)
    width = int(total / cpus[0] + 1e-9)
    if cluster_gpus >= 1:  # one GPU per task
        width = min(width, int(cluster_gpus))
    return max(width, 1)


def run_on_ray(plan: RayPlan, path: str | Path, overrides: Sequence[str], resume: bool,
               runs: Sequence[tuple[str, str, int]], tracker: Tracker, parent_id: str, reporter: Reporter,
               nested_under: str | None = None) -> int:
    """Submit one task per run (``runs``: (name, run_key, train.threads)); as each ends, ``reporter`` prints
    the summary line a sequential run prints (best value and epoch, final value, epochs, time); return the
    exit code.

    Call ``connect`` first. ``tracker`` is the driver's Tracker: it ends the parent run and sweeps up
    runs left RUNNING by tasks that could not end them (a worker that died on its last retry). Whatever
    happens here, the parent run ends FINISHED, FAILED or KILLED.

    ``nested_under``: a batch of tuning trials, whose runs nest under that study run; then only the runs
    left RUNNING under it are swept up when the tasks end, and the parent stays open for the tuner (an
    interrupt still ends everything KILLED).
    """
    import ray

    runs_parent = nested_under or parent_id  # where this batch's runs are created
    to_end = [runs_parent, parent_id] if nested_under else [parent_id]  # on a stop: their runs, then themselves
    env = task_env(tracker.uri)
    token = f"{os.getpid()}-{time.time_ns()}"  # this invocation's stop request (a resumed parent keeps old tags)
    pending: dict = {}
    try:
        resources = ray.cluster_resources()
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        cpus, note = reservations(plan, [threads for _, _, threads in runs], resources.get("CPU", 1.0))
        task = ray.remote(num_gpus=gpus, max_retries=plan.max_retries)(_train_task)
        base = worker_run_args(Path(path).resolve(), overrides, resume=resume, output="jsonl",
                               parent_run_id=parent_id)
        # each task reserves as many CPUs as its run has threads: Ray never changes a run's thread count
        pending = {task.options(num_cpus=need).remote([*base, "--run-name", name], env, tracker.uri, parent_id, key,
                                                      token, runs_parent): name
                   for (name, key, _), need in zip(runs, cpus)}
        shown = "/".join(f"{c:g}" for c in sorted(set(cpus)))
        reporter.line(f"submitted {len(pending)} run(s) to Ray ({plan.address or 'local instance'}; "
                      f"{shown} CPU{' + 1 GPU' if gpus else ''} per run)")
        if note:
            reporter.line(note)
        failed: list[str] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 -- retries exhausted: the worker died every time
                result = {"code": -1, "run_end": None, "reason": f"the Ray task failed: {type(exc).__name__}"}
            status, summary, message = _outcome(result)
            if result["code"] != 0:
                failed.append(name)
            reporter.run_end(name, status, summary, message)
        tracker.end_running_children(runs_parent, "FAILED", "its Ray worker died and retries were exhausted")
        if nested_under is None:
            tracker.end(parent_id, "FAILED" if failed else "FINISHED")
    except KeyboardInterrupt as exc:
        signum = int(getattr(exc, "signum", signal.SIGINT))
        tracker.fail_fast()  # marking runs KILLED must not wait out a dead server
        try:  # every task reads this and tells its run at once; Ray's cancel below as well
            tracker.client.set_tag(parent_id, CANCEL_TAG, token)
        except Exception:  # noqa: BLE001 -- the store may be what failed: Ray's cancel still goes out
            pass
        _cancel_all(ray, list(pending))  # each run ends itself (KILLED, or FINISHED if it was done)
        for run_id in to_end:  # what a killed worker left RUNNING, then the run itself
            _end_quietly(tracker, run_id, "KILLED", "interrupted")
        print(f"unetlab: interrupted by {signal.Signals(signum).name}; Ray tasks cancelled: "
              f"{_statuses(tracker, runs_parent, list(pending.values()))}; last checkpoints kept: "
              f"resume with 'unetlab run {path} --ray --resume'", file=sys.stderr)
        return 128 + signum
    except BaseException:
        tracker.fail_fast()
        _cancel_all(ray, list(pending))
        for run_id in to_end:
            _end_quietly(tracker, run_id, "FAILED", "the Ray driver failed")
        raise
    if failed:
        print(f"unetlab: {len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _outcome(result: dict) -> tuple[str, dict, str]:
    """(status, summary, message) of a finished task, from the ``run_end`` event its run printed; a run that
    printed none (its process was killed, or stopped before training) is FAILED with the exit code."""
    event = result.get("run_end")
    if isinstance(event, dict) and isinstance(event.get("status"), str):
        summary = {k: v for k, v in event.items() if k not in ("event", "run", "status", "message")}
        return event["status"], summary, str(event.get("message") or "")
    return "FAILED", {}, result.get("reason") or f"its process exited with code {result['code']}"


def _statuses(tracker: Tracker, parent_id: str, names: Sequence[str]) -> str:
    """``add/seed=0 KILLED, concat/seed=0 FINISHED``: the true final status of each run that was still going
    when the driver was interrupted (read back from the store), or "not started"."""
    try:
        found = tracker.client.search_runs([tracker.experiment_id], max_results=10000,
                                           filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
        status = {r.info.run_name: r.info.status for r in found}
    except Exception:  # noqa: BLE001 -- the store may be what failed: say what is known
        return f"{len(names)} run(s) stopped (their status could not be read back)"
    return ", ".join(f"{name} {status.get(name, 'not started')}" for name in sorted(names)) or "none was running"


def _end_quietly(tracker: Tracker, parent_id: str, status: str, reason: str) -> None:
    """End the children still RUNNING and the parent; a store that is gone must not hide the first error."""
    try:
        tracker.end_running_children(parent_id, status, reason)
        tracker.end(parent_id, status)
    except Exception as exc:  # noqa: BLE001 -- already failing: say so, keep the original error
        print(f"unetlab: warning: could not mark the runs {status}: {exception_text(exc)}", file=sys.stderr)


def _cancel_all(ray, refs: list) -> None:
    """Cancel gently (each child marks its run KILLED), then force whatever is still going."""
    for ref in refs:
        ray.cancel(ref, force=False)
    deadline = time.monotonic() + CANCEL_GRACE_S
    remaining = refs
    while remaining and time.monotonic() < deadline:
        _, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=0.5)
    for ref in remaining:
        ray.cancel(ref, force=True)
