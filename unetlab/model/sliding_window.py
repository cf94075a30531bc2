"""Sliding-window inference: the one implementation behind ``unetlab predict`` and whole-image validation.

``stream_logits(model, windows, tile, overlap)`` yields the logits of an image of any size as row
bands, top to bottom, in memory bounded by the tile, the window batch and the image WIDTH, never its
height: the input is read window by window (``ImageWindows``: a tensor, or a raw array normalised per
window, e.g. memory-mapped from the decode cache), and the blended sums live in two accumulators of
one window's height; the rows no later window can reach are divided out and handed on, then dropped.
``sliding_window_logits(model, image, tile, overlap)`` assembles the bands into the whole logit map
(the same numbers, bit for bit: every pixel gets the same sums in the same order).

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
from collections.abc import Callable, Iterator
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from unetlab.errors import UnetlabError

__all__ = [
    "AUTO_TILE",
    "AUTO_TILE_PIXELS",
    "BLEND_MODES",
    "VALID_TILE",
    "ArrayWindows",
    "ImageWindows",
    "TensorWindows",
    "blend_window",
    "check_tiling",
    "minimum_input_size",
    "release_rows",
    "resolve_tile",
    "sliding_window_logits",
    "stream_logits",
    "streaming_bytes",
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


class ImageWindows:
    """One image (C x H x W as the model sees it) read window by window: what ``stream_logits`` consumes.

    Subclasses implement ``_rows_cols(rows, cols)`` for index arrays (valid padding's mirrored windows)
    and may override ``window`` for plain rectangles.
    """

    channels: int
    height: int
    width: int

    def window(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The C x height x width float32 input at (top, left), inside the image."""
        return self._rows_cols(np.arange(top, top + height), np.arange(left, left + width))

    def mirrored(self, top: int, left: int, height: int, width: int, pads: tuple[int, int, int, int]) -> torch.Tensor:
        """A window of the image mirror-padded by ``pads`` (top, bottom, left, right) as ``_mirror_pad`` pads
        it, at (top, left) of the padded image, without padding the whole image."""
        replicate = self.height == 1 or self.width == 1
        rows = _mirror_index(self.height, pads[0], pads[1], replicate)[top:top + height]
        cols = _mirror_index(self.width, pads[2], pads[3], replicate)[left:left + width]
        return self._rows_cols(rows, cols)

    def release(self, rows: int) -> None:
        """No window will read rows above ``rows`` again: memory they hold may be given back."""

    def _rows_cols(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:  # overridden
        raise NotImplementedError


class TensorWindows(ImageWindows):
    """Windows of a C x H x W tensor (already the model's input)."""

    def __init__(self, image: torch.Tensor) -> None:
        self.image = image
        self.channels, self.height, self.width = image.shape

    def window(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        return self.image[:, top:top + height, left:left + width]

    def _rows_cols(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return self.image[:, torch.from_numpy(rows)][:, :, torch.from_numpy(cols)]


class ArrayWindows(ImageWindows):
    """Windows of a raw H x W x C array (any dtype; a memory map is read only where windows fall),
    normalised per window by ``spec`` (``unetlab.data.normalization``; resolve a per-image spec on the whole
    image first with ``image_spec``). Normalisation is per pixel, so a window equals the same window of
    the normalised whole image, bit for bit."""

    def __init__(self, raw: np.ndarray, spec: dict) -> None:
        from unetlab.data.normalization import per_image

        self.raw = raw if raw.ndim == 3 else raw[..., None]
        if per_image(spec) and "offset" not in spec:
            raise ValueError("resolve a per-image normalisation on the whole image first (image_spec)")
        self.spec = spec
        self.height, self.width, self.channels = self.raw.shape

    def window(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        return self._normalise(self.raw[top:top + height, left:left + width])

    def release(self, rows: int) -> None:
        release_rows(self.raw, rows)

    def _rows_cols(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        low, high = int(rows.min()), int(rows.max()) + 1  # read only the rows the window needs
        return self._normalise(np.asarray(self.raw[low:high])[rows - low][:, cols])

    def _normalise(self, block: np.ndarray) -> torch.Tensor:
        from unetlab.data.normalization import apply_normalization

        return torch.from_numpy(apply_normalization(block, self.spec))


def release_rows(array: np.ndarray, rows: int) -> None:
    """Drop the pages of a memory-mapped array's rows above ``rows`` from this process (they stay in the
    page cache and are read again if needed; nothing happens for an array in RAM). Without it every page
    read counts in the RSS until the array is closed, so a 12k image would add its whole file to the peak."""
    import mmap

    owner: np.ndarray | None = array
    while owner is not None and not isinstance(getattr(owner, "_mmap", None), mmap.mmap):
        owner = owner.base if isinstance(owner.base, np.ndarray) else None
    if owner is None or not hasattr(mmap, "MADV_DONTNEED") or not owner.flags.c_contiguous:
        return
    mapped = cast(np.memmap, owner)  # only np.memmap holds an mmap.mmap as _mmap
    start_in_map = mapped.offset % mmap.ALLOCATIONGRANULARITY  # np.memmap maps from an aligned offset
    length = (start_in_map + rows * mapped.strides[0]) // mmap.PAGESIZE * mmap.PAGESIZE
    if length > 0:
        # numpy's stubs omit np.memmap's (private) _mmap attribute
        mapped._mmap.madvise(mmap.MADV_DONTNEED, 0, length)  # type: ignore[attr-defined]


def _mirror_index(n: int, before: int, after: int, replicate: bool) -> np.ndarray:
    """Source index of each position of a side of ``n`` pixels padded by ``before``/``after`` exactly as
    ``_mirror_pad`` pads it (reflect, repeatedly; replicate when a side of the image is 1 pixel)."""
    index = np.arange(n)
    if replicate:
        return np.concatenate([np.zeros(before, int), index, np.full(after, n - 1)])
    while before or after:
        m = len(index)
        b, a = min(before, m - 1), min(after, m - 1)
        index = np.concatenate([index[1:b + 1][::-1], index, index[m - 1 - a:m - 1][::-1]])
        before, after = before - b, after - a
    return index


def streaming_bytes(channels: int, classes: int, width: int, tile: int, batch_size: int = 4) -> int:
    """Bytes ``stream_logits`` holds besides the model: the window batch (float32 input and logits) and
    the two band accumulators (one window high, the image's width): what bounds streamed validation."""
    return 4 * (batch_size * tile * tile * (channels + classes) + tile * width * (classes + 1) * 2)


def stream_logits(model: Callable[[torch.Tensor], torch.Tensor], windows: ImageWindows, tile: int | None = None,
                  overlap: int = 32, *, batch_size: int = 4, mode: str = "gaussian", sigma_scale: float = 0.125,
                  padding: str | None = None, device: torch.device | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, K x rows x W float32 logits)`` bands covering the image top to bottom, by sliding windows.

    The numbers are ``sliding_window_logits``'s (its implementation); only a window batch and two
    accumulators one window high exist at a time, so a 12000 x 12000 image costs what a 512-row strip
    of it costs. Run it under ``torch.no_grad()`` (and autocast) while consuming the bands.
    """
    padding = padding or _padding(model)
    device = device or _device(model, torch.empty(0))
    height, width = windows.height, windows.width
    tile = resolve_tile(height, width, tile, padding)
    if padding == "valid":
        assert tile is not None  # resolve_tile gives valid padding a tile (VALID_TILE by default)
        out_side, margin = _valid_geometry(model, windows.channels, tile)
        pads = (margin, margin + max(0, out_side - height), margin, margin + max(0, out_side - width))
        boxes = [(top, left, out_side, out_side) for top in window_starts(max(height, out_side), out_side, out_side)
                 for left in window_starts(max(width, out_side), out_side, out_side)]
        weight = torch.ones(out_side, out_side)  # blocks are exact: nothing to blend

        def read(t: int, l: int, h: int, w: int) -> torch.Tensor:
            return windows.mirrored(t, l, h + 2 * margin, w + 2 * margin, pads)

        yield from _bands(model, read, boxes, weight, batch_size, device, height, width)
        return
    if tile is None:
        image = windows.window(0, 0, height, width)
        yield 0, _forward(model, image[None].to(device), (height, width))[0].float().to(image.device)
        return
    win_h, win_w = min(tile, height), min(tile, width)
    step = max(tile - overlap, 1)
    boxes = [(top, left, win_h, win_w) for top in window_starts(height, win_h, step)
             for left in window_starts(width, win_w, step)]
    yield from _bands(model, windows.window, boxes, blend_window(win_h, win_w, mode, sigma_scale), batch_size,
                      device, height, width, windows.release)


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
    device = device or _device(model, image)
    out = None
    for top, band in stream_logits(model, TensorWindows(image), tile, overlap, batch_size=batch_size, mode=mode,
                                   sigma_scale=sigma_scale, padding=padding, device=device):
        if top == 0 and band.shape[1] == image.shape[1]:
            return band.to(image.device)
        if out is None:
            out = torch.empty(band.shape[0], *image.shape[1:], device=image.device)
        out[:, top:top + band.shape[1]] = band
    return cast(torch.Tensor, out)  # an image of at least one row gives at least one band


def _padding(model) -> str:
    return getattr(model, "padding", "same")


def _device(model, image: torch.Tensor) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return image.device


def _forward(model, batch: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``model(batch)``, turning 'too small for this model' into a one-line error."""
    try:
        return model(batch)
    except RuntimeError:
        if isinstance(model, torch.nn.Module):
            from unetlab.model.unet import output_shape

            output_shape(model, batch.shape[1], *size)  # raises the one-line size error if that is the cause
        raise


def _bands(model, read: Callable[[int, int, int, int], torch.Tensor], boxes: list[tuple[int, int, int, int]],
           weight: torch.Tensor, batch_size: int, device: torch.device, height: int, width: int,
           release: Callable[[int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Run the windows of ``boxes`` (output top, left, height, width; row-major) and blend them, yielding
    finished row bands of the output cropped to ``height`` x ``width``.

    ``read(top, left, h, w)`` is a box's input window. A pixel's sum is the same sequence of float32
    additions as one accumulator of the whole output would make (windows in the same order), so the
    bands equal the rows of the whole map. Rows above a window's top are final when it arrives (windows
    come row by row), so the accumulators only span one window height; only ``batch_size`` windows'
    logits exist at a time.
    """
    out_width = max(l + w for _, l, _, w in boxes)
    out_height = max(t + h for t, _, h, _ in boxes)
    cap = max(h for _, _, h, _ in boxes)
    acc: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    base = 0

    def finished(rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        end = min(base + rows, height)
        if end > base:
            # called only after the first batch (boxes is not empty: max() above) set both accumulators
            assert acc is not None and norm is not None
            yield base, acc[:, :end - base, :width] / norm[:end - base, :width]

    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        batch = torch.stack([read(t, l, h, w) for t, l, h, w in chunk])
        weight = weight.to(batch.device)  # the outputs live where the input does
        logits = _forward(model, batch.to(device), tuple(batch.shape[-2:])).float().to(weight.device)
        if acc is None or norm is None:  # both are None until the first batch, then both are set
            acc = torch.zeros(logits.shape[1], cap, out_width, device=weight.device)
            norm = torch.zeros(cap, out_width, device=weight.device)
        for (t, l, h, w), window_logits in zip(chunk, logits):
            if window_logits.shape[-2:] != (h, w):
                margin = (batch.shape[-1] - w) // 2
                raise UnetlabError(f"the model maps a {h + 2 * margin}x{w + 2 * margin} window to "
                                   f"{tuple(window_logits.shape[-2:])}, expected {h}x{w}")
            if t > base:  # rows above t are final: hand them on, then move the accumulators down
                yield from finished(t - base)
                kept = cap - (t - base)
                acc[:, :kept] = acc[:, t - base:].clone()
                acc[:, kept:] = 0
                norm[:kept] = norm[t - base:].clone()
                norm[kept:] = 0
                base = t
                if release is not None:  # no later window reads input rows above this one's
                    release(t)
            acc[:, t - base:t - base + h, l:l + w] += window_logits * weight
            norm[t - base:t - base + h, l:l + w] += weight
    yield from finished(out_height - base)


def _valid_geometry(model, in_channels: int, tile: int) -> tuple[int, int]:
    """(output side, margin per side) of a ``tile`` input window of a valid-padding model."""
    from unetlab.model.unet import output_shape

    out_side = output_shape(model, in_channels, tile, tile)[-1]
    margin = tile - out_side
    if margin % 2:
        raise UnetlabError(f"--tile {tile} gives an output of {out_side}: the margin must be even; "
                           f"try --tile {tile + 1}")
    return out_side, margin // 2


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
