"""``unetlab compare`` warns when a verdict is fragile, and says what would settle it.

A verdict compares the interval's bounds with 0 and +-margin; it is fragile when a bound lies within 10%
of the margin of one of them. Fabricated runs (2 variants x 2 seeds x 24 images, equal in truth) give a
known interval, computed here by the documented bootstrap written as a plain loop; the margins are then
chosen on both sides of the threshold: the upper bound 5% of the margin below it (fragile) and 33% below
it (not). The README's headline case (a bound of 0.0099 against a 0.01 margin) must be called fragile.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from unetlab.analysis import paired_stats
from unetlab.tracking.per_image import log_per_image_metrics

SEEDS, IMAGES = [1, 2], 24


def known_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    a = rng.uniform(0.6, 0.85, (len(SEEDS), IMAGES))
    noise = rng.normal(0.0, 0.04, a.shape)
    return {"a": np.round(a, 8), "b": np.round(a + noise - noise.mean(), 8)}  # equal in truth and in mean


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('fragile') / 'f.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fragile")
    parent = client.create_run(exp, run_name="parent", tags={"unetlab.parent": "true"}).info.run_id
    for variant, matrix in known_values().items():
        for s, seed in enumerate(SEEDS):
            tags = {"mlflow.parentRunId": parent, "unetlab.variant": variant, "unetlab.seed": str(seed),
                    "unetlab.metric_directions": json.dumps({"val_iou": "max"})}
            run = client.create_run(exp, run_name=f"{variant}/seed={seed}", tags=tags).info.run_id
            client.log_batch(run, metrics=[Metric("val_iou", float(matrix[s].mean()), 0, 1)],
                             params=[Param("train.monitor", "val_iou")])
            log_per_image_metrics(SimpleNamespace(client=client, run_id=run),
                                  [{"image": i, "val_iou": float(v)} for i, v in enumerate(matrix[s])])
            client.set_terminated(run, "FINISHED")
    return uri, exp


def loop_interval(diffs: np.ndarray) -> tuple[float, float]:
    rng = np.random.default_rng(paired_stats.BOOTSTRAP_SEED)
    n_seeds, n_images = diffs.shape
    draws = []
    for _ in range(paired_stats.RESAMPLES):
        u = rng.random(n_seeds + n_seeds * n_images)
        total = 0.0
        for j in range(n_seeds):
            s = min(int(u[j] * n_seeds), n_seeds - 1)
            total += sum(diffs[s, min(int(u[n_seeds + j * n_images + k] * n_images), n_images - 1)]
                         for k in range(n_images))
        draws.append(total / (n_seeds * n_images))
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(low), float(high)


def test_a_bound_near_the_margin_is_fragile_and_one_clear_of_it_is_not(store):
    from unetlab.analysis.compare import compare_runs, render

    uri, exp = store
    values = known_values()
    diffs = values["a"] - values["b"]
    low, high = loop_interval(diffs)
    # the bound farther from 0 decides equivalence: put the margin 5% (fragile) or 33% (not) beyond it
    edge, bound, side = max((-low, "ci_low", "lower"), (high, "ci_high", "upper"))
    fragile_margin, solid_margin = edge / 0.95, edge / 0.67
    assert min(-low, high) > 0.1 * solid_margin  # neither bound is near 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [fragile] = compare_runs(client, exp, None, None, margin=fragile_margin).pairs
    [solid] = compare_runs(client, exp, None, None, margin=solid_margin).pairs
    assert fragile["verdict"] == f"equivalent within ±{fragile_margin:g}"
    assert solid["verdict"] == f"equivalent within ±{solid_margin:g}" and solid["fragile"] is None
    f = fragile["fragile"]
    threshold = fragile_margin if bound == "ci_high" else -fragile_margin
    assert f["bound"] == bound and f["threshold"] == pytest.approx(threshold, abs=1e-15)
    assert f["distance"] == pytest.approx(fragile_margin - edge, abs=1e-12)
    assert f["tolerance"] == pytest.approx(0.1 * fragile_margin)
    # what settles it: a half-width at which that bound sits a full tolerance inside the margin,
    # reached (half-width ~ 1/sqrt(seeds)) at this many seeds
    target = abs(threshold - diffs.mean()) - 0.1 * fragile_margin
    seeds = math.ceil(len(SEEDS) * (((high - low) / 2) / target) ** 2)
    assert f["settle"]["seeds"] == seeds and seeds > len(SEEDS)
    text = render(compare_runs(client, exp, None, None, margin=fragile_margin), "table")
    value = low if bound == "ci_low" else high
    assert (f"  warning: fragile verdict: the CI's {side} bound {value:+.4f} is {fragile_margin - edge:.4f} "
            f"from {threshold:+g}, within {0.1 * fragile_margin:.4g} (10% of the margin)") in text
    assert f"about {seeds} seeds with these images" in text and "would settle it" in text
    assert "fragile" not in render(compare_runs(client, exp, None, None, margin=solid_margin), "table")


def test_the_readme_headline_bound_is_fragile():
    # the bound that flipped on another machine: 0.0099 against a 0.01 margin
    result = paired_stats.PairedResult(0.002, -0.0061, 0.0099, 3, 40, 0.5, 0.1, 0.1)
    f = paired_stats.fragility(result, 0.01)
    assert f is not None and f["bound"] == "ci_high" and f["threshold"] == 0.01
    assert f["distance"] == pytest.approx(0.0001)
    # 0.0089 (11% of the margin away, other bound far from 0 and -0.01) is not
    assert paired_stats.fragility(paired_stats.PairedResult(0.002, -0.0061, 0.0089, 3, 40, 0.5, 0.1, 0.1),
                                  0.01) is None
    # a lower bound just above 0 ("A better" by a hair) is fragile too; without a margin the tolerance
    # is 10% of the CI half-width
    near_zero = paired_stats.PairedResult(0.03, 0.0004, 0.0596, 3, 40, 0.01, 0.5, 0.5)
    f = paired_stats.fragility(near_zero, None)
    assert f["threshold"] == 0 and f["tolerance"] == pytest.approx(0.1 * 0.0296) and f["basis"] == "CI half-width"


def figure_text(figure) -> str:
    """Every text artist of a matplotlib figure (titles, labels, tick labels, legends), one per line."""
    from matplotlib.text import Text

    return "\n".join(t.get_text() for t in figure.findobj(Text) if t.get_text())


def test_the_compare_figure_carries_the_verdicts_n_and_the_margin(store):
    from mlflow.tracking import MlflowClient

    from unetlab.analysis.compare import compare_runs
    from unetlab.analysis.figures import comparison_figure

    uri, exp = store
    client = MlflowClient(uri)
    values = known_values()
    low, high = loop_interval(values["a"] - values["b"])
    margin = max(-low, high) / 0.95  # equivalent, but fragile
    text = figure_text(comparison_figure(compare_runs(client, exp, None, None, margin=margin).as_dict()))
    assert f"a - b\nequivalent within ±{margin:g} (fragile)\nn = 2 seeds x {IMAGES} images" in text
    assert f"margin ±{margin:g}" in text  # the forest plot's title and the figure's
    assert f"val_iou (higher is better): n = 2 variant(s) x 2 seeds x {IMAGES} images; margin ±{margin:g}" in text
    text = figure_text(comparison_figure(compare_runs(client, exp, None, None).as_dict()))
    assert "a - b\nno difference shown\nn = 2 seeds" in text and "no margin (equivalence not tested)" in text


@pytest.mark.parametrize("low, high, p", [
    (0.048, 0.10, 0.001),    # "A better": the lower bound near +margin cannot change that
    (-0.001, 0.03, 0.5),     # "equivalent": the lower bound near 0 cannot change that
    (-0.10, -0.049, 0.001),  # "B better": the upper bound near -margin cannot change that
    (0.0004, 0.06, 0.2),     # "not resolved" (p >= 0.05): crossing 0 leaves it not resolved
])
def test_a_bound_near_a_threshold_that_cannot_flip_the_verdict_is_not_fragile(low, high, p):
    result = paired_stats.PairedResult((low + high) / 2, low, high, 3, 40, p, 0.5, 0.5)
    assert paired_stats.fragility(result, 0.05) is None


def test_a_bound_that_can_flip_the_verdict_is_still_fragile():
    # "A better" with the lower bound 0.0004 above 0 (p small): crossing 0 makes it not resolved
    result = paired_stats.PairedResult(0.03, 0.0004, 0.06, 3, 40, 0.001, 0.5, 0.5)
    f = paired_stats.fragility(result, 0.05)
    assert f["bound"] == "ci_low" and f["threshold"] == 0
    # "A better" with its upper bound just over +margin: below it, the pair would be "equivalent"
    result = paired_stats.PairedResult(0.03, 0.01, 0.0502, 3, 40, 0.001, 0.5, 0.5)
    f = paired_stats.fragility(result, 0.05)
    assert f["bound"] == "ci_high" and f["threshold"] == 0.05
