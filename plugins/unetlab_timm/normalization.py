"""A pretrained timm encoder's input normalisation, checked against ``data.normalize`` and recorded.

At the start of each run (``on_run_start``) the encoder's normalisation is logged as the run's
parameters ``timm.input_norm`` (``applied`` or ``off``), ``timm.weights_mean`` and ``timm.weights_std``
(timm's ``pretrained_cfg`` values, on [0, 1] inputs), and one warning line names both sides when the
images do not reach the weights normalised as they expect:

- the encoder normalises inside (``input_norm``) and ``data.normalize`` normalises too: twice;
- the encoder does not, and ``data.normalize`` is unset (images in [0, 1]), ``zscore`` or
  ``percentile`` (per-dataset statistics, not the weights'), or ``fixed`` with a mean and std that are
  not the weights' up to one common scale (``fixed`` on the raw scale: mean 255*m, std 255*s for uint8).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["normalization_warning", "on_run_start"]

_RELATIVE_TOLERANCE = 0.02


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _RELATIVE_TOLERANCE * max(abs(a), abs(b), 1e-12)


def _fixed_matches(normalize: dict, mean: list[float], std: list[float]) -> bool:
    """``{mode: fixed}`` on a raw scale k equals the weights' (x/k - m)/s: mean = k*m and std = k*s, one k."""
    def per_channel(value):
        return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * len(mean)
    got_mean, got_std = per_channel(normalize.get("mean")), per_channel(normalize.get("std"))
    if len(got_mean) != len(mean) or len(got_std) != len(std):
        return False
    scale = got_std[0] / std[0]
    return all(_close(gs, scale * s) and _close(gm, scale * m) for gm, gs, m, s in zip(got_mean, got_std, mean, std))


def normalization_warning(encoder: Any, normalize: dict | None) -> str | None:
    """One line when the images will not reach ``encoder``'s pretrained weights normalised as they expect."""
    if not getattr(encoder, "pretrained_weights", False) and not getattr(encoder, "normalizes", False):
        return None
    mean, std = encoder.weights_mean, encoder.weights_std
    weights = f"the weights' mean {_fmt(mean)}, std {_fmt(std)} on [0, 1] images (timm pretrained_cfg)"
    data = "data.normalize unset (images scaled to [0, 1])" if normalize is None else f"data.normalize {normalize}"
    if encoder.normalizes:
        if normalize is None:
            return None
        return (f"{data} and the timm encoder's input_norm ({weights}) both normalise the images: "
                "set model.encoder.input_norm: false or leave data.normalize unset")
    if normalize is not None and normalize.get("mode") == "fixed" and _fixed_matches(normalize, mean, std):
        return None
    return (f"{data} is not {weights}: set model.encoder.input_norm: true (with data.normalize unset) or "
            f"data.normalize: {{mode: fixed, mean: {_fmt([255 * m for m in mean])}, "
            f"std: {_fmt([255 * s for s in std])}}} for uint8 images")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def on_run_start(run_name: str, config: dict, model: Any, tracker: Any) -> None:
    """Record a timm encoder's normalisation as run parameters; warn (one line) when the data does not match it."""
    encoder: Any = getattr(model, "encoder", None)  # any model; only a TimmEncoder is used below
    if type(encoder).__name__ != "TimmEncoder":
        return
    if tracker is not None and encoder.weights_mean is not None:
        tracker.log_params({"timm.input_norm": "applied" if encoder.normalizes else "off",
                            "timm.weights_mean": _fmt(encoder.weights_mean),
                            "timm.weights_std": _fmt(encoder.weights_std)})
    message = normalization_warning(encoder, (config.get("data") or {}).get("normalize"))
    if message:
        print(f"unetlab: warning: run '{run_name}': {message}", file=sys.stderr)
