"""What tuning cost each variant, and how the verdict depends on that budget: ``unetlab compare`` on a tuned
experiment.

Read from MLflow (``unetlab.runs.tuning`` writes it): per variant one study run (``unetlab.role = study``,
a child of the parent run) with the budget spent (``tune.trials``, ``tune.pruned``, ``tune.epochs``,
``tune.steps``, ``tune.seconds``) and the best parameters (``tune.best.<key>``), and its trial runs
(``unetlab.role = trial``) each with ``tune.objective``, the best validation value the trial reached.

From the trials that completed, each variant gets its *expected best validation score after n trials*,
n = 1 .. its complete trials (Tang et al. 2020's unbiased estimator, ``unetlab.analysis.expected_max``): a
variant whose curve leads only past some n wins only with that much tuning. Pruned trials stopped early
(their objective is a partial value) and failed ones have none: both are left out of the curves and counted.
Everything read back is validated: a missing or non-finite value is a warning naming the run, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from unetlab.analysis.expected_max import Crossing, crossings, expected_max_curve
from unetlab.tracking import tags as run_tags

__all__ = ["BUDGET_METRICS", "TuningReport", "VariantBudget", "budget_figure", "read_tuning"]

ROLE_TAG, VARIANT_TAG = run_tags.ROLE, run_tags.VARIANT
STATE_TAG, NUMBER_TAG = run_tags.TRIAL_STATE, run_tags.TRIAL_NUMBER
BUDGET_METRICS = ("tune.trials", "tune.pruned", "tune.epochs", "tune.steps", "tune.seconds")
TRIAL_STATES = ("complete", "pruned", "failed")


@dataclass(frozen=True)
class VariantBudget:
    """One variant's tuning: what its study says it spent, its best parameters, its complete trials' values."""

    variant: str
    study_run_id: str
    spent: dict[str, float | None]          # BUDGET_METRICS -> value (None: missing or not a finite count)
    best_params: dict[str, str]             # dotted key -> value as logged
    objectives: list[float]                 # tune.objective of the complete trials, by trial number
    trial_runs: dict[str, int]              # trial state -> trial runs found


@dataclass(frozen=True)
class TuningReport:
    """The tuning budget per variant and the expected-max curves, with what they say about the verdict."""

    metric: str
    direction: str                           # "max" or "min"
    budgets: list[VariantBudget]
    curves: dict[str, list[float]]           # variant -> expected best after n = 1.. trials
    crossings: list[Crossing]
    warnings: list[str] = field(default_factory=list)

    def budget_table(self) -> list[str]:
        """The budget per variant as aligned text rows (a header first)."""
        header = ["variant", "trials", "pruned", "failed", "epochs", "steps", "seconds", "best parameters"]
        rows = [[b.variant, *(_count(b.spent.get(k)) for k in ("tune.trials", "tune.pruned")),
                 str(b.trial_runs.get("failed", 0)), _count(b.spent.get("tune.epochs")),
                 _count(b.spent.get("tune.steps")), _seconds(b.spent.get("tune.seconds")),
                 ", ".join(f"{k}={v}" for k, v in b.best_params.items()) or "-"] for b in self.budgets]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]

    def budget_line(self) -> str:
        """One line: who leads the expected best validation score as the number of trials grows."""
        if len(self.curves) < 2:
            return "expected best validation score by number of trials: needs two variants with complete trials"
        n = min(len(c) for c in self.curves.values())
        if self.crossings:
            parts = [f"{c.before} leads up to {c.below} trial{'s' * (c.below > 1)}, {c.after} from {c.above}"
                     for c in self.crossings]
            return (f"the verdict depends on the tuning budget: {'; then '.join(parts)} (expected best "
                    f"{self.metric} after n trials, n = 1..{n})")
        ends = {name: curve[n - 1] for name, curve in self.curves.items()}
        pick = max if self.direction == "max" else min
        leader = pick(ends, key=ends.__getitem__)
        return (f"the tuning budget does not change the leader: {leader} has the better expected best validation "
                f"{self.metric} at every n = 1..{n} trials (or they tie)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuningReport:
        """The report back from ``as_dict()``."""
        return cls(data["metric"], data["direction"], [VariantBudget(**b) for b in data["budgets"]],
                   dict(data["curves"]), [Crossing(**c) for c in data["crossings"]], list(data["warnings"]))

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``compare --format json``."""
        return {"metric": self.metric, "direction": self.direction, "warnings": self.warnings,
                "curves": self.curves, "crossings": [vars(c) for c in self.crossings],
                "budgets": [vars(b) for b in self.budgets]}


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _finite(value: Any) -> float | None:
    """A store value as a finite float (else None)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _trial_number(run: Any) -> int:
    text = run.data.tags.get(NUMBER_TAG, "")
    return int(text) if text.isdigit() else 10**9  # unnumbered last, in start order (sorted is stable)


def _read_variant(client: Any, experiment_id: str, study: Any, warn: Callable[[str], None]) -> VariantBudget:
    variant = study.data.tags.get(VARIANT_TAG) or study.info.run_name or study.info.run_id
    who = f"study run '{study.info.run_name}' (id {study.info.run_id})"
    spent: dict[str, float | None] = {}
    for key in BUDGET_METRICS:
        value = _finite(study.data.metrics.get(key))
        if value is not None and value < 0:
            value = None
        if value is None:
            warn(f"{who}: {key} is missing or not a finite count; shown as -")
        spent[key] = value
    best = {k[len("tune.best."):]: v for k, v in study.data.params.items()  # dotted config keys only
            if k.startswith("tune.best.") and "." in k[len("tune.best."):]}
    trials = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study.info.run_id}'",
                                max_results=5000, order_by=["attributes.start_time ASC"])
    found = {state: 0 for state in TRIAL_STATES}
    objectives = []
    for trial in sorted((t for t in trials if t.data.tags.get(ROLE_TAG) == "trial"), key=_trial_number):
        state = trial.data.tags.get(STATE_TAG)
        name = f"trial run '{trial.info.run_name}' (id {trial.info.run_id})"
        if state not in TRIAL_STATES:
            warn(f"{name}: {STATE_TAG} is {str(state)[:40]!r}, not one of {', '.join(TRIAL_STATES)}; left out")
            continue
        found[state] += 1
        if state != "complete":
            continue
        value = _finite(trial.data.metrics.get("tune.objective"))
        if value is None:
            warn(f"{name}: complete, but its tune.objective is missing or not finite; left out of the curve")
            continue
        objectives.append(value)
    counted = sum(found.values())
    if spent["tune.trials"] is not None and counted != spent["tune.trials"]:
        warn(f"{who}: tune.trials says {spent['tune.trials']:.0f} trials, but {counted} trial runs were found")
    return VariantBudget(variant, study.info.run_id, spent, best, objectives, found)


def _study_direction(studies: list[Any], warn: Callable[[str], None]) -> tuple[str, str]:
    metrics = {s.data.params.get("tune.metric") for s in studies}
    directions = {s.data.params.get("tune.direction") for s in studies}
    if len(metrics) != 1 or None in metrics:
        warn(f"the studies name different or no tune metrics ({', '.join(sorted(map(str, metrics)))})")
    if directions == {"min"}:
        return next(iter(metrics)) or "?", "min"
    if directions != {"max"}:
        warn(f"the studies' tune.direction is {', '.join(sorted(map(str, directions)))}: assuming higher is better")
    return next(iter(metrics)) or "?", "max"


def read_tuning(client: Any, experiment_id: str, parent_id: str, warnings: list[str]) -> TuningReport | None:
    """The tuning report of the invocation under ``parent_id`` (None when it has no study runs: untuned).
    Problems with what the store holds are appended to ``warnings`` and also kept on the report."""
    studies = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                 f"tags.`{ROLE_TAG}` = 'study'", max_results=1000,
                                 order_by=["attributes.start_time ASC"])
    if not studies:
        return None
    found: list[str] = []
    metric, direction = _study_direction(studies, found.append)
    budgets = [_read_variant(client, experiment_id, study, found.append) for study in studies]
    curves = {b.variant: expected_max_curve(b.objectives, direction=direction) for b in budgets if b.objectives}
    for b in budgets:
        if not b.objectives:
            found.append(f"variant {b.variant}: no complete trial with a tune.objective; no budget curve")
    if len({len(b.objectives) for b in budgets}) > 1:
        found.append("the variants have different numbers of complete trials ("
                     + ", ".join(f"{b.variant} {len(b.objectives)}" for b in budgets)
                     + "): the curves are compared up to the shortest")
    between = crossings(curves, direction=direction) if len(curves) >= 2 else []
    warnings.extend(found)
    return TuningReport(metric, direction, budgets, curves, between, found)


def budget_figure(report: TuningReport):
    """The expected best validation score after n trials, one line per variant, crossings marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, curve) in enumerate(report.curves.items()):
        ax.plot(range(1, len(curve) + 1), curve, "o-", color=f"C{i}", label=f"{name} ({len(curve)} complete trials)")
    for crossing in report.crossings:
        ax.axvspan(crossing.below, crossing.above, color="0.88", zorder=0)
        ax.annotate(f"{crossing.after} leads from {crossing.above}", (crossing.above, ax.get_ylim()[0]),
                    xytext=(-3, 6), textcoords="offset points", fontsize=8, ha="right")
    better = "higher" if report.direction == "max" else "lower"
    ax.set(xlabel="number of tuning trials n", ylabel=f"expected best {report.metric} (validation)",
           title=f"expected best {report.metric} after n trials ({better} is better)\n"
                 "unbiased estimator without replacement (Tang et al. 2020)")
    # a new linear axis's major locator is an AutoLocator, a MaxNLocator (whose set_params takes integer=)
    cast(MaxNLocator, ax.xaxis.get_major_locator()).set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
