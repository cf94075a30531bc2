"""``unetlab compare`` on cross-validated runs: folds are replicates, as seeds are.

Fabricated runs, named and tagged as ``unetlab run`` names and tags them for ``matrix: {data.fold: [...]}``
(``a/fold=0/seed=1``, tag ``unetlab.matrix.data.fold``, params ``data.folds``/``data.fold``), with known
per-image values on a pool of 31 images split into 3 folds of 11, 10 and 10 (each image in one fold).
The references are written here independently: the pooled paired difference, the documented
hierarchical bootstrap as a plain loop over replicates of unequal size, SciPy's Wilcoxon and Welch
tests, and the cross-validation estimate of a fold-only experiment.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from unetlab.analysis import paired_stats
from unetlab.tracking.per_image import log_per_image_metrics

from conftest import run_cli

FOLDS, SEED, POOL = 3, 7, 31
DIRECTIONS = {"val_iou": "max", "val_loss": "min", "train_loss": "min"}


def fold_images() -> list[list[str]]:
    """The pool's image names by fold (11, 10, 10), as a K-fold split assigns them."""
    names = [f"case_{i:02d}" for i in range(POOL)]
    order = np.random.default_rng(0).permutation(POOL)
    return [[names[i] for i in part] for part in np.array_split(order, FOLDS)]


def known_values() -> dict[str, list[np.ndarray]]:
    """variant -> per fold, the per-image val_iou of that fold's validation images."""
    rng = np.random.default_rng(5)
    out: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for images in fold_images():
        base = rng.uniform(0.5, 0.9, len(images)) + rng.normal(0, 0.02)
        out["a"].append(np.round(base + 0.03 + rng.normal(0, 0.01, len(images)), 8))
        out["b"].append(np.round(base, 8))
    return out


def history(whole: float) -> list[float]:
    return [whole - 0.1, whole, whole - 0.02]


