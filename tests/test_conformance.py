"""The conformance kit: every first-party component passes it, and broken ones fail with the contract named."""

from __future__ import annotations

import pytest
import torch

import unetlab
from unetlab.plugins import PluginHost, module_from_functions
from unetlab.testing import ContractError, check_component, components_of

REGISTRY = unetlab.default_host().registry
SMALL = {  # required or heavy parameters of first-party components, kept small here
    ("dataset", "shapes"): {"n_train": 4, "n_val": 2, "image_size": 32},
    ("dataset", "blobs"): {"n_train": 4, "n_val": 2, "image_size": 32},
    ("augmentation", "crop"): {"size": 16},
    ("encoder", "classic"): {"depth": 3, "base_channels": 4},
    ("encoder", "residual"): {"depth": 3, "base_channels": 4},
}
ALL = [(c.kind, c.name) for c in REGISTRY if c.plugin.startswith("unetlab_std.")]


@pytest.mark.parametrize("kind, name", ALL, ids=[f"{k}-{n}" for k, n in ALL])
def test_first_party_components_pass(kind, name, tmp_path):
    params = dict(SMALL.get((kind, name), {}))
    if (kind, name) == ("dataset", "folder"):
        from test_data import write_folder

        write_folder(tmp_path / "d", ["a", "b", "c"])
        params = {"root": str(tmp_path / "d"), "val_fraction": 0.34}
    check_component(kind, name, **params)


def test_components_of_lists_a_plugins_components():
    assert ("fusion", "concat") in components_of("unetlab_std.fusions")
    with pytest.raises(LookupError, match="registers no components"):
        components_of("no_such_plugin")


class WrongChannels(torch.nn.Module):
    """Declares one thing, returns another."""

    def __init__(self, skip_channels: int, up_channels: int):
        super().__init__()
        self.out_channels = up_channels

    def forward(self, skip, up):
        return torch.cat([skip, up], 1)


class NotShrinking(torch.nn.Module):
    """Claims to double the size but does not."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.conv(x)


def constant_loss(num_classes: int):
    """A loss that cannot be optimised."""
    return lambda logits, target: (logits * 0).sum() + 1.0


class BatchMean:
    """Averages per-batch ratios: the bias the kit must catch."""

    def __init__(self, num_classes: int):
        self.reset()

    def reset(self):
        self.values = []

    def update(self, logits, target):
        self.values.append((logits.argmax(1) == target).float().mean().item() * (1 + 0.1 * len(self.values)))

    def compute(self):
        return {"odd": sum(self.values) / len(self.values)}


def untyped_upsampler(in_channels, out_channels, scale, factor=2):
    """An upsampler whose parameter has no type."""
    return torch.nn.Sequential(torch.nn.Upsample(scale_factor=scale), torch.nn.Conv2d(in_channels, out_channels, 1))


def misaligned_flip(p: float = 1.0):
    """Flips the image but not the mask."""
    return lambda images, masks, generator: (images.flip(-1), masks.flip(-2))


@pytest.mark.parametrize("kind, factory, contract", [
    ("fusion", WrongChannels, "[out_channels]"),
    ("upsampler", NotShrinking, "[doubles the size]"),
    ("loss", constant_loss, "[decreases]"),
    ("metric", BatchMean, "[accumulates over the whole set]"),
    ("upsampler", untyped_upsampler, "[parameters declared]"),
    ("augmentation", misaligned_flip, "[image and mask aligned]"),
])
def test_broken_components_fail_naming_the_contract(kind, factory, contract):
    host = PluginHost(autoload=False)
    hook = unetlab.KINDS[kind].hook
    host.register(module_from_functions("broken_plugin", **{hook: lambda register: register("bad", factory)}))
    with pytest.raises(ContractError) as info:
        check_component(kind, "bad", registry=host.registry)
    message = str(info.value)
    assert message.startswith(f"{kind} 'bad' (plugin broken_plugin) breaks the {kind} contract {contract}"), message
