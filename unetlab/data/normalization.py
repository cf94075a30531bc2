"""Intensity normalisation, per dataset (the default) or per image, as a small JSON-able spec.

A spec is computed once from the training split and stored in checkpoints under ``"normalization"``;
``apply_normalization`` is the one function that turns a raw image into the model's input, in
training and in ``unetlab predict``. Every mode reduces to: optionally clip each channel to
``[low, high]``, then ``(x - offset) / scale`` per channel.

Modes (``data.normalize``):

- default (``null``): from the dtype: uint8 / 255, uint16 / 65535, floats as they are. A dark 16-bit
  image is therefore scaled exactly like a bright one.
- ``{mode: zscore}``: per channel mean and standard deviation of the training split.
- ``{mode: percentile, lower: 0.5, upper: 99.5}``: clip each channel to those percentiles of the
  training split, then map them to [0, 1].
- ``{mode: fixed, mean: [..], std: [..]}``: given values (a number or one per channel), on the raw
  scale, e.g. ImageNet's ``mean: [123.7, 116.3, 103.5], std: [58.4, 57.1, 57.4]`` for uint8 RGB.

``scope: image`` (zscore and percentile; ``scope: dataset`` is the default) computes the statistics on
each image instead, as nnU-Net (z-score per image for non-CT data) and CSBDeep/StarDist (percentiles
per image) do. The spec then holds no statistics (``{"mode", "scope": "image", "channels", ...}``);
``image_spec`` computes them on the WHOLE image (every pixel, never a patch or a window: a training
patch, a sliding window and ``predict`` of one image all use the same numbers) and returns the
per-dataset form, so the arithmetic that follows is the same for both scopes. A spec without
``scope`` (every checkpoint written before it existed) is per dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeGuard

import numpy as np

from unetlab.errors import UnetlabError, did_you_mean

__all__ = ["MODES", "SCOPES", "apply_normalization", "check_normalize", "check_stored_spec", "dtype_spec",
           "fit_normalization", "image_spec", "image_statistics", "per_image"]

MODES = ("zscore", "percentile", "fixed")
SCOPES = ("dataset", "image")
_KEYS = {"zscore": {"scope"}, "percentile": {"lower", "upper", "scope"}, "fixed": {"mean", "std"}}
BAND_PIXELS = 1 << 22  # pixels read at a time when computing one image's statistics: bounded memory
SAMPLE_PIXELS = 200_000  # pixels per channel kept to estimate statistics: bounded memory for any dataset size
SAMPLE_IMAGES = 256


def dtype_spec(dtype: np.dtype | str, channels: int) -> dict:
    """The default spec of images of ``dtype``: uint8 / 255, uint16 / 65535, floats unchanged."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8 or dtype == np.bool_:
        scale = 255.0 if dtype == np.uint8 else 1.0
    elif dtype == np.uint16:
        scale = 65535.0
    elif dtype.kind == "f":
        scale = 1.0
    else:
        raise UnetlabError(f"images of dtype {dtype} have no default scale (uint8, uint16 and floats do); "
                           "set data.normalize: {mode: zscore} or {mode: fixed, mean: ..., std: ...}")
    return {"mode": "dtype", "dtype": dtype.name, "offset": [0.0] * channels, "scale": [scale] * channels,
            "clip": None}