def fabricate(uri: str, name: str, values: dict[str, list[np.ndarray]], variants: bool = True) -> None:
    """A parent run and one FINISHED child per variant and fold (one seed), as `unetlab run` leaves them."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(name)
    parent = client.create_run(exp, run_name=f"{name} parent", tags={"unetlab.parent": "true"}).info.run_id
    for variant, per_fold in values.items():
        for fold, (images, matrix) in enumerate(zip(fold_images(), per_fold)):
            run_name = f"{variant}/fold={fold}/seed={SEED}" if variants else f"fold={fold}/seed={SEED}"
            tags = {"mlflow.parentRunId": parent, "unetlab.variant": variant if variants else "base",
                    "unetlab.seed": str(SEED), "unetlab.matrix.data.fold": str(fold),
                    "unetlab.metric_directions": json.dumps(DIRECTIONS)}
            run = client.create_run(exp, run_name=run_name, tags=tags).info.run_id
            metrics = [Metric("train_time_s", 5.0, 0, 0)]
            for step, v in enumerate(history(float(matrix.mean())), 1):
                metrics += [Metric("val_iou", v, 0, step), Metric("val_loss", 1 - v, 0, step)]
            params = [Param("train.monitor", "val_iou"), Param("model.num_params", "1000"),
                      Param("model.gflops_per_image", "0.5"), Param("data.folds", str(FOLDS)),
                      Param("data.fold", str(fold))]
            client.log_batch(run, metrics=metrics, params=params)
            rows = [{"image": image, "val_iou": float(v)} for image, v in zip(images, matrix)]
            log_per_image_metrics(SimpleNamespace(client=client, run_id=run), rows)
            client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('folds') / 'folds.db'}"
    values = known_values()
    fabricate(uri, "cv_pair", values)
    fabricate(uri, "cv_only", {"base": values["a"]}, variants=False)
    return uri


def loop_bootstrap(groups: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """The documented draws, unequal replicate sizes: u = rng.random(R + R*M), replicate j = floor(u[j]*R),
    its image k (k < n) = floor(u[R + j*M + k] * n); the draw is the mean of everything drawn."""
    rng = np.random.default_rng(seed)
    r, m = len(groups), max(len(g) for g in groups)
    out = []
    for _ in range(resamples):
        u = rng.random(r + r * m)
        drawn = []
        for j in range(r):
            g = groups[min(int(u[j] * r), r - 1)]
            drawn += [g[min(int(u[r + j * m + k] * len(g)), len(g) - 1)] for k in range(len(g))]
        out.append(sum(drawn) / len(drawn))
    return np.array(out)


def test_variants_across_folds_are_paired_on_fold_and_image(store, tmp_path):
    proc = run_cli("compare", "cv_pair", "--tracking-uri", store, "--format", "json", "--margin", "0.01",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cross_validated"] and result["folds"] == ["0", "1", "2"]
    assert [r["variant"] for r in result["rows"]] == ["a", "b"]  # folds are not variants
    assert [(r["folds"], r["seeds"], r["replicates"]) for r in result["rows"]] == [(3, 1, 3), (3, 1, 3)]
    [pair] = result["pairs"]
    values = known_values()
    diffs = [a - b for a, b in zip(values["a"], values["b"])]
    every_image = np.concatenate(diffs)  # each image of the pool exactly once
    s = pair["paired"]
    assert (s["n_images"], s["n_folds"], s["n_seeds"], s["n_replicates"], s["n_pairs"]) == (POOL, 3, 1, 3, POOL)
    assert s["difference"] == pytest.approx(every_image.mean(), abs=1e-12)
    low, high = np.percentile(loop_bootstrap(diffs, paired_stats.RESAMPLES, paired_stats.BOOTSTRAP_SEED),
                              [2.5, 97.5])
    assert s["ci_low"] == pytest.approx(low, abs=1e-12) and s["ci_high"] == pytest.approx(high, abs=1e-12)
    assert s["wilcoxon_p"] == pytest.approx(stats.wilcoxon(every_image).pvalue, rel=1e-9)
    assert s["effect_size_dz"] == pytest.approx(every_image.mean() / every_image.std(ddof=1), rel=1e-9)
    assert 0 < low and pair["verdict"] == "a better"
    # the replicate-level Welch test runs on fold x seed replicates (3 per variant), no longer "n/a"
    best = {v: [max(history(float(m.mean()))) for m in values[v]] for v in values}
    assert pair["seed_level"]["p_value"] == pytest.approx(
        stats.ttest_ind(best["a"], best["b"], equal_var=False).pvalue, rel=1e-9)
    assert set(result["seed_bests"]["a"]) == {f"fold={f}/seed={SEED}" for f in range(FOLDS)}

    table = run_cli("compare", "cv_pair", "--tracking-uri", store, "--margin", "0.01", cwd=tmp_path,
                    check=True).stdout
    assert "a vs b: a better" in table
    assert f"paired (per image, {POOL} images in 3 folds x 1 seeds = 3 replicates)" in table
    assert "replicate-level (Welch t-test on per-replicate (fold x seed) best values): difference" in table
    assert "fold=0 vs fold=1" not in table and "n/a (needs >= 2" not in table


def test_a_fold_only_experiment_prints_the_cross_validation_estimate_and_no_pairs(store, tmp_path):
    proc = run_cli("compare", "cv_only", "--tracking-uri", store, "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["pairs"] == [] and [r["variant"] for r in result["rows"]] == ["base"]
    per_fold = known_values()["a"]
    pooled = np.concatenate(per_fold)
    cv = result["cv"]["base"]
    assert cv["mean"] == pytest.approx(pooled.mean(), abs=1e-12)  # every pool image once (nnU-Net's CV estimate)
    assert cv["std"] == pytest.approx(np.std([f.mean() for f in per_fold], ddof=1), abs=1e-12)
    low, high = np.percentile(loop_bootstrap(per_fold, paired_stats.RESAMPLES, paired_stats.BOOTSTRAP_SEED),
                              [2.5, 97.5])
    assert cv["ci_low"] == pytest.approx(low, abs=1e-12) and cv["ci_high"] == pytest.approx(high, abs=1e-12)
    assert (cv["n_replicates"], cv["n_values"]) == (3, POOL)

    table = run_cli("compare", "cv_only", "--tracking-uri", store, cwd=tmp_path, check=True).stdout
    assert (f"cross-validation estimate of val_iou for base: {pooled.mean():.4f} +- "
            f"{np.std([f.mean() for f in per_fold], ddof=1):.4f} (std over 3 fold x seed replicates), "
            f"95% CI [{low:.4f}, {high:.4f}]") in table
    assert " vs " not in table  # no pairs: folds are not variants
    assert table.splitlines()[1].split()[:4] == ["base", "3", "x", "1"]


def test_the_compare_figure_of_folds_names_replicates_and_the_cv_estimate(store):
    from matplotlib.text import Text
    from mlflow.tracking import MlflowClient

    from unetlab.analysis.compare import compare_runs
    from unetlab.analysis.figures import comparison_figure

    client = MlflowClient(store)
    pair = compare_runs(client, client.get_experiment_by_name("cv_pair").experiment_id, None, None, margin=0.01)
    figure = comparison_figure(pair.as_dict())
    text = "\n".join(t.get_text() for t in figure.findobj(Text))
    assert f"a - b\na better\nn = 3 folds x 1 seeds, {POOL} images" in text
    assert f"val_iou (higher is better): n = 2 variant(s) x 3 replicates (3 folds x 1 seeds), {POOL} images " \
           "paired; margin ±0.01" in text
    assert "one replicate (fold x seed)" in text and "CV estimate (per image), 95% CI" in text
    only = compare_runs(client, client.get_experiment_by_name("cv_only").experiment_id, None, None)
    text = "\n".join(t.get_text() for t in comparison_figure(only.as_dict()).findobj(Text))
    assert f"n = 1 variant(s) x 3 replicates (3 folds x 1 seeds), {POOL} per-image values; no margin" in text
