"""The MLflow dashboard of an experiment: URLs that open on its training runs grouped by variant, and the
comparison logged to each invocation's parent run.

What MLflow 3.x's UI reads from its URL (``mlflow/server/js/src/experiment-tracking/``, checked against the
built bundle of MLflow 3.17):

- ``workflowType=machine_learning`` opens the training-runs view; without it an experiment opens on the
  GenAI overview, whatever its ``mlflow.experimentKind`` tag says;
- the search facets (``searchFilter``, ``orderByKey``, ``orderByAsc``, ...; ``useExperimentPageSearchFacets``)
  and the view mode (``compareRunsMode``) are URL parameters, but grouping, columns and charts are not:
  they are UI state, kept in the browser's local storage;
- ``viewStateShareKey=KEY`` loads a *shared view*: the experiment tag ``mlflow.sharedViewState.KEY`` holds
  JSON with search facets and UI state (``groupBy``, ``selectedColumns``, ...;
  ``useSharedExperimentViewState``). It is ignored when the URL carries a search facet itself, so the
  search filter goes into the tag too.

So each parent run gets a shared view (``unetlab-<parent run id>``): its children only, grouped by the
``unetlab.variant`` tag (mean, min and max bands in the charts), the monitored metric as the first columns.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from unetlab.tracking import tags as run_tags

__all__ = ["VIEW_TAG_PREFIX", "comparison_markdown", "experiment_runs_url", "factor_keys", "group_tags",
           "latest_parent",
           "log_comparison", "report_dashboard", "run_url", "set_runs_view", "summary_metrics", "ui_base_url",
           "ui_urls",
           "view_key", "view_state"]

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
NOTE_TAG = "mlflow.note.content"
MARGIN_TAG = run_tags.COMPARE_MARGIN
NOTE_MARKER = "<!-- unetlab compare: everything below is rewritten by unetlab compare -->"
KEEP_VIEWS = 20  # shared-view tags kept per experiment (older invocations' URLs then open unfiltered)
_UNSAFE = re.compile(r"[^\w.\-]")


def view_key(parent_id: str) -> str:
    """The shared-view key of one parent run (letters, digits and '-': safe in a URL and a tag name)."""
    return f"unetlab-{parent_id}"


def _column(kind: str, key: str) -> str:
    """A runs-table column id as the UI writes it (``makeCanonicalSortKey``): ``metrics.`best_val_iou```."""
    return f"{kind}.`{key}`"


def group_tags(runs) -> list[str]:
    """The tags that tell ``runs``' (``experiment.Run``) variants apart as ``unetlab compare`` does:
    ``unetlab.variant`` and each matrix key's tag, except the fold (folds are replicates, like seeds)."""
    keys = sorted({k for r in runs for k in r.matrix if k not in ("data.fold",)})
    return [run_tags.VARIANT, *[run_tags.matrix_tag(k) for k in keys]]


def view_state(parent_id: str, monitor: str, factors: Sequence[str] = (),
               groups: Sequence[str] = (run_tags.VARIANT,)) -> dict[str, Any]:
    """The shared view of ``parent_id``'s children: filtered to them, grouped by variant (the ``groups``
    tags), columns first the best and last value of ``monitor``, then the params that differ between
    variants and the seed."""
    columns = [_column("metrics", f"best_{monitor}"), _column("metrics", monitor),
               *[_column("params", f) for f in factors], _column("tags", run_tags.SEED),
               _column("params", "model.num_params")]
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": True,
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": tag} for tag in groups]},
        "groupsExpanded": {}, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
        "runsHiddenMode": "SHOW_ALL", "selectedColumns": columns,
    }


def set_runs_view(client, experiment_id: str, parent_id: str, monitor: str, factors: Sequence[str] = (),
                  groups: Sequence[str] = (run_tags.VARIANT,)) -> str:
    """Store the shared view of ``parent_id`` as an experiment tag and return its key; keep the newest
    ``KEEP_VIEWS`` unetlab views of the experiment (one per invocation)."""
    key = view_key(parent_id)
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key,
                              json.dumps(view_state(parent_id, monitor, list(factors), list(groups))))
    ours = [k for k in client.get_experiment(experiment_id).tags if k.startswith(VIEW_TAG_PREFIX + "unetlab-")]
    if len(ours) > KEEP_VIEWS:
        start = {r.info.run_id: r.info.start_time for r in client.search_runs(
            [experiment_id], filter_string=f"tags.`{run_tags.PARENT}` = 'true'", max_results=1000)}
        ours.sort(key=lambda k: start.get(k[len(VIEW_TAG_PREFIX) + len("unetlab-"):], 0), reverse=True)
        for stale in ours[KEEP_VIEWS:]:
            client.delete_experiment_tag(experiment_id, stale)
    return key


