"""Sliding-window inference: the one implementation behind ``unetlab predict`` and whole-image validation.

``sliding_window_logits(model, image, tile, overlap)`` returns logits the size of the input image,
whatever its size, in memory bounded by the window batch plus two accumulators of the output's size.

- ``same`` padding: windows of ``tile`` x ``tile`` (shrunk to the image along a side shorter than
  the tile) at evenly spread positions that overlap by at least ``overlap`` pixels (nnU-Net's
  placement: the first window at 0, the last flush with the far border). Each window's logits are
  weighted by a blending window and accumulated; the sum is divided by the summed weights. The default
  blending is a Gaussian (nnU-Net / MONAI ``mode="gaussian"``: sigma = tile / 8 per side, peak 1 at the
  centre), which trusts a window's centre, where the model saw full context, over its edges. ``hann``
  (the window ``predict`` used before, floored at 1e-3) and ``constant`` (a plain average) are options.
- ``valid`` padding: the U-Net paper's overlap-tile strategy. The image is mirror-padded by the model's
  margin and each ``tile`` input window yields an exact output block (every output pixel sees its full
  context), so the blocks tile the output with no blending and the result does not depend on the tile.
- ``tile=None``: the whole image in one window when it has at most ``AUTO_TILE_PIXELS`` pixels, else
  ``AUTO_TILE`` windows (same padding), so a huge image never goes through the model at once; valid
  padding uses the paper's ``VALID_TILE``.

Logits are blended (not probabilities): thresholding the result at 0 (or its argmax) is what both
``predict`` and validation use, so a validation score is exactly what ``predict`` would produce.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import UnetlabError

__all__ = [
    "AUTO_TILE",
    "AUTO_TILE_PIXELS",
    "BLEND_MODES",
    "VALID_TILE",
    "blend_window",
    "check_tiling",
    "minimum_input_size",
    "resolve_tile",
    "sliding_window_logits",
    "window_starts",
]

AUTO_TILE_PIXELS = 1024 * 1024  # same padding: larger images are tiled even without a tile size
AUTO_TILE = 512                 # ... with windows of this size
VALID_TILE = 572                # valid padding's default input tile (the paper's)
BLEND_MODES = ("gaussian", "hann", "constant")


def blend_window(height: int, width: int, mode: str = "gaussian", sigma_scale: float = 0.125) -> torch.Tensor:
    """The weight (H x W, float32, peak 1) a window's logits get when overlapping windows are blended."""
    if mode == "gaussian":
        def axis(n: int) -> torch.Tensor:
            d = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
            return torch.exp(-d ** 2 / (2 * (sigma_scale * n) ** 2))
    elif mode == "hann":
        def axis(n: int) -> torch.Tensor:
            return torch.hann_window(n + 2, periodic=False, dtype=torch.float64)[1:-1] if n > 1 else torch.ones(1)
    elif mode == "constant":
        def axis(n: int) -> torch.Tensor:
            return torch.ones(n, dtype=torch.float64)
    else:
        raise UnetlabError(f"blending mode '{mode}': choose one of {', '.join(BLEND_MODES)}")
    weight = torch.outer(axis(height), axis(width))
    weight = weight / weight.max()
    if mode == "hann":
        weight = weight + 1e-3  # the edges of border windows still count
    return weight.float().clamp_min(torch.finfo(torch.float32).tiny)


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Evenly spread window starts along one side: first 0, last ``size - window``, gaps at most ``step``."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / step) + 1
    spacing = (size - window) / (count - 1)
    return [math.floor(spacing * i + 0.5) for i in range(count)]


def resolve_tile(height: int, width: int, tile: int | None, padding: str) -> int | None:
    """The tile actually used: ``tile`` if given; else none (whole image) or the automatic tile."""
    if tile is not None:
        return tile
    if padding == "valid":
        return VALID_TILE
    return AUTO_TILE if height * width > AUTO_TILE_PIXELS else None


def minimum_input_size(model: torch.nn.Module, in_channels: int) -> int:
    """The smallest square input side the model accepts (found on the meta device: no compute)."""
    meta = copy.deepcopy(model).to("meta").eval()
    for side in range(1, 4097):
        try:
            with torch.no_grad():
                out = meta(torch.empty(1, in_channels, side, side, device="meta"))
        except RuntimeError:
            continue
        if out.shape[-2] > 0 and out.shape[-1] > 0:
            return side
    raise UnetlabError("the model accepts no input up to 4096 pixels a side")


def check_tiling(model: torch.nn.Module, in_channels: int, tile: int | None, overlap: int) -> None:
    """Refuse a tile or overlap the model cannot use, in one line (before any image is processed)."""
    if overlap < 0:
        raise UnetlabError(f"--overlap {overlap}: must be 0 or more")
    if tile is None:
        if _padding(model) == "valid":
            _valid_geometry(model, in_channels, VALID_TILE)
        return
    minimum = minimum_input_size(model, in_channels)
    if tile < minimum:
        raise UnetlabError(f"--tile {tile}: this model needs tiles of at least {minimum} pixels a side")
    if _padding(model) == "same" and overlap >= tile:
        raise UnetlabError(f"--overlap {overlap}: must be smaller than the tile ({tile})")
    if _padding(model) == "valid":
        _valid_geometry(model, in_channels, tile)


