"""Standard decoder blocks. Contract: built from (in_channels, out_channels, padding); applied after
each fusion; ``valid`` padding shrinks the map as the encoder's convs do."""

from __future__ import annotations

from typing import Annotated

from torch import nn

import unetlab
from unetlab.plugin_api.params import Range

from .layers import Activation, BasicBlock, DoubleConv, Norm, Padding


def double_conv(in_channels: int, out_channels: int, padding: Padding = "same", norm: Norm = "batch",
                conv_bias: bool = True, activation: Activation = "relu",
                groups: Annotated[int, Range(1, 1024)] = 8) -> nn.Module:
    """(3x3 conv -> norm -> activation) x 2, as in the U-Net paper and the seed blog."""
    return DoubleConv(in_channels, out_channels, padding, norm, activation, conv_bias, groups)


def residual(in_channels: int, out_channels: int, padding: Padding = "same", norm: Norm = "batch",
             activation: Activation = "relu", groups: Annotated[int, Range(1, 1024)] = 8) -> nn.Module:
    """A ResNet basic block (two 3x3 convs + projected shortcut)."""
    return BasicBlock(in_channels, out_channels, 1, padding, norm, activation, groups)


@unetlab.hookimpl
def register_blocks(register):
    register("double_conv", double_conv)
    register("residual", residual)
