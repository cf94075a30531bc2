"""Whole-image validation: every validation image, at its own size, through the sliding-window inference
``unetlab predict`` uses (``unetlab.model.sliding_window.stream_logits`` with predict's defaults), so a validation
score is what ``predict`` would score on the same checkpoint. Metrics accumulate over all images, as
batched validation does; the loss is the mean of the per-image losses.

Used when a dataset trains on patches (``data.patch_size``): its validation images differ in size.
``validation_images(source)`` is the one answer to "which images does validation score", shared by
the trainer's validation, the per-image metrics, the run's figures and the logged split sizes.

Memory. An image is read window by window (from the decode cache's memory map when the dataset has
one) and its logits arrive as row bands (``stream_logits``). An image whose whole-image outputs
(``full_image_bytes``: logits, loss and metric intermediates) fit ``memory_budget()``
(``UNETLAB_VALIDATION_MEMORY_MB``, default 1024) is scored on its assembled logit map, exactly as
before. A larger one is scored band by band, so memory is bounded by the tile, the window batch and the
image's width (``streaming_bytes``), never its height: metrics that declare ``pixel_additive``
(confusion counts: iou, dice, precision, recall, accuracy) add each band's counts, which gives the
same numbers exactly; the image's loss is the mean of the band losses weighted by their counted
(non-ignored) pixels, which is the whole-image loss for pixel-mean losses without class weights (cross
entropy, BCE, focal) and an approximation for region losses (dice, tversky, lovasz: a warning says so).
A metric without ``pixel_additive`` (hd95, a plugin's) needs the whole image: such an image is then
scored whole, with a warning that its memory is not bounded.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch

from unetlab.errors import UnetlabError
from unetlab.model.sliding_window import (
    AUTO_TILE,
    ArrayWindows,
    ImageWindows,
    TensorWindows,
    release_rows,
    resolve_tile,
    sliding_window_logits,
    stream_logits,
    streaming_bytes,
)
from unetlab.model.unet import crop_target
from unetlab.plugin_api.contracts import validates_whole_images

__all__ = [
    "MEMORY_ENV",
    "evaluate_whole_images",
    "folder_validation_warnings",
    "full_image_bytes",
    "has_test_split",
    "memory_budget",
    "score_whole_image",
    "validation_images",
    "validation_memory_warnings",
    "whole_image_logits",
]

MEMORY_ENV = "UNETLAB_VALIDATION_MEMORY_MB"
DEFAULT_BUDGET_MB = 1024
_FULL_FACTOR = 6  # whole-image logits' copies alive while a loss and a metric run (log-softmax, indices...)


def memory_budget() -> int:
    """Bytes an image's whole-image outputs may take before validation scores it band by band."""
    value = os.environ.get(MEMORY_ENV, str(DEFAULT_BUDGET_MB))
    try:
        megabytes = float(value)
    except ValueError:
        raise UnetlabError(f"{MEMORY_ENV}={value!r}: expected a number of megabytes") from None
    if megabytes <= 0:
        raise UnetlabError(f"{MEMORY_ENV}={value!r}: must be > 0")
    return int(megabytes * 2 ** 20)


def full_image_bytes(channels: int, classes: int, height: int, width: int) -> int:
    """Bytes scoring one image whole takes: its float32 input, logits and the loss/metric intermediates."""
    outputs = max(classes, 1)
    return 4 * height * width * (channels + 2 + _FULL_FACTOR * outputs)


