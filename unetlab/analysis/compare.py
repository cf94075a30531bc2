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
Which way is better comes from the runs' ``unetlab.metric_directions`` tag, never from the name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

from unetlab.errors import ConfigError, UnetlabError, did_you_mean
from unetlab.tracking import tags as run_tags

__all__ = ["compare_command", "compare_runs", "margin_from_file", "render", "welch"]

DIRECTIONS_TAG = run_tags.METRIC_DIRECTIONS


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
    """Union of the runs' ``unetlab.metric_directions`` tags (key -> "max"/"min")."""
    out: dict[str, str] = {}
    for run in runs:
        text = run.data.tags.get(DIRECTIONS_TAG)
        if text:
            try:
                out.update({k: v for k, v in json.loads(text).items() if v in ("max", "min")})
            except (ValueError, AttributeError, RecursionError):  # store content: a bad tag is no direction
                continue
    return out


def _find_parent(client, experiment_id: str) -> str:
    parents = client.search_runs([experiment_id], filter_string="tags.`unetlab.parent` = 'true'",
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
    low, high = paired_stats.t_interval(bests)
    return {"mean": statistics.mean(bests), "std": statistics.stdev(bests), "ci_low": low, "ci_high": high,
            "n_replicates": len(bests), "n_values": len(bests), "interval": "t-interval over replicates",
            "source": f"best whole-set {metric} of each replicate (no per-image tables)"}


def _read_tables(client, runs_by_variant: dict[str, list], replicate_of, metric: str,
                 warnings: list[str]) -> tuple[dict, list[dict[str, Any]]]:
    """Every run's validated per-image values (``unetlab.analysis.compare_inputs``), and one report per run that had
    a bad table or dropped rows (also a warning line naming the run)."""
    from unetlab.analysis.compare_inputs import ARTIFACT, declared_ranges, read_per_image

    tables: dict[str, dict] = {}
    reports = []
    for variant, runs in runs_by_variant.items():
        for run in runs:
            who = f"run '{run.info.run_name}' (id {run.info.run_id})"
            ranges, tag_problem = declared_ranges(run.data.tags)
            if tag_problem:
                warnings.append(f"{who}: {tag_problem}")
            read = read_per_image(client, run.info.run_id, metric, ranges)
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
                                f"{ARTIFACT} ({why})")
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


