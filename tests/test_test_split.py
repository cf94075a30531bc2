"""A final run's best model on the held-out test split: ``test_`` metrics and ``per_image_test_metrics.json``,
checked against scikit-learn's Jaccard index on predictions recomputed from the run's best checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli

EXPERIMENT = """
name: held_out
data:
  dataset: {name: shapes, image_size: 32, n_train: 16, n_val: 4, n_test: 6, seed: 5, min_shapes: 2}
  batch_size: 8
model:
  encoder: {name: classic, depth: 2, base_channels: 4}
train: {epochs: 2, lr: 0.01, device: cpu, loss: bce_iou, metrics: [iou]}
tracking: {uri: "sqlite:///STORE", checkpoint_dir: CKPT, log_model: false, figures: false}
seeds: [1]
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("held_out")
    path = root / "held_out.yaml"
    path.write_text(EXPERIMENT.replace("STORE", str(root / "s.db")).replace("CKPT", str(root / "ckpt")))
    proc = run_cli("run", str(path))
    assert proc.returncode == 0, proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 's.db'}")
    exp = client.get_experiment_by_name("held_out")
    [run] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("unetlab.parent") != "true"]
    return root, path, client, run


def test_final_run_is_scored_on_the_test_split_like_validation(trained):
    from sklearn.metrics import jaccard_score

    from unetlab.config.experiment import load_experiment
    from unetlab.data.sources import build_source
    from unetlab.model.unet import build_unet
    from unetlab.plugin_api.host import default_host

    root, path, client, run = trained
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert {"test_iou", "test_loss"} <= set(metrics)
    local = client.download_artifacts(run.info.run_id, "per_image_test_metrics.json", str(root))
    table = json.loads(open(local).read())
    assert table["columns"][0] == "image" and {"test_iou", "test_loss"} <= set(table["columns"])
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    assert len(rows) == 6
    # independent: the best checkpoint's predictions on the regenerated test images, scored by scikit-learn
    host = default_host()
    config = load_experiment(path, host=host).runs[0].config
    test = build_source(config, host.registry).split("test")
    [best] = list((root / "ckpt").rglob("best.pt"))
    images, masks = test.tensors
    model = build_unet(config["model"], images.shape[1], 1, host.registry)  # binary: one logit channel
    model.load_state_dict(torch.load(best, weights_only=False)["model"])
    model.eval()
    with torch.no_grad():
        predicted = (model(images)[:, 0] > 0).long().numpy()
    truth = masks.numpy()
    per_image = [jaccard_score(truth[i].ravel(), predicted[i].ravel(), zero_division=1.0) for i in range(6)]
    assert [r["test_iou"] for r in rows] == pytest.approx(per_image, abs=1e-6)
    assert metrics["test_iou"] == pytest.approx(jaccard_score(truth.ravel(), predicted.ravel()), abs=1e-6)
    assert np.isfinite([r["test_loss"] for r in rows]).all()
    # the validation table is still the validation split's, under its own keys
    (root / "val").mkdir(exist_ok=True)
    local = client.download_artifacts(run.info.run_id, "per_image_metrics.json", str(root / "val"))
    assert len(json.loads(open(local).read())["data"]) == 4


def test_the_contract_measurements_are_logged(trained):
    _, _, _, run = trained
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["train_epochs"] == 2
    assert metrics["train_steps"] == 2 * 2  # 16 images, batch 8, 2 epochs
    assert metrics["peak_memory_mb"] > 10 and tags["unetlab.peak_memory_kind"].startswith("process peak RSS")


def test_compare_shows_the_measured_contract(trained):
    root, path, _, _ = trained
    proc = run_cli("compare", str(path), "--out", str(root / "c.png"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = lines.index("comparison contract:")
    assert lines[start + 1].strip() == "one variant: nothing is compared"
    assert lines[start + 2].split()[:11] == ["variant", "runs", "params", "GFLOPs/img", "epochs", "steps", "compute",
                                             "TFLOP", "train", "s", "peak"]
    row = lines[start + 3].split()
    assert row[4:6] == ["2", "4"] and float(row[8]) > 10  # epochs, steps (16 images / batch 8 x 2), peak MB
    assert "peak memory: process peak RSS" in proc.stdout
