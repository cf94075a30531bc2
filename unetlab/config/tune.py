"""The ``tune:`` section of an experiment file, parsed and checked into a frozen ``TuneSpec``.

Every variant of a tuned experiment gets the same search space, trial count, per-trial budget, sampler
and sampler seed, so that a verdict between variants is not a verdict between hand-picked settings::

    tune:
      params:
        train.lr: {log_uniform: [1.0e-4, 1.0e-2]}
        train.weight_decay: {uniform: [0.0, 1.0e-3]}
        data.batch_size: {choice: [4, 8]}
      trials: 8                 # per variant
      epochs: 4                 # per trial (or max_steps: N; exactly one)
      sampler: tpe              # tpe | random | qmc
      seed: 0                   # one sampler seed for every variant
      pruning: {median: {warmup_epochs: 1, startup_trials: 2}}   # or false (default)
      metric: val_iou           # default: the monitored metric (train.monitor)

This module checks the section's own shape only; whether ``params`` name real config keys, and whether a
variant's declared factor is tuned, is checked by the experiment loader. Imports stdlib and
``unetlab.errors`` only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from unetlab.errors import ConfigError, did_you_mean, known_list

__all__ = ["DISTRIBUTIONS", "SAMPLERS", "PRUNERS", "ParamSpace", "Pruning", "TuneSpec", "parse_tune"]

DISTRIBUTIONS = ("uniform", "log_uniform", "int", "choice")
SAMPLERS = ("tpe", "random", "qmc")
PRUNERS = ("median",)
SECTION_KEYS = ("params", "trials", "epochs", "max_steps", "sampler", "seed", "pruning", "metric")
MEDIAN_KEYS = ("warmup_epochs", "startup_trials")
MAX_TRIALS = 10_000
MAX_PARAMS = 64
MAX_EPOCHS = 100_000
MAX_STEPS = 10 ** 9
MAX_SEED = 2 ** 32 - 1          # numpy's seed range: the samplers seed numpy generators
MAX_CHOICES = 1_000
# Optuna's MedianPruner defaults: prune only once this many trials finished, and never before this epoch.
DEFAULT_STARTUP_TRIALS = 5
DEFAULT_WARMUP_EPOCHS = 0

KeyPath = tuple[Any, ...]
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class ParamSpace:
    """One tuned config key: ``key`` (dotted, ``train.lr``) drawn from ``kind`` over ``low``..``high``
    (``uniform``, ``log_uniform``, ``int``; both ends included) or from ``choices`` (``choice``)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Scalar, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The range as written in the file: ``{"log_uniform": [1e-4, 1e-2]}``."""
        return {self.kind: list(self.choices) if self.kind == "choice" else [self.low, self.high]}


@dataclass(frozen=True)
class Pruning:
    """Median pruning: a trial stops when its value at an epoch is worse than the median of the earlier
    trials' values at that epoch; never in its first ``warmup_epochs`` epochs, nor before ``startup_trials``
    trials have finished."""

    kind: str = "median"
    warmup_epochs: int = DEFAULT_WARMUP_EPOCHS
    startup_trials: int = DEFAULT_STARTUP_TRIALS


@dataclass(frozen=True)
class TuneSpec:
    """The parsed ``tune:`` section. ``epochs`` xor ``max_steps`` is the budget of each trial; ``metric``
    None means the monitored metric (``train.monitor``), resolved by the loader."""

    params: tuple[ParamSpace, ...]
    trials: int
    sampler: str
    seed: int
    epochs: int | None = None
    max_steps: int | None = None
    pruning: Pruning | None = None
    metric: str | None = None

    def space(self) -> dict[str, dict[str, list]]:
        """The search space as written: ``{"train.lr": {"log_uniform": [0.0001, 0.01]}, ...}``."""
        return {p.key: p.as_dict() for p in self.params}

    def space_json(self) -> str:
        """The search space as canonical JSON (sorted keys): what the study run's ``unetlab.tune_space`` holds."""
        return json.dumps(self.space(), sort_keys=True)

    def budget_text(self) -> str:
        """``3 trials x 2 epochs`` / ``3 trials x 500 steps``, plus the pruning when there is one."""
        per_trial = f"{self.epochs} epoch(s)" if self.epochs is not None else f"{self.max_steps} step(s)"
        pruning = "" if self.pruning is None else (
            f", median pruning after {self.pruning.warmup_epochs} epoch(s) once {self.pruning.startup_trials} "
            "trial(s) finished")
        return f"{self.trials} trial(s) x {per_trial}, sampler {self.sampler} (seed {self.seed}){pruning}"


