"""``unetlab compare``: variants side by side, and for each pair whether and by how much they differ.

Rows come from the nested runs of one parent run (the latest with a finished child by default),
grouped by variant (the run name without its ``/seed=N`` part): best and final value of each logged
metric as mean +- std over seeds, parameters, GFLOPs, training time.

Pairs. Two variants are paired on the same seeds and the same validation images, using each run's
per-image table of its best checkpoint (``per_image_metrics.json``, see ``unetlab.per_image``):

1. the primary line: the mean per-image difference A - B with a 95% interval from a hierarchical
   bootstrap (seeds, then images), the Wilcoxon signed-rank test across images on the differences
   averaged over seeds (Holm-corrected when there are more than two variants), effect sizes, and a
   verdict: "A better", "B better", "equivalent within +-margin" or "not resolved" with the seeds
   or images that would resolve it (``unetlab.paired_stats`` has the exact rules);
2. a second line: the seed-level Welch t-test on the per-seed best values (whole-set metric).

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

from .errors import ConfigError, UnetlabError, did_you_mean

__all__ = ["compare_command", "compare_runs", "margin_from_file", "render", "welch"]

DIRECTIONS_TAG = "unetlab.metric_directions"


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


def _variant(run_name: str) -> str:
    return re.sub(r"/?seed=[^/]*$", "", run_name) or run_name


def _seed(run) -> str:
    tag = run.data.tags.get("unetlab.seed")
    if tag is not None:
        return tag
    found = re.search(r"seed=([^/]*)$", run.info.run_name or "")
    return found.group(1) if found else run.info.run_id


def _directions(runs) -> dict[str, str]:
    """Union of the runs' ``unetlab.metric_directions`` tags (key -> "max"/"min")."""
    out: dict[str, str] = {}
    for run in runs:
        text = run.data.tags.get(DIRECTIONS_TAG)
        if text:
            try:
                out.update({k: v for k, v in json.loads(text).items() if v in ("max", "min")})
            except (ValueError, AttributeError):
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


def _difference_matrix(tables_a: dict, tables_b: dict, metric: str):
    """seeds x images matrix of A - B on the seeds and images both variants have (finite values only)."""
    import numpy as np

    seeds = [s for s in tables_a if s in tables_b and tables_a[s] is not None and tables_b[s] is not None]
    if not seeds:
        return None, [], 0
    tables = [tables_a[s] for s in seeds] + [tables_b[s] for s in seeds]
    images = [i for i in tables[0] if all(i in t for t in tables)]
    images = [i for i in images if all(metric in t[i] and math.isfinite(t[i][metric]) for t in tables)]
    if not images:
        return None, seeds, 0
    diffs = np.array([[tables_a[s][i][metric] - tables_b[s][i][metric] for i in images] for s in seeds])
    return diffs, seeds, len(images)


