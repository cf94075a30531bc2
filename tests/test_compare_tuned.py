"""``unetlab compare`` on a tuned experiment, fabricated with the MLflow client as ``unetlab run`` leaves it:
only final runs enter the verdict, which is on the held-out test split and says so; the budget per variant;
the expected best validation score by number of trials (checked against brute force) and its crossing."""

from __future__ import annotations

import itertools
import json
import statistics
from types import SimpleNamespace

import numpy as np
import pytest

from unetlab.tracking.per_image import PER_IMAGE_TEST_ARTIFACT, log_per_image_metrics

from conftest import run_cli

SEEDS, TEST_IMAGES = [1, 2], 30
DIRECTIONS = {"val_iou": "max", "val_loss": "min", "train_loss": "min"}
# steady: good mean, low ceiling; erratic: poor mean, high ceiling: the leader changes with the budget
OBJECTIVES = {"steady": [0.70, 0.71, 0.72, 0.70], "erratic": [0.40, 0.55, 0.74, 0.60]}
PRUNED = {"steady": 1, "erratic": 0}
BUDGET = {"steady": (5, 1, 18, 360, 42.5), "erratic": (4, 0, 16, 320, 40.0)}  # trials pruned epochs steps s


def held_out_values() -> dict[str, np.ndarray]:
    """variant -> seeds x test images per-image test_iou: steady clearly better on the test split."""
    rng = np.random.default_rng(7)
    base = rng.uniform(0.5, 0.8, TEST_IMAGES)
    return {"steady": np.round(base + 0.08 + rng.normal(0, 0.01, (2, TEST_IMAGES)), 8),
            "erratic": np.round(base + rng.normal(0, 0.01, (2, TEST_IMAGES)), 8)}


def fabricate(uri: str) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("tuned")
    parent = client.create_run(exp, run_name="tuned parent", tags={"unetlab.parent": "true"}).info.run_id
    values = held_out_values()
    for variant in ("steady", "erratic"):
        study = client.create_run(exp, run_name=f"{variant}/study", tags={
            "mlflow.parentRunId": parent, "unetlab.role": "study", "unetlab.variant": variant}).info.run_id
        trials, pruned, epochs, steps, seconds = BUDGET[variant]
        client.log_batch(study, metrics=[Metric(k, v, 0, 0) for k, v in zip(
            ("tune.trials", "tune.pruned", "tune.epochs", "tune.steps", "tune.seconds"), BUDGET[variant])],
            params=[Param("tune.metric", "val_iou"), Param("tune.direction", "max"),
                    Param("tune.best.train.lr", "0.003" if variant == "steady" else "0.01")])
        states = ["complete"] * len(OBJECTIVES[variant]) + ["pruned"] * PRUNED[variant]
        for number, state in enumerate(states):
            trial = client.create_run(exp, run_name=f"{variant}/trial={number}", tags={
                "mlflow.parentRunId": study, "unetlab.role": "trial", "unetlab.variant": variant,
                "unetlab.trial_number": str(number), "unetlab.trial_state": state}).info.run_id
            objective = OBJECTIVES[variant][number] if state == "complete" else 0.99  # a pruned value: left out
            client.log_metric(trial, "tune.objective", objective)
            client.set_terminated(trial, "FINISHED")
        client.set_terminated(study, "FINISHED")
        for s, seed in enumerate(SEEDS):
            run = client.create_run(exp, run_name=f"{variant}/seed={seed}", tags={
                "mlflow.parentRunId": parent, "unetlab.variant": variant, "unetlab.seed": str(seed),
                "unetlab.role": "final", "unetlab.tuned_from": study, "unetlab.data_digest": "abc",
                "unetlab.metric_directions": json.dumps(DIRECTIONS)}).info.run_id
            # validation: erratic looks better (it was tuned on it); the test split says the opposite
            val = 0.75 if variant == "erratic" else 0.72
            metrics = [Metric("val_iou", v, 0, step) for step, v in enumerate([val - 0.1, val], 1)]
            metrics += [Metric("test_iou", float(values[variant][s].mean()), 0, 2), Metric("train_time_s", 10.0, 0, 2),
                        Metric("train_steps", 40, 0, 2), Metric("train_epochs", 2, 0, 2)]
            params = [Param("train.monitor", "val_iou"), Param("model.num_params", "1000"),
                      Param("model.gflops_per_image", "0.5"), Param("data.batch_size", "8"),
                      Param("train.seed", str(seed)), Param("model.fusion.name", variant),
                      Param("train.lr", "0.003" if variant == "steady" else "0.01")]
            client.log_batch(run, metrics=metrics, params=params)
            rows = [{"image": f"t{i}", "test_iou": float(values[variant][s, i])} for i in range(TEST_IMAGES)]
            log_per_image_metrics(SimpleNamespace(client=client, run_id=run), rows, PER_IMAGE_TEST_ARTIFACT)
            client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('tuned') / 'tuned.db'}"
    fabricate(uri)
    return uri