def compare_runs(client, experiment_id: str, metric: str | None, parent_id: str | None,
                 margin: float | None = None, direction: str | None = None) -> dict[str, Any]:
    """Gather the comparison of one parent run's children (see the module docstring)."""
    from unetlab.analysis import paired_stats

    if margin is not None and not (margin > 0 and math.isfinite(margin)):
        raise ConfigError(f"--margin: must be a positive number, got {margin}")
    parent_id = parent_id or _find_parent(client, experiment_id)
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=5000)
    finished = [c for c in children if c.info.status == "FINISHED"]
    if not finished:
        raise UnetlabError(f"parent run {parent_id} has no finished runs")
    monitor = finished[0].data.params.get("train.monitor", "val_iou")
    metric = metric or monitor
    available = sorted({k for c in finished for k in c.data.metrics})
    if metric not in available:
        raise UnetlabError(f"--metric {metric}: not logged by these runs{did_you_mean(metric, available)} "
                           f"(logged: {', '.join(available)})")
    directions = _directions(finished)
    warnings: list[str] = []
    if direction is not None:
        direction_source = "--direction"
    elif metric in directions:
        direction, direction_source = directions[metric], f"the runs' {DIRECTIONS_TAG} tag"
    else:
        direction, direction_source = "max", "assumed"
        warnings.append(f"which way is better for {metric} is unknown (the runs have no {DIRECTIONS_TAG} tag "
                        f"for it): assuming higher is better; pass --direction max|min to say")
    directions[metric] = direction
    higher = direction == "max"

    fold_of = {c.info.run_id: _fold(c) for c in finished}
    folds = sorted({f for f in fold_of.values() if f is not None}, key=lambda f: (len(f), f))
    cross_validated = bool(folds)
    per_epoch = sorted({k for k in available if k.startswith("val_") or k == "train_loss"})
    groups: dict[str, list] = {}
    for c in sorted(finished, key=lambda c: c.info.start_time):  # the experiment file's order
        groups.setdefault(_variant(c), []).append(c)
    tables, dropped = _read_tables(client, groups, lambda r: _replicate(r, cross_validated), metric, warnings)
    names = {v: {_replicate(r, cross_validated): r.info.run_name for r in runs} for v, runs in groups.items()}
    fold_seed = {_replicate(r, cross_validated): (fold_of[r.info.run_id], _seed(r)) for r in finished}
    rows, curves, bests, seed_bests, cv = [], {}, {}, {}, {}
    for variant, runs in groups.items():
        row: dict[str, Any] = {"variant": variant, "seeds": len({_seed(r) for r in runs}),
                               "folds": len({fold_of[r.info.run_id] for r in runs}), "replicates": len(runs)}
        for key in per_epoch:
            best_values, final_values, by_replicate = [], [], {}
            for run in runs:
                history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
                if not history:
                    continue
                values = [m.value for m in history]
                if key in directions:  # no direction known: no "best" (final only)
                    best = max(values) if directions[key] == "max" else min(values)
                    best_values.append(best)
                    by_replicate[_replicate(run, cross_validated)] = best
                final_values.append(values[-1])
                if key == metric:
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
        if cross_validated:
            cv[variant] = _cv_estimate(tables[variant], bests.get(variant, []), metric)

    level = "replicate" if cross_validated else "seed"
    pairs = []
    for a, b in combinations(groups, 2):
        pair: dict[str, Any] = {"a": a, "b": b}
        p = welch(bests.get(a, []), bests.get(b, []))
        pair["seed_level"] = {
            "test": f"Welch t-test on per-{level} best values (whole-set metric)",
            "difference": (statistics.mean(bests[a]) - statistics.mean(bests[b])
                           if bests.get(a) and bests.get(b) else None),
            "p_value": p, "replicates": [len(bests.get(a, [])), len(bests.get(b, []))]}
        paired_groups = _paired_groups(tables[a], tables[b])
        pair["dropped"] = _pair_losses(tables[a], tables[b], names[a], names[b], paired_groups)
        if not paired_groups:
            missing = [v for v in (a, b) if all(t.values is None and t.problem is None for t in tables[v].values())]
            pair["paired"] = None
            pair["note"] = (f"no per-image tables for {', '.join(missing)} (runs logged before per-image metrics)"
                            if missing else f"no common {level}s and images with a per-image {metric}")
            pair["verdict"] = f"{level}-level only: " + pair["note"]
        else:
            replicates = [g[0] for g in paired_groups]
            result = paired_stats.paired_comparison(  # an image's unit is (fold, image): folds validate apart
                [g[2] for g in paired_groups], margin,
                image_ids=[[(fold_seed[r][0], i) for i in images] for r, images, _ in paired_groups],
                n_seeds=len({fold_seed[r][1] for r in replicates}),
                n_folds=len({fold_seed[r][0] for r in replicates}))
            pair["paired"] = result.as_dict()
            pair["seeds_paired"] = replicates
        pairs.append(pair)
    paired = [p for p in pairs if p["paired"] is not None]
    adjusted = paired_stats.holm([p["paired"]["wilcoxon_p"] for p in paired]) if len(paired) > 1 else \
        [p["paired"]["wilcoxon_p"] for p in paired]
    fields = set(paired_stats.PairedResult.__dataclass_fields__)
    for pair, p_adj in zip(paired, adjusted):
        pair["paired"]["wilcoxon_p_holm"] = p_adj if len(paired) > 1 else None
        stats_obj = paired_stats.PairedResult(**{k: v for k, v in pair["paired"].items() if k in fields})
        pair["verdict"] = paired_stats.verdict(stats_obj, p_adj, higher, margin, pair["a"], pair["b"])
        pair["fragile"] = stats_obj.fragile
        pair["fragile_text"] = (paired_stats.fragile_text(stats_obj.fragile, stats_obj.n_folds)
                                if stats_obj.fragile else None)
    for pair in pairs:
        lost = pair["dropped"]
        if lost:
            pair["verdict"] += (f" [from {lost['values_used']} of {lost['values_total']} per-image values: "
                                f"{lost['dropped']} dropped ({'; '.join(lost['reasons'])}); see the warnings]")
    failed = [c.info.run_name for c in children if c.info.status != "FINISHED"]
    return {"metric": metric, "direction": direction, "direction_source": direction_source,
            "higher_is_better": higher, "margin": margin, "parent_run_id": parent_id, "rows": rows,
            "pairs": pairs, "curves": curves, "seed_bests": seed_bests, "not_finished": failed,
            "warnings": warnings, "cross_validated": cross_validated, "folds": folds, "cv": cv,
            "dropped": dropped,
            "tests": {
                "paired": (f"per-image {metric} of each run's best checkpoint, paired by "
                           + ("fold, seed" if cross_validated else "seed") + " and image: mean "
                           f"difference A - B with a 95% hierarchical bootstrap CI ({paired_stats.RESAMPLES} "
                           f"resamples of " + ("fold x seed replicates" if cross_validated else "seeds")
                           + f", then images; RNG seed {paired_stats.BOOTSTRAP_SEED}); Wilcoxon "
                           "signed-rank test across images on the differences averaged over seeds"
                           + (", Holm-corrected over the pairs" if len(paired) > 1 else "")),
                "seed_level": f"two-sided Welch t-test on the per-{level} best values (whole-set metric)"
                              + (" over fold x seed replicates" if cross_validated else ""),
                **({"cv": f"cross-validation estimate: mean per-image {metric} over all fold x seed replicates "
                          "and their images, std of the replicate means, 95% hierarchical bootstrap CI "
                          "(replicates, then images)"} if cross_validated else {})}}


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


