"""The ``timm`` encoder: a timm backbone created with ``features_only=True``, from scratch or pretrained.

- ``model``: any timm model name (with an optional pretrained tag, ``resnet18.a1_in1k``) whose
  ``features_only`` gives a feature pyramid; ``out_channels`` and ``strides`` come from its
  ``feature_info`` (resnet, efficientnet, regnet, mobilenetv3: 2..32; convnext: 4..32, the logits are
  then interpolated to the input size as for any first stride > 1). Models without a pyramid (plain
  ViTs: every stage at stride 16) are refused.
- ``pretrained``: ``false``; ``true`` (timm's default weights of the model, from the Hugging Face hub
  cache, downloaded into it when the hub can be reached); or a path to a ``.safetensors`` or
  ``.pth``/``.pt``/``.bin`` file holding the state dict of the timm model (the classification model, as
  ``timm.create_model(model).state_dict()`` or the hub's file). Files are read with safetensors or
  ``torch.load(weights_only=True)``: nothing is unpickled. timm then applies them as it does its own
  (its key filters, the first convolution adapted to ``in_channels``).
- ``input_norm``: the weights' normalisation (timm's ``pretrained_cfg`` mean and std) applied inside
  the encoder to images in [0, 1] (``data.normalize`` unset); default (null): on when pretrained.

The build follows ``unetlab.model.unet.pretrained_mode()``: ``check`` (validate, preflight) only confirms
the weights can be read, ``skip`` (predict, export, ``--resume``) reads nothing, since unetlab loads
its own saved weights into the model next: a trained run never needs the file, the cache or the hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional, Union

import torch
from torch import nn

import unetlab
from unetlab.errors import did_you_mean
from unetlab.model.unet import pretrained_mode
from unetlab.plugin_api.params import FilePath

__all__ = ["TimmEncoder", "pretrained_state_dict", "weights_file"]

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_INSTALL = "the timm encoder needs the optional extra: pip install 'unetlab[timm]' (timm and safetensors)"


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise RuntimeError(f"{_INSTALL} ({exc})") from None
    return timm


def _hub_file(model: str, timm) -> tuple[str, str]:
    """The Hugging Face repository and file of timm's default weights of ``model``."""
    cfg = timm.models.get_pretrained_cfg(model)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise ValueError(f"timm has no default weights on the Hugging Face hub for '{model}'; "
                         "give pretrained: PATH to a .safetensors or .pth file")
    return repo, getattr(cfg, "hf_hub_filename", None) or "model.safetensors"


def weights_file(model: str, pretrained: Union[bool, str], mode: str) -> Path | None:
    """The local file the pretrained weights are read from (``mode`` ``load``), or None (``check``: confirmed
    readable; ``skip``: not looked for). ``pretrained: true`` downloads into the hub cache when it can."""
    if pretrained is False or mode == "skip":
        return None
    if isinstance(pretrained, str):
        path = Path(pretrained)
        if path.suffix not in SUFFIXES:
            raise ValueError(f"pretrained file '{path}' must be one of {', '.join(SUFFIXES)} (a state dict)")
        if not path.is_file():
            raise ValueError(f"pretrained file '{path}' not found")
        return path
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    hub_id, filename = _hub_file(model, _timm())
    repo, _, revision = hub_id.partition("@")
    cached = try_to_load_from_cache(repo, filename, revision=revision or None)
    if isinstance(cached, str):
        return Path(cached)
    where = (f"timm's default weights of '{model}' (hub repository '{repo}', file {filename}) are not in the "
             f"Hugging Face cache ({HF_HUB_CACHE})")
    advice = ("download them where there is network (hf download " + repo + " " + filename + ") and copy the "
              "cache, or save the weights to a file and set pretrained: PATH")
    if HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"{where} and HF_HUB_OFFLINE is set: {advice}")
    if mode == "check":
        return None  # the training run downloads them
    try:
        return Path(hf_hub_download(repo, filename, revision=revision or None))
    except Exception as exc:  # noqa: BLE001 - no network, no such file, a proxy: the same one line
        raise ValueError(f"{where} and the hub cannot be reached ({type(exc).__name__}): {advice}") from None


def pretrained_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read without unpickling (safetensors, or ``torch.load(weights_only=True)``);
    a checkpoint that wraps them under ``state_dict`` or ``model`` is unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"pretrained file '{path}' holds pickled objects other than tensors (code could run): "
                             "refused; save a plain state dict or a .safetensors file") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained file '{path}' is not a state dict (a mapping of names to tensors)")
    return state