def validation_memory_warnings(shapes: Sequence[tuple[str, tuple[int, int]]], channels: int, classes: int,
                               budget: int | None = None, tile: int | None = None) -> list[str]:
    """One line per image of ``shapes`` ((name, (H, W))) whose whole-image validation would exceed the
    budget (``memory_budget``): it is then scored in row bands, and how much that takes."""
    budget = memory_budget() if budget is None else budget
    lines = []
    for name, (height, width) in shapes:
        whole = full_image_bytes(channels, classes, height, width)
        if whole <= budget:
            continue
        side = resolve_tile(height, width, tile, "same") or AUTO_TILE
        band = streaming_bytes(channels, max(classes, 1), width, side)
        lines.append(f"'{name}' ({height}x{width}): whole-image validation would take {whole / 2 ** 20:,.0f} MB, over "
                     f"the {budget / 2 ** 20:,.0f} MB budget ({MEMORY_ENV}); it is validated in row bands "
                     f"(about {band / 2 ** 20:,.0f} MB besides the model), slower, and its val_loss is exact "
                     "only for pixel-mean losses (cross entropy, BCE, focal)")
    return lines


def folder_validation_warnings(source: Any, built: Any) -> list[str]:
    """``unetlab data``'s warning lines for a scanned folder source (``built``: its ``check()`` summary):
    the validation images whose whole-image validation would exceed the budget."""
    samples = built.samples.get("val", [])
    if not validates_whole_images(source) or not samples or built.channels is None:
        return []
    classes = built.num_classes if built.num_classes > 2 else 1
    shapes = [(str(image.source), tuple(image.shape)[:2]) for image, _ in samples]
    return [f"  warning: {line}" for line in validation_memory_warnings(shapes, built.channels, classes)]


def validation_images(source: Any, split: str = "val") -> Any:
    """The images of ``split`` (``val``, or ``test`` for a final run's held-out evaluation) of ``source`` as
    validation scores them: whole images of their own size when it validates by sliding windows
    (``whole_image_validation``: training on patches), else the split itself (never the tiles of a
    patch-trained source)."""
    if validates_whole_images(source):
        return source.whole_images(split)
    return source.split(split)


def has_test_split(source: Any) -> bool:
    """Whether ``source`` has a test split holding at least one image (generated data: ``n_test``; folders:
    a ``test/`` folder or the split file's ``test`` list)."""
    try:
        return len(source.split("test")) > 0
    except (KeyError, ValueError):  # a plugin's source that knows no test split
        return False


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def whole_image_logits(model: torch.nn.Module, image: torch.Tensor, device: torch.device,
                       dtype: torch.dtype | None = None, tile: int | None = None, overlap: int = 32) -> torch.Tensor:
    """Logits (1 x K x H x W, float32, on ``device``) of one C x H x W image by predict's sliding window,
    under autocast ``dtype`` when given: what validation scores for that image."""
    with _autocast(device, dtype):
        return sliding_window_logits(model, image.to(device), tile, overlap, device=device)[None].float()


def _image(dataset: Any, index: int) -> tuple[ImageWindows, Callable[[int, int], torch.Tensor]]:
    """Image ``index`` of ``dataset`` as windows, and ``target(top, rows)``: its class mask's rows. A
    dataset over a ``SampleStore`` is read from the raw (memory-mapped) arrays, normalised per window;
    any other dataset item is a C x H x W tensor and an H x W mask."""
    store = getattr(dataset, "store", None)
    if store is not None and hasattr(store, "raw") and hasattr(store, "image_spec"):
        raw, mask = store.raw(index)
        lut = store.lut

        def store_rows(top: int, rows: int) -> torch.Tensor:
            classes = torch.from_numpy(np.asarray(lut[np.asarray(mask[top:top + rows])], dtype=np.int64))
            release_rows(mask, top)  # bands come top to bottom: rows above are done
            return classes

        return ArrayWindows(raw, store.image_spec(index)), store_rows
    image, target = dataset[index]
    target = torch.as_tensor(target)

    def tensor_rows(top: int, rows: int) -> torch.Tensor:
        return target[top:top + rows].long()

    return TensorWindows(image), tensor_rows


def _pixel_additive(metric: Any) -> bool:
    return bool(getattr(metric, "pixel_additive", False))


