"""Training on patches of images of any size, and the datasets a folder source hands to the trainer.

``SampleStore`` holds a split's decoded samples (memory-mapped cache files, or arrays in RAM for small
sets) and reads any window of them, padded where it leaves the image: padded image pixels are 0 and
padded mask pixels are ``IGNORE_INDEX``, which losses (``ignore_index``) and metrics leave out.

- ``PatchDataset``: one random patch per image and epoch; a share ``foreground_oversample`` of the
  patches is centred on a random foreground pixel (nnU-Net forces a third). The position is drawn from
  a seed the ``PatchSampler`` gives with each index, so patches depend on (run seed, epoch) only, not
  on the number of DataLoader workers.
- ``TileDataset``: every image cut into a grid of patch-sized tiles (validation on patches: every
  pixel counted once).
- ``WholeImageDataset``: whole images (same-size sets batch them as before).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import EpochSampler
from .folder_cache import Entry
from .normalization import apply_normalization, image_spec, per_image

__all__ = [
    "IGNORE_INDEX",
    "PatchDataset",
    "PatchSampler",
    "SampleStore",
    "TileDataset",
    "WholeImageDataset",
    "draw_seed",
    "patch_origin",
]

IGNORE_INDEX = 255
"""Mask value of pixels that count nowhere: padding, and 255 in class-index or palette masks (as in VOC)."""


def draw_seed(epoch_seed: int, position: int) -> int:
    """The seed of the patch drawn at ``position`` of an epoch's order."""
    return (epoch_seed * 6_364_136_223_846_793_005 + position * 1_442_695_040_888_963_407 + 1) % 2 ** 63


class PatchSampler(EpochSampler):
    """``EpochSampler`` whose items are ``(index, seed)``: the seed fixes that item's random patch."""

    def __iter__(self):
        for k, index in enumerate(super().__iter__()):
            yield index, draw_seed(self.seed, self.rank + k * self.world_size)


class SampleStore:
    """A split's samples: decoded images and masks (cache entries), read whole or by window.

    ``lut`` maps raw mask values to class indices (``IGNORE_INDEX`` for ignored values); ``spec`` is
    the normalisation. ``in_memory`` loads every array into RAM once; otherwise each read
    memory-maps the cache file, so RAM does not grow with the number of images.
    """

    def __init__(self, images: list[Entry], masks: list[Entry], lut: np.ndarray, spec: dict,
                 foreground_values: list[int], in_memory: bool) -> None:
        self.images, self.masks, self.lut, self.spec = images, masks, lut, spec
        self.in_memory = in_memory
        self._image_specs: dict[int, dict] = {}
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None
        if in_memory:
            self._arrays = [(i.load(mmap=False), m.load(mmap=False)) for i, m in zip(images, masks)]
        wanted = {str(v) for v in foreground_values}
        empty = np.zeros((0, 2), np.int32)
        self.foreground = [np.concatenate([empty, *(c for v, c in m.meta["coords"].items() if v in wanted)])
                           for m in masks]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def names(self) -> list[str]:
        """Each sample's id: its image file's stem (what pairs it with its mask)."""
        return [Path(entry.source).stem for entry in self.images]

    def shape(self, index: int) -> tuple[int, int]:
        """(H, W) of sample ``index``."""
        return self.images[index].shape

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw image (H x W x C, its dtype) and raw mask (H x W) of sample ``index``."""
        if self._arrays is not None:
            return self._arrays[index]
        return self.images[index].load(), self.masks[index].load()

    def image_spec(self, index: int) -> dict:
        """The normalisation of sample ``index``: the dataset's spec, or with ``scope: image`` the spec with
        the statistics of the WHOLE image (computed once per process), so every patch, tile and sliding
        window of an image is normalised alike, as ``predict`` normalises the whole file."""
        if not per_image(self.spec):
            return self.spec
        if index not in self._image_specs:
            self._image_specs[index] = image_spec(self.spec, self.raw(index)[0])
        return self._image_specs[index]

    def read(self, index: int, top: int = 0, left: int = 0, size: tuple[int, int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ``size`` at (top, left) (may reach outside: padded), normalised; whole image when no size."""
        image, mask = self.raw(index)
        height, width = image.shape[:2]
        if size is None:
            size, top, left = (height, width), 0, 0
        ph, pw = size
        y0, y1 = max(top, 0), min(top + ph, height)
        x0, x1 = max(left, 0), min(left + pw, width)
        crop = apply_normalization(image[y0:y1, x0:x1], self.image_spec(index))
        classes = self.lut[mask[y0:y1, x0:x1]]
        if (y1 - y0, x1 - x0) == (ph, pw):
            return torch.from_numpy(crop), torch.from_numpy(classes)
        out_image = np.zeros((crop.shape[0], ph, pw), np.float32)
        out_mask = np.full((ph, pw), IGNORE_INDEX, np.int64)
        out_image[:, y0 - top:y1 - top, x0 - left:x1 - left] = crop
        out_mask[y0 - top:y1 - top, x0 - left:x1 - left] = classes
        return torch.from_numpy(out_image), torch.from_numpy(out_mask)


def patch_origin(shape: tuple[int, int], size: tuple[int, int], rng: np.random.Generator,
                 centre: tuple[int, int] | None = None) -> tuple[int, int]:
    """Top-left corner of a patch: uniform over the positions keeping the image inside it as far as it can,
    or centred on ``centre`` and clamped to those positions. An image smaller than the patch lands at a
    random offset inside it (the rest is padding)."""
    origin = []
    for extent, patch, c in zip(shape, size, centre or (None, None)):
        low, high = min(0, extent - patch), max(0, extent - patch)
        if c is None:
            origin.append(int(rng.integers(low, high + 1)))
        else:
            origin.append(int(np.clip(c - patch // 2, low, high)))
    return origin[0], origin[1]


class PatchDataset(Dataset):
    """One random ``size`` patch per image per epoch; ``oversample`` of them centred on foreground."""

    sampler_class = PatchSampler

    def __init__(self, store: SampleStore, size: tuple[int, int], oversample: float) -> None:
        self.store, self.size, self.oversample = store, tuple(size), oversample

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        centre = None
        forced = rng.random() < self.oversample
        points = self.store.foreground[index]
        if forced and len(points):
            centre = tuple(points[rng.integers(len(points))])
        top, left = patch_origin(self.store.shape(index), self.size, rng, centre)
        return self.store.read(index, top, left, self.size)


class TileDataset(Dataset):
    """Every image as a grid of ``size`` tiles (the last row and column padded): each pixel exactly once."""

    def __init__(self, store: SampleStore, size: tuple[int, int]) -> None:
        self.store, self.size = store, tuple(size)
        self.tiles = [(i, top, left) for i in range(len(store))
                      for top in range(0, store.shape(i)[0], size[0])
                      for left in range(0, store.shape(i)[1], size[1])]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, top, left = self.tiles[index]
        return self.store.read(i, top, left, self.size)


class WholeImageDataset(Dataset):
    """Whole images, normalised (sizes may differ between items: batch 1, or sliding-window inference)."""

    def __init__(self, store: SampleStore) -> None:
        self.store = store

    @property
    def names(self) -> list[str]:
        """The images' ids (file stems), in item order: per-image results are named by them."""
        return self.store.names

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.read(index)