def check_normalize(value: Any) -> dict | None:
    """Check ``data.normalize`` (None or a mapping with ``mode``); raise a one-line error naming the key."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("mode") not in MODES:
        got = value.get("mode") if isinstance(value, dict) else value
        raise UnetlabError(f"data.normalize.mode: {got!r} is not a mode{did_you_mean(str(got), MODES)} (modes: "
                           f"{', '.join(MODES)}; or leave data.normalize unset to scale by the dtype)")
    mode = value["mode"]
    unknown = sorted(set(value) - {"mode"} - _KEYS[mode])
    if unknown:
        allowed = ", ".join(sorted(_KEYS[mode])) or "none"
        raise UnetlabError(f"data.normalize.{unknown[0]}: not a key of mode {mode}"
                           f"{did_you_mean(unknown[0], _KEYS[mode])} (its keys: {allowed})")
    scope = value.get("scope", "dataset")
    if scope not in SCOPES:
        raise UnetlabError(f"data.normalize.scope: {scope!r} is not a scope{did_you_mean(scope, SCOPES)} (scopes: "
                           "dataset (the default: statistics of the training split), image (statistics of each "
                           "image))")
    per = {"scope": "image"} if scope == "image" else {}
    if mode == "percentile":
        lower, upper = value.get("lower", 0.5), value.get("upper", 99.5)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lower, upper)) \
                or not 0 <= lower < upper <= 100:
            raise UnetlabError(f"data.normalize: percentile needs 0 <= lower < upper <= 100, got lower={lower!r}, "
                               f"upper={upper!r}")
        return {"mode": mode, "lower": float(lower), "upper": float(upper), **per}
    if mode == "fixed":
        for key in ("mean", "std"):
            if key not in value:
                raise UnetlabError(f"data.normalize.{key}: mode fixed needs mean and std (a number or one per "
                                   "channel)")
            items = value[key] if isinstance(value[key], list) else [value[key]]
            if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                raise UnetlabError(f"data.normalize.{key}: expected a number or a list of numbers, got {value[key]!r}")
            if key == "std" and any(v <= 0 for v in items):
                raise UnetlabError(f"data.normalize.std: must be > 0, got {value[key]!r}")
        return {"mode": mode, "mean": value["mean"], "std": value["std"]}
    return {"mode": mode, **per}


def _per_channel(value: Any, channels: int, key: str) -> list[float]:
    items = [float(v) for v in (value if isinstance(value, list) else [value])]
    if len(items) == 1:
        return items * channels
    if len(items) != channels:
        raise UnetlabError(f"data.normalize.{key}: {len(items)} values for images with {channels} channel(s)")
    return items


class ImageSequence(Protocol):
    """Raw training images as ``fit_normalization`` reads them: a list, or a lazy loader with len and index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> np.ndarray: ...


def fit_normalization(options: dict | None, dtype: np.dtype | str, channels: int,
                      images: ImageSequence, seed: int = 0) -> dict:
    """The spec for ``options`` (checked ``data.normalize``), from the training images when it needs statistics.

    ``images`` is a (lazy) sequence of raw training images (H x W x C). At most ``SAMPLE_IMAGES`` images,
    evenly spaced, and ``SAMPLE_PIXELS`` pixels per channel in all are read, so time and memory do not
    grow with the dataset.
    """
    if options is None:
        return dtype_spec(dtype, channels)
    mode = options["mode"]
    if mode == "fixed":
        mean, std = _per_channel(options["mean"], channels, "mean"), _per_channel(options["std"], channels, "std")
        return {"mode": mode, "offset": mean, "scale": std, "clip": None}
    if options.get("scope") == "image":  # nothing to fit: each image brings its own statistics
        spec = {"mode": mode, "scope": "image", "channels": int(channels), "clip": None}
        return {**spec, "percentiles": [options["lower"], options["upper"]]} if mode == "percentile" else spec
    sample = _sample_pixels(images, channels, seed)
    if mode == "zscore":
        std = sample.std(axis=0)
        return {"mode": mode, "offset": sample.mean(axis=0).tolist(),
                "scale": np.where(std > 0, std, 1.0).tolist(), "clip": None}
    low = np.percentile(sample, options["lower"], axis=0)
    high = np.percentile(sample, options["upper"], axis=0)
    span = np.where(high > low, high - low, 1.0)
    return {"mode": mode, "offset": low.tolist(), "scale": span.tolist(),
            "clip": [[float(a), float(b)] for a, b in zip(low, high)],
            "percentiles": [options["lower"], options["upper"]]}


