"""``unetlab compare``: variants side by side, and for each pair whether and by how much they differ.

Rows come from the nested runs of one parent run (the latest with a finished child by default),
grouped by variant (the run name without its ``seed=N`` and ``fold=K`` parts): best and final value of
each logged metric as mean +- std over the variant's *replicates*, parameters, GFLOPs, training time.
A replicate is one (fold, seed): cross-validation folds are replicates, as seeds are (the fold comes
from the run's ``unetlab.matrix.data.fold`` tag, its ``fold=K`` name part, or its ``data.fold`` param
when ``data.folds`` is set).

Pairs. Two variants are paired on the same replicates (fold and seed) and the same validation images,
using each run's per-image table of its best checkpoint (``per_image_metrics.json``, see
``unetlab.tracking.per_image``); with K folds every image of the training pool is paired once per seed:

1. the primary line: the mean per-image difference A - B with a 95% interval from a hierarchical
   bootstrap (replicates, then images), the Wilcoxon signed-rank test across images on the differences
   averaged over seeds (Holm-corrected when there are more than two variants), effect sizes, and a
   verdict: "A better", "B better", "equivalent within +-margin" or "not resolved" with the seeds
   or images that would resolve it (``unetlab.analysis.paired_stats`` has the exact rules), and a warning when
   the verdict is fragile (an interval bound within 10% of the margin of 0 or +-margin) saying what
   would settle it;
2. a second line: the replicate-level Welch t-test on the per-replicate best values (whole-set metric;
   "seed-level" when there are no folds).

With folds, each variant also gets its cross-validation estimate: the mean per-image value over all
replicates and images, the std of the replicate means, and a 95% hierarchical bootstrap interval; a
fold-only experiment (one variant) prints that and no pairs.

Runs without per-image tables (logged before they existed) get the seed-level line only, and say so.
Which way is better comes from the runs' ``unetlab.metric_directions`` tag, never from the name (a
``test_`` metric goes the way of its ``val_`` one).

Tuned experiments (a ``tune:`` section). Only the *final* runs (tag ``unetlab.role = final``) are compared;
the study runs and their trials are read for the tuning budget (``unetlab.analysis.tuning_budget``). The
validation split chose each variant's parameters, so its scores are optimistic: the verdict is on the
held-out test split (``test_<monitored metric>`` and each run's ``per_image_test_metrics.json``) and the
output says so; the budget each variant spent is a table; the expected best validation score after n
trials is a figure (``<figure>-budget.png``, logged as ``tuning_budget.png``) and a line saying whether the
leader changes with the number of trials. ``--metric test_<name>`` judges an untuned experiment whose runs
had a test split the same way.

Every comparison ends with its contract (``unetlab.analysis.contract``): the keys the variants differ in
and the confound columns (parameters, FLOPs, steps, compute, time, peak memory, data), warned about when
compute differs by more than ``compute_ratio``.

``compare_runs`` returns a ``Comparison``; its ``as_dict()`` is the plain data ``compare.json`` holds and the
figure and the dashboard read.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, fields
from itertools import combinations
from typing import Any, cast

from unetlab.analysis.contract import (
    ComparisonContract,
    build_contract,
    contract_from_dict,
    format_contract,
)
from unetlab.analysis.contract_records import records_from_runs
from unetlab.analysis.tuning_budget import TuningReport, read_tuning
from unetlab.errors import ConfigError, UnetlabError, did_you_mean
from unetlab.tracking import tags as run_tags

__all__ = ["BUDGET_FIGURE", "Comparison", "compare_runs", "render", "welch"]

DIRECTIONS_TAG = run_tags.METRIC_DIRECTIONS
BUDGET_FIGURE = "tuning_budget.png"  # the expected-max curves, on the parent run


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (None when a group has fewer than 2 values)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return 1.0 if statistics.mean(a) == statistics.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return None, None
    return statistics.mean(clean), (statistics.stdev(clean) if len(clean) > 1 else None)


_FOLD_PART = re.compile(r"^(?:data\.)?fold=(.*)$")
FOLD_TAG = run_tags.FOLD


def _variant(run) -> str:
    """The run's variant: its name without the ``seed=`` and ``fold=`` parts (replicates, not variants)."""
    name = run.info.run_name or ""
    parts = [p for p in name.split("/") if not p.startswith("seed=") and not _FOLD_PART.match(p)]
    return "/".join(parts) or run.data.tags.get(run_tags.VARIANT) or name or run.info.run_id


