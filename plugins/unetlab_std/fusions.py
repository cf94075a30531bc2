"""Standard skip fusions. Contract: built from (skip_channels, up_channels); ``forward(skip, up)``
combines two maps of equal spatial size; the module declares ``out_channels``."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
from torch import nn

import unetlab
from unetlab.plugin_api.params import Range


class ConcatFusion(nn.Module):
    """Concatenate skip and upsampled maps along channels (the U-Net's choice)."""

    def __init__(self, skip_channels: int, up_channels: int) -> None:
        super().__init__()
        self.out_channels = skip_channels + up_channels

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.cat([skip, up], dim=1)


class AddFusion(nn.Module):
    """Add skip to the upsampled map (FCN/ResNet style); a 1x1 conv projects the skip when channels differ."""

    def __init__(self, skip_channels: int, up_channels: int) -> None:
        super().__init__()
        self.out_channels = up_channels
        self.project = nn.Identity() if skip_channels == up_channels else nn.Conv2d(skip_channels, up_channels, 1)

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.project(skip) + up


class AttentionFusion(nn.Module):
    """Attention gate (Oktay et al. 2018): the upsampled map gates the skip, then both are concatenated."""

    def __init__(self, skip_channels: int, up_channels: int,
                 inter_channels: Optional[Annotated[int, Range(1, 65536)]] = None,
                 norm: bool = True) -> None:
        super().__init__()
        inter = inter_channels or max(skip_channels // 2, 1)
        self.out_channels = skip_channels + up_channels

        def proj(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=not norm),
                                 nn.BatchNorm2d(cout) if norm else nn.Identity())

        self.theta_x = proj(skip_channels, inter)
        self.phi_g = proj(up_channels, inter)
        self.psi = nn.Sequential(nn.ReLU(inplace=True), proj(inter, 1), nn.Sigmoid())

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        alpha = self.psi(self.theta_x(skip) + self.phi_g(up))  # N x 1 x H x W attention coefficients
        return torch.cat([skip * alpha, up], dim=1)


class NoFusion(nn.Module):
    """Drop the skip entirely (an ablation: an encoder-decoder without skip connections)."""

    def __init__(self, skip_channels: int, up_channels: int) -> None:
        super().__init__()
        self.out_channels = up_channels

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return up


@unetlab.hookimpl
def register_fusions(register):
    register("concat", ConcatFusion)
    register("add", AddFusion)
    register("attention", AttentionFusion)
    register("none", NoFusion)