def _sample_pixels(images: ImageSequence, channels: int, seed: int) -> np.ndarray:
    """Pixels (rows) x channels drawn uniformly from evenly spaced images, float64."""
    if len(images) == 0:
        raise UnetlabError("data.normalize: the training split has no images to compute statistics from")
    rng = np.random.default_rng(seed)
    chosen = np.unique(np.linspace(0, len(images) - 1, min(len(images), SAMPLE_IMAGES)).round().astype(int))
    per_image = max(1, SAMPLE_PIXELS // len(chosen))
    chunks = []
    for i in chosen:
        flat = np.asarray(images[int(i)]).reshape(-1, channels)
        if per_image >= flat.shape[0]:  # small images: every pixel, so small sets get exact statistics
            chunks.append(np.asarray(flat, dtype=np.float64))
            continue
        rows = rng.integers(0, flat.shape[0], size=per_image)
        chunks.append(flat[np.sort(rows)].astype(np.float64))
    return np.concatenate(chunks)


def per_image(spec: dict | None) -> bool:
    """True when ``spec`` computes its statistics on each image (``scope: image``)."""
    return bool(spec and spec.get("scope") == "image")


def image_statistics(image: np.ndarray, mode: str, percentiles: Sequence[float] = (0.5, 99.5)
                     ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """Per-channel statistics of one whole image (H x W x C, or H x W), in float64.

    ``zscore``: (mean, std) -- numpy's ``image.mean((0, 1))`` and ``image.std((0, 1))``;
    ``percentile``: a 2 x C array of ``np.percentile(channel, percentiles)`` (linear interpolation).
    Integer images of at most 16 bits are counted into a histogram, so the results are exact in
    memory bounded by ``BAND_PIXELS`` whatever the image size (a memory-mapped 12k x 12k image is
    read in row bands); float images are summed in float64 by row bands, and their percentiles need one
    channel as float64 at a time.
    """
    array = np.asarray(image) if not isinstance(image, np.memmap) else image
    if array.ndim == 2:
        array = array[..., None]
    height, width, channels = array.shape
    rows = max(1, BAND_PIXELS // max(width, 1))
    bands = [array[top:top + rows] for top in range(0, height, rows)]
    count = height * width
    if count == 0:
        raise UnetlabError("data.normalize: an empty image has no statistics")
    integer = array.dtype.kind in "biu" and array.dtype.itemsize <= 2
    if integer:
        low = 0 if array.dtype.kind in "bu" else int(np.iinfo(array.dtype).min)
        size = (2 if array.dtype.kind == "b" else 1 << (8 * array.dtype.itemsize))
        hist = np.zeros((channels, size), np.int64)
        for band in bands:
            for c in range(channels):
                hist[c] += np.bincount((band[..., c].astype(np.int64).ravel() - low), minlength=size)
        values = np.arange(size, dtype=np.float64) + low
        if mode == "zscore":
            mean = hist @ values / count
            var = ((values[None, :] - mean[:, None]) ** 2 * hist).sum(axis=1) / count
            return mean, np.sqrt(var)
        out = np.empty((2, channels))
        for c in range(channels):
            cumulative = np.cumsum(hist[c])
            for j, q in enumerate(percentiles):
                position = q / 100 * (count - 1)
                below, above = int(np.floor(position)), int(np.ceil(position))
                a = values[np.searchsorted(cumulative, below, side="right")]
                b = values[np.searchsorted(cumulative, above, side="right")]
                out[j, c] = a + (b - a) * (position - below)
        return out
    if mode == "zscore":
        total = np.zeros(channels)
        for band in bands:
            total += band.reshape(-1, channels).sum(axis=0, dtype=np.float64)
        mean = total / count
        squares = np.zeros(channels)
        for band in bands:
            squares += ((band.reshape(-1, channels).astype(np.float64) - mean) ** 2).sum(axis=0)
        return mean, np.sqrt(squares / count)
    return np.stack([np.percentile(np.asarray(array[..., c], dtype=np.float64), list(percentiles))
                     for c in range(channels)], axis=1)


def image_spec(spec: dict, image: np.ndarray) -> dict:
    """``spec`` ready to apply to ``image`` or any window of it: a per-image spec gets the statistics of
    the whole ``image`` (``image_statistics``) in the per-dataset form; any other spec is returned as is."""
    if not per_image(spec):
        return spec
    if spec["mode"] == "zscore":
        mean, std = image_statistics(image, "zscore")
        return {"mode": "zscore", "scope": "image", "offset": mean.tolist(),
                "scale": np.where(std > 0, std, 1.0).tolist(), "clip": None}
    low, high = image_statistics(image, "percentile", spec["percentiles"])
    span = np.where(high > low, high - low, 1.0)
    return {"mode": "percentile", "scope": "image", "offset": low.tolist(), "scale": span.tolist(),
            "clip": [[float(a), float(b)] for a, b in zip(low, high)], "percentiles": list(spec["percentiles"])}


def check_stored_spec(spec: Any, label: str) -> dict | None:
    """A normalisation spec read back from a checkpoint or weights file, checked (one line naming
    ``label`` when it is malformed). A spec without ``scope`` is per dataset (older checkpoints)."""
    if spec is None:
        return None

    def bad(detail: str) -> UnetlabError:
        return UnetlabError(f"{label}: normalization {detail}")

    def numbers(value: Any, n: int | None = None) -> TypeGuard[list[Any]]:
        return isinstance(value, list) and len(value) > 0 and (n is None or len(value) == n) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)

    if not isinstance(spec, dict) or not isinstance(spec.get("mode"), str):
        raise bad(f"is {str(spec)[:60]!r}, expected a mapping with a mode")
    scope = spec.get("scope", "dataset")
    if scope not in SCOPES:
        raise bad(f"scope {scope!r} is not one of {', '.join(SCOPES)} (written by a newer unetlab?)")
    if scope == "image":
        channels = spec.get("channels")
        if spec["mode"] not in ("zscore", "percentile") or not isinstance(channels, int) or channels < 1:
            raise bad("per image needs mode zscore or percentile and a channel count")
        if spec["mode"] == "percentile":
            q = spec.get("percentiles")
            if not numbers(q, 2) or not 0 <= q[0] < q[1] <= 100:
                raise bad(f"percentiles {q!r}: expected [lower, upper] within 0..100")
        return spec
    offset, scale = spec.get("offset"), spec.get("scale")
    if not numbers(offset) or not numbers(scale, len(offset)) or any(v == 0 for v in scale):
        raise bad("needs offset and non-zero scale, one number per channel")
    clip = spec.get("clip")
    if clip is not None and not (isinstance(clip, list) and len(clip) == len(offset)
                                 and all(numbers(pair, 2) for pair in clip)):
        raise bad("clip must be [low, high] per channel")
    return spec


def apply_normalization(image: np.ndarray, spec: dict) -> np.ndarray:
    """Raw image (H x W x C, or H x W) -> float32 C x H x W model input, by ``spec``.

    A per-image spec (``scope: image``) takes its statistics from ``image`` itself: pass a whole image,
    or resolve the spec on the whole image first (``image_spec``) and apply it to windows of it.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if per_image(spec) and "offset" not in spec:
        if array.shape[2] != spec["channels"]:
            raise UnetlabError(f"the image has {array.shape[2]} channel(s), the normalisation was fitted on "
                               f"{spec['channels']}")
        spec = image_spec(spec, array)
    x = array.astype(np.float32)
    channels = x.shape[2]
    if len(spec["offset"]) != channels:
        raise UnetlabError(f"the image has {channels} channel(s), the normalisation was fitted on "
                           f"{len(spec['offset'])}")
    if spec.get("clip"):
        clip = np.asarray(spec["clip"], dtype=np.float32)
        x = np.clip(x, clip[:, 0], clip[:, 1])
    offset = np.asarray(spec["offset"], dtype=np.float32)
    if np.any(offset):
        x -= offset
    x *= 1.0 / np.asarray(spec["scale"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