def ui_base_url(tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> str:
    """Where the UI of ``tracking_uri`` is: the tracking server itself for an http(s) store, else the
    ``unetlab ui`` server on ``host:port`` (a wildcard host is opened locally, on 127.0.0.1)."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def experiment_runs_url(base: str, experiment_id: str, key: str | None = None) -> str:
    """The experiment's training runs (``workflowType=machine_learning``), in shared view ``key`` if given."""
    url = f"{base}/#/experiments/{quote(str(experiment_id))}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={quote(key)}" if key else "")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page (its description, metrics, artifacts) in the training view."""
    return f"{base}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}?workflowType=machine_learning"


def latest_parent(client, experiment_ids: list[str]):
    """The newest unetlab parent run of these experiments, or None."""
    runs = client.search_runs(experiment_ids, filter_string=f"tags.`{run_tags.PARENT}` = 'true'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def factor_keys(runs) -> list[str]:
    """The config keys (flattened, as logged as params) that differ between the variants of ``runs``
    (``experiment.Run``), leaving out the keys that differ between a variant's replicates (seed, fold)."""
    from unetlab.analysis.contract import differing_keys, variant_label

    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(variant_label(run.name), []).append(run.flat())
    return list(differing_keys(groups))


def _name(text: str) -> str:
    """``text`` as one part of an MLflow metric or tag name (letters, digits, _ . - only)."""
    return _UNSAFE.sub("_", str(text)) or "_"


MAX_KEY_LENGTH = 250  # MLflow refuses longer metric and tag keys, and the whole batch with them


def _fit(key: str) -> str:
    """``key`` cut to MLflow's key length, with a digest of the whole so two long keys stay apart."""
    if len(key) <= MAX_KEY_LENGTH:
        return key
    import hashlib

    return f"{key[:MAX_KEY_LENGTH - 11]}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _t_interval(values: list[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    from scipy import stats

    mean, sem = statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    return mean - half, mean + half


