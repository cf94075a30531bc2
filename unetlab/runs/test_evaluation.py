"""A final run's best model on its held-out test split, after training: what a tuned comparison's verdict is on.

The test images are scored exactly as validation scores its images, by the same code: whole images through
the sliding window (``unetlab.training.whole_image_validation``) when the run trains on patches, else the
split's batches through the trainer's ``evaluate``; per image by ``unetlab.tracking.per_image`` one image at
a time. The run logs ``test_<key>`` for every validation key (``test_loss``, ``test_iou``, ...) at its last
epoch's step, and the table ``per_image_test_metrics.json`` (the schema of ``per_image_metrics.json``, its
columns ``test_`` instead of ``val_``). Nothing else reads the test split: trials and training never see it.

A dataset has a test split when ``source.split("test")`` holds images (generated data: ``n_test``; folders: a
``test/`` folder or the split file's ``test`` list).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unetlab.config.settings import DataSettings
from unetlab.plugin_api.contracts import ignore_index_of, validates_whole_images

if TYPE_CHECKING:
    import torch

    from unetlab.plugin_api.registry import Registry
    from unetlab.tracking.run_tracker import RunTracker
    from unetlab.training.preflight import Prepared

__all__ = ["evaluate_test_split", "record_test_metrics"]


def _as_test(metrics: dict[str, float]) -> dict[str, float]:
    return {"test_" + key.removeprefix("val_"): value for key, value in metrics.items()}


def evaluate_test_split(model: torch.nn.Module, prep: Prepared, registry: Registry) -> tuple[dict[str, float],
                                                                                          list[dict[str, Any]]]:
    """(``test_`` metrics over the whole test split, one row per test image) of ``model``, scored as validation
    scores (see the module docstring)."""
    from unetlab.data.sources import make_batches
    from unetlab.tracking.per_image import validation_per_image
    from unetlab.training.trainer import build_loss, build_metrics, evaluate
    from unetlab.training.whole_image_validation import evaluate_whole_images, validation_images

    source, config, runtime = prep.source, prep.run.config, prep.runtime
    ignore_index = ignore_index_of(source)
    loss_fn = build_loss(config["train"], prep.num_classes, registry, ignore_index)
    metrics = build_metrics(config["train"], prep.num_classes, registry, ignore_index)
    device = next(model.parameters()).device
    if validates_whole_images(source):
        whole = evaluate_whole_images(model, validation_images(source, "test"), loss_fn, metrics, device,
                                      runtime.amp_dtype)
    else:
        data = DataSettings.from_config(config)
        batch = data.val_batch_size or data.batch_size
        loader = make_batches(source.split("test"), batch, False, 0, runtime.pin_memory, device)
        whole = evaluate(model, loader, loss_fn, metrics, device, runtime.amp_dtype, runtime.channels_last)
    rows = validation_per_image(model, source, config["train"], prep.num_classes, registry, runtime.amp_dtype,
                                split="test")
    return _as_test(whole), rows


def record_test_metrics(tracker: RunTracker, model: torch.nn.Module, prep: Prepared, registry: Registry,
                        step: int) -> dict[str, float] | None:
    """Evaluate ``model`` on the run's test split and log ``test_`` metrics at ``step`` and the per-image table;
    None (nothing logged) when the dataset has no test split."""
    from unetlab.tracking.per_image import PER_IMAGE_TEST_ARTIFACT, log_per_image_metrics
    from unetlab.training.whole_image_validation import has_test_split

    if not has_test_split(prep.source):
        return None
    metrics, rows = evaluate_test_split(model, prep, registry)
    tracker.log_metrics(metrics, step=step)
    log_per_image_metrics(tracker, rows, PER_IMAGE_TEST_ARTIFACT)
    return metrics
