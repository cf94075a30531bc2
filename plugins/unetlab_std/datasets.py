"""Standard datasets: ``shapes`` and ``blobs`` (generated, deterministic from ``seed``, cached on disk)
and ``folder`` (your own images and masks, any size, decoded once into a cache and read lazily).

Dataset contract: the factory returns a *source* with ``in_channels``, ``num_classes`` (background
included: 2 for binary), ``image_size`` ((H, W) or None) and ``split(name)`` for ``train``, ``val``
and ``test`` giving a ``torch.utils.data.Dataset`` of (image float32 C x H x W, mask int64 H x W).
The split does not depend on the run's seed: every variant and seed trains on the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, cast

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

import unetlab
from unetlab.data.decode_cache import cache_home, decode_many, remove_stale_temporaries_once
from unetlab.data.normalization import fit_normalization
from unetlab.data.options import DataOptions
from unetlab.data.patches import (
    IGNORE_INDEX,
    PatchDataset,
    SampleStore,
    TileDataset,
    WholeImageDataset,
)
from unetlab.data.splits import kfold, random_split, split_from_file
from unetlab.errors import UnetlabError
from unetlab.plugin_api.params import FilePath, Range

SHAPE_TYPES = ("circle", "rectangle", "triangle", "ellipse")
MAX_IMAGES = 1_000_000
Seed = Annotated[int, Range(0, 2 ** 32 - 1)]
ImageSize = Annotated[int, Range(8, 4096)]
Count = Annotated[int, Range(1, MAX_IMAGES)]
Fraction = Annotated[float, Range(0, 1)]
SPLITS = ("train", "val", "test")
KINDS = ("image", "mask")


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$UNETLAB_CACHE_DIR`` or ``~/.cache/unetlab``."""
    return cache_home() / "datasets"


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
        remove_stale_temporaries_once(cache_dir())
        if path.exists():
            try:
                with np.load(path) as data:
                    return data["images"], data["masks"]
            except Exception:  # noqa: BLE001, S110 - a damaged cache file is regenerated, never trusted
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


