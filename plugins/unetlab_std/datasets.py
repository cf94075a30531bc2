"""Standard datasets: ``shapes`` and ``blobs`` (generated, deterministic from ``seed``, cached on disk)
and ``folder`` (your own images and masks).

Dataset contract: the factory returns a *source* with ``in_channels``, ``num_classes`` (background
included: 2 for binary), ``image_size`` ((H, W) or None) and ``split(name)`` for ``train``, ``val``
and ``test`` giving a ``torch.utils.data.Dataset`` of (image float32 C x H x W, mask int64 H x W).
The split does not depend on the run's seed: every variant and seed trains on the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

import unetlab
from unetlab.errors import UnetlabError, exception_text

SHAPE_TYPES = ("circle", "rectangle", "triangle", "ellipse")
SPLITS = ("train", "val", "test")


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$UNETLAB_CACHE_DIR`` or ``~/.cache/unetlab``."""
    return Path(os.environ.get("UNETLAB_CACHE_DIR") or Path.home() / ".cache" / "unetlab") / "datasets"


class ArraySource:
    """A dataset source backed by in-memory arrays per split, generated once and cached as .npz."""

    def __init__(self, kind: str, params: dict, counts: dict[str, int], in_channels: int, num_classes: int,
                 image_size: tuple[int, int], generate) -> None:
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.kind, self.params, self.counts, self._generate = kind, params, counts, generate
        self._splits: dict[str, TensorDataset] = {}

    def split(self, name: str) -> Dataset:
        """The split ``name`` (``train``, ``val`` or ``test``), loaded from the cache or generated."""
        if name not in SPLITS:
            raise UnetlabError(f"unknown split '{name}' (splits: {', '.join(SPLITS)})")
        if name not in self._splits:
            images, masks = self._load_or_generate(name)
            self._splits[name] = TensorDataset(torch.from_numpy(images), torch.from_numpy(masks))
        return self._splits[name]

    def _load_or_generate(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        key = json.dumps({"kind": self.kind, "split": name, "n": self.counts[name], **self.params}, sort_keys=True)
        path = cache_dir() / f"{self.kind}-{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        if path.exists():
            try:
                with np.load(path) as data:
                    return data["images"], data["masks"]
            except Exception:  # a damaged cache file is regenerated, never trusted
                pass
        split_seed = np.random.SeedSequence([self.params["seed"], SPLITS.index(name), 7919])
        images, masks = self._generate(self.counts[name], np.random.default_rng(split_seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=images, masks=masks)
        os.replace(tmp, path)  # atomic: parallel runs never read a half-written cache file
        return images, masks


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((size, size)), sigma)
    return field / (field.std() + 1e-8)


def shapes(seed: int = 0, image_size: int = 64, n_train: int = 256, n_val: int = 64, n_test: int = 0,
           mode: Literal["binary", "target", "multiclass"] = "binary",
           target_shape: Literal["circle", "rectangle", "triangle", "ellipse"] = "circle",
           min_shapes: int = 1, max_shapes: int = 4, min_size: int = 8, max_size: Optional[int] = None,
           noise: float = 0.1, texture: float = 0.15, channels: Literal[1, 3] = 3) -> ArraySource:
    """Random shapes (skimage.draw.random_shapes) on a textured, noisy background.

    mode: ``binary`` (any shape vs background), ``target`` (only ``target_shape`` is foreground, the
    other shapes are look-alike distractors: needs context, not just edges), ``multiclass`` (one class
    per shape type + background).
    """
    from skimage.draw import random_shapes

    if image_size < 16 or min_size < 2 or max_shapes < min_shapes or min_shapes < 0:
        raise UnetlabError(f"shapes: invalid sizes (image_size={image_size} >= 16, min_size={min_size} >= 2, "
                           f"0 <= min_shapes={min_shapes} <= max_shapes={max_shapes})")
    max_size = max_size or image_size // 2
    num_classes = len(SHAPE_TYPES) + 1 if mode == "multiclass" else 2

    def generate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        images = np.empty((n, channels, image_size, image_size), np.float32)
        masks = np.zeros((n, image_size, image_size), np.int64)
        for i in range(n):
            background = 0.5 + texture * _smooth_noise(rng, image_size, 3.0)
            image = np.repeat(background[None], channels, 0)
            for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
                kind = SHAPE_TYPES[int(rng.integers(len(SHAPE_TYPES)))]
                drawn, labels = random_shapes((image_size, image_size), 1, 1, min_size, max_size, num_channels=1,
                                              channel_axis=None, shape=kind, intensity_range=(0, 0),
                                              rng=int(rng.integers(2 ** 31)))
                if not labels:
                    continue
                region = drawn == 0
                colour = rng.uniform(0.0, 1.0, channels)
                shade = colour[:, None] + texture * 0.5 * _smooth_noise(rng, image_size, 1.5)[region]
                image[:, region] = shade
                if mode == "binary":
                    masks[i][region] = 1
                elif mode == "target":
                    masks[i][region] = int(kind == target_shape)
                else:
                    masks[i][region] = 1 + SHAPE_TYPES.index(kind)
            image += noise * rng.standard_normal(image.shape)
            images[i] = image
        return images, masks

    params = dict(seed=seed, image_size=image_size, mode=mode, target_shape=target_shape, min_shapes=min_shapes,
                  max_shapes=max_shapes, min_size=min_size, max_size=max_size, noise=noise, texture=texture,
                  channels=channels, version=1)
    return ArraySource("shapes", params, {"train": n_train, "val": n_val, "test": n_test}, channels, num_classes,
                       (image_size, image_size), generate)


def blobs(seed: int = 0, image_size: int = 64, n_train: int = 256, n_val: int = 64, n_test: int = 0,
          blob_size_fraction: float = 0.1, volume_fraction: float = 0.3, blur: float = 1.5,
          illumination: float = 0.5, photons: float = 30.0) -> ArraySource:
    """Microscopy-like cells (skimage.data.binary_blobs) with blur, uneven illumination and shot noise."""
    from scipy.ndimage import gaussian_filter
    from skimage.data import binary_blobs

    def generate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        images = np.empty((n, 1, image_size, image_size), np.float32)
        masks = np.empty((n, image_size, image_size), np.int64)
        yy, xx = np.mgrid[0:1:image_size * 1j, 0:1:image_size * 1j]
        for i in range(n):
            mask = binary_blobs(image_size, blob_size_fraction, n_dim=2, volume_fraction=volume_fraction,
                                rng=int(rng.integers(2 ** 31)))
            angle = rng.uniform(0, 2 * np.pi)
            light = 1 - illumination * (0.5 + 0.5 * np.cos(angle) * (xx - 0.5) * 2 + 0.5 * np.sin(angle) * (yy - 0.5))
            signal = gaussian_filter(0.15 + 0.85 * mask.astype(float), blur) * np.clip(light, 0.05, None)
            counts = rng.poisson(signal * photons)
            images[i, 0] = counts / photons
            masks[i] = mask
        return images, masks

    params = dict(seed=seed, image_size=image_size, blob_size_fraction=blob_size_fraction,
                  volume_fraction=volume_fraction, blur=blur, illumination=illumination, photons=photons, version=1)
    return ArraySource("blobs", params, {"train": n_train, "val": n_val, "test": n_test}, 1, 2,
                       (image_size, image_size), generate)


IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class FolderSource:
    """Images and masks from disk: ``root/images`` and ``root/masks`` with matching file names."""

    def __init__(self, root: Path, image_dir: str, mask_dir: str, val_fraction: float, seed: int,
                 grayscale: bool, class_values: Optional[list[int]]) -> None:
        self.root, self.grayscale, self.class_values = root, grayscale, class_values
        if not root.is_dir():
            raise UnetlabError(f"folder dataset: root '{root}' is not a directory")
        explicit_val = (root / "val").is_dir()
        self.pairs: dict[str, list[tuple[Path, Path]]] = {}
        if explicit_val:
            self.pairs["train"] = self._scan(root / "train" if (root / "train").is_dir() else root, image_dir, mask_dir)
            self.pairs["val"] = self._scan(root / "val", image_dir, mask_dir)
        else:
            pairs = self._scan(root, image_dir, mask_dir)
            order = np.random.default_rng(seed).permutation(len(pairs))
            n_val = int(round(val_fraction * len(pairs)))
            if val_fraction > 0 and n_val == 0 and len(pairs) > 1:
                n_val = 1
            self.pairs["val"] = [pairs[i] for i in sorted(order[:n_val])]
            self.pairs["train"] = [pairs[i] for i in sorted(order[n_val:])]
        self.pairs["test"] = self._scan(root / "test", image_dir, mask_dir) if (root / "test").is_dir() else []
        first_image = self._read(self.pairs["train"][0][0]) if self.pairs["train"] else None
        if first_image is None:
            raise UnetlabError(f"folder dataset: no training images under '{root}'")
        self.in_channels = 1 if (first_image.ndim == 2 or grayscale) else first_image.shape[2]
        self.image_size = tuple(first_image.shape[:2])
        self.num_classes = len(class_values) if class_values else None  # found from the masks when loaded
        self._splits: dict[str, TensorDataset] = {}
        if self.num_classes is None:
            self.num_classes = len(self._mask_values())

    def _scan(self, base: Path, image_dir: str, mask_dir: str) -> list[tuple[Path, Path]]:
        images_path, masks_path = base / image_dir, base / mask_dir
        for p in (images_path, masks_path):
            if not p.is_dir():
                raise UnetlabError(f"folder dataset: missing folder '{p}'")
        images = {p.stem: p for p in images_path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in masks_path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        if not images:
            raise UnetlabError(f"folder dataset: '{images_path}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        missing_masks = sorted(set(images) - set(masks))
        missing_images = sorted(set(masks) - set(images))
        if missing_masks or missing_images:
            parts = []
            if missing_masks:
                parts.append(f"images without a mask in '{masks_path}': {', '.join(missing_masks[:5])}"
                             + (f" (+{len(missing_masks) - 5} more)" if len(missing_masks) > 5 else ""))
            if missing_images:
                parts.append(f"masks without an image in '{images_path}': {', '.join(missing_images[:5])}"
                             + (f" (+{len(missing_images) - 5} more)" if len(missing_images) > 5 else ""))
            raise UnetlabError("folder dataset: " + "; ".join(parts))
        return [(images[k], masks[k]) for k in sorted(images)]

    def _read(self, path: Path) -> np.ndarray:
        from skimage import io

        try:
            array = io.imread(path)
        except Exception as exc:
            raise UnetlabError(f"folder dataset: cannot read '{path}': {exception_text(exc)}") from None
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        return array

    def _mask_values(self) -> list[int]:
        """Mask values in class order: ``class_values``, or {0, 255} (binary), or class indices 0..K-1."""
        if self.class_values:
            return list(self.class_values)
        if getattr(self, "_detected", None) is None:
            seen: dict[int, Path] = {}
            for pairs in self.pairs.values():
                for _, mask_path in pairs:
                    for v in np.unique(self._mask(mask_path)).tolist():
                        seen.setdefault(int(v), mask_path)
            values = set(seen) | {0}
            if values <= {0, 255}:
                self._detected = [0, 255]
            elif values == set(range(max(values) + 1)):
                self._detected = sorted(values)
            else:
                odd = sorted(values - {0, 255}) if 255 in values else sorted(values)
                example = seen[odd[-1]] if odd[-1] in seen else next(iter(seen.values()))
                raise UnetlabError(f"folder dataset: unexpected mask value(s) {odd[:10]} (e.g. in '{example}'): masks "
                                   "must be binary {0, 255} or class indices 0..K-1; set class_values to map other "
                                   "values to classes")
        return self._detected

    def _mask(self, path: Path) -> np.ndarray:
        mask = self._read(path)
        return mask[..., 0] if mask.ndim == 3 else mask

    def split(self, name: str) -> Dataset:
        """Load split ``name`` into memory (images scaled to [0, 1], masks mapped to class indices)."""
        if name not in SPLITS:
            raise UnetlabError(f"unknown split '{name}' (splits: {', '.join(SPLITS)})")
        if name in self._splits:
            return self._splits[name]
        values = self._mask_values()
        lookup = {v: i for i, v in enumerate(values)}
        images, masks = [], []
        for image_path, mask_path in self.pairs[name]:
            image = self._read(image_path).astype(np.float32)
            image = image / (65535.0 if image.max() > 255 else 255.0)
            if self.grayscale and image.ndim == 3:
                image = image.mean(axis=2)
            image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
            mask = self._mask(mask_path)
            if image.shape[0] != self.in_channels or image.shape[1:] != self.image_size:
                raise UnetlabError(f"folder dataset: '{image_path}' is {image.shape[1]}x{image.shape[2]} with "
                                   f"{image.shape[0]} channel(s); expected {self.image_size[0]}x{self.image_size[1]} "
                                   f"with {self.in_channels} like the first image")
            if mask.shape != image.shape[1:]:
                raise UnetlabError(f"folder dataset: size mismatch: mask '{mask_path}' is {mask.shape[0]}x"
                                   f"{mask.shape[1]}, its image is {image.shape[1]}x{image.shape[2]}")
            unexpected = sorted(set(np.unique(mask).tolist()) - set(lookup))
            if unexpected:
                raise UnetlabError(f"folder dataset: mask '{mask_path}' has unexpected value(s) "
                                   f"{unexpected[:10]} (expected: {values}; set class_values to map them)")
            images.append(image)
            masks.append(np.vectorize(lookup.get, otypes=[np.int64])(mask))
        if not images:
            tensors = (torch.empty(0, self.in_channels, *self.image_size), torch.empty(0, *self.image_size,
                                                                                       dtype=torch.long))
        else:
            tensors = (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)))
        self._splits[name] = TensorDataset(*tensors)
        return self._splits[name]


def folder(root: str, image_dir: str = "images", mask_dir: str = "masks", val_fraction: float = 0.2,
           seed: int = 0, grayscale: bool = False, class_values: Optional[list[int]] = None) -> FolderSource:
    """Your own data: ``root/images`` + ``root/masks`` (same file names); ``root/val`` gives an explicit split.

    ``class_values``: mask values in class order (default: {0, 255} is binary, else the sorted values).
    Relative roots are taken from the working directory.
    """
    return FolderSource(Path(root).expanduser(), image_dir, mask_dir, val_fraction, seed, grayscale, class_values)


@unetlab.hookimpl
def register_datasets(register):
    register("shapes", shapes)
    register("blobs", blobs)
    register("folder", folder)