@torch.no_grad()
def sliding_window_logits(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                          tile: int | None = None, overlap: int = 32, *, batch_size: int = 4,
                          mode: str = "gaussian", sigma_scale: float = 0.125, padding: str | None = None,
                          device: torch.device | None = None) -> torch.Tensor:
    """Logits (K x H x W, float32, on ``image``'s device) for one C x H x W image, by sliding windows.

    ``model`` maps N x C x h x w to N x K x h' x w' (an ``nn.Module`` or any callable; call this
    inside ``torch.autocast`` for mixed precision). Windows run on ``device`` (default: the model's);
    ``batch_size`` windows go through the model at once. ``padding`` defaults to ``model.padding``.
    See the module docstring for ``tile=None``, ``overlap`` and ``mode``.
    """
    if image.dim() != 3:
        raise ValueError(f"expected one C x H x W image, got shape {tuple(image.shape)}")
    padding = padding or _padding(model)
    device = device or _device(model, image)
    height, width = image.shape[-2:]
    tile = resolve_tile(height, width, tile, padding)
    if padding == "valid":
        return _valid_logits(model, image, tile, batch_size, device)
    if tile is None:
        return _forward(model, image[None].to(device), (height, width))[0].float().to(image.device)
    win_h, win_w = min(tile, height), min(tile, width)
    step = max(tile - overlap, 1)
    boxes = [(top, left, win_h, win_w) for top in window_starts(height, win_h, step)
             for left in window_starts(width, win_w, step)]
    weight = blend_window(win_h, win_w, mode, sigma_scale).to(image.device)
    return _accumulate(model, image, boxes, 0, weight, batch_size, device)


def _padding(model) -> str:
    return getattr(model, "padding", "same")


def _device(model, image: torch.Tensor) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return image.device


def _forward(model, batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``model(batch)``, turning 'too small for this model' into a one-line error."""
    try:
        return model(batch)
    except RuntimeError:
        if isinstance(model, torch.nn.Module):
            from .model import output_shape

            output_shape(model, batch.shape[1], *size)  # raises the one-line size error if that is the cause
        raise


def _accumulate(model, source: torch.Tensor, boxes: list[tuple[int, int, int, int]], margin: int,
                weight: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Run the windows of ``boxes`` (output top, left, height, width) and blend them into one logit map.

    A box's input window is ``source[:, top:top + height + 2 * margin, left:left + width + 2 * margin]``:
    the same region for same padding (margin 0); for valid padding ``source`` is the image mirror-padded
    by ``margin``, so the window's output lands exactly on the box. Only ``batch_size`` windows' logits
    exist at a time: memory is bounded by the two accumulators of the output's size.
    """
    height = max(t + h for t, _, h, _ in boxes)
    width = max(l + w for _, l, _, w in boxes)
    out = norm = None
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        batch = torch.stack([source[:, t:t + h + 2 * margin, l:l + w + 2 * margin] for t, l, h, w in chunk])
        logits = _forward(model, batch.to(device), tuple(batch.shape[-2:])).float().to(source.device)
        if out is None:
            out = torch.zeros(logits.shape[1], height, width, device=source.device)
            norm = torch.zeros(height, width, device=source.device)
        for (t, l, h, w), window_logits in zip(chunk, logits):
            if window_logits.shape[-2:] != (h, w):
                raise UnetlabError(f"the model maps a {h + 2 * margin}x{w + 2 * margin} window to "
                                   f"{tuple(window_logits.shape[-2:])}, expected {h}x{w}")
            out[:, t:t + h, l:l + w] += window_logits * weight
            norm[t:t + h, l:l + w] += weight
    return out / norm


def _valid_geometry(model, in_channels: int, tile: int) -> tuple[int, int]:
    """(output side, margin per side) of a ``tile`` input window of a valid-padding model."""
    from .model import output_shape

    out_side = output_shape(model, in_channels, tile, tile)[-1]
    margin = tile - out_side
    if margin % 2:
        raise UnetlabError(f"--tile {tile} gives an output of {out_side}: the margin must be even; "
                           f"try --tile {tile + 1}")
    return out_side, margin // 2


def _valid_logits(model, image: torch.Tensor, tile: int, batch_size: int, device: torch.device) -> torch.Tensor:
    channels, height, width = image.shape
    out_side, margin = _valid_geometry(model, channels, tile)
    # mirror by the margin on every side, and at the far sides up to one whole output block
    padded = _mirror_pad(image, margin, margin + max(0, out_side - height),
                         margin, margin + max(0, out_side - width))
    boxes = [(top, left, out_side, out_side) for top in window_starts(max(height, out_side), out_side, out_side)
             for left in window_starts(max(width, out_side), out_side, out_side)]
    weight = torch.ones(out_side, out_side, device=image.device)  # blocks are exact: nothing to blend
    logits = _accumulate(model, padded, boxes, margin, weight, batch_size, device)
    return logits[:, :height, :width]


def _mirror_pad(image: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Mirror-pad (reflect, repeatedly when the pad exceeds the image; replicate a 1-pixel side)."""
    out = image
    while top or bottom or left or right:
        h, w = out.shape[-2:]
        t, b = min(top, h - 1), min(bottom, h - 1)
        lf, r = min(left, w - 1), min(right, w - 1)
        if h == 1 or w == 1:
            return F.pad(out[None], [left, right, top, bottom], mode="replicate")[0]
        out = F.pad(out[None], [lf, r, t, b], mode="reflect")[0]
        top, bottom, left, right = top - t, bottom - b, left - lf, right - r
    return out