def compare_runs(client, experiment_id: str, metric: str | None, parent_id: str | None,
                 margin: float | None = None, direction: str | None = None) -> dict[str, Any]:
    """Gather the comparison of one parent run's children (see the module docstring)."""
    from . import paired_stats
    from .per_image import load_per_image_metrics

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

    per_epoch = sorted({k for k in available if k.startswith("val_") or k == "train_loss"})
    groups: dict[str, list] = {}
    for c in sorted(finished, key=lambda c: c.info.start_time):  # the experiment file's order
        groups.setdefault(_variant(c.info.run_name), []).append(c)
    rows, curves, bests, seed_bests = [], {}, {}, {}
    for variant, runs in groups.items():
        row: dict[str, Any] = {"variant": variant, "seeds": len(runs)}
        for key in per_epoch:
            best_values, final_values, by_seed = [], [], {}
            for run in runs:
                history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
                if not history:
                    continue
                values = [m.value for m in history]
                if key in directions:  # no direction known: no "best" (final only)
                    best = max(values) if directions[key] == "max" else min(values)
                    best_values.append(best)
                    by_seed[_seed(run)] = best
                final_values.append(values[-1])
                if key == metric:
                    curves.setdefault(variant, []).append([(m.step, m.value) for m in history])
            row[f"best_{key}_mean"], row[f"best_{key}_std"] = _mean_std(best_values)
            row[f"final_{key}_mean"], row[f"final_{key}_std"] = _mean_std(final_values)
            if key == metric:
                bests[variant], seed_bests[variant] = best_values, by_seed
        row["params"] = int(runs[0].data.params.get("model.num_params", 0))
        row["gflops"] = float(runs[0].data.params.get("model.gflops_per_image", "nan"))
        row["train_time_s_mean"], row["train_time_s_std"] = _mean_std(
            [r.data.metrics.get("train_time_s") for r in runs])
        rows.append(row)

    tables = {v: {_seed(r): load_per_image_metrics(client, r.info.run_id) for r in runs} for v, runs in groups.items()}
    pairs = []
    for a, b in combinations(groups, 2):
        pair: dict[str, Any] = {"a": a, "b": b}
        p = welch(bests.get(a, []), bests.get(b, []))
        pair["seed_level"] = {
            "test": "Welch t-test on per-seed best values (whole-set metric)",
            "difference": (statistics.mean(bests[a]) - statistics.mean(bests[b])
                           if bests.get(a) and bests.get(b) else None),
            "p_value": p}
        diffs, seeds, _ = _difference_matrix(tables[a], tables[b], metric)
        if diffs is None:
            missing = [v for v in (a, b) if not any(t is not None for t in tables[v].values())]
            pair["paired"] = None
            pair["note"] = (f"no per-image tables for {', '.join(missing)} (runs logged before per-image metrics)"
                            if missing else f"no common seeds and images with a per-image {metric}")
            pair["verdict"] = "seed-level only: " + pair["note"]
        else:
            result = paired_stats.paired_comparison(diffs, margin)
            pair["paired"] = result.as_dict()
            pair["seeds_paired"] = seeds
        pairs.append(pair)
    paired = [p for p in pairs if p["paired"] is not None]
    adjusted = paired_stats.holm([p["paired"]["wilcoxon_p"] for p in paired]) if len(paired) > 1 else \
        [p["paired"]["wilcoxon_p"] for p in paired]
    for pair, p_adj in zip(paired, adjusted):
        pair["paired"]["wilcoxon_p_holm"] = p_adj if len(paired) > 1 else None
        stats_obj = paired_stats.PairedResult(**{k: v for k, v in pair["paired"].items()
                                                 if k != "wilcoxon_p_holm"})
        pair["verdict"] = paired_stats.verdict(stats_obj, p_adj, higher, margin, pair["a"], pair["b"])
    failed = [c.info.run_name for c in children if c.info.status != "FINISHED"]
    return {"metric": metric, "direction": direction, "direction_source": direction_source,
            "higher_is_better": higher, "margin": margin, "parent_run_id": parent_id, "rows": rows,
            "pairs": pairs, "curves": curves, "seed_bests": seed_bests, "not_finished": failed,
            "warnings": warnings,
            "tests": {
                "paired": (f"per-image {metric} of each run's best checkpoint, paired by seed and image: mean "
                           f"difference A - B with a 95% hierarchical bootstrap CI ({paired_stats.RESAMPLES} "
                           f"resamples of seeds, then images; RNG seed {paired_stats.BOOTSTRAP_SEED}); Wilcoxon "
                           "signed-rank test across images on the differences averaged over seeds"
                           + (", Holm-corrected over the pairs" if len(paired) > 1 else "")),
                "seed_level": "two-sided Welch t-test on the per-seed best values (whole-set metric)"}}


def _pm(mean, std, digits=4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None else "")


def _pair_lines(pair: dict[str, Any]) -> list[str]:
    lines = [f"{pair['a']} vs {pair['b']}: {pair['verdict']}"]
    s = pair["paired"]
    if s is not None:
        holm_text = f", Holm-adjusted {s['wilcoxon_p_holm']:.3g}" if s.get("wilcoxon_p_holm") is not None else ""
        dz = "n/a" if s["effect_size_dz"] is None else f"{s['effect_size_dz']:+.2f}"
        lines.append(f"  paired (per image, {s['n_images']} images x {s['n_seeds']} seeds): difference "
                     f"{s['difference']:+.4f}, 95% CI [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]; Wilcoxon "
                     f"signed-rank p = {s['wilcoxon_p']:.3g}{holm_text}; effect size d_z = {dz}, rank-biserial "
                     f"r = {s['rank_biserial']:+.2f}")
    level = pair["seed_level"]
    if level["p_value"] is None:
        lines.append("  seed-level (Welch t-test on per-seed best values): n/a (needs >= 2 seeds per variant)")
    else:
        lines.append(f"  seed-level (Welch t-test on per-seed best values): difference {level['difference']:+.4f}, "
                     f"p = {level['p_value']:.3g}")
    return lines


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
    header = ["variant", "seeds", f"best {metric}", f"final {metric}", "params", "GFLOPs", "train s"]
    lines = [[r["variant"], str(r["seeds"]), _pm(r[f"best_{metric}_mean"], r[f"best_{metric}_std"]),
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
             f"paired test: {result['tests']['paired']}.", f"seed-level test: {result['tests']['seed_level']}."]
    for pair in result["pairs"]:
        text += _pair_lines(pair)
    if result["not_finished"]:
        text.append(f"not included (not FINISHED): {', '.join(result['not_finished'])}")
    return "\n".join(text)


def margin_from_file(path: str | Path) -> float | None:
    """``compare.margin`` of an experiment file, read straight from its YAML (None when absent)."""
    from .experiment import compare_margin
    from .yamlio import load_yaml_file

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

    from .tracking import resolve_tracking_uri

    name, config_uri = target, None
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        from .experiment import load_experiment

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
    from .figures import comparison_figure

    figure = comparison_figure(result)
    path = Path(out or f"compare-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png")
    figure.savefig(path, dpi=110)
    client.log_figure(result["parent_run_id"], figure, f"compare_{result['metric']}.png")
    print(f"figure: {path} (also logged to parent run {result['parent_run_id']})", file=sys.stderr)
    return 0