def summary_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Per-variant and per-pair numbers of a comparison, as parent-run metrics (usable as table columns).

    ``summary/<variant>/best_<metric>_mean``, ``_std``, ``_ci_low``, ``_ci_high`` (95% t-interval over the
    per-replicate best values) and ``_n``; with cross-validation also ``cv_<metric>_mean``, ``_ci_low``,
    ``_ci_high``; per pair ``paired/<a>_vs_<b>/difference``, ``ci_low``, ``ci_high`` (per-image, A - B).
    """
    metric, out = result["metric"], {}
    for variant, by_replicate in result["seed_bests"].items():
        values = [float(v) for v in by_replicate.values() if v is not None and math.isfinite(v)]
        if not values:
            continue
        prefix = f"summary/{_name(variant)}/best_{metric}"
        out[f"{prefix}_mean"] = statistics.mean(values)
        out[f"{prefix}_n"] = float(len(values))
        if len(values) > 1:
            out[f"{prefix}_std"] = statistics.stdev(values)
            interval = _t_interval(values)
            assert interval is not None  # None only with fewer than 2 values
            out[f"{prefix}_ci_low"], out[f"{prefix}_ci_high"] = interval
    for variant, cv in (result.get("cv") or {}).items():
        if cv:
            for field in ("mean", "ci_low", "ci_high"):
                if cv.get(field) is not None:
                    out[f"summary/{_name(variant)}/cv_{metric}_{field}"] = float(cv[field])
    for pair in result["pairs"]:
        stats = pair.get("paired")
        if stats:
            prefix = f"paired/{_name(pair['a'])}_vs_{_name(pair['b'])}"
            for field in ("difference", "ci_low", "ci_high"):
                out[f"{prefix}/{field}"] = float(stats[field])
    return {_fit(k): v for k, v in out.items() if math.isfinite(v)}


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def comparison_markdown(result: dict[str, Any], figure_name: str) -> str:
    """The comparison as the parent run's Markdown description: verdicts first, then the variants, then
    exactly what ``unetlab compare`` prints."""
    from unetlab.analysis.compare import render

    metric = result["metric"]
    better = "higher" if result["higher_is_better"] else "lower"
    margin = f"margin ±{result['margin']:g}" if result.get("margin") is not None else "no margin set"
    # first a one-paragraph summary: the UI shows a description's first lines only until "Show more"
    short = " · ".join(f"**{p['a']} vs {p['b']}: {str(p['verdict']).split(':', 1)[0]}**" for p in result["pairs"])
    score = f"{metric} of the best checkpoint" if result.get("split") == "test" else f"best {metric}"
    lines = [f"Comparison of {score} ({better} is better; {margin}){': ' + short if short else ''}", ""]
    if result["pairs"]:
        lines += ["| pair | verdict | paired difference A − B [95% CI] | n | Wilcoxon p (Holm) | seed-level p |",
                  "|---|---|---|---|---|---|"]
        for pair in result["pairs"]:
            s = pair.get("paired")
            if s:
                diff = f"{s['difference']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]"
                n = f"{s['n_images']} images × {s['n_seeds']} seeds"
                p = _p(s.get("wilcoxon_p_holm") if s.get("wilcoxon_p_holm") is not None else s.get("wilcoxon_p"))
            else:
                diff, n, p = "-", "-", "-"
            verdict = "**" + str(pair["verdict"]).replace("|", "/") + "**"
            if pair.get("fragile_text"):  # an interval bound close to 0 or the margin: say what would settle it
                verdict += f" (warning: {str(pair['fragile_text']).replace('|', '/')})"
            lines.append(f"| {pair['a']} vs {pair['b']} | {verdict} | {diff} | {n} | {p} | "
                         f"{_p(pair['seed_level'].get('p_value'))} |")
        lines.append("")
    lines += [f"Figure: `{figure_name}`; every number: `compare.json` (this run's artifacts). Per-variant "
              f"summaries are this run's `summary/...` metrics.", "", "```text", render(result, "table"), "```"]
    return "\n".join(lines)


def _figure(result: dict[str, Any]):
    from unetlab.analysis.figures import comparison_figure

    return comparison_figure(result)


def log_comparison(client, result: dict[str, Any], figure=None) -> str:
    """Log a comparison to its parent run: the Markdown note (after the parent's own description, which is
    kept), summary metrics, verdict tags, ``compare_<metric>.png`` and ``compare.json``. Returns one line
    saying what was logged and, when the margin changed since the last time, that the verdicts were updated."""
    import time

    from mlflow.entities import Metric, RunTag

    from unetlab.analysis.compare import render

    parent_id, metric = result["parent_run_id"], result["metric"]
    parent = client.get_run(parent_id)
    figure_name = f"compare_{metric}.png"
    description = parent.data.tags.get(NOTE_TAG, "").split(NOTE_MARKER)[0].rstrip()
    note = "\n\n".join(part for part in (description, NOTE_MARKER, comparison_markdown(result, figure_name)) if part)
    margin = "none" if result.get("margin") is None else f"{result['margin']:g}"
    previous = parent.data.tags.get(MARGIN_TAG)
    tags = [RunTag(NOTE_TAG, note[:8000]), RunTag(MARGIN_TAG, margin), RunTag(run_tags.COMPARE_METRIC, metric)]
    tags += [RunTag(_fit(run_tags.VERDICT_PREFIX + f"{_name(p['a'])}_vs_{_name(p['b'])}"), str(p["verdict"])[:500])
             for p in result["pairs"]]
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in summary_metrics(result).items()]
    for i in range(0, max(len(metrics), 1), 1000):
        client.log_batch(parent_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])
    own = figure is None
    figure = _figure(result) if own else figure
    client.log_figure(parent_id, figure, figure_name)
    if own:
        import matplotlib.pyplot as plt

        plt.close(figure)
    client.log_text(parent_id, render(result, "json"), "compare.json")
    line = f"comparison logged to parent run {parent_id} (description, summary metrics, {figure_name}, compare.json)"
    if previous is not None and previous != margin:
        line += f"; margin {previous} -> {margin}: verdicts updated"
    return line


def report_dashboard(client, experiment_id: str, parent_id: str, monitor: str, margin: float | None,
                     runs, tracking_uri: str | None, experiment_file: str, say,
                     compute_ratio: float | None = None) -> None:
    """The end of ``unetlab run``: store the parent's runs view, compare its runs (the file's margin) and
    log the comparison to it (a failure is one warning line, never the exit status), then ``say`` each
    verdict and where the dashboard is. ``runs``: the experiment's runs (``experiment.Run``)."""
    import os

    from unetlab.analysis.compare import compare_runs
    from unetlab.errors import exception_text

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # per-image tables: no bars
    try:
        set_runs_view(client, experiment_id, parent_id, monitor, factor_keys(runs), group_tags(runs))
        result = compare_runs(client, experiment_id, None, parent_id, margin, compute_ratio=compute_ratio).as_dict()
        log_comparison(client, result)
    except Exception as exc:  # noqa: BLE001 -- the runs are done; a comparison problem must not change that
        print(f"unetlab: warning: comparison not logged to parent run {parent_id}: {exception_text(exc)}",
              file=sys.stderr)
    else:
        for pair in result["pairs"]:
            say(f"{pair['a']} vs {pair['b']}: {pair['verdict']}")
    base = ui_base_url(tracking_uri)
    own_server = bool(tracking_uri and tracking_uri.startswith(("http://", "https://")))
    server = "" if own_server else f" (start the UI with: unetlab ui {experiment_file})"
    say(f"dashboard: {experiment_runs_url(base, experiment_id, view_key(parent_id))}{server}")
    say(f"comparison: {run_url(base, experiment_id, parent_id)}")


