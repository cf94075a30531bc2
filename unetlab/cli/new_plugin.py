"""``unetlab new-plugin NAME``: a plugin project that installs and passes its own tests as generated."""

from __future__ import annotations

import re
from pathlib import Path

from unetlab.errors import UnetlabError

__all__ = ["scaffold_plugin"]

PYPROJECT = '''[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A unetlab plugin"
requires-python = ">=3.10"
dependencies = ["{requirement}"]  # the unetlab minor versions this plugin was written for

[project.optional-dependencies]
test = ["pytest"]

[project.entry-points.unetlab]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
'''

README = '''# {dist}

A [unetlab](https://pypi.org/project/unetlab/) plugin. One example component of every kind lives in
`{module}/__init__.py`; keep the kinds you need and delete the rest.

```bash
pip install -e ".[test]"     # in the environment where unetlab is installed
unetlab plugins              # lists {module} and its components
pytest                       # unetlab's conformance kit checks every component
```

Use the components in an experiment file, e.g. `model: {{fusion: {name}_mean}}`.
'''

MODULE = '''"""{dist}: unetlab components, registered through the ``unetlab`` entry point group."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import unetlab

# The unetlab plugin API versions this plugin was written for: a unetlab outside them refuses it with one line.
UNETLAB_PLUGIN_API = "{api_range}"


class Encoder(nn.Module):
    """Two 3x3 convs per level, max-pooling between levels."""

    def __init__(self, in_channels: int, depth: int = 3, width: int = 8) -> None:
        super().__init__()
        self.out_channels = [width * 2 ** i for i in range(depth)]
        self.strides = [2 ** i for i in range(depth)]
        self.levels = nn.ModuleList()
        previous = in_channels
        for channels in self.out_channels:
            self.levels.append(nn.Sequential(nn.Conv2d(previous, channels, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()))
            previous = channels

    def forward(self, x):
        features = []
        for i, level in enumerate(self.levels):
            x = level(F.max_pool2d(x, 2) if i else x)
            features.append(x)
        return features


def upsampler(in_channels: int, out_channels: int, scale: int = 2) -> nn.Module:
    """Bilinear upsampling and a 3x3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False),
                         nn.Conv2d(in_channels, out_channels, 3, padding=1))


class MeanFusion(nn.Module):
    """The mean of the projected skip and the upsampled map."""

    def __init__(self, skip_channels: int, up_channels: int) -> None:
        super().__init__()
        self.out_channels = up_channels
        self.project = nn.Conv2d(skip_channels, up_channels, 1)

    def forward(self, skip, up):
        return (self.project(skip) + up) / 2


def block(in_channels: int, out_channels: int, padding: str = "same") -> nn.Module:
    """One 3x3 conv + ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1 if padding == "same" else 0), nn.ReLU())


def initializer(std: float = 0.02):
    """Normal conv weights with the given std, zero biases."""
    def init(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return init


def loss(num_classes: int, smooth: float = 1.0):
    """Soft Dice loss over the foreground (or over every class)."""
    def dice(logits, target):
        logits = logits.float()
        if logits.shape[1] == 1:
            probs, truth = torch.sigmoid(logits), (target == 1).float()[:, None]
        else:
            probs = torch.softmax(logits, 1)
            truth = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
        inter = (probs * truth).sum((0, 2, 3))
        total = probs.sum((0, 2, 3)) + truth.sum((0, 2, 3))
        return 1 - ((2 * inter + smooth) / (total + smooth)).mean()
    return dice


class PixelError:
    """Fraction of misclassified pixels over the whole set (lower is better: registered with direction="min").

    Keys of ``compute()``: the registered name, optionally ``<name>_c<k>`` per class k.
    """

    key = "{name}_pixel_error"

    def __init__(self, num_classes: int) -> None:
        self.reset()

    def reset(self) -> None:
        self.wrong = self.total = 0

    def update(self, logits, target) -> None:
        pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        self.wrong += int((pred != target).sum())
        self.total += target.numel()

    def compute(self) -> dict[str, float]:
        return {{self.key: self.wrong / self.total if self.total else 0.0}}


class SquaresSource:
    """Bright squares on noise; the mask is the squares."""

    def __init__(self, seed: int, image_size: int, counts: dict) -> None:
        self.in_channels, self.num_classes, self.image_size = 1, 2, (image_size, image_size)
        self.splits = {{}}
        for i, (split, n) in enumerate(counts.items()):
            rng = np.random.default_rng([seed, i])
            masks = np.zeros((n, image_size, image_size), np.int64)
            for mask in masks:
                y, x = rng.integers(0, image_size // 2, 2)
                side = int(rng.integers(4, image_size // 2))
                mask[y:y + side, x:x + side] = 1
            images = (masks[:, None] * 0.8 + 0.2 * rng.standard_normal((n, 1, image_size, image_size)))
            self.splits[split] = TensorDataset(torch.from_numpy(images.astype(np.float32)), torch.from_numpy(masks))

    def split(self, name: str):
        return self.splits[name]


def dataset(seed: int = 0, image_size: int = 32, n_train: int = 32, n_val: int = 8, n_test: int = 0):
    """Bright squares on noise."""
    return SquaresSource(seed, image_size, {{"train": n_train, "val": n_val, "test": n_test}})


def augmentation(p: float = 0.5):
    """Swap height and width (a transpose) of image and mask together."""
    def augment(images, masks, generator):
        if images.shape[-1] != images.shape[-2]:
            return images, masks
        apply = torch.rand(images.shape[0], generator=generator, device=images.device) < p
        return (torch.where(apply[:, None, None, None], images.transpose(-1, -2), images),
                torch.where(apply[:, None, None], masks.transpose(-1, -2), masks))
    return augment


@unetlab.hookimpl
def register_encoders(register):
    register("{name}_encoder", Encoder)


@unetlab.hookimpl
def register_upsamplers(register):
    register("{name}_up", upsampler)


@unetlab.hookimpl
def register_fusions(register):
    register("{name}_mean", MeanFusion)


@unetlab.hookimpl
def register_blocks(register):
    register("{name}_block", block)


@unetlab.hookimpl
def register_initializers(register):
    register("{name}_normal", initializer)


@unetlab.hookimpl
def register_losses(register):
    register("{name}_dice", loss)


@unetlab.hookimpl
def register_metrics(register):
    register(PixelError.key, PixelError, direction="min")


@unetlab.hookimpl
def register_datasets(register):
    register("{name}_squares", dataset)


@unetlab.hookimpl
def register_augmentations(register):
    register("{name}_transpose", augmentation)
'''

