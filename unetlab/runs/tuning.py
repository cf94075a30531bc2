"""Optuna studies of a tuned experiment: one study per variant with the same space, sampler, seed and budget.

A study lives in a journal file under the experiment's checkpoint folder (``<checkpoint_dir>/<experiment>/
tune/studies.journal``), named ``<parent run id>/<variant>``: every process of one invocation (``--jobs``
workers, Ray tasks, a later ``--resume``) that can reach the checkpoints reads and writes the same studies,
and Optuna's journal keeps them consistent across processes. A trial's numbers are stored as its user
attributes (epochs, steps, seconds trained; its MLflow run id), so the budget a variant spent is counted
from the study itself, and read back as data to validate.

The random sampler draws trial ``n``'s values from (seed, n, key) alone: every variant's trial ``n`` gets the
same values, in one process or several, and after ``--resume``.
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from unetlab.config.tune import ParamSpace, TuneSpec
from unetlab.errors import ConfigError, UnetlabError, exception_text
from unetlab.tracking import tags as run_tags

__all__ = ["ROLE_TAG", "TRIAL_NUMBER_TAG", "TRIAL_STATE_TAG", "TUNED_FROM_TAG", "TUNE_SPACE_TAG", "Budget",
           "TrialRecord", "TrialReporter", "best_trial", "count_budget", "journal_path", "make_pruner",
           "make_sampler", "open_study", "check_tuned", "check_tuned_file", "plan_lines", "study_name", "suggest",
           "trial_records"]

ROLE_TAG = run_tags.ROLE                     # trial | final | study
TRIAL_NUMBER_TAG = run_tags.TRIAL_NUMBER
TRIAL_STATE_TAG = run_tags.TRIAL_STATE       # complete | pruned | failed
TUNED_FROM_TAG = run_tags.TUNED_FROM         # on a final run: its variant's study run id
TUNE_SPACE_TAG = run_tags.TUNE_SPACE         # on a study run: the space as JSON
STATES = ("complete", "pruned", "failed")


def journal_path(checkpoint_dir: str | Path, experiment_name: str) -> Path:
    """The journal file holding the experiment's studies."""
    import re

    safe = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", experiment_name)
    return Path(checkpoint_dir) / safe / "tune" / "studies.journal"


def study_name(parent_run_id: str, variant: str) -> str:
    """The study of ``variant`` in the invocation whose parent run is ``parent_run_id``."""
    return f"{parent_run_id}/{variant}"


def make_sampler(spec: TuneSpec):
    """The sampler of ``spec`` seeded with ``spec.seed`` (every variant's study gets an identical one)."""
    import optuna

    if spec.sampler == "random":
        return trial_seeded_random_sampler(spec.seed)
    if spec.sampler == "qmc":  # its first trial is drawn by the independent sampler: seeded per trial too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=spec.seed, scramble=True,
                                              independent_sampler=trial_seeded_random_sampler(spec.seed),
                                              warn_independent_sampling=False, warn_asynchronous_seeding=False)
    return optuna.samplers.TPESampler(seed=spec.seed)


def make_pruner(spec: TuneSpec):
    """Optuna's MedianPruner for ``pruning: median`` (its steps are epochs, counted from 1; the first
    ``warmup_epochs`` are never pruned), else a pruner that never prunes."""
    import optuna

    if spec.pruning is None:
        return optuna.pruners.NopPruner()
    # steps are 1-based epochs and Optuna prunes from step n_warmup_steps on: the first warmup_epochs are safe
    return optuna.pruners.MedianPruner(n_startup_trials=spec.pruning.startup_trials,
                                       n_warmup_steps=spec.pruning.warmup_epochs + 1)


