"""Assemble a U-Net from registry components: encoder + per-level upsampler, fusion, decoder block + head.

The builder knows only the contracts (see ``docs/plugins.md``), never a concrete component:

- the encoder returns features finest -> coarsest and declares ``out_channels``, ``strides`` and
  (optionally) ``padding``;
- at each decoder level, coarsest first, the upsampler maps the current channels to the level's
  decoder channels and doubles the size; the skip and the upsampled map are aligned (``same``: the
  upsampled map is zero-padded to the skip's size, as the seed blog's ``F.pad``; ``valid``: the skip
  is centre-cropped, the paper's "copy and crop"); the fusion combines them; the block refines;
- a 1x1 conv head gives ``out_channels`` logits (1: binary, sigmoid; >1: classes, softmax);
- with ``model.deep_supervision`` (nnU-Net's scheme), 1x1 auxiliary heads on the decoder levels between
  the coarsest and the finest: used only in training (``return_auxiliary``), never at inference or export.

A component that reads pretrained weights asks ``pretrained_mode()`` what this build wants: ``load``
(training from scratch), ``check`` (validate and preflight: confirm the weights are there, read nothing)
or ``skip`` (predict, export, ``--resume``: unetlab's own weights are loaded right after the build, so
no file, cache or network is touched).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from unetlab.errors import ConfigError, UnetlabError, exception_text
from unetlab.plugin_api.registry import Registry, component_params

__all__ = [
    "UNet",
    "build_unet",
    "center_crop",
    "count_parameters",
    "crop_target",
    "forward_flops",
    "logits_to_classes",
    "output_shape",
    "pretrained_mode",
    "resolve_model_config",
]

PretrainedMode = Literal["load", "check", "skip"]
_PRETRAINED_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("unetlab_pretrained_mode", default="load")


def pretrained_mode() -> str:
    """What the model being built wants from a component with pretrained weights.

    ``"load"``: read them (a training run from scratch). ``"check"``: confirm they can be read (the
    file exists, the cache holds them) without reading them (``validate``, preflight's counts).
    ``"skip"``: neither; the whole model's weights are loaded right after the build from unetlab's own
    checkpoint or weights artifact (``predict``, ``export``, ``--resume``), so no network is needed.
    """
    return _PRETRAINED_MODE.get()


@contextlib.contextmanager
def _pretrained(mode: str) -> Iterator[None]:
    token = _PRETRAINED_MODE.set(mode)
    try:
        yield
    finally:
        _PRETRAINED_MODE.reset(token)


class UNet(nn.Module):
    """A U-Net made of plugin parts. ``forward(x)`` returns logits (N x out_channels x H' x W').

    ``aux_heads`` (deep supervision): one 1x1 head per supervised decoder level, the level just below
    full resolution first. Only in training mode with ``return_auxiliary`` set (the trainer sets it)
    does ``forward`` return ``[logits, aux_1, aux_2, ...]``, finest first, the auxiliary outputs
    at their level's resolution; otherwise, and always for inference and export, the logits alone.
    """

    def __init__(self, encoder: nn.Module, upsamplers: list[nn.Module], fusions: list[nn.Module],
                 blocks: list[nn.Module], head: nn.Module, padding: str = "same",
                 aux_heads: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.upsamplers = nn.ModuleList(upsamplers)
        self.fusions = nn.ModuleList(fusions)
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.aux_heads = nn.ModuleList(aux_heads or [])
        self.padding = padding
        self.first_stride = int(getattr(encoder, "strides", [1])[0])
        self.gradient_checkpointing = False
        self.return_auxiliary = False

    def _level(self, i: int, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self.upsamplers[i](y)
        if self.padding == "valid":
            skip = center_crop(skip, y.shape[-2], y.shape[-1])
        elif y.shape[-2:] != skip.shape[-2:]:
            y = _pad_to(y, skip.shape[-2], skip.shape[-1])
        return self.blocks[i](self.fusions[i](skip, y))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[-2:]
        # Gradient checkpointing keeps only each segment's inputs and outputs (the skips) and recomputes
        # the rest in backward: less memory for large images, about one more forward pass of compute.
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if recompute:
            from torch.utils.checkpoint import checkpoint

            features = checkpoint(self.encoder, x, use_reentrant=False)
        else:
            features = self.encoder(x)
        y = features[-1]
        levels = len(self.blocks)
        auxiliary = self.return_auxiliary and self.training and len(self.aux_heads) > 0
        decoded = []
        for i in range(levels):
            skip = features[-2 - i]
            y = checkpoint(self._level, i, y, skip, use_reentrant=False) if recompute else self._level(i, y, skip)
            if auxiliary:
                decoded.append(y)
        y = self.head(y)
        if self.first_stride > 1 and self.padding == "same":
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        if not auxiliary:
            return y
        # decoded[-1] is the finest level (the main head's); aux head k reads the level k steps coarser
        return [y, *(head(decoded[-1 - k]) for k, head in enumerate(self.aux_heads, start=1))]


def center_crop(x, height: int, width: int):
    """The centre ``height`` x ``width`` of the last two dimensions of a tensor or array (valid padding's
    "copy and crop"; also how targets and figures meet a smaller output)."""
    if x.shape[-2] < height or x.shape[-1] < width:
        raise RuntimeError(f"cannot centre-crop size {tuple(x.shape[-2:])} to the larger {(height, width)}")
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


def crop_target(masks, logits):
    """The centre of ``masks`` that ``logits`` predict: valid padding gives an output smaller than its input,
    so the target (and anything drawn beside it) is cropped to the logits' last two dimensions."""
    return center_crop(masks, *logits.shape[-2:])


def _pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    dy, dx = height - x.shape[-2], width - x.shape[-1]
    if dy < 0 or dx < 0:  # upsampled beyond the skip (odd sizes upstream): crop the excess
        return center_crop(x, min(height, x.shape[-2]), min(width, x.shape[-1]))
    return F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])