def parse_tune(section: Any, at: Callable[[KeyPath], str] | None = None) -> TuneSpec:
    """Check a ``tune:`` section and return its ``TuneSpec``.

    ``at(key_path)`` gives ``file:line`` for a key path such as ``("tune", "params", "train.lr")``; every
    problem is a ``ConfigError`` of one line naming that place, the dotted key path and what is allowed.
    """
    where = _Where(at)
    if not isinstance(section, dict) or not section:
        where.fail(("tune",), "expected a mapping with the keys params, trials and epochs or max_steps "
                              "(e.g. tune: {params: {train.lr: {log_uniform: [1.0e-4, 1.0e-2]}}, trials: 8, "
                              "epochs: 4})")
    for key in section:
        if key not in SECTION_KEYS:
            where.fail(("tune", key), f"unknown key{did_you_mean(str(key), SECTION_KEYS)} "
                                      f"(allowed: {known_list(SECTION_KEYS)})")
    for required in ("params", "trials"):
        if required not in section:
            where.fail(("tune",), f"the key '{required}' is required (keys: {known_list(SECTION_KEYS)})")
    epochs, max_steps = section.get("epochs"), section.get("max_steps")
    if (epochs is None) == (max_steps is None):
        where.fail(("tune",), "give the budget of each trial as exactly one of epochs or max_steps, "
                              f"got {'both' if epochs is not None else 'neither'}")
    return TuneSpec(
        params=_params(section["params"], where),
        trials=_count(section["trials"], ("tune", "trials"), MAX_TRIALS, where),
        epochs=None if epochs is None else _count(epochs, ("tune", "epochs"), MAX_EPOCHS, where),
        max_steps=None if max_steps is None else _count(max_steps, ("tune", "max_steps"), MAX_STEPS, where),
        sampler=_sampler(section.get("sampler", "tpe"), where),
        seed=_seed(section.get("seed", 0), where),
        pruning=_pruning(section.get("pruning", False), where),
        metric=_metric(section.get("metric"), where))


class _Where:
    """Builds the one-line errors: ``file:line: tune.params.train.lr.log_uniform: what is allowed``."""

    def __init__(self, at: Callable[[KeyPath], str] | None) -> None:
        self.at = at

    def fail(self, key_path: KeyPath, detail: str) -> NoReturn:
        dotted = ".".join(str(k) for k in key_path)
        place = self.at(key_path) if self.at is not None else ""
        raise ConfigError(f"{place}: {dotted}: {detail}" if place else detail, None if place else dotted)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _count(value: Any, key_path: KeyPath, maximum: int, where: _Where) -> int:
    if not _is_int(value) or not 1 <= value <= maximum:
        where.fail(key_path, f"expected an integer in [1, {maximum}], got {_short(value)}")
    return value


def _params(value: Any, where: _Where) -> tuple[ParamSpace, ...]:
    if not isinstance(value, dict) or not value:
        where.fail(("tune", "params"), "expected a mapping of dotted config keys to ranges, e.g. "
                                       "{train.lr: {log_uniform: [1.0e-4, 1.0e-2]}}")
    if len(value) > MAX_PARAMS:
        where.fail(("tune", "params"), f"at most {MAX_PARAMS} tuned keys, got {len(value)}")
    return tuple(_param(key, spec, where) for key, spec in value.items())


