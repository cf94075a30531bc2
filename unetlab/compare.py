"""``unetlab compare``: variants side by side, mean +- std over seeds, and which differences are real.

Rows come from the nested runs of one parent run (the latest by default), grouped by variant (the run
name without its ``/seed=N`` part). For each pair of variants a two-sided Welch t-test on the
per-seed best values says whether the difference is larger than the seed-to-seed spread (p < 0.05).
With few seeds (3) the test has little power: "no" often means "not shown", not "equal".
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

from .errors import UnetlabError, did_you_mean

__all__ = ["compare_runs", "compare_command", "welch"]

LOWER_IS_BETTER = re.compile(r"(loss|hd95|time)")


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


def compare_runs(client, experiment_id: str, metric: str | None, parent_id: str | None) -> dict[str, Any]:
    """Gather the comparison of one parent run's children (see the module docstring)."""
    if parent_id is None:
        parents = client.search_runs([experiment_id], filter_string="tags.`unetlab.parent` = 'true'",
                                     order_by=["attributes.start_time DESC"], max_results=50)
        for parent in parents:
            children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                          f"'{parent.info.run_id}'", max_results=5000)
            if any(c.info.status == "FINISHED" for c in children):
                parent_id = parent.info.run_id
                break
        if parent_id is None:
            raise UnetlabError("no finished runs to compare in this experiment (run 'unetlab run' first)")
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
    if metric == monitor:
        higher = finished[0].data.params.get("train.monitor_mode", "max") == "max"
    else:
        higher = not LOWER_IS_BETTER.search(metric)
    per_epoch = sorted({k for k in available if k.startswith("val_") or k == "train_loss"})
    groups: dict[str, list] = {}
    for c in sorted(finished, key=lambda c: c.info.start_time):  # the experiment file's order
        groups.setdefault(_variant(c.info.run_name), []).append(c)
    rows, curves, bests = [], {}, {}
    for variant, runs in groups.items():
        row: dict[str, Any] = {"variant": variant, "seeds": len(runs)}
        for key in per_epoch:
            histories = [client.get_metric_history(r.info.run_id, key) for r in runs]
            best_values, final_values = [], []
            for history in histories:
                if not history:
                    continue
                values = [m.value for m in sorted(history, key=lambda m: m.step)]
                key_higher = higher if key == metric else not LOWER_IS_BETTER.search(key)
                best_values.append(max(values) if key_higher else min(values))
                final_values.append(values[-1])
            row[f"best_{key}_mean"], row[f"best_{key}_std"] = _mean_std(best_values)
            row[f"final_{key}_mean"], row[f"final_{key}_std"] = _mean_std(final_values)
            if key == metric:
                bests[variant] = best_values
                curves[variant] = [[(m.step, m.value) for m in sorted(h, key=lambda m: m.step)] for h in histories]
        row["params"] = int(runs[0].data.params.get("model.num_params", 0))
        row["gflops"] = float(runs[0].data.params.get("model.gflops_per_image", "nan"))
        row["train_time_s_mean"], row["train_time_s_std"] = _mean_std(
            [r.data.metrics.get("train_time_s") for r in runs])
        rows.append(row)
    pairs = []
    for a, b in combinations(groups, 2):
        p = welch(bests[a], bests[b])
        diff = statistics.mean(bests[a]) - statistics.mean(bests[b]) if bests[a] and bests[b] else None
        pairs.append({"a": a, "b": b, "difference": diff, "p_value": p,
                      "significant": None if p is None else p < 0.05})
    failed = [c.info.run_name for c in children if c.info.status != "FINISHED"]
    return {"metric": metric, "higher_is_better": higher, "parent_run_id": parent_id, "rows": rows,
            "pairs": pairs, "curves": curves, "not_finished": failed,
            "test": "two-sided Welch t-test on per-seed best values, significant when p < 0.05"}


def _pm(mean, std, digits=4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None else "")


def render(result: dict[str, Any], fmt: str) -> str:
    """The comparison as text: ``table``, ``md``, ``csv`` or ``json``."""
    metric = result["metric"]
    if fmt == "json":
        return json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        fields = list(result["rows"][0])
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result["rows"])
        return out.getvalue()
    header = ["variant", "seeds", f"best {metric}", f"final {metric}", "params", "GFLOPs", "train s"]
    lines = [[r["variant"], str(r["seeds"]), _pm(r[f"best_{metric}_mean"], r[f"best_{metric}_std"]),
              _pm(r[f"final_{metric}_mean"], r[f"final_{metric}_std"]), f"{r['params']:,}", f"{r['gflops']:.3f}",
              _pm(r["train_time_s_mean"], r["train_time_s_std"], 1)] for r in result["rows"]]
    pair_lines = []
    for p in result["pairs"]:
        verdict = ("n/a (needs >= 2 seeds per variant)" if p["p_value"] is None else
                   f"{'yes' if p['significant'] else 'no'} (p = {p['p_value']:.3g})")
        pair_lines.append(f"{p['a']} vs {p['b']}: difference {p['difference']:+.4f}; larger than the seed-to-seed "
                          f"spread: {verdict}")
    if fmt == "md":
        text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        text += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
        text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        text += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text += ["", f"{'higher' if result['higher_is_better'] else 'lower'} is better; test: {result['test']}."]
    text += pair_lines
    if result["not_finished"]:
        text.append(f"not included (not FINISHED): {', '.join(result['not_finished'])}")
    return "\n".join(text)


def compare_command(target: str, metric: str | None, fmt: str, out: str | None, parent: str | None,
                    tracking_uri: str | None) -> int:
    """Print the comparison, write the figure to disk and log it to the parent run."""
    from mlflow.tracking import MlflowClient

    from .tracking import resolve_tracking_uri

    name, config_uri = target, None
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        from .experiment import load_experiment

        experiment = load_experiment(target)
        name, config_uri = experiment.name, experiment.runs[0].config["tracking"]["uri"]
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
    result = compare_runs(client, found.experiment_id, metric, parent)
    print(render(result, fmt))
    from .figures import comparison_figure

    figure = comparison_figure(result["rows"], result["metric"], result["curves"])
    path = Path(out or f"compare-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png")
    figure.savefig(path, dpi=110)
    client.log_figure(result["parent_run_id"], figure, f"compare_{result['metric']}.png")
    print(f"figure: {path} (also logged to parent run {result['parent_run_id']})", file=sys.stderr)
    return 0
