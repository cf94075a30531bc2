"""The conformance kit: every first-party component passes it, and broken ones fail with the contract named."""

from __future__ import annotations

import pytest
import torch

import unetlab
from unetlab.plugin_api.conformance import ContractError, check_component, components_of
from unetlab.plugin_api.host import PluginHost, module_from_functions

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
        return {"bad": sum(self.values) / len(self.values)}


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
    direction = "max" if kind == "metric" else None
    host.register(module_from_functions("broken_plugin", **{
        hook: lambda register: register("bad", factory, direction=direction)}))
    with pytest.raises(ContractError) as info:
        check_component(kind, "bad", registry=host.registry)
    message = str(info.value)
    assert message.startswith(f"{kind} 'bad' (plugin broken_plugin) breaks the {kind} contract {contract}"), message


# --- semantic mistakes, each in a small local plugin file as a plugin author would write it ------------

BUGGY_PLUGIN = '''
import torch
import torch.nn.functional as F
import unetlab


def _soft_dice(logits, target, classes):
    logits = logits.float()
    if logits.shape[1] == 1:
        probs = torch.cat([1 - torch.sigmoid(logits), torch.sigmoid(logits)], 1)
    else:
        probs = torch.softmax(logits, 1)
    truth = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * truth).sum((0, 2, 3))[classes]
    total = (probs + truth).sum((0, 2, 3))[classes]
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


def flipped(num_classes: int):
    """Cross-entropy with its sign flipped."""
    def loss(logits, target):
        logits = logits.float()
        if logits.shape[1] == 1:
            return -F.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).float())
        return -F.cross_entropy(logits, target)
    return loss


def background_dice(num_classes: int):
    """Soft Dice over class 0 only (the background)."""
    return lambda logits, target: _soft_dice(logits, target, [0])


def no_upcast(num_classes: int):
    """Binary cross-entropy in the logits' own dtype."""
    def loss(logits, target):
        if logits.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).to(logits.dtype))
        return F.cross_entropy(logits, target)
    return loss


def sigmoid_only(num_classes: int):
    """Binary cross-entropy on channel 0, whatever the number of channels."""
    return lambda logits, target: F.binary_cross_entropy_with_logits(logits[:, 0].float(), (target == 1).float())


class Counts:
    """Foreground pixel agreement."""

    key = "counts"

    def __init__(self, num_classes: int, include_background: bool = False):
        self.num_classes, self.include_background = num_classes, include_background
        self.reset()

    def reset(self):
        self.hit = self.total = 0

    def predict(self, logits):
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)

    def update(self, logits, target):
        pred = self.predict(logits)
        self.hit += int(((pred == target) & (target > 0)).sum())
        self.total += int((target > 0).sum())

    def compute(self):
        return {self.key: self.hit / self.total if self.total else 1.0}


class ArgmaxOneChannel(Counts):
    """Takes argmax over the channels, even with one channel."""

    key = "argmax_one_channel"

    def predict(self, logits):
        return logits.argmax(1)


class Misnamed(Counts):
    """Returns its per-class values under the wrong names."""

    def compute(self):
        return {"misnamed": self.hit / self.total if self.total else 1.0, "misnamed_class1": 0.5}


class Ignores(Counts):
    """Declares include_background and ignores it."""

    key = "ignores"


class WrongDirection(Counts):
    """Higher is better, registered as lower is better."""

    key = "wrong_direction"


@unetlab.hookimpl
def register_losses(register):
    register("flipped", flipped)
    register("background_dice", background_dice)
    register("no_upcast", no_upcast)
    register("sigmoid_only", sigmoid_only)
    register("sigmoid_only_declared", sigmoid_only, binary_only=True)


@unetlab.hookimpl
def register_metrics(register):
    register("argmax_one_channel", ArgmaxOneChannel, direction="max")
    register("misnamed", Misnamed, direction="max")
    register("ignores", Ignores, direction="max")
    register("wrong_direction", WrongDirection, direction="min")
'''


@pytest.fixture(scope="module")
def buggy(tmp_path_factory):
    """A fresh host with the buggy local plugin file loaded the way a plugin's own tests load it."""
    path = tmp_path_factory.mktemp("buggy") / "buggy_plugin.py"
    path.write_text(BUGGY_PLUGIN)
    host = PluginHost(autoload=False)
    found = components_of(str(path), host=host)
    assert ("loss", "flipped") in found and ("metric", "misnamed") in found
    return host


@pytest.mark.parametrize("kind, name, contract, words", [
    ("loss", "flipped", "[perfect beats inverted]", "sign flipped"),
    ("loss", "background_dice", "[foreground counts]", "background only"),
    ("loss", "no_upcast", "[float32 under bf16]", "torch.bfloat16"),
    ("loss", "sigmoid_only", "[perfect beats inverted]", "binary_only=True"),
    ("metric", "argmax_one_channel", "[perfect beats inverted]", "binary (1-channel)"),
    ("metric", "misnamed", "[key names]", "'misnamed_class1'"),
    ("metric", "ignores", "[parameters have an effect]", "include_background=True"),
    ("metric", "wrong_direction", "[perfect beats inverted]", "direction='min'"),
])
def test_semantic_mistakes_are_caught(buggy, kind, name, contract, words):
    with pytest.raises(ContractError) as info:
        check_component(kind, name, registry=buggy.registry)
    message = str(info.value)
    assert (message.startswith(f"{kind} '{name}' (plugin file:")
            and f"breaks the {kind} contract {contract}" in message), message
    assert words in message, message


def test_a_declared_binary_only_loss_passes(buggy):
    check_component("loss", "sigmoid_only_declared", registry=buggy.registry)
    assert buggy.registry.get("loss", "sigmoid_only_declared").binary_only


def test_components_of_accepts_module_entry_point_and_distribution():
    by_module = components_of("unetlab_std.metrics")
    assert ("metric", "hd95") in by_module
    host = unetlab.default_host()
    entry_point = host.plugins["unetlab_std.metrics"].entry_point
    assert components_of(entry_point) == by_module
    everything = components_of("unetlab")  # the distribution: all of its entry points
    assert set(by_module) < set(everything) and ("fusion", "concat") in everything


def test_components_of_a_broken_plugin_fails_with_the_reason(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("import unetlab\n\n@unetlab.hookimpl\ndef register_fusion(register):\n    pass\n")
    with pytest.raises(LookupError, match=r"'register_fusion', which is not a unetlab hook; did you mean "
                                          r"'register_fusions'\?"):
        components_of(str(path), host=PluginHost(autoload=False))