def _seed(run) -> str:
    tag = run.data.tags.get(run_tags.SEED)
    if tag is not None:
        return tag
    found = re.search(r"seed=([^/]*)$", run.info.run_name or "")
    return found.group(1) if found else run.info.run_id


def _fold(run) -> str | None:
    """The run's cross-validation fold, or None when it is not part of a K-fold comparison."""
    tag = run.data.tags.get(FOLD_TAG)
    if tag is not None:
        return tag
    for part in (run.info.run_name or "").split("/"):
        found = _FOLD_PART.match(part)
        if found:
            return found.group(1)
    if run.data.params.get("data.folds", "None") not in ("None", "", "null"):
        return run.data.params.get("data.fold", "0")
    return None


def _replicate(run, folds: bool) -> str:
    """The run's replicate label: its seed, or ``fold=K/seed=N`` when the runs are cross-validated."""
    return f"fold={_fold(run)}/seed={_seed(run)}" if folds else _seed(run)


def _directions(runs) -> dict[str, str]:
    """Union of the runs' ``unetlab.metric_directions`` tags (key -> "max"/"min"); a ``test_`` metric goes the
    way of its ``val_`` one (the same metric on the test split)."""
    out: dict[str, str] = {}
    for run in runs:
        text = run.data.tags.get(DIRECTIONS_TAG)
        if text:
            try:
                out.update({k: v for k, v in json.loads(text).items() if v in ("max", "min")})
            except (ValueError, AttributeError, RecursionError):  # store content: a bad tag is no direction
                continue
    return {**{"test_" + k.removeprefix("val_"): v for k, v in out.items() if k.startswith("val_")}, **out}