TEST = '''"""Every component of {module} honours its kind's contract (unetlab's conformance kit)."""

import pytest

from unetlab import check_component, components_of


@pytest.mark.parametrize("kind, name", components_of("{module}"))
def test_component_honours_its_contract(kind, name):
    check_component(kind, name)
'''


def scaffold_plugin(name: str, directory: str | Path = ".") -> Path:
    """Write the project ``unetlab-NAME`` (package ``unetlab_NAME``) under ``directory``; return its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UnetlabError(f"new-plugin: '{name}' is not a valid plugin name (lowercase letters, digits and _, "
                           "starting with a letter)")
    dist, module = f"unetlab-{name.replace('_', '-')}", f"unetlab_{name}"
    root = Path(directory) / dist
    if root.exists():
        raise UnetlabError(f"new-plugin: '{root}' already exists; choose another name or directory")
    from unetlab import __version__
    from unetlab.plugin_api.hookspecs import PLUGIN_API_VERSION

    major, minor = (int(part) for part in re.findall(r"\d+", __version__)[:2] or (0, 0))
    values = {"name": name, "dist": dist, "module": module,
              "requirement": f"unetlab>={major}.{minor},<{major}.{minor + 1}",
              "api_range": f">={PLUGIN_API_VERSION},<{PLUGIN_API_VERSION + 1}"}
    files = {root / "pyproject.toml": PYPROJECT, root / "README.md": README, root / module / "__init__.py": MODULE,
             root / "tests" / "test_conformance.py": TEST}
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
    return root
