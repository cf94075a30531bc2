"""Per-image validation metrics of a run's best model, logged as an MLflow table (``per_image_metrics.json``).

Each configured metric accumulator is used on one image at a time (reset, update, compute), so every
row holds exactly what the run-level metric would say about that image alone, per class where the
metric reports classes, under the same keys the run logs (``val_iou``, ``val_iou_c1``, ...) plus the
per-image ``val_loss``. ``unetlab compare`` pairs variants on these rows (``unetlab.analysis.paired_stats``).

The images are the ones validation scores (``unetlab.training.whole_image_validation.validation_images``): whole images
through the same sliding window when the run trains on patches, one image at a time, never tiles
(``unetlab.training.whole_image_validation.score_whole_image``: streamed in row bands when an image is over the budget);
rows are named by the dataset's ``names`` (file stems for folder data), losses and metrics ignore
the dataset's ``ignore_index`` as in training.

The table is logged with ``MlflowClient.log_table``, so the MLflow UI lists it among the run's
artifacts and in its evaluation view. ``log_table`` appends to an existing file (a run resumed after
logging it): readers keep the last row of each image.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from unetlab.plugin_api.contracts import ignore_index_of, validates_whole_images

if TYPE_CHECKING:
    import torch
    from mlflow.tracking import MlflowClient

    from unetlab.plugin_api.registry import Registry
    from unetlab.tracking.run_tracker import RunTracker

__all__ = [
    "PER_IMAGE_ARTIFACT",
    "PER_IMAGE_TEST_ARTIFACT",
    "evaluate_per_image",
    "load_per_image_metrics",
    "log_per_image_metrics",
    "per_image_rows",
    "record_per_image_metrics",
    "validation_per_image",
]

PER_IMAGE_ARTIFACT = "per_image_metrics.json"
PER_IMAGE_TEST_ARTIFACT = "per_image_test_metrics.json"  # a final run's test split (unetlab.runs.test_evaluation)


def _image_ids(dataset: Any) -> list:
    """Stable image identifiers: the dataset's ``names`` or ``ids`` when it has them, else indices."""
    for attribute in ("names", "ids"):
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return [str(v) for v in values]
    return list(range(len(dataset)))