def _store_exists(uri: str) -> bool:
    """Whether a local store is there to be read (reading must not create one)."""
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:"):
        path = unquote(uri.split("sqlite://", 1)[-1].lstrip("/"))
        return (Path("/" + path) if uri.startswith("sqlite:////") else Path(path)).is_file()
    if uri.startswith("file:") or "://" not in uri:
        return Path(unquote(urlparse(uri).path) if uri.startswith("file:") else uri).is_dir()
    return False  # a server: ``unetlab ui`` is for local stores


def ui_urls(tracking_uri: str | None, experiment_name: str | None, host: str, port: int) -> list[str]:
    """The lines ``unetlab ui`` prints: the UI's address, then the training runs of the latest comparison
    grouped by variant and its parent run (of experiment ``experiment_name``, else of the newest one in the
    store). A store that cannot be read only loses the last two lines."""
    base = ui_base_url(None, host, port)
    lines = [f"MLflow UI: {base}"]
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or mlflow.get_tracking_uri()
        if uri.startswith(("http://", "https://")):
            return lines + [f"the store is a tracking server: its own UI is at {uri.rstrip('/')}"]
        if not _store_exists(uri):
            return lines + [f"no runs yet in {uri}: 'unetlab run FILE' first"]
        client = MlflowClient(uri)
        if experiment_name is not None:
            found = client.get_experiment_by_name(experiment_name)
            if found is None:
                return lines + [f"no experiment '{experiment_name}' in {uri} yet: 'unetlab run FILE' first"]
            ids = [found.experiment_id]
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        parent = latest_parent(client, ids) if ids else None
        if parent is None:
            return lines + [f"no unetlab runs in {uri} yet"]
        experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
        experiment = client.get_experiment(experiment_id)
        if VIEW_TAG_PREFIX + view_key(parent_id) not in experiment.tags:  # runs logged before views existed
            children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                          max_results=1)
            monitor = children[0].data.params.get("train.monitor", "val_iou") if children else "val_iou"
            set_runs_view(client, experiment_id, parent_id, monitor)
        return lines + [
            f"training runs of '{experiment.name}', grouped by variant: "
            f"{experiment_runs_url(base, experiment_id, view_key(parent_id))}",
            f"comparison (parent run {parent.info.run_name}): {run_url(base, experiment_id, parent_id)}"]
    except Exception as exc:  # noqa: BLE001 -- the UI itself still starts; the store is its business
        from unetlab.errors import exception_text

        return lines + [f"(could not read the store for the runs' address: {exception_text(exc)})"]