def _param(key: Any, spec: Any, where: _Where) -> ParamSpace:
    path: KeyPath = ("tune", "params", key)
    if not isinstance(key, str) or not key or not all(key.split(".")):
        where.fail(path, "expected a dotted config key such as train.lr")
    example = "e.g. {log_uniform: [1.0e-4, 1.0e-2]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        where.fail(path, f"expected one range, one of {known_list(DISTRIBUTIONS)} ({example}), got {_short(spec)}")
    kind, bounds = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        where.fail(path + (kind,), f"unknown range{did_you_mean(str(kind), DISTRIBUTIONS)} "
                                   f"(allowed: {known_list(DISTRIBUTIONS)})")
    path += (kind,)
    if kind == "choice":
        return ParamSpace(key, kind, choices=_choices(bounds, path, where))
    if not isinstance(bounds, list) or len(bounds) != 2:
        where.fail(path, f"expected [lo, hi], got {_short(bounds)}")
    low, high = bounds
    if kind == "int":
        if not (_is_int(low) and _is_int(high)) or not low < high:
            where.fail(path, f"expected integers [lo, hi] with lo < hi, got {_short(bounds)}")
        return ParamSpace(key, kind, low, high)
    if not (_is_number(low) and _is_number(high)) or not low < high:
        where.fail(path, f"expected finite numbers [lo, hi] with lo < hi, got {_short(bounds)}")
    if kind == "log_uniform" and low <= 0:
        where.fail(path, f"expected 0 < lo < hi (a log scale), got {_short(bounds)}")
    return ParamSpace(key, kind, float(low), float(high))


def _choices(value: Any, path: KeyPath, where: _Where) -> tuple[Scalar, ...]:
    if not isinstance(value, list) or len(value) < 2 or len(value) > MAX_CHOICES:
        where.fail(path, f"expected a list of 2 to {MAX_CHOICES} values, got {_short(value)}")
    for i, item in enumerate(value):
        if not (item is None or isinstance(item, (str, bool)) or _is_number(item)):
            where.fail(path + (i,), f"a choice must be a string, number, boolean or null, got {_short(item)}")
    # yaml's 1 and 1.0 and True would collide as Optuna categories: compare their JSON spellings
    if len({json.dumps(item) for item in value}) != len(value):
        where.fail(path, f"duplicate values in {_short(value)}")
    return tuple(value)


def _sampler(value: Any, where: _Where) -> str:
    if value not in SAMPLERS:
        where.fail(("tune", "sampler"), f"unknown sampler {_short(value)}{did_you_mean(str(value), SAMPLERS)} "
                                        f"(allowed: {known_list(SAMPLERS)})")
    return value


def _seed(value: Any, where: _Where) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        where.fail(("tune", "seed"), f"expected an integer in [0, {MAX_SEED}], got {_short(value)}")
    return value


def _pruning(value: Any, where: _Where) -> Pruning | None:
    path: KeyPath = ("tune", "pruning")
    if value is False or value is None:
        return None
    if value in PRUNERS:
        return Pruning(kind=value)
    if not isinstance(value, dict) or len(value) != 1:
        where.fail(path, f"expected false, median or {{median: {{warmup_epochs: N, startup_trials: M}}}}, "
                         f"got {_short(value)}")
    kind, options = next(iter(value.items()))
    if kind not in PRUNERS:
        where.fail(path + (kind,), f"unknown pruner{did_you_mean(str(kind), PRUNERS)} "
                                   f"(allowed: {known_list(PRUNERS)})")
    options = options or {}
    if not isinstance(options, dict):
        where.fail(path + (kind,), f"expected a mapping with keys {known_list(MEDIAN_KEYS)}, got {_short(options)}")
    for key in options:
        if key not in MEDIAN_KEYS:
            where.fail(path + (kind, key), f"unknown key{did_you_mean(str(key), MEDIAN_KEYS)} "
                                           f"(allowed: {known_list(MEDIAN_KEYS)})")
    found: dict[str, int] = {}
    for key, default in (("warmup_epochs", DEFAULT_WARMUP_EPOCHS), ("startup_trials", DEFAULT_STARTUP_TRIALS)):
        number = options.get(key, default)
        if not _is_int(number) or not 0 <= number <= MAX_EPOCHS:
            where.fail(path + (kind, key), f"expected an integer in [0, {MAX_EPOCHS}], got {_short(number)}")
        found[key] = number
    return Pruning(kind=kind, **found)


def _metric(value: Any, where: _Where) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        where.fail(("tune", "metric"), f"expected a metric key such as val_iou, got {_short(value)}")
    return value
