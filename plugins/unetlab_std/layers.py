"""Small building blocks shared by the standard components (norms, activations, conv units)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "instance", "group", "none"]
Activation = Literal["relu", "leaky_relu", "elu", "gelu", "silu"]
Padding = Literal["same", "valid"]


def make_norm(norm: Norm, channels: int, groups: int = 8) -> nn.Module:
    """A normalisation layer for ``channels`` feature maps (``none`` gives an identity)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return nn.GroupNorm(g, channels)
    return nn.Identity()


def make_activation(activation: Activation) -> nn.Module:
    """An activation module by name."""
    return {
        "relu": lambda: nn.ReLU(inplace=True),
        "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
        "elu": lambda: nn.ELU(inplace=True),
        "gelu": nn.GELU,
        "silu": lambda: nn.SiLU(inplace=True),
    }[activation]()


def conv_norm_act(in_channels: int, out_channels: int, padding: Padding = "same", norm: Norm = "batch",
                  activation: Activation = "relu", conv_bias: bool = True, groups: int = 8) -> nn.Sequential:
    """3x3 conv -> norm -> activation; ``valid`` padding shrinks each side by one pixel."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1 if padding == "same" else 0, bias=conv_bias),
        make_norm(norm, out_channels, groups),
        make_activation(activation),
    )


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> activation) x 2, the U-Net's unit of work at every level."""

    def __init__(self, in_channels: int, out_channels: int, padding: Padding = "same", norm: Norm = "batch",
                 activation: Activation = "relu", conv_bias: bool = True, groups: int = 8,
                 mid_channels: int | None = None) -> None:
        mid = mid_channels or out_channels
        super().__init__(
            conv_norm_act(in_channels, mid, padding, norm, activation, conv_bias, groups),
            conv_norm_act(mid, out_channels, padding, norm, activation, conv_bias, groups),
        )


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the spatial centre of ``x`` to ``height`` x ``width`` (the paper's "copy and crop")."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a shortcut (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, padding: Padding = "same",
                 norm: Norm = "batch", activation: Activation = "relu", groups: int = 8) -> None:
        super().__init__()
        pad = 1 if padding == "same" else 0
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=pad, bias=norm == "none")
        self.norm1 = make_norm(norm, out_channels, groups)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=pad, bias=norm == "none")
        self.norm2 = make_norm(norm, out_channels, groups)
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=norm == "none"),
                make_norm(norm, out_channels, groups),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.shortcut(x)
        if shortcut.shape[-2:] != y.shape[-2:]:  # valid padding shrinks the main path
            shortcut = center_crop(shortcut, y.shape[-2], y.shape[-1])
        return self.act2(y + shortcut)