def resolve_model_config(model_config: Mapping[str, Any] | None, registry: Registry) -> dict:
    """A ``model`` section in any form an experiment file accepts, resolved as ``validate`` resolves it.

    Components may be bare names (``"add"``), mappings with ``name`` and parameters, or mappings of
    parameters only (``{"depth": 3}``: the default component with those parameters); missing keys get
    the schema's defaults and every component's parameters are checked and completed. Raises
    ``ConfigError`` with the key path (``model.fusion: unknown fusion 'ad'; did you mean 'add'?``).
    """
    from unetlab.config.schema import SCHEMA, normalise_component, validate_section

    if model_config is None:
        model_config = {}
    if not isinstance(model_config, Mapping):
        raise ConfigError(f"expected a mapping of model keys, got {model_config!r}", "model")
    values = dict(model_config)
    for key, field in SCHEMA["model"].items():
        value = values.get(key)
        if getattr(field, "kind", None) and isinstance(value, Mapping) and "name" not in value:
            values[key] = {**normalise_component(field.default, field, f"model.{key}"), **value}
    return validate_section("model", values, registry)


def _create(registry: Registry, kind: str, key: str, spec: Mapping[str, Any], **contract: Any) -> Any:
    """Build one component of the model; a factory's own exception becomes a one-line ``ConfigError``."""
    try:
        return registry.create(kind, spec["name"], **contract, **component_params(spec))
    except UnetlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin factory rejecting a value or failing, as one line
        raise ConfigError(f"cannot build {kind} '{spec['name']}': {exception_text(exc)}", f"model.{key}") from None


