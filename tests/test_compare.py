"""``unetlab compare`` on runs with known values: means, stds, the test, formats, figure."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest
from scipy import stats

from conftest import one_line_error, run_cli

# variant -> per-seed val_iou histories (3 epochs)
KNOWN = {
    "concat": [[0.5, 0.8, 0.7], [0.6, 0.82, 0.81], [0.55, 0.79, 0.78]],
    "add": [[0.4, 0.6, 0.65], [0.5, 0.62, 0.61], [0.45, 0.58, 0.66]],
}


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'known.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("known")
    parent = client.create_run(exp, run_name="known parent", tags={"unetlab.parent": "true"}).info.run_id
    for variant, seeds in KNOWN.items():
        for seed, values in enumerate(seeds, 1):
            run = client.create_run(exp, run_name=f"{variant}/seed={seed}",
                                    tags={"mlflow.parentRunId": parent, "unetlab.variant": variant}).info.run_id
            client.log_param(run, "train.monitor", "val_iou")
            client.log_param(run, "train.monitor_mode", "max")
            client.log_param(run, "model.num_params", 1000 if variant == "concat" else 800)
            client.log_param(run, "model.gflops_per_image", "0.5")
            for step, v in enumerate(values, 1):
                client.log_metric(run, "val_iou", v, step=step)
                client.log_metric(run, "val_loss", 1 - v, step=step)
            client.log_metric(run, "train_time_s", 10.0 + seed)
            client.set_terminated(run, "FINISHED")
    failed = client.create_run(exp, run_name="add/seed=9", tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(failed, "FAILED")
    client.set_terminated(parent, "FINISHED")
    return uri


def test_json_numbers_match_an_independent_computation(store, tmp_path):
    proc = run_cli("compare", "known", "--tracking-uri", store, "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {r["variant"]: r for r in result["rows"]}
    for variant, seeds in KNOWN.items():
        best = [max(h) for h in seeds]
        final = [h[-1] for h in seeds]
        assert rows[variant]["seeds"] == 3
        assert rows[variant]["best_val_iou_mean"] == pytest.approx(statistics.mean(best))
        assert rows[variant]["best_val_iou_std"] == pytest.approx(statistics.stdev(best))
        assert rows[variant]["final_val_iou_mean"] == pytest.approx(statistics.mean(final))
        assert rows[variant]["best_val_loss_mean"] == pytest.approx(statistics.mean([1 - max(h) for h in seeds]))
    assert rows["concat"]["params"] == 1000 and rows["add"]["params"] == 800
    assert rows["concat"]["train_time_s_mean"] == pytest.approx(12.0)
    [pair] = result["pairs"]
    expected_p = stats.ttest_ind([max(h) for h in KNOWN["concat"]], [max(h) for h in KNOWN["add"]],
                                 equal_var=False).pvalue
    assert pair["p_value"] == pytest.approx(expected_p) and pair["significant"] is True
    assert result["not_finished"] == ["add/seed=9"]
    assert "Welch" in result["test"]
    assert (tmp_path / "compare-known.png").stat().st_size > 1000


def test_table_md_csv(store, tmp_path):
    table = run_cli("compare", "known", "--tracking-uri", store, cwd=tmp_path, check=True).stdout
    assert "concat" in table and "0.8033 +- 0.0153" in table and "larger than the seed-to-seed spread: yes" in table
    md = run_cli("compare", "known", "--tracking-uri", store, "--format", "md", cwd=tmp_path, check=True).stdout
    assert md.splitlines()[0].startswith("| variant | seeds | best val_iou")
    out = run_cli("compare", "known", "--tracking-uri", store, "--format", "csv", "--metric", "val_loss",
                  cwd=tmp_path, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(out.split("\n\n")[0])))
    assert {r["variant"] for r in rows} == {"concat", "add"}


def test_unknown_metric_and_experiment(store, tmp_path):
    line = one_line_error(run_cli("compare", "known", "--tracking-uri", store, "--metric", "val_iuo", cwd=tmp_path))
    assert "did you mean 'val_iou'" in line
    line = one_line_error(run_cli("compare", "knwon", "--tracking-uri", store, cwd=tmp_path))
    assert "no MLflow experiment named 'knwon'" in line and "did you mean 'known'" in line