def brute_expected_max(values: list[float], n: int) -> float:
    return statistics.mean(max(c) for c in itertools.combinations(values, n))


def test_compare_on_a_tuned_experiment_through_the_cli(store, tmp_path):
    out = tmp_path / "cmp.png"
    proc = run_cli("compare", "tuned", "--tracking-uri", store, "--out", str(out), "--margin", "0.01")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"judged on the held-out test split ({TEST_IMAGES} images)" in text
    # the test split is scored once, on the checkpoint validation chose: one column, no "best"/"final" epoch of it
    header = next(line for line in text.splitlines() if line.startswith("variant "))
    assert header.split()[:5] == ["variant", "seeds", "test_iou", "(best", "checkpoint)"] and "final" not in header
    steady = next(line for line in text.splitlines() if line.startswith("steady ") and "+-" in line)
    assert steady.split()[2] == f"{np.mean(held_out_values()['steady']):.4f}"
    assert "steady vs erratic: steady better" in text  # the test split's verdict, not the validation split's
    # the budget per variant, as the studies logged it (the failed column: trial runs found in that state)
    budget = next(line for line in text.splitlines() if line.strip().startswith("steady ") and "train.lr=0.003" in line)
    assert budget.split()[:7] == ["steady", "5", "1", "0", "18", "360", "42.5"]
    # who leads at n trials, checked against brute force over every n-subset of the complete trials
    leaders = ["steady" if brute_expected_max(OBJECTIVES["steady"], n) > brute_expected_max(OBJECTIVES["erratic"], n)
               else "erratic" for n in range(1, 5)]
    switch = leaders.index("erratic") + 1
    assert leaders[:switch - 1] == ["steady"] * (switch - 1) and set(leaders[switch - 1:]) == {"erratic"}
    assert (f"the verdict depends on the tuning budget: steady leads up to {switch - 1} trial"
            f"{'s' * (switch > 2)}, erratic from {switch}") in text
    assert "comparison contract:" in text and "declared factor: model.fusion.name" in text
    assert "tuned per variant (one search space and budget): train.lr" in text
    budget_png = tmp_path / "cmp-budget.png"
    assert out.stat().st_size > 5000 and budget_png.stat().st_size > 5000
    # the parent run's description (the dashboard) names the score as the table does
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    [parent] = client.search_runs([client.get_experiment_by_name("tuned").experiment_id],
                                  filter_string="tags.`unetlab.parent` = 'true'")
    assert "\nComparison of test_iou of the best checkpoint (higher is better; margin ±0.01)" in \
        parent.data.tags["mlflow.note.content"]


def test_json_has_the_curves_and_only_final_runs(store, tmp_path):
    proc = run_cli("compare", "tuned", "--tracking-uri", store, "--out", str(tmp_path / "c.png"), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["metric"] == "test_iou" and result["split"] == "test"
    assert {r["variant"]: r["replicates"] for r in result["rows"]} == {"steady": 2, "erratic": 2}
    curves = result["tuning"]["curves"]
    for variant, values in OBJECTIVES.items():
        assert curves[variant] == pytest.approx([brute_expected_max(values, n) for n in range(1, len(values) + 1)])
    assert result["tuning"]["budgets"][0]["trial_runs"] == {"complete": 4, "pruned": 1, "failed": 0}


def test_compute_ratio_flag_sets_the_contract_threshold_and_a_bad_one_is_one_line(store, tmp_path):
    proc = run_cli("compare", "tuned", "--tracking-uri", store, "--out", str(tmp_path / "c.png"),
                   "--compute-ratio", "1.2")
    assert proc.returncode == 0, proc.stderr
    assert "by more than 1.2x (set by --compute-ratio)" in proc.stdout
    for experiment in ("tuned", "no-such-experiment"):  # the flag is checked before the store is read
        proc = run_cli("compare", experiment, "--tracking-uri", store, "--out", str(tmp_path / "d.png"),
                       "--compute-ratio", "0.9")
        assert proc.returncode == 2
        assert proc.stderr.strip() == "unetlab: error: --compute-ratio: must be a number > 1, got 0.9"
        assert not (tmp_path / "d.png").exists()