def build_unet(model_config: dict, in_channels: int, out_channels: int, registry: Registry,
               initialise: bool = True, pretrained: PretrainedMode = "load") -> UNet:
    """Build a ``UNet`` from a resolved ``model`` section (components as ``{name, **params}``).

    ``initialise=False`` builds the initializer without applying it (for a model on the meta device).
    ``pretrained``: what components with pretrained weights do (``pretrained_mode``); ``"skip"`` when
    the caller loads the whole model's weights next. Factory errors are ``ConfigError``s naming the
    component's key path.
    """
    with _pretrained(pretrained):
        encoder = _create(registry, "encoder", "encoder", model_config["encoder"], in_channels=in_channels)
    channels = list(getattr(encoder, "out_channels", []))
    strides = list(getattr(encoder, "strides", [2 ** i for i in range(len(channels))]))
    if not channels or len(strides) != len(channels):
        raise UnetlabError(f"encoder '{model_config['encoder']['name']}' breaks the encoder contract: it must "
                           "declare out_channels (one per stage) and strides of the same length")
    padding = getattr(encoder, "padding", "same")
    levels = len(channels) - 1
    decoder_channels = model_config.get("decoder_channels") or list(reversed(channels[:-1]))
    if len(decoder_channels) != levels:
        raise ConfigError(f"needs {levels} values (one per decoder level, coarsest first), got "
                          f"{len(decoder_channels)}", "model.decoder_channels")
    upsamplers, fusions, blocks = [], [], []
    current = channels[-1]
    for i in range(levels):
        skip_channels = channels[-2 - i]
        scale = strides[-1 - i] // strides[-2 - i]
        if scale < 2 or strides[-1 - i] % strides[-2 - i]:
            raise UnetlabError(f"encoder '{model_config['encoder']['name']}' declares strides {strides}: "
                               "each stage must downsample by an integer factor >= 2")
        width = decoder_channels[i]
        upsamplers.append(_create(registry, "upsampler", "upsampler", model_config["upsampler"], in_channels=current,
                                  out_channels=width, scale=scale))
        fusion = _create(registry, "fusion", "fusion", model_config["fusion"], skip_channels=skip_channels,
                         up_channels=width)
        fused = getattr(fusion, "out_channels", None)
        if not isinstance(fused, int):
            raise UnetlabError(f"fusion '{model_config['fusion']['name']}' breaks the fusion contract: it must "
                               "declare out_channels (an int)")
        fusions.append(fusion)
        blocks.append(_create(registry, "block", "block", model_config["block"], in_channels=fused,
                              out_channels=width, padding=padding))
        current = width
    head = nn.Conv2d(current, out_channels, kernel_size=1)
    # nnU-Net's deep supervision: every decoder level has an output except the coarsest, whose loss
    # weight nnU-Net sets to 0 (so no head is built for it); the finest is the main head.
    aux_heads: list[nn.Module] = []
    if model_config.get("deep_supervision"):
        if levels < 3:
            raise ConfigError(f"needs at least 3 decoder levels (this encoder gives {levels}): the coarsest level is "
                              "not supervised and the finest is the main output", "model.deep_supervision")
        aux_heads = [nn.Conv2d(decoder_channels[-1 - k], out_channels, kernel_size=1) for k in range(1, levels - 1)]
    model = UNet(encoder, upsamplers, fusions, blocks, head, padding, aux_heads)
    init = _create(registry, "initializer", "init", model_config["init"])
    if initialise:
        # an encoder that declares pretrained_weights keeps them: the initializer is for what was not pretrained
        kept = copy.deepcopy(encoder.state_dict()) if getattr(encoder, "pretrained_weights", False) else None
        init(model)
        if kept is not None:
            encoder.load_state_dict(kept)
    return model


def logits_to_classes(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class indices (N x H x W): one channel -> class 1 where the logit > 0; several -> argmax."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def output_shape(model: nn.Module, in_channels: int, height: int, width: int) -> tuple[int, ...]:
    """The output shape (C, H', W') for one input image, found on the meta device (no compute).

    Raises ``UnetlabError`` when the size cannot pass through the model (too small for its depth).
    """
    meta = copy.deepcopy(model).to("meta").eval()
    try:
        with torch.no_grad():
            out = meta(torch.empty(1, in_channels, height, width, device="meta"))
    except RuntimeError as exc:
        raise UnetlabError(_size_error(model, height, width, exc)) from None
    if out.shape[-2] <= 0 or out.shape[-1] <= 0:
        raise UnetlabError(_size_error(model, height, width, None))
    return tuple(out.shape[1:])


def _size_error(model: nn.Module, height: int, width: int, exc: Exception | None) -> str:
    depth = len(getattr(getattr(model, "encoder", None), "out_channels", [])) or "?"
    padding = getattr(model, "padding", "same")
    reason = f": {exception_text(exc).split(': ', 1)[-1]}" if exc else ""
    return (f"input size {height}x{width} is too small for a U-Net of depth {depth} with {padding} padding"
            f"{reason}; use a larger image size or a smaller encoder depth")


def forward_flops(model: nn.Module, in_channels: int, height: int, width: int) -> int:
    """Forward FLOPs for one image (torch.utils.flop_counter: 2 per multiply-add), counted on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, in_channels, height, width, device="meta"))
    return int(counter.get_total_flops())

