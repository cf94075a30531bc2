"""``unetlab run``: check every run first, then execute them into MLflow with an explicit final status.

Order of work, so that bad input leaves nothing behind and a crash never leaves a run RUNNING:

1. load the experiment file (``experiment``) and check every run (``preflight``): no MLflow yet;
2. create the MLflow experiment and one parent run for this invocation, or reopen it for --resume
   (``tracking``);
3. execute the runs (``execution``): one after another, in a pool of workers, or as a DDP rank; each
   is trained by ``trainer`` and its outputs logged by ``run_outputs``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from unetlab.config.experiment import load_experiment
from unetlab.errors import ConfigError, UnetlabError
from unetlab.plugin_api.host import default_host
from unetlab.tracking import tags as run_tags

if TYPE_CHECKING:
    from unetlab.runs.ray_runs import RayPlan

__all__ = ["run_experiment"]


def run_experiment(path: str | Path, overrides: Sequence[str] = (), resume: bool = False, output: str = "bar",
                   only: Sequence[str] = (), jobs: int = 1, parent_run_id: str | None = None,
                   exact: Sequence[str] = (), ray: RayPlan | None = None) -> int:
    """Train every run of an experiment file; return the exit code (0 all finished, 1 any failed, 128+N killed).

    ``jobs > 1`` trains independent runs in that many processes (one GPU each when there are several),
    all under one parent run. ``parent_run_id`` and ``exact`` are how those worker processes are told
    which parent to log under and which run to train. ``ray`` submits each run as a Ray task instead.
    """
    from unetlab import __version__
    from unetlab.runs.execution import (
        Invocation,
        claim_resumed_runs,
        run_parallel,
        run_rank,
        run_sequential,
        warn_if_omp_threads_ignored,
    )
    from unetlab.runs.progress import Reporter
    from unetlab.tracking.run_ownership import owner_tags
    from unetlab.tracking.run_tracker import Tracker, git_commit, resolve_tracking_uri
    from unetlab.training import distributed
    from unetlab.training.preflight import prepare_all

    ctx = distributed.current()
    if ctx.enabled and jobs > 1:
        raise UnetlabError("--jobs and several processes per run (--nproc-per-node, torchrun) do not combine")
    host = default_host()
    experiment = load_experiment(path, overrides, host=host)
    if ctx.is_main:
        host.warn_problems()
    trial = _trial_to_train(experiment, parent_run_id, exact)
    runs = [trial.run] if trial is not None else [
        r for r in experiment.runs if (not only or any(r.name.startswith(o) for o in only))
        and (not exact or r.name in exact)]
    if not runs:
        raise UnetlabError(f"--only {' '.join(only)}: matches no run "
                           f"(runs: {', '.join(r.name for r in experiment.runs)})")
    if len({r.settings.tracking.uri for r in runs}) > 1:
        raise ConfigError("tracking.uri: every run of one invocation must log to the same store; set it in the base "
                          "config, not in variants or the matrix")
    if ray is not None:  # a cluster that cannot reach the store or the checkpoints: refuse before any work
        from unetlab.runs.ray_runs import check_ray_settings

        check_ray_settings(ray, resolve_tracking_uri(runs[0].settings.tracking.uri),
                           [r.settings.tracking.checkpoint_dir for r in runs])
    # bad input stops here: nothing written yet (--resume: a pretrained encoder's file or cache is not
    # required, the runs continue from their own checkpoints)
    prepared = prepare_all(runs, host.registry, ctx.world_size, pretrained="skip" if resume else "check")
    direction = _check_tuned(experiment, prepared, path, ctx, host)
    if direction is not None and parent_run_id is not None and trial is None:  # a worker's final run: best params
        from unetlab.runs.tuned_runs import final_runs

        prepared = prepare_all(final_runs(experiment, runs, parent_run_id, direction), host.registry, ctx.world_size,
                               pretrained="skip" if resume else "check")
    if ray is not None:  # before any MLflow run: a cluster that cannot be reached is one line
        from unetlab.runs.ray_runs import connect

        connect(ray)
    reporter = Reporter(output if ctx.is_main else "silent", runs[0].settings.train.monitor)
    inv = Invocation(Path(path), tuple(overrides), resume, experiment, prepared, host, ctx, reporter)
    distributed.init(ctx, prepared[0].runtime.device)
    try:
        if not ctx.is_main:
            return run_rank(inv)
        inv.tracker = tracker = Tracker(experiment.name, resolve_tracking_uri(runs[0].settings.tracking.uri),
                                        experiment_file=path)
        invocation = hashlib.sha256("\n".join(p.key for p in prepared).encode()).hexdigest()[:16]
        commit = git_commit(Path(path).resolve())
        from unetlab.analysis.dashboard import factor_keys

        factors = factor_keys(experiment.runs)  # what differs between the variants: a param to group by
        inv.base_tags = {run_tags.EXPERIMENT_FILE: str(Path(path).resolve()), run_tags.INVOCATION: invocation,
                         **({run_tags.FACTOR: ", ".join(factors)[:500]} if factors else {}),
                         run_tags.VERSION: __version__, **({"mlflow.source.git.commit": commit} if commit else {})}
        inv.parent_id, inv.owns_parent = parent_run_id, parent_run_id is None
        if parent_run_id is not None:  # a worker of --jobs: the parent belongs to the process that started us
            tracker.parent_id = parent_run_id
        else:
            tracker.reap_orphans()  # runs left RUNNING by a process that is gone (SIGKILL...) become KILLED
        if parent_run_id is None and resume:
            # a run another live process trains is refused here, before anything is reopened; when this
            # process trains the runs itself it also takes their folder locks now (workers take their own).
            # Tuned: the final runs are known after tuning, and claimed then (tuned_runs)
            if direction is None:
                claim_resumed_runs(inv, lock=ray is None and not (jobs > 1 and len(prepared) > 1))
            parents = [r for r in tracker.find_runs(run_tags.INVOCATION, invocation)
                       if r.data.tags.get(run_tags.PARENT)]
            if parents:
                inv.parent_id = tracker.parent_id = parents[0].info.run_id
                tracker.reopen(inv.parent_id)
                tracker.child(inv.parent_id).set_tags(owner_tags())
        if inv.parent_id is None:
            inv.parent_id = tracker.start_parent(f"{experiment.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                                 {**inv.base_tags, **owner_tags(), run_tags.PARENT: "true"},
                                                 experiment.description)
            tracker.client.log_text(inv.parent_id, Path(path).read_text(encoding="utf-8"), "experiment.yaml")
        if parent_run_id is None:
            reporter.info(f"{experiment.name}: {len(prepared)} run(s), tracking at {tracker.uri} "
                          f"(experiment '{experiment.name}', parent run {inv.parent_id})")
            if not ctx.enabled:  # torchrun sets OMP_NUM_THREADS=1 for its ranks itself
                warn_if_omp_threads_ignored({p.run.settings.train.threads for p in prepared})
        if ray is not None and direction is None:
            from unetlab.runs.execution import signals_interrupt
            from unetlab.runs.ray_runs import run_on_ray

            with signals_interrupt():
                code = run_on_ray(ray, path, overrides, resume,
                                  [(p.run.name, p.key, p.run.settings.train.threads) for p in prepared], tracker,
                                  inv.parent_id, reporter)
        elif trial is not None:  # a worker of a tuned --jobs: one trial, nested under its study run
            from unetlab.runs.tuned_runs import train_trial_worker

            code = train_trial_worker(inv, trial, cast(str, direction))  # a trial implies a tune section
        elif direction is not None and parent_run_id is None:
            from unetlab.runs.tuned_runs import run_tuned

            code = run_tuned(inv, jobs, ray, direction)
        elif jobs > 1 and len(prepared) > 1:
            code = run_parallel(inv, jobs)
        else:
            code = run_sequential(inv)
        if parent_run_id is None and code in (0, 1):  # the parent carries the comparison; not after an interrupt
            from unetlab.analysis.dashboard import report_dashboard

            # the margin of the file as it was loaded: the file may have changed (or gone) while the runs trained
            report_dashboard(tracker.client, tracker.experiment_id, inv.parent_id, runs[0].settings.train.monitor,
                             experiment.compare_margin, experiment.runs, tracker.uri, str(path), reporter.info,
                             experiment.compute_ratio)
        return code
    finally:
        distributed.shutdown(ctx)
        if ray is not None:
            from unetlab.runs.ray_runs import disconnect

            disconnect()


def _check_tuned(experiment, prepared, path, ctx, host) -> str | None:
    """For a tuned experiment, before any MLflow run: its runs have a test split and log the tune metric;
    return the metric's direction ("max" or "min"). None for an untuned experiment."""
    if experiment.tune is None:
        return None
    if ctx.enabled:
        raise UnetlabError("tune: a tuned experiment trains each trial in one process; several processes per run "
                           "(--nproc-per-node, torchrun) are not supported with a tune section")
    from unetlab.runs.tuning import check_tuned

    return check_tuned([(p.run, p.source, p.num_classes) for p in prepared], host.registry, path,
                       experiment.tune.metric)


def _trial_to_train(experiment, parent_run_id: str | None, exact: Sequence[str]):
    """A ``--jobs`` worker of a tuned experiment told to train a trial run (``<variant>/trial=<n>``): that
    trial, read from the invocation's study; None for any other run."""
    if experiment.tune is None or parent_run_id is None or len(exact) != 1 or "/trial=" not in exact[0]:
        return None
    from unetlab.runs.tuned_runs import open_trial

    return open_trial(experiment, parent_run_id, exact[0])
