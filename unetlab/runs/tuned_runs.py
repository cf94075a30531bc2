"""``unetlab run`` of a tuned experiment: for each variant a study (its trial runs nested under one study run),
then every final run (each seed and fold) trained with its variant's best parameters.

Reads top to bottom: ``run_tuned`` tunes each variant (``_tune_variant``: ask Optuna, train the trial as an
ordinary run of this invocation, tell Optuna what it reached, count what it spent), logs the study, and then
trains the final runs through the usual paths (one after another, ``--jobs``, Ray). Trials are judged on the
validation split only; the test split is left to the final runs.

With ``--jobs N`` a study's trials train N at a time in worker processes: the driver asks Optuna for N trials
(their values stored in the journal), each worker trains one, reports its validations to the pruner and tells
the study its result through the journal. The random and QMC samplers draw the same values for trial n either
way; TPE proposes a trial from the results before it, so trials asked together know less than sequential ones
(Optuna's constant liar keeps them apart). ``--ray`` does the same with Ray tasks in place of worker processes:
a batch is as many trials as the cluster trains at once (its CPUs over a run's ``train.threads``, or
``--ray-cpus``), each task running the very worker command a ``--jobs`` worker runs; the final runs follow on
Ray (the Ray path ends the parent run when its tasks end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from unetlab.config.experiment import Experiment, Run, derive_run
from unetlab.config.tune import TuneSpec
from unetlab.errors import UnetlabError, exception_text
from unetlab.runs.tuning import (
    ROLE_TAG,
    TRIAL_NUMBER_TAG,
    TRIAL_STATE_TAG,
    TUNE_SPACE_TAG,
    TUNED_FROM_TAG,
    TrialRecord,
    TrialReporter,
    best_trial,
    count_budget,
    journal_path,
    open_study,
    study_name,
    suggest,
    trial_records,
)
from unetlab.tracking import tags as run_tags

__all__ = ["STUDY_RUN_ATTR", "TrialWork", "final_runs", "open_trial", "run_tuned", "train_trial_worker", "trial_run",
           "variants_in_order"]

STUDY_RUN_ATTR = "study_run_id"   # the study's own user attribute: its MLflow study run, for --jobs workers
PARENT_TAG = "mlflow.parentRunId"


def variants_in_order(runs: Sequence[Run]) -> list[str]:
    """The variants of ``runs`` in file order."""
    return list(dict.fromkeys(r.variant for r in runs))


def trial_run(template: Run, spec: TuneSpec, number: int, params: dict[str, Any]) -> Run:
    """Trial ``number`` of ``template``'s variant: its config with ``params`` and the per-trial budget applied
    (``tune.epochs`` as ``train.epochs``; ``tune.max_steps`` as ``train.max_steps``, within ``train.epochs``)."""
    max_steps = cast(int, spec.max_steps)  # read only without epochs: the tune parser sets exactly one of the two
    budget: dict[str, Any] = {"train.epochs": spec.epochs} if spec.epochs is not None else {
        "train.max_steps": min(max_steps, template.settings.train.max_steps or max_steps)}
    return derive_run(template, {**params, **budget}, name=f"{template.variant}/trial={number}", role="trial",
                      tags={TRIAL_NUMBER_TAG: str(number)})


def final_runs(experiment: Experiment, runs: Sequence[Run], parent_id: str, direction: str) -> list[Run]:
    """``runs`` (the file's final runs) each with its variant's best parameters, read from the invocation's
    studies; tagged with the study run they were tuned in. A variant whose study has no complete trial is a
    one-line ``UnetlabError``."""
    spec = experiment.tune
    assert spec is not None
    out = []
    for variant in variants_in_order(runs):
        mine = [r for r in runs if r.variant == variant]
        study = open_study(journal_path(mine[0].settings.tracking.checkpoint_dir, experiment.name),
                           study_name(parent_id, variant), spec, direction)
        best = best_trial(trial_records(study), direction)
        if best is None:
            raise UnetlabError(f"variant '{variant}': no trial of its study completed, so it has no best "
                               "parameters and no final runs (see the trial runs' unetlab.error tags)")
        study_run = study.user_attrs.get(STUDY_RUN_ATTR)
        if not isinstance(study_run, str):
            raise UnetlabError(f"tuning study '{study.study_name}': its study run id is missing or malformed")
        out += [derive_run(r, _checked_params(best, spec), role="final", tags={TUNED_FROM_TAG: study_run})
                for r in mine]
    return out


def _checked_params(best: TrialRecord, spec: TuneSpec) -> dict[str, Any]:
    """The best trial's parameters, as read from the journal: exactly the tuned keys (data, not trusted)."""
    keys = {p.key for p in spec.params}
    if set(best.params) != keys:
        raise UnetlabError(f"tuning study: trial {best.number} holds parameters {sorted(best.params)}, the file "
                           f"tunes {sorted(keys)}")
    return dict(best.params)


def run_tuned(inv, jobs: int, ray, direction: str) -> int:
    """Tune every variant of ``inv`` (its prepared runs are the final runs, untuned), then train the final runs
    with the best parameters; return the exit code as ``run_sequential`` does (0, 1, or 128 + a signal)."""
    from unetlab.training.preflight import prepare_all

    spec: TuneSpec = inv.experiment.tune
    variants = variants_in_order([p.run for p in inv.prepared])
    inv.reporter.info(f"{inv.experiment.name}: tuning {len(variants)} variant(s), each {spec.budget_text()}; "
                      f"{spec.metric} ({direction}) on the validation split")
    failed_variants = []
    try:
        for variant in variants:
            template = next(p for p in inv.prepared if p.run.variant == variant)
            code = _tune_variant(inv, variant, template, spec, direction, jobs, ray)
            if code >= 128:  # interrupted in a trial: the trial is KILLED, and so are its study and the parent
                return _stopped(inv, "KILLED", "interrupted", code)
            if code:
                failed_variants.append(variant)
    except KeyboardInterrupt:  # between two trials
        return _stopped(inv, "KILLED", "interrupted", 130)
    except BaseException:  # the store or the journal went away...: no study run or parent is left RUNNING
        _stopped(inv, "FAILED", "the invocation stopped on an error", 1)
        raise
    finals = [p.run for p in inv.prepared if p.run.variant not in failed_variants]
    tuned = final_runs(inv.experiment, finals, inv.parent_id, direction) if finals else []
    inv.prepared = prepare_all(tuned, inv.host.registry, inv.ctx.world_size,
                               pretrained="skip" if inv.resume else "check")
    if inv.resume and inv.prepared:  # as for an untuned file: a final run another live process trains is refused
        from unetlab.runs.execution import claim_resumed_runs

        claim_resumed_runs(inv, lock=ray is None and not (jobs > 1 and len(inv.prepared) > 1))
    for variant in failed_variants:
        print(f"unetlab: variant '{variant}': no trial completed, so it has no best parameters and no final runs",
              file=sys.stderr)
    code = _train_finals(inv, jobs, ray) if inv.prepared else 0
    if failed_variants and code == 0:
        with contextlib.suppress(Exception):
            inv.tracker.end(inv.parent_id, "FAILED")
        return 1
    return code


def _train_finals(inv, jobs: int, ray) -> int:
    from unetlab.runs.execution import run_parallel, run_sequential, signals_interrupt

    inv.reporter.info(f"{inv.experiment.name}: tuned; {len(inv.prepared)} final run(s) with each variant's best "
                      "parameters")
    if ray is not None:
        from unetlab.runs.ray_runs import run_on_ray

        with signals_interrupt():
            return run_on_ray(ray, inv.path, inv.overrides, inv.resume,
                              [(p.run.name, p.key, p.run.settings.train.threads) for p in inv.prepared],
                              inv.tracker, inv.parent_id, inv.reporter)
    if jobs > 1 and len(inv.prepared) > 1:
        return run_parallel(inv, jobs)
    return run_sequential(inv)


def _stopped(inv, status: str, reason: str, code: int) -> int:
    """Tuning stopped (a trial run has its status already): end the study runs and the parent with ``status``."""
    tracker = inv.tracker
    tracker.fail_fast()
    with contextlib.suppress(Exception):  # a dead store must not hide the first error
        tracker.end_running_children(inv.parent_id, status, reason)
        tracker.end(inv.parent_id, status)
    return code


def _tune_variant(inv, variant: str, template, spec: TuneSpec, direction: str, jobs: int, ray) -> int:
    """Run the variant's study to ``spec.trials`` finished trials (those of an earlier attempt count, with
    ``--resume``), ``jobs`` at once (``--jobs``) or as many as the Ray cluster trains at once (``--ray``); log
    its budget and best parameters on the study run. Returns 0, 1 (no trial completed) or 128 + N (interrupted)."""
    tracker, experiment = inv.tracker, inv.experiment
    if ray is not None:
        from unetlab.runs.ray_runs import tasks_at_once

        width = tasks_at_once(ray, template.run.settings.train.threads)
    else:
        width = jobs
    study = open_study(journal_path(template.run.settings.tracking.checkpoint_dir, experiment.name),
                       study_name(inv.parent_id, variant), spec, direction)
    study_run = _study_run(inv, variant, spec, study, direction)
    records = trial_records(study)
    for left in [r for r in records if r.state == "running"]:  # an earlier attempt was stopped inside it
        code = _train_trial_here(inv, _take_trial(study, left.number, study_run, template.run, spec), spec, direction)
        if code >= 128:
            return code
    while (done := count_budget(trial_records(study)).trials) < spec.trials:
        batch = min(width, spec.trials - done)
        if batch == 1 and ray is None:
            code = _train_trial_here(inv, _ask_trial(study, study_run, template.run, spec), spec, direction)
        else:
            code = _train_trials_in_workers(inv, study, study_run, template.run, spec, batch, width, ray)
        if code >= 128:
            return code
    records = trial_records(study)
    _log_study(tracker, study_run, spec, records, direction)
    best = best_trial(records, direction)
    tracker.end(study_run, "FINISHED" if best is not None else "FAILED")
    if best is not None:
        shown = ", ".join(f"{k}={_short(v)}" for k, v in best.params.items())
        inv.reporter.info(f"{variant}: best of {len(records)} trial(s): trial {best.number}, "
                          f"{spec.metric} {best.value:.4f} ({shown})")
    return 0 if best is not None else 1


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _study_run(inv, variant: str, spec: TuneSpec, study, direction: str) -> str:
    """The variant's study run under the parent: found again (``--resume``: the journal names it) and reopened,
    or created with the study's settings as params."""
    from unetlab.tracking.run_ownership import owner_tags

    tracker = inv.tracker
    known = study.user_attrs.get(STUDY_RUN_ATTR)
    if isinstance(known, str):
        with contextlib.suppress(Exception):  # not found (another store): a new study run is made below
            if tracker.client.get_run(known).data.tags.get(PARENT_TAG) == inv.parent_id:
                tracker.reopen(known)
                tracker.child(known).set_tags(owner_tags())
                return known
    tags = {**(inv.base_tags or {}), **owner_tags(), ROLE_TAG: "study", run_tags.VARIANT: variant,
            TUNE_SPACE_TAG: spec.space_json()[:5000]}
    run_id = tracker.client.create_run(tracker.experiment_id, run_name=f"{variant}/study",
                                       tags={**tags, PARENT_TAG: inv.parent_id}).info.run_id
    tracker.child(run_id).log_params({
        "tune.sampler": spec.sampler, "tune.seed": spec.seed, "tune.metric": spec.metric, "tune.direction": direction,
        "tune.trials_planned": spec.trials,
        "tune.budget": f"epochs={spec.epochs}" if spec.epochs is not None else f"max_steps={spec.max_steps}",
        "tune.pruning": "none" if spec.pruning is None else
        f"{spec.pruning.kind}(warmup_epochs={spec.pruning.warmup_epochs},startup_trials={spec.pruning.startup_trials})"})
    study.set_user_attr(STUDY_RUN_ATTR, run_id)
    return run_id


@dataclass
class TrialWork:
    """A trial to train: its Optuna handle (to report to and tell), its run, and the study run it nests under."""

    study: Any
    trial: Any               # optuna.trial.Trial
    run: Run
    study_run: str


def _ask_trial(study, study_run: str, template: Run, spec: TuneSpec) -> TrialWork:
    trial = study.ask()
    return TrialWork(study, trial, trial_run(template, spec, trial.number, suggest(trial, spec)), study_run)


def _take_trial(study, number: int, study_run: str, template: Run, spec: TuneSpec) -> TrialWork:
    """Trial ``number`` as stored: asked already (by the driver of ``--jobs``, or by an attempt before
    ``--resume``) and still waiting for its result; its stored params make its run."""
    import optuna

    frozen = study.get_trials(deepcopy=False)[number]
    trial = optuna.trial.Trial(study, frozen._trial_id)  # a handle on a stored trial: Optuna's distributed way
    return TrialWork(study, trial, trial_run(template, spec, number, dict(frozen.params)), study_run)


def open_trial(experiment: Experiment, parent_id: str, name: str) -> TrialWork | None:
    """For a ``--jobs`` worker told to train run ``name``: the trial it names (``<variant>/trial=<n>``) of the
    invocation's study, or None when ``name`` is not a trial's. One line when the trial is not waiting."""
    import optuna

    variant, _, number = name.rpartition("/trial=")
    template = next((r for r in experiment.runs if r.variant == variant), None)
    if template is None or not number.isdigit() or experiment.tune is None:
        return None
    path = journal_path(template.settings.tracking.checkpoint_dir, experiment.name)
    try:
        study = optuna.load_study(study_name=study_name(parent_id, variant), storage=_storage(path))
    except Exception as exc:  # noqa: BLE001 -- the journal or the study is not there: one line
        raise UnetlabError(f"tuning journal '{path}': {exception_text(exc)}") from None
    trials = study.get_trials(deepcopy=False)
    if int(number) >= len(trials) or trials[int(number)].state.name != "RUNNING":
        raise UnetlabError(f"run '{name}': trial {number} of study '{study.study_name}' is not waiting to be trained")
    study_run = study.user_attrs.get(STUDY_RUN_ATTR)
    if not isinstance(study_run, str):
        raise UnetlabError(f"tuning study '{study.study_name}': its study run id is missing or malformed")
    return _take_trial(study, int(number), study_run, template, experiment.tune)


def _storage(path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def _train_trials_in_workers(inv, study, study_run: str, template: Run, spec: TuneSpec, batch: int, jobs: int,
                             ray=None) -> int:
    """Ask ``batch`` trials, train them in ``--jobs`` worker processes or Ray tasks (each worker reports to and
    tells the study itself, through the journal), and fail whatever a crashed worker left unfinished."""
    import optuna

    from unetlab.runs.execution import run_parallel, signals_interrupt
    from unetlab.training.preflight import prepare

    asked, prepared = [_ask_trial(study, study_run, template, spec) for _ in range(batch)], []
    for work in asked:
        try:
            prepared.append(prepare(work.run, inv.host.registry, inv.ctx.world_size,
                                    pretrained="skip" if inv.resume else "check"))
        except UnetlabError as exc:  # e.g. a batch size the data cannot fill: this trial fails, the study goes on
            print(f"unetlab: {work.run.name}: {exc}", file=sys.stderr)
            study.tell(work.trial, state=optuna.trial.TrialState.FAIL)
    if not prepared:
        return 0
    if ray is None:
        code = run_parallel(dataclasses.replace(inv, prepared=prepared, owns_parent=False, claimed={}), jobs)
    else:
        from unetlab.runs.ray_runs import run_on_ray

        with signals_interrupt():
            code = run_on_ray(ray, inv.path, inv.overrides, inv.resume,
                              [(p.run.name, p.key, p.run.settings.train.threads) for p in prepared],
                              inv.tracker, inv.parent_id, inv.reporter, nested_under=study_run)
    if code >= 128:
        return code
    for work in asked:  # a worker that died before telling: its trial failed
        if study.get_trials(deepcopy=False)[work.trial.number].state.name == "RUNNING":
            study.tell(work.trial, state=optuna.trial.TrialState.FAIL)
    inv.tracker.end_running_children(study_run, "FAILED", "its worker process exited without ending it")
    return 0


def _train_trial_here(inv, work: TrialWork, spec: TuneSpec, direction: str) -> int:
    """Train one trial in this process as a run nested under its study run, and tell Optuna how it ended;
    the exit code of that one run (a failed trial is 1, and the study goes on)."""
    import optuna

    from unetlab.runs.execution import run_sequential
    from unetlab.training.preflight import prepare

    tracker, started, trial = inv.tracker, time.perf_counter(), work.trial
    # a loaded experiment's tune.metric is set (None in the file means train.monitor, resolved by the loader)
    reporter = TrialReporter(trial, cast(str, spec.metric), direction, spec.pruning is not None)
    try:
        prep = prepare(work.run, inv.host.registry, inv.ctx.world_size, pretrained="skip" if inv.resume else "check")
    except UnetlabError as exc:  # e.g. a batch size the data cannot fill: this trial fails, the study goes on
        print(f"unetlab: {work.run.name}: {exc}", file=sys.stderr)
        work.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return 1
    sub = dataclasses.replace(inv, prepared=[prep], owns_parent=False, parent_id=work.study_run, claimed={},
                              on_validation=reporter.stop_reason)
    parent, tracker.parent_id = tracker.parent_id, work.study_run  # trial runs are created under the study run
    try:
        code = run_sequential(sub)
    finally:
        tracker.parent_id = parent
    if code >= 128:
        return code
    state = "failed" if code else "pruned" if reporter.pruned else "complete"
    run_id = _trial_run_id(tracker, prep.key)
    value = _objective(tracker, run_id, reporter)
    if state == "complete" and value is None:  # no finite value of the metric was ever logged
        state = "failed"
    for key, item in {"epochs": reporter.epochs, "steps": reporter.steps, "seconds": time.perf_counter() - started,
                      "run_id": run_id, "last_value": reporter.values[-1] if reporter.values else None}.items():
        trial.set_user_attr(key, item)
    if state == "complete":
        work.study.tell(trial, value)
    else:
        work.study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned" else
                        optuna.trial.TrialState.FAIL)
    if run_id is not None:
        child = tracker.child(run_id)
        child.set_tags({TRIAL_STATE_TAG: state})
        if value is not None and state != "failed":
            child.log_metric("tune.objective", value)
    return 1 if state == "failed" else 0


def train_trial_worker(inv, work: TrialWork, direction: str) -> int:
    """A ``--jobs`` worker's whole job for a trial run: train it under its study run and tell the study."""
    return _train_trial_here(inv, work, inv.experiment.tune, direction)


def _objective(tracker, run_id: str | None, reporter: TrialReporter) -> float | None:
    """The value to tell Optuna, from the trial run's own history of the metric (one value per epoch): it also
    holds the epochs an interrupted attempt validated before ``--resume`` continued it. The reporter's values
    when the history cannot be read."""
    if run_id is None:
        return reporter.objective()
    try:
        history = tracker.client.get_metric_history(run_id, reporter.metric)
    except Exception:  # noqa: BLE001 -- the store: the values this process saw are the next best
        return reporter.objective()
    by_epoch = {m.step: float(m.value) for m in sorted(history, key=lambda m: m.timestamp)}  # a re-logged epoch
    values = [v for _, v in sorted(by_epoch.items()) if math.isfinite(v)]                 # keeps its last value
    if not values:
        return reporter.objective()
    return dataclasses.replace(reporter, values=values).objective()


def _trial_run_id(tracker, key: str) -> str | None:
    """The MLflow run the trial was trained in (the newest with its run key)."""
    try:
        found = tracker.find_runs(run_tags.RUN_KEY, key)
    except Exception as exc:  # noqa: BLE001 -- the store: one line, the study's own record stays
        print(f"unetlab: warning: cannot find the trial's run: {exception_text(exc)}", file=sys.stderr)
        return None
    return found[0].info.run_id if found else None


def _log_study(tracker, study_run: str, spec: TuneSpec, records: list[TrialRecord], direction: str) -> None:
    """The budget the study spent and its best parameters, on the study run."""
    budget = count_budget(records)
    child = tracker.child(study_run)
    for key, value in {"tune.trials": budget.trials, "tune.pruned": budget.pruned, "tune.failed": budget.failed,
                       "tune.epochs": budget.epochs, "tune.steps": budget.steps,
                       "tune.seconds": budget.seconds}.items():
        child.log_metric(key, float(value))
    best = best_trial(records, direction)
    if best is not None and math.isfinite(cast(float, best.value)):  # best_trial: only trials with a value
        child.log_metric("tune.best_value", best.value)
        child.log_params({f"tune.best.{k}": v for k, v in best.params.items()} | {"tune.best.trial": best.number})