def _find_parent(client, experiment_id: str) -> str:
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{run_tags.PARENT}` = 'true'",
                                 order_by=["attributes.start_time DESC"], max_results=50)
    for parent in parents:
        children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                      f"'{parent.info.run_id}'", max_results=5000)
        if any(c.info.status == "FINISHED" for c in children):
            return parent.info.run_id
    raise UnetlabError("no finished runs to compare in this experiment (run 'unetlab run' first)")


def _paired_groups(tables_a: dict, tables_b: dict) -> list[tuple[str, list, list[float]]]:
    """Per replicate both variants have: (replicate, image ids, A - B) on the images both have usable values of."""
    groups = []
    for replicate, read_a in tables_a.items():
        read_b = tables_b.get(replicate)
        if read_b is None or read_a.values is None or read_b.values is None:
            continue
        images = [i for i in read_a.values if i in read_b.values]
        if images:
            groups.append((replicate, images, [read_a.values[i] - read_b.values[i] for i in images]))
    return groups


def _pair_losses(tables_a: dict, tables_b: dict, names_a: dict, names_b: dict,
                 groups: list) -> dict[str, Any] | None:
    """What a pair could not use of the per-image values its tables name, and why (None: nothing lost).

    Counted over the replicates both variants ran: every image either table names, less those paired.
    """
    if all(r.values is None and r.problem is None for r in [*tables_a.values(), *tables_b.values()]):
        return None  # no tables at all (runs logged before them): the seed-level fallback says so
    used_by = {replicate: len(images) for replicate, images, _ in groups}
    total, reasons = 0, []
    for replicate in [r for r in tables_a if r in tables_b]:
        sides = ((tables_a[replicate], names_a[replicate]), (tables_b[replicate], names_b[replicate]))
        images = {i for read, _ in sides for i in read.images}
        total += len(images)
        for read, name in sides:
            if read.problem:
                reasons.append(f"bad per-image table in run '{name}'")
            elif read.values is None:
                reasons.append(f"no per-image table in run '{name}'")
            reasons += [f"{why} in run '{name}' ({n})" for why, n in read.dropped.items()]
        if all(read.values is not None for read, _ in sides) and \
                set(sides[0][0].images) != set(sides[1][0].images):
            reasons.append(f"images in one variant's table only ({replicate})")
    used = sum(used_by.values())
    if used == total and not reasons:
        return None
    return {"values_used": used, "values_total": total, "dropped": total - used, "reasons": reasons}


def _cv_estimate(tables: dict, bests: list[float], metric: str) -> dict[str, Any] | None:
    """A variant's cross-validation estimate from its per-image tables (else from its best values)."""
    from unetlab.analysis import paired_stats

    groups = [list(read.values.values()) for read in tables.values() if read.values]
    if groups:
        lost = {"dropped": sum(read.dropped_count for read in tables.values()),
                "bad_tables": sum(read.problem is not None for read in tables.values())}
        return {**paired_stats.cv_estimate(groups), **lost,
                "source": f"per-image {metric} of each replicate's best checkpoint"}
    if len(bests) < 2:
        return None
    interval = paired_stats.t_interval(bests)
    assert interval is not None  # None only with fewer than 2 values, returned above
    low, high = interval
    return {"mean": statistics.mean(bests), "std": statistics.stdev(bests), "ci_low": low, "ci_high": high,
            "n_replicates": len(bests), "n_values": len(bests), "interval": "t-interval over replicates",
            "source": f"best whole-set {metric} of each replicate (no per-image tables)"}


def _read_tables(client, runs_by_variant: dict[str, list], replicate_of, metric: str,
                 warnings: list[str], split: str = "validation") -> tuple[dict, list[dict[str, Any]]]:
    """Every run's validated per-image values on ``split`` (``unetlab.analysis.compare_inputs``), and one report
    per run that had a bad table or dropped rows (also a warning line naming the run)."""
    from unetlab.analysis.compare_inputs import declared_ranges, read_per_image
    from unetlab.tracking.per_image import PER_IMAGE_ARTIFACT, PER_IMAGE_TEST_ARTIFACT

    artifact = PER_IMAGE_TEST_ARTIFACT if split == "test" else PER_IMAGE_ARTIFACT

    tables: dict[str, dict] = {}
    reports = []
    for variant, runs in runs_by_variant.items():
        for run in runs:
            who = f"run '{run.info.run_name}' (id {run.info.run_id})"
            ranges, tag_problem = declared_ranges(run.data.tags)
            if tag_problem:
                warnings.append(f"{who}: {tag_problem}")
            ranges.update({"test_" + k.removeprefix("val_"): r for k, r in ranges.items() if k.startswith("val_")})
            read = read_per_image(client, run.info.run_id, metric, ranges, artifact=artifact)
            tables.setdefault(variant, {})[replicate_of(run)] = read
            if read.problem or read.dropped:
                reports.append({"run_id": run.info.run_id, "run_name": run.info.run_name, "variant": variant,
                                "replicate": replicate_of(run), "problem": read.problem,
                                "images": len(read.images), "dropped": read.dropped})
            if read.problem:
                warnings.append(f"{who}: {read.problem}; none of its per-image values are used")
            elif read.dropped:
                why = "; ".join(f"{reason}: {n}" for reason, n in read.dropped.items())
                warnings.append(f"{who}: {read.dropped_count} of {len(read.images)} images dropped from "
                                f"{artifact} ({why})")
    return tables, reports


def _param(run, key: str, kind: type, default: Any, warnings: list[str]) -> Any:
    """A run's param converted to ``kind`` (store content: a garbled one is ``default`` and a warning)."""
    text = run.data.params.get(key)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        warnings.append(f"run '{run.info.run_name}' (id {run.info.run_id}): param {key} = {text[:40]!r} is not "
                        f"a {kind.__name__}; shown as {default}")
        return default


@dataclass
class Comparison:
    """``compare_runs``'s result. ``as_dict()`` is its plain data: ``compare.json``, and what the figure and
    the dashboard read. Rows and pairs are plain data already (a row has one column per logged metric)."""

    metric: str
    direction: str                            # "max" or "min"
    direction_source: str
    margin: float | None
    parent_run_id: str
    split: str                                # the split the verdict is on: "validation" or "test"
    split_images: int | None                  # its images (from the per-image tables), when known
    rows: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    curves: dict[str, list[list[tuple[int, float]]]]   # variant -> per run: (epoch, validation value)
    seed_bests: dict[str, dict[str, float]]            # variant -> replicate -> its value of ``metric``
    not_finished: list[str]
    warnings: list[str]
    cross_validated: bool
    folds: list[str]
    cv: dict[str, dict[str, Any] | None]
    dropped: list[dict[str, Any]]
    tests: dict[str, str]
    contract: ComparisonContract | None = None
    tuning: TuningReport | None = None

    @property
    def higher_is_better(self) -> bool:
        """Whether a higher value of ``metric`` is better."""
        return self.direction == "max"

    def as_dict(self) -> dict[str, Any]:
        """The comparison as plain data (JSON-ready but for the curves' tuples)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["higher_is_better"] = self.higher_is_better
        data["contract"] = self.contract.as_dict() if self.contract else None
        data["tuning"] = self.tuning.as_dict() if self.tuning else None
        return data


@dataclass
class _Selection:
    """The runs a comparison is made of."""

    finished: list          # FINISHED final runs (untuned experiments: every training run)
    not_finished: list[str]  # names of final runs that did not finish
    tuning: TuningReport | None


def check_compare_options(margin: float | None, compute_ratio: float | None) -> None:
    """``--margin`` and ``--compute-ratio`` as given: one line when out of range (before any store is read)."""
    if margin is not None and not (margin > 0 and math.isfinite(margin)):
        raise ConfigError(f"--margin: must be a positive number, got {margin}")
    if compute_ratio is not None and not (compute_ratio > 1 and math.isfinite(compute_ratio)):
        raise ConfigError(f"--compute-ratio: must be a number > 1, got {compute_ratio}")


def compare_runs(client, experiment_id: str, metric: str | None, parent_id: str | None,
                 margin: float | None = None, direction: str | None = None,
                 compute_ratio: float | None = None,
                 compute_ratio_source: str = "compare.compute_ratio") -> Comparison:
    """Gather the comparison of one parent run's final runs (see the module docstring); ``compute_ratio``:
    the contract's warning threshold (None: ``COMPUTE_RATIO``), which ``compute_ratio_source`` names."""
    check_compare_options(margin, compute_ratio)
    parent_id = parent_id or _find_parent(client, experiment_id)
    warnings: list[str] = []
    selection = _select_runs(client, experiment_id, parent_id, warnings)
    metric = _judged_metric(selection, metric, warnings)
    directions = _directions(selection.finished)
    direction, direction_source = _direction_of(metric, directions, direction, warnings)
    directions[metric] = direction
    fold_of = {c.info.run_id: _fold(c) for c in selection.finished}
    folds = sorted({f for f in fold_of.values() if f is not None}, key=lambda f: (len(f), f))
    cross_validated = bool(folds)

    def replicate_of(run) -> str:
        return _replicate(run, cross_validated)

    groups: dict[str, list] = {}
    for c in sorted(selection.finished, key=lambda c: c.info.start_time):  # the experiment file's order
        groups.setdefault(_variant(c), []).append(c)
    split = "test" if metric.startswith("test_") else "validation"
    tables, dropped = _read_tables(client, groups, replicate_of, metric, warnings, split)
    rows, curves, bests, seed_bests = _variant_rows(client, groups, metric, directions, fold_of, replicate_of,
                                                    warnings)
    cv = {v: _cv_estimate(tables[v], bests.get(v, []), metric) for v in groups} if cross_validated else {}
    fold_seed = {replicate_of(r): (fold_of[r.info.run_id], _seed(r)) for r in selection.finished}
    names = {v: {replicate_of(r): r.info.run_name for r in runs} for v, runs in groups.items()}
    pairs = _pairs(groups, tables, bests, names, fold_seed, margin, direction, cross_validated)
    tuned = sorted({k for b in selection.tuning.budgets for k in b.best_params}) if selection.tuning else []
    contract = build_contract(records_from_runs([(v, r) for v, runs in groups.items() for r in runs], tuned),
                              tuned=tuned, ratio=compute_ratio, ratio_source=compute_ratio_source)
    images = [len(read.images) for by_replicate in tables.values() for read in by_replicate.values() if read.images]
    return Comparison(
        metric=metric, direction=direction, direction_source=direction_source, margin=margin,
        parent_run_id=parent_id, split=split, split_images=max(images) if images else None, rows=rows, pairs=pairs,
        curves=curves, seed_bests=seed_bests, not_finished=selection.not_finished, warnings=warnings,
        cross_validated=cross_validated, folds=folds, cv=cv, dropped=dropped,
        tests=_test_descriptions(metric, cross_validated, len([p for p in pairs if p["paired"]]), split),
        contract=contract, tuning=selection.tuning)


def _select_runs(client, experiment_id: str, parent_id: str, warnings: list[str]) -> _Selection:
    """The parent's final runs (a tuned experiment's study runs and their trials are not compared) and its
    tuning report."""
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=5000)
    final = [c for c in children if c.data.tags.get(run_tags.ROLE, "final") == "final"]
    finished = [c for c in final if c.info.status == "FINISHED"]
    if not finished:
        raise UnetlabError(f"parent run {parent_id} has no finished runs")
    tuning = read_tuning(client, experiment_id, parent_id, warnings)
    return _Selection(finished, [c.info.run_name for c in final if c.info.status != "FINISHED"], tuning)


def _judged_metric(selection: _Selection, metric: str | None, warnings: list[str]) -> str:
    """The metric the verdict is on: ``--metric``, else the monitored one; on a tuned experiment its value on
    the held-out test split (the validation split chose the parameters: its scores are optimistic)."""
    finished = selection.finished
    monitor = finished[0].data.params.get("train.monitor", "val_iou")
    available = sorted({k for c in finished for k in c.data.metrics})
    if metric is None and selection.tuning is not None:
        metric = "test_" + monitor.removeprefix("val_")
        if metric not in available:
            raise UnetlabError(f"this experiment was tuned on the validation split, so its verdict is on the "
                               f"held-out test split, but its final runs logged no {metric} (logged: "
                               f"{', '.join(available)}); pass --metric to compare another")
    metric = metric or monitor
    if metric not in available:
        raise UnetlabError(f"--metric {metric}: not logged by these runs{did_you_mean(metric, available)} "
                           f"(logged: {', '.join(available)})")
    if selection.tuning is not None and not metric.startswith("test_"):
        warnings.append(f"{metric} is not on the held-out test split: the variants were tuned on the validation "
                        "split, so a verdict on it is optimistic")
    return metric


def _direction_of(metric: str, directions: dict[str, str], given: str | None,
                  warnings: list[str]) -> tuple[str, str]:
    """Which way is better for ``metric`` and where that was read."""
    if given is not None:
        return given, "--direction"
    if metric in directions:
        return directions[metric], f"the runs' {DIRECTIONS_TAG} tag"
    warnings.append(f"which way is better for {metric} is unknown (the runs have no {DIRECTIONS_TAG} tag "
                    f"for it): assuming higher is better; pass --direction max|min to say")
    return "max", "assumed"


def _variant_rows(client, groups: dict[str, list], metric: str, directions: dict[str, str], fold_of: dict,
                  replicate_of, warnings: list[str]) -> tuple[list, dict, dict, dict]:
    """Per variant: its row (best and final of every per-epoch metric, and of ``metric``, as mean +- std over
    replicates, params, GFLOPs, training time), its validation curves, its replicates' values of ``metric``."""
    available = sorted({k for runs in groups.values() for c in runs for k in c.data.metrics})
    keys = sorted({k for k in available if k.startswith("val_") or k == "train_loss"} | {metric})
    curve_key = "val_" + metric.removeprefix("test_") if metric.startswith("test_") else metric
    rows, bests, seed_bests = [], {}, {}
    curves: dict[str, list[list[tuple[int, float]]]] = {}  # variant -> per replicate: (step, value) of curve_key
    for variant, runs in groups.items():
        row: dict[str, Any] = {"variant": variant, "seeds": len({_seed(r) for r in runs}),
                               "folds": len({fold_of[r.info.run_id] for r in runs}), "replicates": len(runs)}
        for key in keys:
            best_values, final_values, by_replicate = [], [], {}
            for run in runs:
                history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
                if not history:
                    continue
                values = [m.value for m in history]
                if key in directions:  # no direction known: no "best" (final only)
                    best = max(values) if directions[key] == "max" else min(values)
                    best_values.append(best)
                    by_replicate[replicate_of(run)] = best
                final_values.append(values[-1])
                if key == curve_key:
                    curves.setdefault(variant, []).append([(m.step, m.value) for m in history])
            row[f"best_{key}_mean"], row[f"best_{key}_std"] = _mean_std(best_values)
            row[f"final_{key}_mean"], row[f"final_{key}_std"] = _mean_std(final_values)
            if key == metric:
                bests[variant], seed_bests[variant] = best_values, by_replicate
        row["params"] = _param(runs[0], "model.num_params", int, 0, warnings)
        row["gflops"] = _param(runs[0], "model.gflops_per_image", float, math.nan, warnings)
        row["train_time_s_mean"], row["train_time_s_std"] = _mean_std(
            [r.data.metrics.get("train_time_s") for r in runs])
        rows.append(row)
    return rows, curves, bests, seed_bests


def _pairs(groups: dict[str, list], tables: dict, bests: dict, names: dict, fold_seed: dict,
           margin: float | None, direction: str, cross_validated: bool) -> list[dict[str, Any]]:
    """Every pair of variants: the replicate-level Welch test, the paired per-image comparison (Holm-corrected
    over the pairs when there are several), the verdict and what data it could not use."""
    from unetlab.analysis import paired_stats

    level = "replicate" if cross_validated else "seed"
    pairs, results = [], []
    for a, b in combinations(groups, 2):
        pair: dict[str, Any] = {"a": a, "b": b, "seed_level": _seed_level(bests.get(a, []), bests.get(b, []), level)}
        paired_groups = _paired_groups(tables[a], tables[b])
        pair["dropped"] = _pair_losses(tables[a], tables[b], names[a], names[b], paired_groups)
        result = None
        if not paired_groups:
            missing = [v for v in (a, b) if all(t.values is None and t.problem is None for t in tables[v].values())]
            pair["paired"] = None
            pair["note"] = (f"no per-image tables for {', '.join(missing)} (runs logged before per-image metrics)"
                            if missing else f"no common {level}s and images with a per-image value")
            pair["verdict"] = f"{level}-level only: " + pair["note"]
        else:
            replicates = [g[0] for g in paired_groups]
            result = paired_stats.paired_comparison(  # an image's unit is (fold, image): folds validate apart
                [g[2] for g in paired_groups], margin,
                image_ids=[[(fold_seed[r][0], i) for i in images] for r, images, _ in paired_groups],
                n_seeds=len({fold_seed[r][1] for r in replicates}),
                n_folds=len({fold_seed[r][0] for r in replicates}))
            pair["seeds_paired"] = replicates
        pairs.append(pair)
        results.append(result)
    paired = [(pair, result) for pair, result in zip(pairs, results) if result is not None]
    p_values = [result.wilcoxon_p for _, result in paired]
    # holm() gives None only where its input is None, and no p-value here is
    adjusted = cast(list[float], paired_stats.holm(p_values)) if len(paired) > 1 else p_values
    for (pair, result), p_adj in zip(paired, adjusted):
        pair["paired"] = {**result.as_dict(), "wilcoxon_p_holm": p_adj if len(paired) > 1 else None}
        pair["verdict"] = paired_stats.verdict(result, p_adj, direction == "max", margin, pair["a"], pair["b"])
        pair["fragile"] = result.fragile
        pair["fragile_text"] = paired_stats.fragile_text(result.fragile, result.n_folds) if result.fragile else None
    for pair in pairs:
        lost = pair["dropped"]
        if lost:
            pair["verdict"] += (f" [from {lost['values_used']} of {lost['values_total']} per-image values: "
                                f"{lost['dropped']} dropped ({'; '.join(lost['reasons'])}); see the warnings]")
    return pairs


def _seed_level(a: list[float], b: list[float], level: str) -> dict[str, Any]:
    return {"test": f"Welch t-test on per-{level} best values (whole-set metric)",
            "difference": statistics.mean(a) - statistics.mean(b) if a and b else None,
            "p_value": welch(a, b), "replicates": [len(a), len(b)]}


def _test_descriptions(metric: str, cross_validated: bool, n_paired: int, split: str) -> dict[str, str]:
    from unetlab.analysis import paired_stats

    level = "replicate" if cross_validated else "seed"
    checkpoint = "best checkpoint" + (" on the held-out test split" if split == "test" else "")
    return {
        "paired": (f"per-image {metric} of each run's {checkpoint}, paired by "
                   + ("fold, seed" if cross_validated else "seed") + " and image: mean "
                   f"difference A - B with a 95% hierarchical bootstrap CI ({paired_stats.RESAMPLES} "
                   f"resamples of " + ("fold x seed replicates" if cross_validated else "seeds")
                   + f", then images; RNG seed {paired_stats.BOOTSTRAP_SEED}); Wilcoxon "
                   "signed-rank test across images on the differences averaged over seeds"
                   + (", Holm-corrected over the pairs" if n_paired > 1 else "")),
        "seed_level": f"two-sided Welch t-test on the per-{level} best values (whole-set metric)"
                      + (" over fold x seed replicates" if cross_validated else ""),
        **({"cv": f"cross-validation estimate: mean per-image {metric} over all fold x seed replicates "
                  "and their images, std of the replicate means, 95% hierarchical bootstrap CI "
                  "(replicates, then images)"} if cross_validated else {})}


def _pm(mean, std, digits=4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None else "")


def _pair_lines(pair: dict[str, Any], cross_validated: bool = False) -> list[str]:
    lines = [f"{pair['a']} vs {pair['b']}: {pair['verdict']}"]
    s = pair["paired"]
    if s is not None:
        holm_text = f", Holm-adjusted {s['wilcoxon_p_holm']:.3g}" if s.get("wilcoxon_p_holm") is not None else ""
        dz = "n/a" if s["effect_size_dz"] is None else f"{s['effect_size_dz']:+.2f}"
        n = (f"{s['n_images']} images in {s['n_folds']} folds x {s['n_seeds']} seeds = {s['n_replicates']} "
             "replicates" if cross_validated else f"{s['n_images']} images x {s['n_seeds']} seeds")
        lines.append(f"  paired (per image, {n}): difference "
                     f"{s['difference']:+.4f}, 95% CI [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]; Wilcoxon "
                     f"signed-rank p = {s['wilcoxon_p']:.3g}{holm_text}; effect size d_z = {dz}, rank-biserial "
                     f"r = {s['rank_biserial']:+.2f}")
    if pair.get("fragile_text"):
        lines.append(f"  warning: {pair['fragile_text']}")
    level = pair["seed_level"]
    name = ("replicate-level (Welch t-test on per-replicate (fold x seed) best values)" if cross_validated else
            "seed-level (Welch t-test on per-seed best values)")
    if level["p_value"] is None:
        lines.append(f"  {name}: n/a (needs >= 2 {'replicates' if cross_validated else 'seeds'} per variant)")
    else:
        lines.append(f"  {name}: difference {level['difference']:+.4f}, p = {level['p_value']:.3g}")
    return lines


def _cv_line(variant: str, cv: dict[str, Any] | None, metric: str) -> str:
    if cv is None:
        return f"cross-validation estimate of {metric} for {variant}: n/a (needs per-image tables or >= 2 replicates)"
    std = "" if cv["std"] is None else f" +- {cv['std']:.4f} (std over {cv['n_replicates']} fold x seed replicates)"
    lost = (f" [{cv['dropped']} images dropped and {cv['bad_tables']} bad tables not used; see the warnings]"
            if cv.get("dropped") or cv.get("bad_tables") else "")
    return (f"cross-validation estimate of {metric} for {variant}: {cv['mean']:.4f}{std}, "
            f"95% CI [{cv['ci_low']:.4f}, {cv['ci_high']:.4f}] ({cv['interval']}; {cv['n_values']} values, the "
            f"{cv['source']}){lost}")


def render(result: Comparison | dict[str, Any], fmt: str) -> str:
    """The comparison (a ``Comparison`` or its plain data, ``compare.json``) as text: ``table``, ``md``, ``csv`` or
    ``json``."""
    data = result.as_dict() if isinstance(result, Comparison) else result
    metric = data["metric"]
    if fmt == "json":
        return json.dumps({k: v for k, v in data.items() if k != "curves"}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(data["rows"][0]))
        writer.writeheader()
        writer.writerows(data["rows"])
        return out.getvalue()
    cross_validated = data.get("cross_validated", False)
    # the test split is scored once, on the checkpoint validation chose: no "best" or "final" epoch of it
    held_out = data.get("split") == "test"
    scores = [f"{metric} (best checkpoint)"] if held_out else [f"best {metric}", f"final {metric}"]
    header = ["variant", "folds x seeds" if cross_validated else "seeds", *scores, "params", "GFLOPs", "train s"]
    lines = [[r["variant"], f"{r['folds']} x {r['seeds']}" if cross_validated else str(r["seeds"]),
              _pm(r[f"best_{metric}_mean"], r[f"best_{metric}_std"]),
              *([] if held_out else [_pm(r[f"final_{metric}_mean"], r[f"final_{metric}_std"])]),
              f"{r['params']:,}", f"{r['gflops']:.3f}", _pm(r["train_time_s_mean"], r["train_time_s_std"], 1)]
             for r in data["rows"]]
    if fmt == "md":
        text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        text += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
        text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    better = "higher" if data["higher_is_better"] else "lower"
    margin = f"; margin ±{data['margin']:g}" if data["margin"] is not None else ""
    text += ["", f"{better} is better ({data['direction_source']}){margin}."]
    if data.get("split") == "test":
        images = f" ({data['split_images']} images)" if data.get("split_images") else ""
        text.append(f"judged on the held-out test split{images}: the final runs' best checkpoints, scored on images "
                    "neither training nor tuning saw.")
    text += [f"paired test: {data['tests']['paired']}.",
             f"{'replicate' if cross_validated else 'seed'}-level test: {data['tests']['seed_level']}."]
    for variant, cv in data.get("cv", {}).items():
        text.append(_cv_line(variant, cv, metric))
    for pair in data["pairs"]:
        text += _pair_lines(pair, cross_validated)
    if data.get("tuning"):
        text += ["", *_tuning_lines(data["tuning"])]
    if data.get("contract"):
        text += ["", *format_contract(contract_from_dict(data["contract"]))]
    if data["not_finished"]:
        text.append(f"not included (not FINISHED): {', '.join(data['not_finished'])}")
    return "\n".join(text)


def _tuning_lines(tuning: dict[str, Any]) -> list[str]:
    report = TuningReport.from_dict(tuning)
    return [f"tuning budget per variant (studies on the validation split, tune metric {report.metric}):",
            *("  " + line for line in report.budget_table()), report.budget_line()]