def open_study(path: Path, name: str, spec: TuneSpec, direction: str):
    """Create, or load when it exists, the study ``name`` in the journal at ``path`` (one line on failure)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "Trial 3 finished with value ..." is ours to say
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(path)))
        study = optuna.create_study(storage=storage, study_name=name, sampler=make_sampler(spec),
                                    pruner=make_pruner(spec), load_if_exists=True,
                                    direction="maximize" if direction == "max" else "minimize")
    except Exception as exc:  # noqa: BLE001 -- an unreadable or unwritable journal is one line naming it
        raise UnetlabError(f"tuning journal '{path}': {exception_text(exc)}") from None
    wanted = "MAXIMIZE" if direction == "max" else "MINIMIZE"
    if study.direction.name != wanted:  # a study stored by another file version: never mixed with this one
        raise UnetlabError(f"tuning journal '{path}': study '{name}' is stored as {study.direction.name.lower()}, "
                           f"this file asks to {wanted.lower()}")
    return study


def trial_seeded_random_sampler(seed: int):
    """A RandomSampler in which the value of ``key`` in trial ``n`` is a function of (seed, n, key) alone:
    independent of the order trials were asked in, of the process that asked, and of the study."""
    return _seeded_sampler_class()(seed)


@functools.cache
def _seeded_sampler_class():
    import optuna

    class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
        def __init__(self, seed: int) -> None:
            super().__init__(seed)
            self.seed = seed

        def sample_independent(self, study, trial, param_name, param_distribution):
            return draw(param_distribution, self.seed, trial.number, param_name)

    return TrialSeededRandomSampler


def draw(distribution, seed: int, number: int, key: str) -> Any:
    """One value of ``distribution`` for trial ``number`` and ``key``, from a generator seeded by all three."""
    import numpy as np
    import optuna.distributions as d

    rng = np.random.default_rng([seed, number, zlib.crc32(key.encode())])
    if isinstance(distribution, d.CategoricalDistribution):
        return distribution.choices[int(rng.integers(len(distribution.choices)))]
    if isinstance(distribution, d.IntDistribution):
        return int(rng.integers(distribution.low, distribution.high + 1))
    low, high = distribution.low, distribution.high
    if distribution.log:
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return float(rng.uniform(low, high))


def suggest(trial, spec: TuneSpec) -> dict[str, Any]:
    """Ask ``trial`` for a value of every tuned key: ``{"train.lr": 0.0031, ...}`` (the keys are config keys)."""
    return {p.key: _suggest_one(trial, p) for p in spec.params}


def _suggest_one(trial, p: ParamSpace) -> Any:
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        # a range kind always has both ends (unetlab.config.tune sets them); only "choice" leaves them None
        return trial.suggest_int(p.key, int(cast(float, p.low)), int(cast(float, p.high)))
    return trial.suggest_float(p.key, float(cast(float, p.low)), float(cast(float, p.high)),
                               log=p.kind == "log_uniform")


def check_tuned(runs: Sequence[tuple[Any, Any, int]], registry, path: str | Path, metric: str) -> str:
    """Check the runs of a tuned experiment against their data, before any MLflow run; return the tune
    metric's direction (``"max"`` or ``"min"``, as the metric registry gives it, as for ``train.monitor``).

    ``runs``: (run, its dataset source, its class count). A tuned experiment reports its verdict on the test
    split, so a run whose dataset has none is refused in one line (the dataset source API:
    ``len(source.split("test"))``; generated data: ``n_test``, folders: a ``test/`` folder or the split file's
    ``test`` list): reporting the split the parameters were tuned on is optimistic. The metric must be one
    the runs log on the validation split.
    """
    from unetlab.errors import did_you_mean
    from unetlab.plugin_api.registry import metric_directions

    directions = set()
    for run, source, num_classes in runs:
        try:
            size = len(source.split("test"))
        except UnetlabError as exc:
            raise UnetlabError(f"{path}: run '{run.name}': tune: the test split cannot be read: {exc}") from None
        if size == 0:
            raise ConfigError(f"{path}: tune: run '{run.name}' has no test split, and a tuned experiment is "
                              "judged on one (the validation split is the one tuned on); give the dataset test "
                              "images (generated data: n_test > 0; folders: a test/ folder or a 'test' list in the "
                              "split file)")
        logged = {k: v for k, v in metric_directions(run.config["train"], num_classes, registry).items()
                  if k.startswith("val_")}
        if metric not in logged:  # judged on the validation split: a val_ key
            raise ConfigError(f"{path}: tune.metric: '{metric}' is not logged on the validation split by run "
                              f"'{run.name}'{did_you_mean(metric, logged)} (logged: {', '.join(logged)})")
        directions.add(logged[metric])
    if len(directions) > 1:
        raise ConfigError(f"{path}: tune.metric: '{metric}' is higher-is-better in some runs and lower in others")
    return directions.pop()


def check_tuned_file(runs: Sequence, registry, path: str | Path, metric: str) -> str:
    """``check_tuned`` for runs not prepared (``unetlab validate``): builds each distinct dataset source once."""
    from unetlab.data.options import source_key
    from unetlab.data.sources import build_source, model_io

    sources: dict[str, Any] = {}
    items = []
    for run in runs:
        key = source_key(run.config["data"])
        if key not in sources:
            sources[key] = build_source(run.config, registry)
        items.append((run, sources[key], model_io(run.config, sources[key])[2]))
    return check_tuned(items, registry, path, metric)


@dataclass
class TrialReporter:
    """Follows one trial's validations: reports the tune metric to Optuna after each (epoch = step) and tells
    the trainer to stop when the pruner says so. ``stop_reason`` is the trainer's hook."""

    trial: Any                 # optuna.trial.Trial
    metric: str
    direction: str             # "max" | "min"
    prune: bool
    values: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    pruned: bool = False

    def stop_reason(self, epoch: int, step: int, record: dict[str, float]) -> str:
        """After the validation at the end of ``epoch`` (1-based), ``step`` optimiser steps in: "" to go on,
        or why the trial stops (pruned)."""
        self.epochs, self.steps = epoch, step
        value = record.get(self.metric)
        if value is None or not math.isfinite(value):
            return ""
        self.values.append(float(value))
        if not self.prune:
            return ""
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned = True
            return f"pruned: {self.metric} {value:.4g} at epoch {epoch} is worse than the median of earlier trials"
        return ""

    def objective(self) -> float | None:
        """The value given to Optuna: the best validation value of the metric, or the last one when pruned."""
        if not self.values:
            return None
        if self.pruned:
            return self.values[-1]
        return max(self.values) if self.direction == "max" else min(self.values)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as stored: its number, state (complete | pruned | failed | running), objective value, params
    and the budget it used."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    epochs: int
    steps: int
    seconds: float
    run_id: str | None