def _model_predict(model: torch.nn.Module) -> Callable:
    import torch

    def predict(images: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            return model(images.to(device)).float().cpu()
    return predict


def per_image_rows(predict_fn: Callable, dataset: Any, metrics: Sequence[Any], loss_fn: Callable | None = None,
                   batch_size: int = 16, prefix: str = "val") -> list[dict[str, Any]]:
    """One row per image of ``dataset``: ``{"image": id, "val_loss": ..., "val_<metric key>": ...}`` (``prefix``
    ``test``: ``test_loss``, ``test_<metric key>``).

    ``predict_fn(images N x C x H x W) -> logits`` (the model, a sliding window, TTA...); ``metrics``:
    accumulators with reset/update/compute, used on one image at a time. Images of equal size are
    predicted ``batch_size`` at a time.
    """
    import torch

    from unetlab.model.unet import crop_target

    ids = _image_ids(dataset)
    rows: list[dict[str, Any]] = []
    index = 0
    while index < len(dataset):
        first = dataset[index]
        batch = [first]
        while (len(batch) < batch_size and index + len(batch) < len(dataset)
               and dataset[index + len(batch)][0].shape == first[0].shape):
            batch.append(dataset[index + len(batch)])
        images = torch.stack([item[0] for item in batch])
        masks = torch.stack([torch.as_tensor(item[1]) for item in batch]).long()
        logits = predict_fn(images).float().cpu()
        targets = crop_target(masks, logits)
        for j in range(len(batch)):
            one_logits, one_target = logits[j:j + 1], targets[j:j + 1]
            row: dict[str, Any] = {"image": ids[index + j]}
            if loss_fn is not None:
                row[f"{prefix}_loss"] = float(loss_fn(one_logits, one_target))
            for metric in metrics:
                metric.reset()
                metric.update(one_logits, one_target)
                row.update({f"{prefix}_{k}": float(v) for k, v in metric.compute().items()})
            rows.append(row)
        index += len(batch)
    return rows


def evaluate_per_image(model: torch.nn.Module | None, dataset: Any, train_config: dict, num_classes: int,
                       registry: Registry, predict_fn: Callable | None = None, batch_size: int = 16,
                       ignore_index: int | None = None, prefix: str = "val") -> list[dict[str, Any]]:
    """Per-image rows for a run's configured metrics and loss (``predict_fn`` defaults to ``model``);
    ``ignore_index``: the dataset's (padding, 255 in masks), given to them as the trainer does."""
    from unetlab.training.trainer import build_loss, build_metrics

    # a caller that gives no predict_fn gives a model (the documented contract; not checked here)
    return per_image_rows(predict_fn or _model_predict(cast("torch.nn.Module", model)), dataset,
                          build_metrics(train_config, num_classes, registry, ignore_index),
                          build_loss(train_config, num_classes, registry, ignore_index), batch_size, prefix)


def validation_per_image(model: torch.nn.Module, source: Any, train_config: dict, num_classes: int,
                         registry: Registry, dtype: torch.dtype | None = None,
                         split: str = "val") -> list[dict[str, Any]]:
    """Per-image rows for the images validation scores on ``source``, predicted as validation predicts
    them (whole images by ``unetlab.training.whole_image_validation.whole_image_logits``, autocast ``dtype``), with the
    source's ``ignore_index``. ``split="test"``: the test split's images, scored the same way, keys ``test_``."""
    from unetlab.training.trainer import build_loss, build_metrics
    from unetlab.training.whole_image_validation import memory_budget, score_whole_image, validation_images

    dataset = validation_images(source, split)
    ignore_index = ignore_index_of(source)
    if not validates_whole_images(source):
        return evaluate_per_image(model, dataset, train_config, num_classes, registry, ignore_index=ignore_index,
                                  prefix=split)
    # whole images, one at a time, scored as validation scores them (streamed in row bands when large)
    metrics = build_metrics(train_config, num_classes, registry, ignore_index)
    loss_fn = build_loss(train_config, num_classes, registry, ignore_index)
    device = next(model.parameters()).device
    model.eval()
    budget = memory_budget()
    rows: list[dict[str, Any]] = []
    for index, image_id in enumerate(_image_ids(dataset)):
        for metric in metrics:
            metric.reset()
        row: dict[str, Any] = {"image": image_id}
        row[f"{split}_loss"] = score_whole_image(model, dataset, index, loss_fn, metrics, device, dtype,
                                                  budget=budget)
        for metric in metrics:
            row.update({f"{split}_{k}": float(v) for k, v in metric.compute().items()})
        rows.append(row)
    return rows


def log_per_image_metrics(tracker: RunTracker, rows: list[dict[str, Any]],
                          artifact: str = PER_IMAGE_ARTIFACT) -> None:
    """Log ``rows`` as the run's MLflow table ``artifact`` (``tracker``: a RunTracker)."""
    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = {c: [row.get(c, math.nan) for row in rows] for c in columns}
    tracker.client.log_table(tracker.run_id, data=table, artifact_file=artifact)


def record_per_image_metrics(tracker: RunTracker, model: torch.nn.Module, source: Any, train_config: dict,
                             num_classes: int, registry: Registry,
                             dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Compute the best model's per-image validation metrics on ``source`` (``validation_per_image``) and
    log them to the run (the runner's call)."""
    rows = validation_per_image(model, source, train_config, num_classes, registry, dtype)
    log_per_image_metrics(tracker, rows)
    return rows


def load_per_image_metrics(client: MlflowClient, run_id: str) -> dict[Any, dict[str, float]] | None:
    """A run's table as ``{image id: {key: value}}`` (None when the run has none: an older run)."""
    names = {a.path for a in client.list_artifacts(run_id)}
    if PER_IMAGE_ARTIFACT not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, PER_IMAGE_ARTIFACT, tmp)
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    columns = table["columns"]
    out: dict[Any, dict[str, float]] = {}
    for values in table["data"]:
        row = dict(zip(columns, values))
        image = row.pop("image")
        out[image] = {k: (math.nan if v is None else float(v)) for k, v in row.items()}  # last row of an image wins
    return out
