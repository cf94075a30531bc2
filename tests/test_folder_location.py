"""Nothing random depends on where a folder dataset lies: a byte-for-byte copy at another path, with other
modification times, trains to the same metrics to the last digit (issue 19, item 1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from unetlab.cli.main import main as cli_main

EXPERIMENT = """\
name: where
data:
  dataset: {name: folder, root: data, val_fraction: 0.34}
  patch_size: [16, 16]
  foreground_oversample: 0.9
  batch_size: 2
model: {encoder: {name: classic, depth: 2, base_channels: 4}}
train: {epochs: 1, device: cpu}  # bit-identity is a CPU promise
tracking: {log_model: false, figures: false}
"""


def write_dataset(root: Path) -> None:
    """Six grey 8-bit images (TIFF and PNG) of varied sizes; masks with more foreground pixels than the
    decode cache keeps positions of (256), so which positions are kept is a random draw."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate([(40, 52), (48, 36), (64, 64), (30, 50), (56, 44), (36, 60)]):
        yy, xx = np.ogrid[:h, :w]
        mask = ((yy - h // 2) ** 2 + (xx - w // 3) ** 2 < (min(h, w) // 3) ** 2).astype(np.uint8) * 255
        image = np.clip(60 + 0.5 * mask + rng.normal(0, 25, (h, w)), 0, 255).astype(np.uint8)
        if i % 2:
            tifffile.imwrite(root / "images" / f"n{i}.tif", image)
        else:
            Image.fromarray(image).save(root / "images" / f"n{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"n{i}.png")


def train(folder: Path, monkeypatch, capsys) -> dict:
    """Train the experiment of ``folder`` into its own store; every non-timing metric's history, and the
    per-image table."""
    from mlflow.tracking import MlflowClient

    from unetlab.tracking.per_image import load_per_image_metrics

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(folder)
    assert cli_main(["run", str(folder / "exp.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("where")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if not r.data.tags.get("unetlab.parent")]
    # what the run measured of the machine (timings, the process's peak memory) is not a result of the data
    histories = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                 for key in run.data.metrics
                 if not key.endswith("_s") and "time" not in key and key != "peak_memory_mb"}
    return {"metrics": histories, "per_image": load_per_image_metrics(client, run.info.run_id)}


def test_a_copied_dataset_trains_to_identical_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNETLAB_CACHE_DIR", str(tmp_path / "cache"))  # one cache: the copy gets its own entries
    first = tmp_path / "first"
    write_dataset(first / "data")
    (first / "exp.yaml").write_text(EXPERIMENT)
    second = tmp_path / "elsewhere" / "deeper" / "second"
    shutil.copytree(first, second)
    for path in second.rglob("*"):  # other modification times: part of the decode cache's key
        os.utime(path, ns=(1_000_000_000_123, 1_000_000_000_456_789 + len(str(path))))
    for path in first.rglob("*"):
        assert (second / path.relative_to(first)).read_bytes() == path.read_bytes() if path.is_file() else True

    a = train(first, monkeypatch, capsys)
    b = train(second, monkeypatch, capsys)
    assert len(list((tmp_path / "cache" / "decoded").rglob("*.npy"))) == 24  # two copies, decoded apart
    assert {"train_loss", "val_iou"} <= set(a["metrics"])
    assert a["metrics"] == b["metrics"]  # every value at every step, exactly
    assert a["per_image"] == b["per_image"] and len(a["per_image"]) == 2
