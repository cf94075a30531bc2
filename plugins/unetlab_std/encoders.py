"""Standard encoders: ``classic`` (the U-Net paper's) and ``residual`` (ResNet basic blocks).

Encoder contract: ``forward(x)`` returns a list of feature maps from finest to coarsest; the module
declares ``out_channels`` (per stage), ``strides`` (each stage's downsampling factor, doubling from
stage to stage) and ``padding`` (``same`` or ``valid``, passed on to the decoder blocks).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

import unetlab
from unetlab.plugin_api.params import Range

from .layers import Activation, BasicBlock, DoubleConv, Norm, Padding, make_activation, make_norm


def level_channels(depth: int, base_channels: int, channel_multiplier: float) -> list[int]:
    """Channels per level: base, base*m, base*m^2, ... (rounded)."""
    return [int(round(base_channels * channel_multiplier ** i)) for i in range(depth)]


def _per_level(value: float | list[float], depth: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * depth
    if len(value) != depth:
        raise ValueError(f"{name} needs one value per level ({depth}), got {len(value)}")
    return [float(v) for v in value]


class ClassicEncoder(nn.Module):
    """Double 3x3 conv per level with 2x2 max-pooling between levels (Ronneberger et al. 2015)."""

    def __init__(self, in_channels: int, depth: Annotated[int, Range(1, 8)] = 5,
                 base_channels: Annotated[int, Range(1, 4096)] = 64,
                 channel_multiplier: Annotated[float, Range(0, 16, min_exclusive=True)] = 2.0,
                 norm: Norm = "batch", conv_bias: bool = True, padding: Padding = "same",
                 activation: Activation = "relu", dropout: float | list[float] = 0.0,
                 groups: Annotated[int, Range(1, 1024)] = 8) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.out_channels = level_channels(depth, base_channels, channel_multiplier)
        self.strides = [2 ** i for i in range(depth)]
        self.padding = padding
        rates = _per_level(dropout, depth, "dropout")
        self.pool = nn.MaxPool2d(2)
        self.levels = nn.ModuleList()
        self.dropouts = nn.ModuleList()
        prev = in_channels
        for channels, rate in zip(self.out_channels, rates):
            self.levels.append(DoubleConv(prev, channels, padding, norm, activation, conv_bias, groups))
            # The seed U-Net drops whole feature maps on the deepest levels; what is dropped is also
            # what the skip carries, as in its code.
            self.dropouts.append(nn.Dropout2d(rate) if rate > 0 else nn.Identity())
            prev = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, (level, drop) in enumerate(zip(self.levels, self.dropouts)):
            if i:
                x = self.pool(x)
            x = drop(level(x))
            features.append(x)
        return features


class ResidualEncoder(nn.Module):
    """ResNet-style encoder: a 3x3 stem, then basic blocks per level, stride-2 blocks between levels."""

    def __init__(self, in_channels: int, depth: Annotated[int, Range(1, 8)] = 5,
                 base_channels: Annotated[int, Range(1, 4096)] = 32,
                 channel_multiplier: Annotated[float, Range(0, 16, min_exclusive=True)] = 2.0,
                 blocks_per_level: Annotated[int, Range(1, 64)] = 2, norm: Norm = "batch",
                 activation: Activation = "relu", groups: Annotated[int, Range(1, 1024)] = 8) -> None:
        super().__init__()
        if depth < 1 or blocks_per_level < 1:
            raise ValueError("depth and blocks_per_level must be >= 1")
        self.out_channels = level_channels(depth, base_channels, channel_multiplier)
        self.strides = [2 ** i for i in range(depth)]
        self.padding = "same"
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, base_channels, 3, padding=1, bias=norm == "none"),
            make_norm(norm, base_channels, groups), make_activation(activation))
        self.levels = nn.ModuleList()
        prev = base_channels
        for i, channels in enumerate(self.out_channels):
            blocks = [BasicBlock(prev, channels, stride=1 if i == 0 else 2, norm=norm, activation=activation,
                                 groups=groups)]
            blocks += [BasicBlock(channels, channels, norm=norm, activation=activation, groups=groups)
                       for _ in range(blocks_per_level - 1)]
            self.levels.append(nn.Sequential(*blocks))
            prev = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


@unetlab.hookimpl
def register_encoders(register):
    register("classic", ClassicEncoder)
    register("residual", ResidualEncoder)