class TimmEncoder(nn.Module):
    """A timm backbone (features_only): resnet, efficientnet, convnext, regnet, mobilenetv3, ..."""

    mean: torch.Tensor  # buffers registered in __init__ when the encoder normalizes its input
    std: torch.Tensor

    def __init__(self, in_channels: int, model: str,
                 pretrained: Union[bool, Annotated[str, FilePath()]] = False,
                 out_indices: Optional[list[int]] = None, input_norm: Optional[bool] = None) -> None:
        super().__init__()
        timm = _timm()
        if not timm.is_model(model.split(".")[0]):
            raise ValueError(f"unknown timm model '{model}'{did_you_mean(model, timm.list_models())}")
        mode = pretrained_mode()
        path = weights_file(model, pretrained, mode)
        kwargs: dict = {"features_only": True, "in_chans": in_channels}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        state = pretrained_state_dict(path) if path is not None and mode == "load" else None
        if state is not None:  # timm applies it as its own weights: its key filter, in_chans adaptation
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state})
        try:
            with _load_report() as report:
                self.model = timm.create_model(model, **kwargs)
        except (RuntimeError, NotImplementedError, AssertionError) as exc:
            if state is not None and "state_dict" in str(exc):
                raise ValueError(f"pretrained file '{path}' does not fit timm model '{model}' (it must hold the "
                                 f"state dict of timm.create_model('{model}')): {' '.join(str(exc).split())[:300]}"
                                 ) from None
            if "features_only" in str(exc) or "feature" in str(exc).lower():
                raise ValueError(f"timm model '{model}' has no feature pyramid (features_only: {exc}); "
                                 "a U-Net needs stages at increasing strides (resnet*, convnext*, efficientnet*, "
                                 "regnet*, mobilenetv3*)") from None
            raise
        if state is not None:
            assert path is not None  # state is only loaded from a path
            _check_fit(report, self.model, model, path)
        info = self.model.feature_info
        self.out_channels = [int(c) for c in info.channels()]
        self.strides = [int(r) for r in info.reduction()]
        if any(b <= a or b % a for a, b in zip(self.strides, self.strides[1:])):
            raise ValueError(f"timm model '{model}' has no feature pyramid: its stages' strides are {self.strides}; "
                             "a U-Net needs each stage to downsample (resnet*, convnext*, efficientnet*, regnet*, "
                             "mobilenetv3*)")
        self.padding = "same"
        self.pretrained_weights = state is not None  # build_unet's initializer leaves them alone
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        mean, std = _per_channel(cfg.get("mean"), in_channels), _per_channel(cfg.get("std"), in_channels)
        self.normalizes = bool(pretrained) if input_norm is None else input_norm
        if self.normalizes and (mean is None or std is None):
            raise ValueError(f"timm model '{model}' declares no mean/std in its pretrained_cfg: set input_norm: false")
        self.weights_mean, self.weights_std = mean, std  # what the weights expect, on [0, 1] inputs
        if self.normalizes:
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.normalizes:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return list(self.model(x))


class _LoadReport(logging.Handler):
    """Collects the keys timm reports while loading pretrained weights into a features_only model, which it
    does non-strictly (the classifier is dropped): a file that does not fit would otherwise load in part."""

    _LINE = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading pretrained weights")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self._LINE.match(record.getMessage())
        if match:
            (self.missing if match.group(1) == "Missing" else self.unexpected).extend(match.group(2).split(", "))


@contextlib.contextmanager
def _load_report() -> Iterator[_LoadReport]:
    logger = logging.getLogger("timm.models._builder")
    report, level, propagate = _LoadReport(), logger.level, logger.propagate
    logger.addHandler(report)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # its multi-line key lists are ours to report, in one line
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)
        logger.propagate = propagate


def _check_fit(report: _LoadReport, features: nn.Module, model: str, path: Path) -> None:
    """Refuse a file that left weights of the encoder unset or held weights for its stages that it has no
    place for. Tolerated: the classifier's weights (dropped by timm) and weights of head modules that the
    features model does not have (efficientnet's conv_head: its features class has no head)."""
    cfg = _timm().models.get_pretrained_cfg(model)  # the classifier's name (a features model's cfg drops it)
    classifiers = getattr(cfg, "classifier", None) or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    missing = [k for k in report.missing if not any(k.startswith(c + ".") for c in classifiers)]
    # a features model keeps the top-level modules it uses, flattened ones as stages_0, stages_1, ...
    names = [name for name, _ in features.named_children()]
    unexpected = [k for k in report.unexpected
                  if any(n == k.split(".")[0] or n.startswith(k.split(".")[0] + "_") for n in names)]
    if missing or unexpected:
        parts = [f"{len(missing)} weight(s) missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""]
        raise ValueError(f"pretrained file '{path}' does not fit timm model '{model}': "
                         f"{', '.join(p for p in parts if p)}; it must hold the state dict of "
                         f"timm.create_model('{model}')")


def _per_channel(values, channels: int) -> list[float] | None:
    """The weights' per-channel statistic for ``channels`` inputs, as timm adapts the first convolution:
    one channel sums the RGB filters (a grey image: the mean of the three), more cycle through them."""
    if not values:
        return None
    values = [float(v) for v in values]
    if channels == 1 and len(values) == 3:
        return [sum(values) / 3]
    return [values[i % len(values)] for i in range(channels)]


@unetlab.hookimpl
def register_encoders(register):
    register("timm", TimmEncoder)
