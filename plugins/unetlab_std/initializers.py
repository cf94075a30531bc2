"""Standard weight initialisers: each returns a callable that initialises a model in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import nn

import unetlab

_CONVS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def default() -> Callable[[nn.Module], None]:
    """PyTorch's own initialisation (leave the weights as built)."""
    return lambda model: None


def kaiming(mode: Literal["fan_in", "fan_out"] = "fan_out",
            nonlinearity: Literal["relu", "leaky_relu"] = "relu") -> Callable[[nn.Module], None]:
    """He initialisation (normal) of conv weights, zero biases."""
    def apply(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, _CONVS):
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity=nonlinearity)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return apply


def xavier(gain: float = 1.0) -> Callable[[nn.Module], None]:
    """Glorot initialisation (normal) of conv weights, zero biases: the seed blog's choice."""
    def apply(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, _CONVS):
                nn.init.xavier_normal_(m.weight, gain=gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return apply


@unetlab.hookimpl
def register_initializers(register):
    register("default", default)
    register("kaiming", kaiming)
    register("xavier", xavier)
