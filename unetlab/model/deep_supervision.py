"""Deep supervision's loss (nnU-Net's scheme): the model's outputs, finest first, each against the target
downsampled to its size by nearest neighbour, weighted 1, 1/2, 1/4, ... and normalised to sum 1.

The coarsest decoder level has no output at all (nnU-Net gives it weight 0), so a U-Net with L decoder
levels has L - 1 outputs: the full-resolution head and L - 2 auxiliary heads (``unetlab.model.unet``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from unetlab.model.unet import center_crop, crop_target

__all__ = ["deep_supervision_loss", "deep_supervision_weights", "level_target"]


def deep_supervision_weights(outputs: int) -> list[float]:
    """Loss weights of ``outputs`` outputs, finest first: 1, 1/2, 1/4, ... normalised to sum 1."""
    raw = [0.5 ** k for k in range(outputs)]
    return [w / sum(raw) for w in raw]


def level_target(masks: torch.Tensor, output: torch.Tensor, level: int, padding: str = "same") -> torch.Tensor:
    """The class-index target (N x H x W) of an output ``level`` steps coarser than the main one.

    ``same`` padding: the masks downsampled to the output's size by nearest neighbour (class indices,
    the ignore value included, are never blended). ``valid`` padding: the centre the level sees
    (its size times 2**level, at most the masks') is cropped first, then downsampled.
    """
    height, width = output.shape[-2:]
    if padding == "valid":
        masks = center_crop(masks, min(masks.shape[-2], height * 2 ** level), min(masks.shape[-1], width * 2 ** level))
    elif level == 0:
        return crop_target(masks, output)
    if masks.shape[-2:] == (height, width):
        return masks
    return F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest-exact")[:, 0].long()


def deep_supervision_loss(loss_fn: Callable, outputs: list[torch.Tensor], masks: torch.Tensor,
                          padding: str = "same") -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted loss of ``outputs`` (finest first) and each output's own loss (a vector, detached)."""
    weights = deep_supervision_weights(len(outputs))
    levels = [loss_fn(out, level_target(masks, out, k, padding)) for k, out in enumerate(outputs)]
    total = sum(w * loss for w, loss in zip(weights, levels))
    return total, torch.stack([loss.detach().float() for loss in levels])
