"""Training on patches of images of any size, and the datasets a folder source hands to the trainer.

``SampleStore`` holds a split's decoded samples (memory-mapped cache files, or arrays in RAM for small
sets) and reads any window of them, padded where it leaves the image: padded image pixels are 0 and
padded mask pixels are ``IGNORE_INDEX``, which losses (``ignore_index``) and metrics leave out.

- ``PatchDataset``: one random patch per image and epoch; a share ``foreground_oversample`` of the
  patches is centred on a random foreground pixel (nnU-Net forces a third). The position is drawn from
  a seed the ``PatchSampler`` gives with each index, so patches depend on (run seed, epoch) only, not
  on the number of DataLoader workers. A DataLoader reads its ``raw`` windows (raw pixels, uint8 class
  indices) and finishes each batch with ``finish_batch``: the same numbers, a fraction of the bytes
  through the workers' shared memory.
- ``TileDataset``: every image cut into a grid of patch-sized tiles (validation on patches: every
  pixel counted once).
- ``WholeImageDataset``: whole images (same-size sets batch them as before).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from unetlab.data.decode_cache import Entry
from unetlab.data.normalization import apply_normalization, image_spec, per_image
from unetlab.data.sources import EpochSampler
from unetlab.errors import UnetlabError

__all__ = [
    "IGNORE_INDEX",
    "PatchDataset",
    "PatchSampler",
    "SampleStore",
    "RawPatches",
    "TileDataset",
    "WholeImageDataset",
    "draw_seed",
    "finish_batch",
    "normalization_rows",
    "zero_outside_masked",
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

    def raw_rows(self, index: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[start, stop)`` of the raw image and mask of sample ``index`` (read from the cache files
        when the set is not held in RAM)."""
        if self._arrays is not None:
            image, mask = self._arrays[index]
            return image[start:stop], mask[start:stop]
        return self.images[index].read_rows(start, stop), self.masks[index].read_rows(start, stop)

    def image_spec(self, index: int) -> dict:
        """The normalisation of sample ``index``: the dataset's spec, or with ``scope: image`` the spec with
        the statistics of the WHOLE image (computed once per process), so every patch, tile and sliding
        window of an image is normalised alike, as ``predict`` normalises the whole file."""
        if not per_image(self.spec):
            return self.spec
        if index not in self._image_specs:
            self._image_specs[index] = image_spec(self.spec, self.raw(index)[0])
        return self._image_specs[index]

    def read_raw(self, index: int, top: int, left: int, size: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Window ``size`` at (top, left) as DataLoader workers hand it over, for ``finish_batch``: raw pixels
        C x H x W (uint8 / uint16 as stored, other types as float32; 0 where padded), class indices uint8
        (``IGNORE_INDEX`` where padded), the normalisation (4 x C float32: offset, 1 / scale, clip low,
        clip high) and the image's part of the window (first row, end row, first column, end column).

        A float32 batch travels through shared memory at 4 bytes a pixel and an int64 mask at 8, each
        batch in freshly allocated, page-faulted memory: that made 2 workers slower than none (issue 19
        item 6). Raw windows are 3 to 6 times smaller; the batch is finished where it is used.
        """
        height, width = self.shape(index)
        ph, pw = size
        y0, y1 = max(top, 0), min(top + ph, height)
        x0, x1 = max(left, 0), min(left + pw, width)
        image, mask = self.raw_rows(index, y0, y1)
        crop = image[:, x0:x1]
        if crop.dtype not in (np.uint8, np.uint16, np.float32):
            crop = crop.astype(np.float32)
        valid = (y0 - top, y1 - top, x0 - left, x1 - left)
        out_image = np.zeros((crop.shape[2], ph, pw), crop.dtype)
        out_image[:, valid[0]:valid[1], valid[2]:valid[3]] = crop.transpose(2, 0, 1)
        out_mask = np.full((ph, pw), IGNORE_INDEX, np.uint8)
        out_mask[valid[0]:valid[1], valid[2]:valid[3]] = self.lut[mask[:, x0:x1]]
        return (torch.from_numpy(out_image), torch.from_numpy(out_mask),
                normalization_rows(self.image_spec(index), crop.shape[2]), np.array(valid, np.int64))

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


def normalization_rows(spec: dict, channels: int) -> np.ndarray:
    """A resolved normalisation spec as 4 x C float32 rows (offset, 1 / scale, clip low, clip high), the
    numbers ``apply_normalization`` uses, for ``finish_batch``."""
    offset = np.asarray(spec["offset"], np.float32)
    if len(offset) != channels:
        raise UnetlabError(f"the image has {channels} channel(s), the normalisation was fitted on {len(offset)}")
    clip = np.asarray(spec["clip"], np.float32) if spec.get("clip") else \
        np.array([[-np.inf, np.inf]] * channels, np.float32)
    return np.stack([offset, 1.0 / np.asarray(spec["scale"], np.float32), clip[:, 0], clip[:, 1]]).astype(np.float32)


def finish_batch(images: torch.Tensor, masks: torch.Tensor, norms: torch.Tensor | np.ndarray,
                 valid: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw windows (``SampleStore.read_raw``, stacked) -> the float32 B x C x H x W images and int64 masks
    of ``SampleStore.read``, on whatever device they are: the same float32 operations in the same order
    as ``apply_normalization`` (clip, subtract the offset, multiply by 1 / scale), so each value is
    bit for bit what the window normalised alone gives; padding is 0."""
    norms, valid = torch.as_tensor(norms), torch.as_tensor(valid)
    rows = norms.to(images.device)[..., None, None]  # B x 4 x C x 1 x 1
    # On the host, operations that are the identity here (no clip: +-inf bounds; a zero offset) are skipped,
    # so a uint8 batch is converted and scaled in one pass; the result is the same either way.
    host = norms.device.type == "cpu"
    if host and not torch.isfinite(norms[:, 2:]).any() and not norms[:, 0].any():
        x = images * rows[:, 1]  # float32 (integers convert exactly), multiplied once: one pass
    else:
        x = images.float().clamp_(rows[:, 2], rows[:, 3]).sub_(rows[:, 0]).mul_(rows[:, 1])
    if valid.device.type != "cpu":  # no host sync on a GPU: one masked pass instead of per-image slices
        return zero_outside_masked(x, valid), masks.long()
    height, width = x.shape[-2:]
    for b, (top, bottom, left, right) in enumerate(valid.tolist()):
        if (top, bottom, left, right) != (0, height, 0, width):  # padded: 0 outside the image, as read() pads
            x[b, :, :top] = 0
            x[b, :, bottom:] = 0
            x[b, :, :, :left] = 0
            x[b, :, :, right:] = 0
    return x, masks.long()


def zero_outside_masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` (B x C x H x W) with 0 outside each image's window ``valid`` (B x 4: first row, end row, first
    column, end column), computed on ``x``'s device without reading ``valid`` back to the host."""
    r, c = torch.arange(x.shape[-2], device=x.device), torch.arange(x.shape[-1], device=x.device)
    inside = ((r >= valid[:, :1]) & (r < valid[:, 1:2]))[:, :, None] & \
        ((c >= valid[:, 2:3]) & (c < valid[:, 3:]))[:, None, :]
    return torch.where(inside[:, None], x, 0.0)


class RawPatches(Dataset):
    """The raw windows of a ``PatchDataset`` (what its DataLoader workers read and hand over)."""

    def __init__(self, patches: PatchDataset) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        return self.patches.raw_item(key)

    @staticmethod
    def collate(items: list[tuple]) -> tuple:
        """Pixels and masks stacked as tensors (through shared memory from a worker); the small per-item
        normalisation rows and windows as numpy arrays, pickled with the batch: every tensor costs a file
        descriptor handed over and a mapping in the receiving process."""
        from torch.utils.data import default_collate

        images, masks, norms, valid = zip(*items)
        return default_collate(list(images)), default_collate(list(masks)), np.stack(norms), np.stack(valid)


class PatchDataset(Dataset):
    """One random ``size`` patch per image per epoch; ``oversample`` of them centred on foreground.

    An item is the normalised (image, mask) pair; a DataLoader made by ``unetlab.data.sources.make_loader`` reads
    ``raw`` windows in its workers and finishes each batch with ``finish_batch`` (same numbers).
    """

    sampler_class = PatchSampler
    finish_batch = staticmethod(finish_batch)

    def __init__(self, store: SampleStore, size: tuple[int, int], oversample: float) -> None:
        self.store, self.oversample = store, oversample
        self.size = cast(tuple[int, int], tuple(size))  # (H, W), possibly given as a list

    def __len__(self) -> int:
        return len(self.store)

    @property
    def raw(self) -> RawPatches:
        """This dataset's raw windows (``SampleStore.read_raw``), to be finished by ``finish_batch``."""
        return RawPatches(self)

    def raw_item(self, key: Any) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """The raw window of item ``key`` (``(index, seed)`` from ``PatchSampler``, or an index)."""
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        centre = None
        forced = rng.random() < self.oversample
        points = self.store.foreground[index]
        if forced and len(points):
            centre = tuple(points[rng.integers(len(points))])
        top, left = patch_origin(self.store.shape(index), self.size, rng, centre)
        return self.store.read_raw(index, top, left, self.size)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = finish_batch(*RawPatches.collate([self.raw_item(key)]))
        return image[0], mask[0]


class TileDataset(Dataset):
    """Every image as a grid of ``size`` tiles (the last row and column padded): each pixel exactly once."""

    def __init__(self, store: SampleStore, size: tuple[int, int]) -> None:
        self.store = store
        self.size = cast(tuple[int, int], tuple(size))  # (H, W), possibly given as a list
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
