"""Standard augmentations, applied in torch to whole training batches (on the GPU when training there).

Contract: ``factory(**params)`` returns ``augment(images, masks, generator) -> (images, masks)`` with
images N x C x H x W (float) and masks N x H x W (int64). Geometric ones move image and mask with
the same transform (masks sampled nearest, so classes never blend); photometric ones touch the image
only. Randomness comes only from ``generator``, so a seeded run augments identically every time.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F

import unetlab
from unetlab.plugin_api.params import Range

Batch = tuple[torch.Tensor, torch.Tensor]
Probability = Annotated[float, Range(0, 1)]


def _rand(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def _warp(images: torch.Tensor, masks: torch.Tensor, grid: torch.Tensor) -> Batch:
    """Sample image (bilinear) and mask (nearest) on the same grid, reflecting at the borders."""
    warped = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection",
                           align_corners=False)
    warped_masks = F.grid_sample(masks[:, None].float(), grid.float(), mode="nearest", padding_mode="reflection",
                                 align_corners=False)
    return warped, warped_masks[:, 0].round().long()


def _flip(dim: int, p: float):
    def augment(images, masks, generator):
        flip = _rand(images.shape[0], generator, images.device) < p
        return (torch.where(flip[:, None, None, None], images.flip(dim), images),
                torch.where(flip[:, None, None], masks.flip(dim), masks))
    return augment


def hflip(p: Probability = 0.5):
    """Flip left-right with probability p."""
    return _flip(-1, p)


def vflip(p: Probability = 0.5):
    """Flip up-down with probability p."""
    return _flip(-2, p)


def rot90(p: Probability = 0.75):
    """Rotate by a random multiple of 90 degrees with probability p (square images only)."""
    def augment(images, masks, generator):
        if images.shape[-1] != images.shape[-2]:
            raise ValueError("rot90 needs square images; use hflip/vflip for rectangular ones")
        n = images.shape[0]
        turns = torch.randint(1, 4, (n,), generator=generator, device=images.device)
        turns = torch.where(_rand(n, generator, images.device) < p, turns, torch.zeros_like(turns))
        # every turn computed and chosen per image with where: no host read of ``turns`` (a GPU sync per step)
        out_i, out_m = images, masks
        for k in (1, 2, 3):
            chosen = turns == k
            out_i = torch.where(chosen[:, None, None, None], torch.rot90(images, k, dims=(-2, -1)), out_i)
            out_m = torch.where(chosen[:, None, None], torch.rot90(masks, k, dims=(-2, -1)), out_m)
        return out_i, out_m
    return augment


def crop(size: Annotated[int, Range(1, 65536)]):
    """Random crop to size x size (the same window for image and mask; one window per batch)."""
    def augment(images, masks, generator):
        h, w = images.shape[-2:]
        if size > min(h, w):
            raise ValueError(f"crop size {size} is larger than the images ({h}x{w})")
        device = images.device
        # offsets stay on the device and the window is gathered with index_select: reading them on the
        # host (int(...)) would make the CPU wait for the GPU at every step
        top = torch.randint(0, h - size + 1, (1,), generator=generator, device=device)
        left = torch.randint(0, w - size + 1, (1,), generator=generator, device=device)
        window = torch.arange(size, device=device)
        rows, cols = top + window, left + window
        return (images.index_select(-2, rows).index_select(-1, cols),
                masks.index_select(-2, rows).index_select(-1, cols))
    return augment


def affine(p: Probability = 0.5, scale: list[float] = (0.8, 1.2),  # type: ignore[assignment]  # the registry reads this annotation as the parameter's allowed type; a tuple default is accepted
           degrees: float = 15.0):
    """Random zoom (scale range) and rotation (+-degrees) with probability p; borders reflected."""
    low, high = scale

    def augment(images, masks, generator):
        n, device = images.shape[0], images.device
        apply = _rand(n, generator, device) < p
        s = low + (high - low) * _rand(n, generator, device)
        a = (2 * _rand(n, generator, device) - 1) * math.radians(degrees)
        s = torch.where(apply, s, torch.ones_like(s))
        a = torch.where(apply, a, torch.zeros_like(a))
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(s)], 1),
                             torch.stack([sin, cos, torch.zeros_like(s)], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return _warp(images, masks, grid)
    return augment


def brightness_contrast(p: Probability = 0.5, brightness: float = 0.2, contrast: float = 0.2):
    """Image only: add a random offset (+-brightness) and scale around the mean (1 +- contrast)."""
    def augment(images, masks, generator):
        n, device = images.shape[0], images.device
        apply = (_rand(n, generator, device) < p)[:, None, None, None]
        offset = ((2 * _rand(n, generator, device) - 1) * brightness)[:, None, None, None]
        factor = (1 + (2 * _rand(n, generator, device) - 1) * contrast)[:, None, None, None]
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        changed = (images - mean) * factor + mean + offset
        return torch.where(apply, changed, images), masks
    return augment


def elastic(p: Probability = 0.5, alpha: float = 10.0, sigma: float = 4.0):
    """Elastic deformation (the U-Net paper's key augmentation): a smooth random displacement field.

    Displacements are Gaussian noise smoothed with std ``sigma`` pixels, scaled so that ``alpha`` is
    their typical size in pixels.
    """
    def augment(images, masks, generator):
        n, _, h, w = images.shape
        device = images.device
        noise = torch.randn(n, 2, h, w, generator=generator, device=device)
        radius = max(1, int(3 * sigma))
        x = torch.arange(-radius, radius + 1, device=device, dtype=noise.dtype)
        kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
        kernel = kernel / kernel.sum()
        smooth = F.conv2d(F.pad(noise.reshape(-1, 1, h, w), [radius] * 4, mode="reflect"), kernel.view(1, 1, 1, -1))
        smooth = F.conv2d(smooth, kernel.view(1, 1, -1, 1)).reshape(n, 2, h, w)
        smooth = smooth / smooth.flatten(1).std(dim=1).clamp_min(1e-8)[:, None, None, None]
        apply = (_rand(n, generator, device) < p)[:, None, None, None]
        displacement = torch.where(apply, smooth * alpha, torch.zeros_like(smooth))
        # pixels -> normalised grid units (align_corners=False: the image spans 2 units over W pixels)
        dx, dy = displacement[:, 0] * 2 / w, displacement[:, 1] * 2 / h
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=device)
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx[None] + dx, gy[None] + dy], dim=-1)
        return _warp(images, masks, grid)
    return augment


@unetlab.hookimpl
def register_augmentations(register):
    register("hflip", hflip)
    register("vflip", vflip)
    register("rot90", rot90)
    register("crop", crop)
    register("affine", affine)
    register("brightness_contrast", brightness_contrast)
    register("elastic", elastic)
