"""``unetlab compare`` on fabricated runs whose answer is known, checked against independent computations.

Four variants on the same 3 seeds x 40 validation images: ``y`` is ``x`` plus tiny noise (equivalent
within a 0.01 margin), ``z`` is ``x`` minus 0.1 (``x`` truly better), ``w`` is ``x`` plus large noise
(not resolved). The references: a plain-loop hierarchical bootstrap with the same fixed seed, SciPy's
Wilcoxon signed-rank and Welch tests, Holm's correction and the rank-biserial r by hand.
"""

from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from unetlab.analysis import paired_stats
from unetlab.tracking.per_image import log_per_image_metrics

from conftest import one_line_error, run_cli

SEEDS, IMAGES, MARGIN = [1, 2, 3], 40, 0.01
DIRECTIONS = {"val_iou": "max", "val_loss": "min", "train_loss": "min"}


def known_values() -> dict[str, np.ndarray]:
    """variant -> seeds x images per-image val_iou."""
    rng = np.random.default_rng(42)
    difficulty = rng.uniform(0.55, 0.9, IMAGES)
    x = difficulty + rng.normal(0, 0.02, (len(SEEDS), 1)) + rng.normal(0, 0.03, (len(SEEDS), IMAGES))
    values = {"x": x, "y": x + rng.normal(0, 0.002, x.shape), "z": x - 0.1 + rng.normal(0, 0.01, x.shape),
              "w": x + rng.normal(0, 0.08, x.shape)}
    return {k: np.round(v, 8) for k, v in values.items()}  # exact through the table's JSON (10 decimals)


def fabricate(uri: str, name: str, values: dict[str, np.ndarray], tables: bool = True, tags: bool = True) -> None:
    """One parent run and a FINISHED child per variant and seed, as ``unetlab run`` leaves them."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(name)
    parent = client.create_run(exp, run_name=f"{name} parent", tags={"unetlab.parent": "true"}).info.run_id
    for variant, matrix in values.items():
        for s, seed in enumerate(SEEDS):
            run_tags = {"mlflow.parentRunId": parent, "unetlab.variant": variant, "unetlab.seed": str(seed)}
            if tags:
                run_tags["unetlab.metric_directions"] = json.dumps(DIRECTIONS)
            run = client.create_run(exp, run_name=f"{variant}/seed={seed}", tags=run_tags).info.run_id
            whole = float(matrix[s].mean())
            metrics = [Metric("train_time_s", 10.0 + seed, 0, 0)]
            for step, v in enumerate(history(whole), 1):
                metrics += [Metric("val_iou", v, 0, step), Metric("val_loss", 1 - v, 0, step)]
            params = [Param("train.monitor", "val_iou"), Param("model.num_params", "1000"),
                      Param("model.gflops_per_image", "0.5")]
            client.log_batch(run, metrics=metrics, params=params)
            if tables:
                rows = [{"image": i, "val_iou": float(matrix[s, i])} for i in range(IMAGES)]
                log_per_image_metrics(SimpleNamespace(client=client, run_id=run), rows)
            client.set_terminated(run, "FINISHED")
    failed = client.create_run(exp, run_name="x/seed=9", tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(failed, "FAILED")
    client.set_terminated(parent, "FINISHED")


def history(whole: float) -> list[float]:
    """A run's val_iou per epoch: its best is the whole-set value."""
    return [whole - 0.2, whole, whole - 0.01]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{path / 'known.db'}"
    fabricate(uri, "known", known_values())
    fabricate(uri, "old", {k: v for k, v in known_values().items() if k in ("x", "z")}, tables=False, tags=False)
    return uri