def render(result: dict[str, Any], fmt: str) -> str:
    """The comparison as text: ``table``, ``md``, ``csv`` or ``json``."""
    metric = result["metric"]
    if fmt == "json":
        return json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
        return out.getvalue()
    cross_validated = result.get("cross_validated", False)
    header = ["variant", "folds x seeds" if cross_validated else "seeds", f"best {metric}", f"final {metric}",
              "params", "GFLOPs", "train s"]
    lines = [[r["variant"], f"{r['folds']} x {r['seeds']}" if cross_validated else str(r["seeds"]),
              _pm(r[f"best_{metric}_mean"], r[f"best_{metric}_std"]),
              _pm(r[f"final_{metric}_mean"], r[f"final_{metric}_std"]), f"{r['params']:,}", f"{r['gflops']:.3f}",
              _pm(r["train_time_s_mean"], r["train_time_s_std"], 1)] for r in result["rows"]]
    if fmt == "md":
        text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        text += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
        text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    better = "higher" if result["higher_is_better"] else "lower"
    margin = f"; margin ±{result['margin']:g}" if result["margin"] is not None else ""
    text += ["", f"{better} is better ({result['direction_source']}){margin}.",
             f"paired test: {result['tests']['paired']}.",
             f"{'replicate' if cross_validated else 'seed'}-level test: {result['tests']['seed_level']}."]
    for variant, cv in result.get("cv", {}).items():
        text.append(_cv_line(variant, cv, metric))
    for pair in result["pairs"]:
        text += _pair_lines(pair, cross_validated)
    if result["not_finished"]:
        text.append(f"not included (not FINISHED): {', '.join(result['not_finished'])}")
    return "\n".join(text)


def margin_from_file(path: str | Path) -> float | None:
    """``compare.margin`` of an experiment file, read straight from its YAML (None when absent)."""
    from unetlab.config.experiment import compare_margin
    from unetlab.config.yaml_loader import load_yaml_file

    data, lines = load_yaml_file(path)

    def at(key_path: tuple) -> str:
        return f"{path}:{lines[key_path]}" if key_path in lines else str(path)

    return compare_margin(data.get("compare") if isinstance(data, dict) else None, at)


def compare_command(target: str, metric: str | None, fmt: str, out: str | None, parent: str | None,
                    tracking_uri: str | None, margin: float | None = None, direction: str | None = None) -> int:
    """Print the comparison, write the figure to disk and log it to the parent run."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    from unetlab.tracking.run_tracker import resolve_tracking_uri

    name, config_uri = target, None
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        from unetlab.config.experiment import load_experiment

        experiment = load_experiment(target)
        name, config_uri = experiment.name, experiment.runs[0].config["tracking"]["uri"]
        if margin is None:
            margin = margin_from_file(target)
    uri = tracking_uri or resolve_tracking_uri(config_uri)
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    client = MlflowClient(mlflow.get_tracking_uri())
    found = client.get_experiment_by_name(name)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise UnetlabError(f"no MLflow experiment named '{name}' at {mlflow.get_tracking_uri()}"
                           f"{did_you_mean(name, names)} (experiments: {', '.join(names) or 'none'})")
    result = compare_runs(client, found.experiment_id, metric, parent, margin, direction)
    for line in result["warnings"]:
        print(f"unetlab: warning: {line}", file=sys.stderr)
    print(render(result, fmt))
    from unetlab.analysis.figures import comparison_figure

    figure = comparison_figure(result)
    path = Path(out or f"compare-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png")
    figure.savefig(path, dpi=110)
    from unetlab.analysis.dashboard import log_comparison

    print(f"figure: {path}; {log_comparison(client, result, figure)}", file=sys.stderr)
    return 0