def shapes(seed: Seed = 0, image_size: ImageSize = 64, n_train: Count = 256, n_val: Count = 64,
           n_test: Annotated[int, Range(0, MAX_IMAGES)] = 0,
           mode: Literal["binary", "target", "multiclass"] = "binary",
           target_shape: Literal["circle", "rectangle", "triangle", "ellipse"] = "circle",
           min_shapes: Annotated[int, Range(0, 64)] = 1, max_shapes: Annotated[int, Range(0, 64)] = 4,
           min_size: Annotated[int, Range(1, 4096)] = 8, max_size: Annotated[int, Range(1, 4096)] | None = None,
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

    params = {"seed": seed, "image_size": image_size, "mode": mode, "target_shape": target_shape,
              "min_shapes": min_shapes, "max_shapes": max_shapes, "min_size": min_size, "max_size": max_size,
              "noise": noise, "texture": texture, "channels": channels, "version": 1}
    return ArraySource("shapes", params, {"train": n_train, "val": n_val, "test": n_test}, channels, num_classes,
                       (image_size, image_size), generate)


def blobs(seed: Seed = 0, image_size: ImageSize = 64, n_train: Count = 256, n_val: Count = 64,
          n_test: Annotated[int, Range(0, MAX_IMAGES)] = 0, blob_size_fraction: Fraction = 0.1,
          volume_fraction: Fraction = 0.3, blur: float = 1.5,
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

    params = {"seed": seed, "image_size": image_size, "blob_size_fraction": blob_size_fraction,
              "volume_fraction": volume_fraction, "blur": blur, "illumination": illumination, "photons": photons,
              "version": 1}
    return ArraySource("blobs", params, {"train": n_train, "val": n_val, "test": n_test}, 1, 2,
                       (image_size, image_size), generate)


IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
IN_MEMORY_BYTES = 256 * 2 ** 20  # decoded sets up to this size are held in RAM; larger ones are memory-mapped


@dataclass
class FolderSummary:
    """What scanning and decoding a folder dataset found (``FolderSource.check``; fields are None / empty where a
    problem stopped the step that derives them)."""

    samples: dict[str, list]            # split -> decoded (image, mask) cache entries
    channels: int | None                # of every image (None: they mix channel counts)
    dtype: str | None                   # of every image (None: they mix dtypes)
    image_size: tuple[int, int] | None  # the training input: patch_size, resize, or the images' common size
    class_values: list[int]             # raw mask values in class order
    lut: np.ndarray                     # raw mask value -> class index
    num_classes: int
    ignore_index: int | None
    normalization: dict                 # fitted on the training split
    in_memory: bool                     # held in RAM, else memory-mapped from the decode cache
    decoded_bytes: int
    stores: dict[str, SampleStore] = field(default_factory=dict)  # per split, when there was no problem


class _RawImages:
    """A lazy sequence of raw training images (for normalisation statistics)."""

    def __init__(self, entries: list) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.entries[index].load()


def _more(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


class FolderSource:
    """Images and masks from disk, paired by file stem, decoded once into a cache and read lazily.

    Layouts: ``root/images`` + ``root/masks`` (split by ``split_file``, ``data.folds`` or ``val_fraction``),
    or ``root/train``, ``root/val``, ``root/test`` each holding ``images`` + ``masks``. A ``root/test``
    folder is the test split in both. The data.* options (patches, resize, normalisation, folds) arrive
    through ``configure``; the dataset is scanned and decoded on first use.
    """

    def __init__(self, root: Path, image_dir: str = "images", mask_dir: str = "masks", mask_suffix: str = "",
                 val_fraction: float = 0.2, seed: int = 0, grayscale: bool = False,
                 class_values: list[int] | None = None, split_file: Path | None = None,
                 cache: str = "auto") -> None:
        if not root.is_dir():
            raise UnetlabError(f"folder dataset: root '{root}' is not a directory")
        self.root, self.image_dir, self.mask_dir, self.mask_suffix = root, image_dir, mask_dir, mask_suffix
        self.val_fraction, self.seed, self.grayscale = val_fraction, seed, grayscale
        self.class_values, self.split_file, self.cache = class_values, split_file, cache
        self.options = DataOptions()
        self.layout = ""  # how the splits were made, for 'unetlab data'
        self._built: FolderSummary | None = None
        self._tensors: dict[str, TensorDataset] = {}

    def configure(self, options: DataOptions) -> None:
        """Take the checked data.* options (before first use)."""
        self.options, self._built, self._tensors = options, None, {}

    # --- public contract ------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        """Channels of the model input."""
        channels = self._build().channels
        if channels is None:  # not reached: a strict build has already refused images that mix channel counts
            raise UnetlabError("folder dataset: the images mix channel counts")
        return channels

    @property
    def num_classes(self) -> int:
        """Classes, background included (2 for binary)."""
        return self._build().num_classes

    @property
    def image_size(self) -> tuple[int, int] | None:
        """The training input size: patch_size, resize, or the images' common size."""
        return self._build().image_size

    @property
    def normalization(self) -> dict:
        """The normalisation spec (fitted on the training split); checkpoints store it."""
        return self._build().normalization

    @property
    def ignore_index(self) -> int | None:
        """Mask value that losses and metrics must ignore, when the data can hold it (padding, 255 masks)."""
        return self._build().ignore_index

    def split(self, name: str) -> Dataset:
        """Split ``name``: random patches (train, with data.patch_size) or tiles (val, test), else whole
        images (a TensorDataset when the set is held in RAM)."""
        store = self._store(name)
        patch = self.options.patch_size
        if patch is not None:
            return PatchDataset(store, patch, self.options.foreground_oversample) if name == "train" \
                else TileDataset(store, patch)
        if store.in_memory:
            if len(store) == 0:
                # a strict build (in_channels) has no problems, so the images have one size or an option sets it
                c, (h, w) = self.in_channels, cast(tuple[int, int], self.image_size)
                return TensorDataset(torch.empty(0, c, h, w), torch.empty(0, h, w, dtype=torch.long))
            if name not in self._tensors:  # normalised once: prepare and the trainer both ask for the split
                items = [store.read(i) for i in range(len(store))]
                self._tensors[name] = TensorDataset(torch.stack([i for i, _ in items]),
                                                    torch.stack([m for _, m in items]))
                # per-image results are named by file stem: an extra attribute on this TensorDataset
                self._tensors[name].names = store.names  # type: ignore[attr-defined]
            return self._tensors[name]
        return WholeImageDataset(store)

    @property
    def whole_image_validation(self) -> bool:
        """True when validation should run on whole images by sliding windows (training on patches)."""
        return self.options.patch_size is not None

    def whole_images(self, name: str) -> Dataset:
        """Split ``name`` as whole images of their own size (for sliding-window validation)."""
        return WholeImageDataset(self._store(name))

    def check(self) -> tuple[FolderSummary, list[str]]:
        """Scan and decode everything; return the summary and every problem found (never raises on data)."""
        return self._build(strict=False), list(self._built_problems)

    # --- scanning ---------------------------------------------------------------------------------------
    def _store(self, name: str) -> SampleStore:
        if name not in SPLITS:
            raise UnetlabError(f"unknown split '{name}' (splits: {', '.join(SPLITS)})")
        return self._build().stores[name]

    def _scan(self, base: Path, problems: list[str]) -> dict[str, tuple[Path, Path]]:
        images_path, masks_path = base / self.image_dir, base / self.mask_dir
        missing = [p for p in (images_path, masks_path) if not p.is_dir()]
        if missing:
            problems.append(f"missing folder '{missing[0]}'")
            return {}
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for folder, found, suffix in ((images_path, images, ""), (masks_path, masks, self.mask_suffix)):
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
                    continue
                stem = p.stem
                if suffix:
                    if not stem.endswith(suffix):
                        continue
                    stem = stem[: -len(suffix)]
                if stem in found:
                    problems.append(f"two files for '{stem}' in '{folder}': '{found[stem].name}' and '{p.name}'")
                found[stem] = p
        if not images:
            problems.append(f"'{images_path}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
        unpaired = []
        if no_mask:
            hint = f" (mask_suffix: '{self.mask_suffix}')" if self.mask_suffix else ""
            unpaired.append(f"images without a mask in '{masks_path}'{hint}: {_more(no_mask)}")
        if no_image:
            unpaired.append(f"masks without an image in '{images_path}': {_more(no_image)}")
        if unpaired:
            problems.append("; ".join(unpaired))
        return {k: (images[k], masks[k]) for k in sorted(set(images) & set(masks))}

    def _layout(self, problems: list[str]) -> dict[str, dict[str, tuple[Path, Path]]]:
        """Pairs per split, as the folders, the split file or the folds say."""
        root, opts = self.root, self.options
        test = self._scan(root / "test", problems) if (root / "test").is_dir() else {}
        explicit = (root / "train").is_dir()
        if explicit or (root / "val").is_dir():
            if self.split_file is not None:
                problems.append(f"split_file given, but '{root}' already has train/ or val/ folders: use one of them")
            pool = self._scan(root / "train" if explicit else root, problems)
            self.layout = f"{'train/' if explicit else 'images/ + masks/'}, val/{', test/' if test else ''} folders"
            if (root / "val").is_dir():
                if opts.folds is not None:
                    problems.append(f"data.folds: '{root}' has an explicit val/ folder; folds split the training "
                                    "pool (remove val/ or data.folds)")
                return {"train": pool, "val": self._scan(root / "val", problems), "test": test}
        else:
            pool = self._scan(root, problems)
        stems = sorted(pool)
        try:
            if self.split_file is not None:
                if opts.folds is not None:
                    raise UnetlabError("data.folds and split_file: pick one (a split file may list folds itself)")
                self.layout = f"split file {self.split_file}"
                named = split_from_file(self.split_file, stems + sorted(test), opts.fold)
                merged = {**pool, **test}
                return {name: {s: merged[s] for s in named[name]} for name in SPLITS}
            if opts.folds is not None:
                self.layout = f"fold {opts.fold} of {opts.folds}, seed {self.seed}"
                train, val = kfold(stems, opts.folds, opts.fold, self.seed)
            else:
                self.layout = f"random split, val_fraction {self.val_fraction:g}, seed {self.seed}"
                train, val = random_split(stems, self.val_fraction, self.seed)
        except UnetlabError as exc:
            problems.append(str(exc))
            train, val = stems, []
        return {"train": {s: pool[s] for s in train}, "val": {s: pool[s] for s in val}, "test": test}

    # --- decoding and checks ----------------------------------------------------------------------------
    def _build(self, strict: bool = True) -> FolderSummary:
        if self._built is None:
            self._built_problems: list[str] = []
            self._built = self._decode_and_check(self._built_problems)
        if strict and self._built_problems:
            first, rest = self._built_problems[0], len(self._built_problems) - 1
            more = f" (+{rest} more problem(s); 'unetlab data FILE' lists them all)" if rest else ""
            raise UnetlabError(f"folder dataset: {first}{more}")
        return self._built

    def _decode_and_check(self, problems: list[str]) -> FolderSummary:
        """Scan, decode and check the whole set; every problem found is appended to ``problems``."""
        opts = self.options
        samples = self._decode_pairs(self._layout(problems), problems)
        everything = [s for name in SPLITS for s in samples[name]]
        if not samples["train"]:
            problems.append(f"no training images under '{self.root}'")
        channels = self._one_kind(everything, lambda e: e.meta["shape"][2], "channel counts",
                                  "set grayscale: true or convert them", problems)
        dtype = self._one_kind(everything, lambda e: e.meta["dtype"], "dtypes", "convert them to one", problems)
        image_size = self._image_size(everything, problems)
        values, lut, ignore = self._classes([m for _, m in everything], problems)
        spec = self._normalization(samples["train"], channels, dtype, problems)
        total = sum(i.nbytes + m.nbytes for i, m in everything)
        in_memory = self.cache == "memory" or (self.cache == "auto" and total <= IN_MEMORY_BYTES)
        summary = FolderSummary(samples=samples, channels=channels, dtype=dtype, image_size=image_size,
                                class_values=values, lut=lut, num_classes=max(len(values), 2),
                                ignore_index=IGNORE_INDEX if (ignore or opts.patch_size) else None,
                                normalization=spec, in_memory=in_memory, decoded_bytes=total)
        if not problems:
            foreground = [v for v, c in enumerate(lut) if c not in (0, IGNORE_INDEX, -1)]
            summary.stores = {name: SampleStore([i for i, _ in samples[name]], [m for _, m in samples[name]], lut,
                                                spec, foreground, in_memory) for name in SPLITS}
        return summary

    def _decode_pairs(self, layout: dict[str, dict[str, tuple[Path, Path]]], problems: list[str]) -> dict[str, list]:
        """Every split's (image, mask) pairs decoded (through the decode cache); a pair whose image and mask
        differ in size is a problem and left out."""
        jobs = [(p, kind) for pairs in layout.values() for pair in pairs.values() for p, kind in zip(pair, KINDS)]
        entries, decode_problems = decode_many(jobs, self.grayscale, self.options.resize)
        problems.extend(decode_problems)
        decoded = dict(zip(jobs, entries))
        samples: dict[str, list] = {}
        for name, pairs in layout.items():
            samples[name] = []
            for image_path, mask_path in pairs.values():
                image, mask = decoded[(image_path, "image")], decoded[(mask_path, "mask")]
                if image is None or mask is None:
                    continue
                if image.meta["source_shape"] != mask.meta["source_shape"]:
                    (h, w), (mh, mw) = image.meta["source_shape"], mask.meta["source_shape"]
                    problems.append(f"size mismatch: mask '{mask_path}' is {mh}x{mw}, its image is {h}x{w}")
                    continue
                samples[name].append((image, mask))
        return samples

    def _image_size(self, everything: list, problems: list[str]) -> tuple[int, int] | None:
        """The training input size: patch_size, resize, or the images' one size (differing sizes without
        either option are a problem)."""
        opts = self.options
        sizes = {tuple(i.shape) for i, _ in everything}
        if len(sizes) > 1 and not (opts.patch_size or opts.resize):
            (a, _), (b, _) = everything[0], next(s for s in everything if tuple(s[0].shape) != everything[0][0].shape)
            problems.append(f"images differ in size ('{a.source}' is {'x'.join(map(str, a.shape))}, '{b.source}' is "
                            f"{'x'.join(map(str, b.shape))}): set data.patch_size: [H, W] to train on patches, or "
                            "data.resize: [H, W] to resize every image")
        return opts.patch_size or opts.resize or (next(iter(sizes)) if len(sizes) == 1 else None)

    def _normalization(self, train: list, channels: int | None, dtype: str | None, problems: list[str]) -> dict:
        """The normalisation spec fitted on the training images; empty when an earlier problem stops it."""
        if not train or channels is None or dtype is None or problems:
            return {}
        try:
            return fit_normalization(self.options.normalize, dtype, channels, _RawImages([i for i, _ in train]),
                                     self.seed)
        except UnetlabError as exc:
            problems.append(str(exc))
            return {}

    @staticmethod
    def _one_kind(samples: list, key, what: str, fix: str, problems: list[str]):
        seen: dict = {}
        for image, _ in samples:
            seen.setdefault(key(image), image.source)
        if len(seen) > 1:
            shown = ", ".join(f"'{path}' has {value}" for value, path in list(seen.items())[:3])
            problems.append(f"images mix {what}: {shown} ({fix})")
            return None
        return next(iter(seen), None)

    def _classes(self, masks: list, problems: list[str]) -> tuple[list[int], np.ndarray, bool]:
        """Raw mask values in class order, the raw -> class lookup table, and whether 255 means 'ignore'."""
        where: dict[int, Path] = {}
        for m in masks:
            for v in m.meta["values"]:
                where.setdefault(v, m.source)
        present = set(where)
        palette = any(m.meta["palette"] for m in masks)
        size = 65536 if any(m.meta["dtype"] == "uint16" for m in masks) else 256
        if self.class_values:
            values = list(self.class_values)
            ignore = IGNORE_INDEX not in values
        elif present <= {0, 255} and not palette:
            values, ignore = [0, 255], False  # binary masks saved as 0 / 255
        else:
            ignore = True  # class indices (or palette indices) 0..K-1, and 255 = ignore as in VOC
            indices = sorted(present - {IGNORE_INDEX} | {0})
            values = [v for k, v in enumerate(indices) if v == k]
        unexpected = sorted(present - set(values) - ({IGNORE_INDEX} if ignore else set()))
        if unexpected:
            expected = f"class_values {values}" if self.class_values else \
                "binary {0, 255} or class indices 0..K-1 (255 = ignore)"
            problems.append(f"unexpected mask value(s) {unexpected[:10]} (e.g. in '{where[unexpected[0]]}'): masks "
                            f"must be {expected}; set class_values to map other values to classes")
        if len(values) > IGNORE_INDEX:
            problems.append(f"{len(values)} classes: at most {IGNORE_INDEX} (mask value {IGNORE_INDEX} means ignore)")
        lut = np.full(size, -1, np.int64)
        if ignore:
            lut[IGNORE_INDEX] = IGNORE_INDEX
        for k, v in enumerate(values):
            if 0 <= v < size:
                lut[v] = k
        return values, lut, ignore and IGNORE_INDEX in present


def folder(root: Annotated[str, FilePath()], image_dir: str = "images", mask_dir: str = "masks", mask_suffix: str = "",
           val_fraction: Annotated[float, Range(0, 1, max_exclusive=True)] = 0.2, seed: Seed = 0,
           grayscale: bool = False, class_values: list[int] | None = None,
           split_file: Annotated[str, FilePath()] | None = None,
           cache: Literal["auto", "memory", "disk"] = "auto") -> FolderSource:
    """Your own images and masks (PNG, JPEG, TIFF; 8/16-bit; any size), paired by file stem.

    ``mask_suffix``: a mask is named like its image plus this (``_mask``: ``a.png`` -> ``a_mask.png``).
    ``class_values``: mask values in class order (default: {0, 255} is binary, else class indices with
    255 = ignore; palette PNGs give their palette indices). ``split_file``: JSON or CSV lists of stems
    per split. ``cache``: auto holds sets up to 256 MB decoded in RAM and memory-maps larger ones.
    ``root`` and ``split_file``, when relative, are relative to the experiment file.
    """
    return FolderSource(Path(root).expanduser(), image_dir, mask_dir, mask_suffix, val_fraction, seed, grayscale,
                        class_values, Path(split_file).expanduser() if split_file else None, cache)


@unetlab.hookimpl
def register_datasets(register):
    register("shapes", shapes)
    register("blobs", blobs)
    register("folder", folder)