def loop_bootstrap(diffs: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The documented hierarchical bootstrap, written as the plainest loop."""
    rng = np.random.default_rng(seed)
    n_seeds, n_images = diffs.shape
    out = []
    for _ in range(resamples):
        u = rng.random(n_seeds + n_seeds * n_images)
        total = 0.0
        for j in range(n_seeds):
            s = min(int(u[j] * n_seeds), n_seeds - 1)
            for k in range(n_images):
                total += diffs[s, min(int(u[n_seeds + j * n_images + k] * n_images), n_images - 1)]
        out.append(total / (n_seeds * n_images))
    return np.array(out)


def hand_holm(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def hand_rank_biserial(d: np.ndarray) -> float:
    d = d[d != 0]
    ranks = stats.rankdata(np.abs(d))
    plus, minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return (plus - minus) / (plus + minus)


def test_paired_verdicts_and_numbers_match_independent_computations(store, tmp_path):
    proc = run_cli("compare", "known", "--tracking-uri", store, "--format", "json", "--margin", str(MARGIN),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["direction"] == "max" and "metric_directions" in result["direction_source"]
    assert result["not_finished"] == ["x/seed=9"] and not result["warnings"]
    values = known_values()
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    assert len(pairs) == 6  # 4 variants, every pair
    assert pairs[("x", "y")]["verdict"] == "equivalent within ±0.01"
    assert pairs[("x", "z")]["verdict"] == "x better"
    assert pairs[("y", "z")]["verdict"] == "y better"
    unresolved = pairs[("x", "w")]
    assert unresolved["verdict"].startswith("not resolved: run more seeds or images")

    raw = {}
    for (a, b), pair in pairs.items():
        diffs = values[a] - values[b]
        s = pair["paired"]
        assert (s["n_seeds"], s["n_images"]) == (3, IMAGES)
        assert s["difference"] == pytest.approx(diffs.mean(), abs=1e-12)
        per_image = diffs.mean(axis=0)
        assert s["wilcoxon_p"] == pytest.approx(stats.wilcoxon(per_image).pvalue, rel=1e-9)
        assert s["rank_biserial"] == pytest.approx(hand_rank_biserial(per_image), abs=1e-12)
        assert s["effect_size_dz"] == pytest.approx(per_image.mean() / per_image.std(ddof=1), rel=1e-9)
        best = {v: [max(history(m.mean())) for m in values[v]] for v in (a, b)}
        welch = stats.ttest_ind(best[a], best[b], equal_var=False).pvalue
        assert pair["seed_level"]["p_value"] == pytest.approx(welch, rel=1e-9)
        assert pair["seed_level"]["difference"] == pytest.approx(statistics.mean(best[a]) - statistics.mean(best[b]))
        raw[(a, b)] = s["wilcoxon_p"]
    holm = dict(zip(raw, hand_holm(list(raw.values()))))
    for key, pair in pairs.items():
        assert pair["paired"]["wilcoxon_p_holm"] == pytest.approx(holm[key], rel=1e-12)

    # the bootstrap, redone as a plain loop with the same fixed seed, for the unresolved pair
    diffs = values["x"] - values["w"]
    loop = loop_bootstrap(diffs, paired_stats.RESAMPLES, paired_stats.BOOTSTRAP_SEED)
    low, high = np.percentile(loop, [2.5, 97.5])
    s = unresolved["paired"]
    assert s["ci_low"] == pytest.approx(low, abs=1e-12) and s["ci_high"] == pytest.approx(high, abs=1e-12)
    assert s["ci_low"] < 0 < s["ci_high"] and s["ci_high"] - s["ci_low"] > MARGIN
    # the stated rule: seeds scale the half-width by 1/sqrt(n), to reach margin/2
    assert s["needed"]["seeds"] == math.ceil(3 * ((high - low) / 2 / (MARGIN / 2)) ** 2)
    assert f"about {s['needed']['seeds']} seeds" in unresolved["verdict"]
    assert (tmp_path / "compare-known.png").stat().st_size > 5000


def test_table_names_each_test(store, tmp_path, capsys):
    from unetlab.cli.compare_command import compare_command

    assert compare_command("known", None, "table", str(tmp_path / "k.png"), None, store, margin=0.01) == 0
    table = capsys.readouterr().out
    assert "x vs y: equivalent within ±0.01" in table and "x vs z: x better" in table
    assert "paired test: per-image val_iou" in table and "Holm-corrected" in table
    assert "seed-level (Welch t-test on per-seed best values)" in table
    assert "higher is better (the runs' unetlab.metric_directions tag)" in table


TINY = """
name: tiny_pair
data:
  dataset: {name: shapes, image_size: 32, n_train: 16, n_val: 6, seed: 3}
  batch_size: 8
model:
  encoder: {name: classic, depth: 2, base_channels: 4}
train: {epochs: 1, lr: 0.01, device: cpu, loss: bce_iou, metrics: [iou, hd95]}
tracking: {uri: "sqlite:///STORE", checkpoint_dir: CKPT, log_model: false, figures: false}
variants:
  concat: {model.fusion: concat}
  add: {model.fusion: add}
seeds: [1]
"""


def test_run_logs_per_image_tables_that_compare_pairs(tmp_path):
    # end to end: `unetlab run` logs each run's per-image table, `unetlab compare FILE` pairs on it
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("STORE", str(tmp_path / "t.db")).replace("CKPT", str(tmp_path / "ckpt")))
    run_cli("run", str(path), "--quiet", cwd=tmp_path, check=True)
    table = run_cli("compare", str(path), "--margin", "0.05", cwd=tmp_path, check=True).stdout
    assert "paired (per image, 6 images x 1 seeds)" in table and "concat vs add: " in table
    assert "higher is better (the runs' unetlab.metric_directions tag)" in table
    from mlflow.tracking import MlflowClient

    from unetlab.analysis.compare import compare_runs

    client = MlflowClient(f"sqlite:///{tmp_path / 't.db'}")
    hd95 = compare_runs(client, client.get_experiment_by_name("tiny_pair").experiment_id, "val_hd95", None)
    assert hd95.direction == "min" and hd95.pairs[0]["paired"]["n_images"] == 6
    assert not hd95.warnings and hd95.dropped == [] and hd95.pairs[0]["dropped"] is None
    # each run records the ranges its metrics declare, which compare checks the per-image tables against
    run = client.search_runs([client.get_experiment_by_name("tiny_pair").experiment_id],
                             filter_string="attributes.run_name = 'concat/seed=1'")[0]
    assert json.loads(run.data.tags["unetlab.metric_ranges"]) == {"val_iou": [0.0, 1.0], "val_hd95": [0.0, None]}


def test_old_runs_fall_back_to_seed_level_and_an_unknown_direction_is_said(store, tmp_path, capsys):
    # runs from before per-image tables and direction tags (in-process: the CLI is tested above)
    from unetlab.cli.compare_command import compare_command

    assert compare_command("old", None, "json", str(tmp_path / "old.png"), None, store) == 0
    out = capsys.readouterr()
    assert "unetlab: warning: which way is better for val_iou is unknown" in out.err
    result = json.loads(out.out)
    [pair] = result["pairs"]
    assert pair["paired"] is None and pair["verdict"].startswith("seed-level only: no per-image tables")
    assert pair["seed_level"]["p_value"] is not None
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["x"]["best_val_loss_mean"] is None  # no direction known for val_loss: no "best" is made up
    # --direction says which way is better for runs without the tag
    assert compare_command("old", None, "json", str(tmp_path / "old.png"), None, store, direction="min") == 0
    flipped = json.loads(capsys.readouterr().out)
    assert flipped["direction_source"] == "--direction"
    expected = statistics.mean(min(history(m.mean())) for m in known_values()["x"])
    assert {r["variant"]: r for r in flipped["rows"]}["x"]["best_val_iou_mean"] == pytest.approx(expected)


def test_per_image_table_is_an_mlflow_table(store):
    # the format MLflow's own reader (and the UI's evaluation view) understands
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(store)  # load_table searches through the fluent API
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("known").experiment_id
    [run] = client.search_runs([exp], filter_string="attributes.run_name = 'x/seed=2'")
    frame = client.load_table(exp, "per_image_metrics.json", run_ids=[run.info.run_id])
    assert list(frame["image"]) == list(range(IMAGES))
    assert np.allclose(frame["val_iou"], known_values()["x"][1], atol=1e-12)
    assert "per_image_metrics.json" in run.data.tags["mlflow.loggedArtifacts"]


def test_unknown_metric_and_experiment(store, tmp_path):
    line = one_line_error(run_cli("compare", "known", "--tracking-uri", store, "--metric", "val_iuo", cwd=tmp_path))
    assert "did you mean 'val_iou'" in line
    line = one_line_error(run_cli("compare", "knwon", "--tracking-uri", store, cwd=tmp_path))
    assert "no MLflow experiment named 'knwon'" in line and "did you mean 'known'" in line


def test_bootstrap_is_the_documented_loop_and_holm_matches_by_hand():
    diffs = np.random.default_rng(3).normal(0.01, 0.05, (2, 7))
    fast = paired_stats.bootstrap_replicates(diffs, 500, seed=11)
    assert np.abs(fast - loop_bootstrap(diffs, 500, 11)).max() < 1e-12
    assert paired_stats.holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert paired_stats.wilcoxon_signed_rank([0.0, 0.0]) == 1.0


def test_compare_takes_the_margin_of_the_loaded_experiment(store, tmp_path, capsys):
    from unetlab.cli.compare_command import compare_command
    from unetlab.errors import ConfigError

    path = tmp_path / "exp.yaml"
    path.write_text(f"name: known\ntrain: {{epochs: 1}}\ntracking: {{uri: '{store}'}}\ncompare:\n  margin: 0.01\n")
    assert compare_command(str(path), None, "table", str(tmp_path / "k.png"), None, None) == 0
    assert "x vs y: equivalent within ±0.01" in capsys.readouterr().out
    path.write_text("name: known\ntrain: {epochs: 1}\ncompare:\n  margin: -1\n")
    with pytest.raises(ConfigError, match=r"exp.yaml:4: compare.margin: expected a positive number"):
        compare_command(str(path), None, "table", str(tmp_path / "k.png"), None, store)


def test_an_experiment_file_with_a_compare_margin_validates_and_a_bad_one_is_one_line(tmp_path, capsys):
    from unetlab.cli.main import main
    from unetlab.config.experiment import load_experiment

    path = tmp_path / "exp.yaml"
    path.write_text("name: e\ntrain: {epochs: 1}\ncompare:\n  margin: 0.02\n")
    assert load_experiment(path).compare_margin == 0.02
    path.write_text("name: e\ncompare: {margn: 0.02}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"unetlab: error: {path}:2: compare.margn: unknown key; did you mean 'margin'? "
                   "(allowed: margin, compute_ratio)"]
    path.write_text("name: e\ncompare: 0.02\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"unetlab: error: {path}:2: compare: expected a mapping with the keys "
                                               "margin, compute_ratio (e.g. compare: {margin: 0.01})")
