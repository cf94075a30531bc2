"""The dataset-independent ``data.*`` keys (patches, resize, normalisation, folds), checked and handed
to a dataset source.

A source that supports them has ``configure(options: DataOptions)``; the standard ``folder`` dataset
supports all of them. A source without ``configure`` (the generated ``shapes`` and ``blobs``, a
plugin's dataset) is used as it is, and setting one of these keys for it is a one-line error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from unetlab.data.normalization import check_normalize
from unetlab.errors import UnetlabError

__all__ = ["LOADER_KEYS", "DataOptions", "configure_source", "data_options", "source_key"]

# data.* keys that only change how batches are loaded, never which samples a source holds
LOADER_KEYS = ("batch_size", "val_batch_size", "num_workers", "pin_memory", "augment")


@dataclass(frozen=True)
class DataOptions:
    """The checked ``data.*`` keys a source's ``configure`` receives."""

    patch_size: tuple[int, int] | None = None
    foreground_oversample: float = 0.33
    resize: tuple[int, int] | None = None
    normalize: dict | None = None
    folds: int | None = None
    fold: int = 0

    def set_keys(self) -> list[str]:
        """The keys that differ from 'use the data as it is'."""
        keys = [k for k in ("patch_size", "resize", "normalize", "folds") if getattr(self, k) is not None]
        return keys + (["fold"] if self.fold and self.folds is None else [])


def _size(value: Any, key: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise UnetlabError(f"data.{key}: expected [H, W] (two positive integers), got {value!r}")
    return int(value[0]), int(value[1])


def data_options(data: dict) -> DataOptions:
    """Check the ``data`` section's dataset-independent keys; one-line errors name the key."""
    patch, resize = _size(data.get("patch_size"), "patch_size"), _size(data.get("resize"), "resize")
    if patch and resize:
        raise UnetlabError("data.patch_size and data.resize: pick one (patches of images at their own size, or "
                           "every image resized)")
    oversample = data.get("foreground_oversample", 0.33)
    if not 0 <= oversample <= 1:
        raise UnetlabError(f"data.foreground_oversample: {oversample} must be in [0, 1]")
    folds, fold = data.get("folds"), data.get("fold", 0)
    if folds is not None and folds < 2:
        raise UnetlabError(f"data.folds: {folds} is too few (at least 2; null for no folds)")
    if folds is not None and not 0 <= fold < folds:
        raise UnetlabError(f"data.fold: {fold} is out of range for data.folds: {folds} (0..{folds - 1})")
    return DataOptions(patch, float(oversample), resize, check_normalize(data.get("normalize")), folds, fold)


def source_key(data: dict) -> str:
    """Equal for two ``data`` sections exactly when they build the same source: the dataset and every
    option ``configure`` receives (fold, patches, resize, normalisation...), not the loader keys."""
    return json.dumps({k: v for k, v in data.items() if k not in LOADER_KEYS}, sort_keys=True, default=str)


def configure_source(source: Any, data: dict, name: str) -> Any:
    """Hand the checked options to ``source`` (dataset ``name``) and return it."""
    options = data_options(data)
    configure = getattr(source, "configure", None)
    if configure is not None:
        configure(options)
    elif options.set_keys():
        key = options.set_keys()[0]
        raise UnetlabError(f"data.{key}: the '{name}' dataset does not support it (patches, resize, normalize and "
                           "folds are for datasets read from files, like 'folder')")
    return source
