"""Whole-image validation: every validation image, at its own size, through the sliding-window inference
``unetlab predict`` uses (``unetlab.inference.sliding_window_logits`` with predict's defaults), so a
validation score is what ``predict`` would score on the same checkpoint. Metrics accumulate over all
images, as batched validation does; the loss is the mean of the per-image losses.

Used when a dataset trains on patches (``data.patch_size``): its validation images differ in size.
``validation_images(source)`` is the one answer to "which images does validation score", shared by
the trainer's validation, the per-image metrics, the run's figures and the logged split sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .inference import sliding_window_logits

__all__ = ["evaluate_whole_images", "validation_images", "whole_image_logits"]


def validation_images(source: Any) -> Any:
    """The validation images of ``source`` as validation scores them: whole images of their own size
    when it validates by sliding windows (``whole_image_validation``: training on patches), else its
    ``val`` split (never the tiles of a patch-trained source)."""
    if getattr(source, "whole_image_validation", False):
        return source.whole_images("val")
    return source.split("val")


@torch.no_grad()
def whole_image_logits(model: torch.nn.Module, image: torch.Tensor, device: torch.device,
                       dtype: torch.dtype | None = None, tile: int | None = None, overlap: int = 32) -> torch.Tensor:
    """Logits (1 x K x H x W, float32, on ``device``) of one C x H x W image by predict's sliding window,
    under autocast ``dtype`` when given: what validation scores for that image."""
    autocast = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        return sliding_window_logits(model, image.to(device), tile, overlap, device=device)[None].float()


@torch.no_grad()
def evaluate_whole_images(model: torch.nn.Module, dataset: Any, loss_fn: Callable, metrics: Sequence[Any],
                          device: torch.device,
                          dtype: torch.dtype | None = None, tile: int | None = None,
                          overlap: int = 32) -> dict[str, float]:
    """``val_loss`` and every metric over ``dataset`` (items: image C x H x W, mask H x W of any size)."""
    model.eval()
    for metric in metrics:
        metric.reset()
    total, count = 0.0, 0
    for index in range(len(dataset)):
        image, mask = dataset[index]
        logits = whole_image_logits(model, image, device, dtype, tile, overlap)
        target = mask.to(device).long()[None]
        total += float(loss_fn(logits, target))
        count += 1
        for metric in metrics:
            metric.update(logits, target)
    out = {"val_loss": total / max(count, 1)}
    for metric in metrics:
        out.update({f"val_{k}": v for k, v in metric.compute().items()})
    return out
