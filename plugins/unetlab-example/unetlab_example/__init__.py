"""unetlab-example: one component of every kind, registered through the ``unetlab`` entry point group."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import unetlab

__version__ = "0.1.0"


# --- encoder: a torchvision-style ResNet backbone ---------------------------------------------------

class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """ResNet-style backbone: stride-2 stem, then basic-block stages (strides 2, 4, 8, ...)."""

    def __init__(self, in_channels: int, width: int = 16, stages: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.out_channels = [width * 2 ** i for i in range(stages)]
        self.strides = [2 * 2 ** i for i in range(stages)]
        self.stages = nn.ModuleList(_Basic(width if i == 0 else self.out_channels[i - 1], c, 1 if i == 0 else 2)
                                    for i, c in enumerate(self.out_channels))

    def forward(self, x):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


# --- upsampler, fusion, block ----------------------------------------------------------------------

def resize_conv(in_channels: int, out_channels: int, scale: int = 2) -> nn.Module:
    """Nearest upsampling + 3x3 conv (no checkerboard artefacts, Odena et al. 2016)."""
    return nn.Sequential(nn.Upsample(scale_factor=scale, mode="nearest"),
                         nn.Conv2d(in_channels, out_channels, 3, padding=1))


class MaxFusion(nn.Module):
    """Element-wise maximum of the projected skip and the upsampled map."""

    def __init__(self, skip_channels: int, up_channels: int) -> None:
        super().__init__()
        self.out_channels = up_channels
        self.project = nn.Conv2d(skip_channels, up_channels, 1)

    def forward(self, skip, up):
        return torch.maximum(self.project(skip), up)


class SEDoubleConv(nn.Module):
    """Double 3x3 conv followed by squeeze-and-excitation channel attention (Hu et al. 2018)."""

    def __init__(self, in_channels: int, out_channels: int, padding: str = "same", reduction: int = 4) -> None:
        super().__init__()
        pad = 1 if padding == "same" else 0
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=pad), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=pad), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        hidden = max(out_channels // reduction, 1)
        self.excite = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_channels, hidden, 1), nn.ReLU(inplace=True),
                                    nn.Conv2d(hidden, out_channels, 1), nn.Sigmoid())

    def forward(self, x):
        y = self.body(x)
        return y * self.excite(y)


def orthogonal(gain: float = 1.0):
    """Orthogonal conv weights, zero biases."""
    def init(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.orthogonal_(m.weight, gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return init


# --- loss, metric -----------------------------------------------------------------------------------

class OHEMBCE(nn.Module):
    """Binary cross-entropy averaged over the hardest fraction of pixels (online hard example mining)."""

    def __init__(self, num_classes: int, fraction: float = 0.25) -> None:
        super().__init__()
        self.fraction = fraction

    def forward(self, logits, target):
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        truth = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype) if logits.shape[1] > 1 \
            else (target == 1).to(logits.dtype)[:, None]
        per_pixel = F.binary_cross_entropy_with_logits(logits, truth, reduction="none").flatten()
        k = max(1, math.ceil(self.fraction * per_pixel.numel()))
        return per_pixel.topk(k).values.mean()


class VolumeSimilarity:
    """Volume similarity 1 - |FP - FN| / (2TP + FP + FN) of the foreground, over the whole set."""

    def __init__(self, num_classes: int) -> None:
        self.reset()

    def reset(self) -> None:
        self.tp = self.fp = self.fn = 0.0

    def update(self, logits, target) -> None:
        pred = (logits[:, 0] > 0) if logits.shape[1] == 1 else logits.argmax(1) > 0
        truth = target > 0
        self.tp += float((pred & truth).sum())
        self.fp += float((pred & ~truth).sum())
        self.fn += float((~pred & truth).sum())

    def compute(self) -> dict[str, float]:
        denominator = 2 * self.tp + self.fp + self.fn
        return {"volume_similarity": 1.0 if denominator == 0 else 1 - abs(self.fp - self.fn) / denominator}


# --- dataset, augmentation --------------------------------------------------------------------------

class StripesSource:
    """Stripes at a random angle; the mask is one band of them."""

    def __init__(self, seed: int, image_size: int, counts: dict[str, int]) -> None:
        self.in_channels, self.num_classes, self.image_size = 1, 2, (image_size, image_size)
        self._data = {}
        for i, (split, n) in enumerate(counts.items()):
            rng = np.random.default_rng([seed, i])
            yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
            images, masks = [], []
            for _ in range(n):
                angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 6)
                u = np.cos(angle) * xx + np.sin(angle) * yy
                band = (u > rng.uniform(0.2, 0.5)) & (u < rng.uniform(0.6, 0.9))
                image = 0.5 + 0.3 * np.sin(2 * np.pi * freq * u) + 0.3 * band + 0.1 * rng.standard_normal(u.shape)
                images.append(image[None].astype(np.float32))
                masks.append(band.astype(np.int64))
            self._data[split] = TensorDataset(
                torch.from_numpy(np.stack(images)) if n else torch.empty(0, 1, image_size, image_size),
                torch.from_numpy(np.stack(masks)) if n else torch.empty(0, image_size, image_size, dtype=torch.long))

    def split(self, name: str):
        return self._data[name]


def stripes(seed: int = 0, image_size: int = 32, n_train: int = 64, n_val: int = 16, n_test: int = 0) -> StripesSource:
    """Synthetic oriented stripes; the mask is one band of them."""
    return StripesSource(seed, image_size, {"train": n_train, "val": n_val, "test": n_test})


def gaussian_noise(p: float = 0.5, std: float = 0.05):
    """Add Gaussian noise to the image (masks untouched)."""
    def augment(images, masks, generator):
        apply = (torch.rand(images.shape[0], generator=generator, device=images.device) < p)[:, None, None, None]
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype) * std
        return torch.where(apply, images + noise, images), masks
    return augment


# --- registration -----------------------------------------------------------------------------------

@unetlab.hookimpl
def register_encoders(register):
    register("tiny_resnet", TinyResNet)


@unetlab.hookimpl
def register_upsamplers(register):
    register("resize_conv", resize_conv)


@unetlab.hookimpl
def register_fusions(register):
    register("max", MaxFusion)


@unetlab.hookimpl
def register_blocks(register):
    register("se_double_conv", SEDoubleConv)


@unetlab.hookimpl
def register_initializers(register):
    register("orthogonal", orthogonal)


@unetlab.hookimpl
def register_losses(register):
    register("ohem_bce", OHEMBCE)


@unetlab.hookimpl
def register_metrics(register):
    register("volume_similarity", VolumeSimilarity, direction="max")


@unetlab.hookimpl
def register_datasets(register):
    register("stripes", stripes)


@unetlab.hookimpl
def register_augmentations(register):
    register("gaussian_noise", gaussian_noise)
