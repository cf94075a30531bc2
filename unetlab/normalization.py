"""Intensity normalisation per dataset (never per image), as a small JSON-able spec.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import UnetlabError

__all__ = ["MODES", "apply_normalization", "check_normalize", "dtype_spec", "fit_normalization"]

MODES = ("zscore", "percentile", "fixed")
_KEYS = {"zscore": set(), "percentile": {"lower", "upper"}, "fixed": {"mean", "std"}}
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
        raise UnetlabError(f"data.normalize.mode: {got!r} is not a mode (modes: {', '.join(MODES)}; or leave "
                           "data.normalize unset to scale by the dtype)")
    mode = value["mode"]
    unknown = sorted(set(value) - {"mode"} - _KEYS[mode])
    if unknown:
        allowed = ", ".join(sorted(_KEYS[mode])) or "none"
        raise UnetlabError(f"data.normalize.{unknown[0]}: not a key of mode {mode} (its keys: {allowed})")
    if mode == "percentile":
        lower, upper = value.get("lower", 0.5), value.get("upper", 99.5)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lower, upper)) \
                or not 0 <= lower < upper <= 100:
            raise UnetlabError(f"data.normalize: percentile needs 0 <= lower < upper <= 100, got lower={lower!r}, "
                               f"upper={upper!r}")
        return {"mode": mode, "lower": float(lower), "upper": float(upper)}
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
    return {"mode": mode}


def _per_channel(value: Any, channels: int, key: str) -> list[float]:
    items = [float(v) for v in (value if isinstance(value, list) else [value])]
    if len(items) == 1:
        return items * channels
    if len(items) != channels:
        raise UnetlabError(f"data.normalize.{key}: {len(items)} values for images with {channels} channel(s)")
    return items


def fit_normalization(options: dict | None, dtype: np.dtype | str, channels: int,
                      images: Sequence[np.ndarray], seed: int = 0) -> dict:
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


def _sample_pixels(images: Sequence[np.ndarray], channels: int, seed: int) -> np.ndarray:
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


def apply_normalization(image: np.ndarray, spec: dict) -> np.ndarray:
    """Raw image (H x W x C, or H x W) -> float32 C x H x W model input, by ``spec``."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
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
