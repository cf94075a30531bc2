"""``unetlab compare``: find the experiment, compare its runs, print the verdicts, write the figures and log
the comparison to the parent run (the dashboard).

It sits in the command layer because it joins the comparison (``unetlab.analysis.compare``) with the dashboard
that writes it into MLflow (``unetlab.analysis.dashboard``), which itself renders comparisons.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from unetlab.analysis.compare import BUDGET_FIGURE, check_compare_options, compare_runs, render
from unetlab.analysis.tuning_budget import budget_figure
from unetlab.errors import UnetlabError, did_you_mean


def compare_command(target: str, metric: str | None, fmt: str, out: str | None, parent: str | None,
                    tracking_uri: str | None, margin: float | None = None, direction: str | None = None,
                    compute_ratio: float | None = None) -> int:
    """Print the comparison, write its figures to disk and log them to the parent run."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    from unetlab.tracking.run_tracker import resolve_tracking_uri

    check_compare_options(margin, compute_ratio)  # flags first: a bad one is one line before the store is read
    ratio_source = "--compute-ratio"
    name, config_uri = target, None
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        from unetlab.config.experiment import load_experiment

        experiment = load_experiment(target)
        name, config_uri = experiment.name, experiment.runs[0].settings.tracking.uri
        margin = experiment.compare_margin if margin is None else margin
        if compute_ratio is None:
            compute_ratio, ratio_source = experiment.compute_ratio, "compare.compute_ratio"
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
    result = compare_runs(client, found.experiment_id, metric, parent, margin, direction, compute_ratio, ratio_source)
    for line in result.warnings:
        print(f"unetlab: warning: {line}", file=sys.stderr)
    print(render(result, fmt))
    from unetlab.analysis.dashboard import log_comparison
    from unetlab.analysis.figures import comparison_figure

    figure = comparison_figure(result.as_dict())
    path = Path(out or f"compare-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png")
    figure.savefig(path, dpi=110)
    written = [str(path)]
    if result.tuning is not None and result.tuning.curves:
        budget = budget_figure(result.tuning)
        budget_path = path.with_name(f"{path.stem}-budget.png")
        budget.savefig(budget_path, dpi=110)
        client.log_figure(result.parent_run_id, budget, BUDGET_FIGURE)
        written.append(f"{budget_path} (logged as {BUDGET_FIGURE})")
    print(f"figure: {'; '.join(written)}; {log_comparison(client, result.as_dict(), figure)}", file=sys.stderr)
    return 0