@dataclass(frozen=True)
class Budget:
    """What a variant's study spent: trials run (any state), pruned and failed ones, epochs and optimiser steps
    trained (pruned trials as far as they ran) and wall seconds of training."""

    trials: int
    pruned: int
    failed: int
    epochs: int
    steps: int
    seconds: float


_OPTUNA_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
                  "WAITING": "running"}


def trial_records(study) -> list[TrialRecord]:
    """The study's trials, their stored numbers checked (a journal is data, never trusted)."""
    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        epochs, steps, seconds = attrs.get("epochs", 0), attrs.get("steps", 0), attrs.get("seconds", 0.0)
        run_id = attrs.get("run_id")
        ok = (isinstance(epochs, int) and epochs >= 0 and isinstance(steps, int) and steps >= 0
              and isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0
              and (run_id is None or isinstance(run_id, str)))
        if not ok:
            raise UnetlabError(f"tuning study '{study.study_name}': trial {t.number} holds malformed budget "
                               f"attributes {dict(attrs)!r}")
        value = t.value if t.state.name == "COMPLETE" else attrs.get("last_value")
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            value = None
        records.append(TrialRecord(t.number, _OPTUNA_STATES.get(t.state.name, "failed"), value, dict(t.params),
                                   epochs, steps, float(seconds), run_id))
    return records


def count_budget(records: Sequence[TrialRecord]) -> Budget:
    """The budget spent by the finished trials of ``records`` (running ones are not counted)."""
    done = [r for r in records if r.state in STATES]
    return Budget(trials=len(done), pruned=sum(r.state == "pruned" for r in done),
                  failed=sum(r.state == "failed" for r in done), epochs=sum(r.epochs for r in done),
                  steps=sum(r.steps for r in done), seconds=sum(r.seconds for r in done))


def best_trial(records: Sequence[TrialRecord], direction: str) -> TrialRecord | None:
    """The complete trial with the best value (the lowest number among equals); None when none completed."""
    complete = [r for r in records if r.state == "complete" and r.value is not None]
    if not complete:
        return None
    sign = -1.0 if direction == "max" else 1.0
    return min(complete, key=lambda r: (sign * cast(float, r.value), r.number))  # value is not None: filtered above


def plan_lines(spec: TuneSpec, variants: Sequence[str], final_runs: int, direction: str) -> list[str]:
    """What ``unetlab validate`` says of a tuned experiment: trials x variants, the budget, the space."""
    lines = [f"tune: {len(variants)} variant(s) x {spec.budget_text()}; metric {spec.metric} ({direction}) on the "
             f"validation split; then {final_runs} final run(s) with each variant's best parameters, judged on "
             "the test split"]
    for p in spec.params:
        span = ", ".join(map(repr, p.choices)) if p.kind == "choice" else f"{p.low!r}, {p.high!r}"
        lines.append(f"  {p.key}: {p.kind} [{span}]")
    return lines