def _counted(target: torch.Tensor, classes: int) -> int:
    """Pixels a loss counts: those holding a class (ignored values, e.g. 255, are outside 0..K-1)."""
    return int(((target >= 0) & (target < max(classes, 2))).sum())


@torch.no_grad()
def score_whole_image(model: torch.nn.Module, dataset: Any, index: int, loss_fn: Callable | None,
                      metrics: Sequence[Any], device: torch.device, dtype: torch.dtype | None = None,
                      tile: int | None = None, overlap: int = 32, budget: int | None = None) -> float | None:
    """Add image ``index`` of ``dataset`` to ``metrics`` (not reset) and return its loss (None without
    ``loss_fn``), streamed when its whole-image outputs exceed ``budget`` (see the module docstring)."""
    windows, target_rows = _image(dataset, index)
    classes = int(getattr(model, "out_channels", 0) or getattr(getattr(model, "head", None), "out_channels", 1))
    whole = full_image_bytes(windows.channels, classes, windows.height, windows.width)
    budget = memory_budget() if budget is None else budget
    streamed = whole > budget
    if streamed and not all(_pixel_additive(m) for m in metrics):
        names = [type(m).__name__ for m in metrics if not _pixel_additive(m)]
        warnings.warn(f"validation image {index} ({windows.height}x{windows.width}) exceeds the {budget / 2**20:,.0f}"
                      f" MB validation budget, but metric {names[0]} needs the whole image: scored whole, memory not "
                      "bounded", stacklevel=2)
        streamed = False
    if streamed and loss_fn is not None:  # shown once per process by Python's default warning filter
        warnings.warn(f"validation images over the {budget / 2**20:,.0f} MB budget ({MEMORY_ENV}) are scored in row "
                      f"bands: their val_loss is the pixel-weighted mean of the bands' {type(loss_fn).__name__} "
                      "values (exact for pixel-mean losses such as cross entropy; an approximation for region "
                      "losses such as dice)", stacklevel=2)
    total, counted = 0.0, 0
    bands = _bands(model, windows, device, dtype, tile, overlap)
    if not streamed:
        logits = _assemble(bands, windows)
        target = crop_target(target_rows(0, windows.height)[None].to(device), logits)
        for metric in metrics:
            metric.update(logits, target)
        return None if loss_fn is None else float(loss_fn(logits, target))
    for top, band in bands:
        logits = band[None]
        target = target_rows(top, band.shape[1])[None].to(device)
        for metric in metrics:
            metric.update(logits, target)
        if loss_fn is not None:
            pixels = _counted(target, classes)
            if pixels:
                total += float(loss_fn(logits, target)) * pixels
                counted += pixels
    return None if loss_fn is None else total / max(counted, 1)


def _bands(model: torch.nn.Module, windows: ImageWindows, device: torch.device, dtype: torch.dtype | None,
           tile: int | None, overlap: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The image's logit bands (float32, on ``device``), computed under autocast ``dtype``."""
    with _autocast(device, dtype):
        for top, band in stream_logits(model, windows, tile, overlap, device=device):
            yield top, band.to(device).float()


def _assemble(bands: Iterator[tuple[int, torch.Tensor]], windows: ImageWindows) -> torch.Tensor:
    out = None
    for top, band in bands:
        if top == 0 and band.shape[1] == windows.height:
            return band[None]
        if out is None:
            out = torch.empty(1, band.shape[0], windows.height, windows.width, device=band.device)
        out[0, :, top:top + band.shape[1]] = band
    return cast(torch.Tensor, out)  # an image of at least one row gives at least one band


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
    budget = memory_budget()
    for index in range(len(dataset)):
        # a loss (not None): loss_fn is given
        total += cast(float, score_whole_image(model, dataset, index, loss_fn, metrics, device, dtype, tile, overlap,
                                               budget))
        count += 1
    out = {"val_loss": total / max(count, 1)}
    for metric in metrics:
        out.update({f"val_{k}": v for k, v in metric.compute().items()})
    return out
