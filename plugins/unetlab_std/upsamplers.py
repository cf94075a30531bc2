"""Standard upsamplers. Contract: built from (in_channels, out_channels, scale); multiplies the
spatial size by ``scale`` (2 between U-Net levels) and maps in_channels -> out_channels."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

import unetlab

from .layers import BilinearUpsample


class InterpolateUp(nn.Module):
    """Interpolation followed by a 1x1 conv that sets the channels (and an optional ReLU), as the seed blog does."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2, mode: str = "bilinear",
                 align_corners: bool | None = True, activation: Literal["relu", "none"] = "relu") -> None:
        super().__init__()
        # bilinear: matrix products on an accelerator in deterministic mode (its interpolation backward
        # has no fast deterministic kernel), PyTorch's kernel elsewhere; see layers.bilinear_upsample
        up = (BilinearUpsample(scale, bool(align_corners)) if mode == "bilinear"
              else nn.Upsample(scale_factor=scale, mode=mode))
        layers: list[nn.Module] = [up, nn.Conv2d(in_channels, out_channels, 1)]
        if activation == "relu":
            layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def bilinear(in_channels: int, out_channels: int, scale: int = 2, align_corners: bool = True,
             activation: Literal["relu", "none"] = "relu") -> nn.Module:
    """Bilinear interpolation + 1x1 conv (+ ReLU): no learned upsampling, few parameters."""
    return InterpolateUp(in_channels, out_channels, scale, "bilinear", align_corners, activation)


def nearest(in_channels: int, out_channels: int, scale: int = 2,
            activation: Literal["relu", "none"] = "relu") -> nn.Module:
    """Nearest-neighbour interpolation + 1x1 conv (+ ReLU)."""
    return InterpolateUp(in_channels, out_channels, scale, "nearest", None, activation)


def transpose(in_channels: int, out_channels: int, scale: int = 2) -> nn.Module:
    """Learned 2x2 transposed convolution with stride 2 (the U-Net paper's up-conv)."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=scale, stride=scale)


class PixelShuffleUp(nn.Module):
    """Sub-pixel convolution: 1x1 conv to out*scale^2 channels, then PixelShuffle (ICNR-initialised)."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2, icnr: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels * scale * scale, 1)
        self.shuffle = nn.PixelShuffle(scale)
        if icnr:  # every sub-pixel starts equal: no checkerboard at initialisation (Aitken et al. 2017)
            with torch.no_grad():
                base = torch.empty(out_channels, in_channels, 1, 1)
                nn.init.kaiming_normal_(base)
                self.conv.weight.copy_(base.repeat_interleave(scale * scale, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


@unetlab.hookimpl
def register_upsamplers(register):
    register("bilinear", bilinear)
    register("nearest", nearest)
    register("transpose", transpose)
    register("pixel_shuffle", PixelShuffleUp)
