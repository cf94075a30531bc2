"""Whole-image validation: every validation image, at its own size, through the sliding-window inference
``unetlab predict`` uses (``unetlab.inference.sliding_window_logits`` with predict's defaults), so a
validation score is what ``predict`` would score on the same checkpoint. Metrics accumulate over all
images, as batched validation does; the loss is the mean of the per-image losses.

Used when a dataset trains on patches (``data.patch_size``): its validation images differ in size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .inference import sliding_window_logits

__all__ = ["evaluate_whole_images"]


@torch.no_grad()
def evaluate_whole_images(model: torch.nn.Module, dataset, loss_fn: Callable, metrics: list, device: torch.device,
                          dtype: torch.dtype | None = None, tile: int | None = None,
                          overlap: int = 32) -> dict[str, float]:
    """``val_loss`` and every metric over ``dataset`` (items: image C x H x W, mask H x W of any size)."""
    model.eval()
    for metric in metrics:
        metric.reset()
    total, count = 0.0, 0
    autocast = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    for index in range(len(dataset)):
        image, mask = dataset[index]
        with autocast:
            logits = sliding_window_logits(model, image.to(device), tile, overlap, device=device)[None].float()
        target = mask.to(device).long()[None]
        total += float(loss_fn(logits, target))
        count += 1
        for metric in metrics:
            metric.update(logits, target)
    out = {"val_loss": total / max(count, 1)}
    for metric in metrics:
        out.update({f"val_{k}": v for k, v in metric.compute().items()})
    return out
