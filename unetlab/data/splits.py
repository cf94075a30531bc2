"""Reproducible splits of a dataset's samples (named by file stem): split files, K folds, a random split.

Every split depends on the dataset's own seed, never on a run's seed, so every variant and seed of
an experiment trains and validates on the same samples.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from unetlab.errors import UnetlabError

__all__ = ["SPLITS", "kfold", "random_split", "read_split_file", "split_from_file"]

SPLITS = ("train", "val", "test")


def read_split_file(path: Path) -> dict[str, list[str]] | list[dict[str, list[str]]]:
    """Read a split file: JSON ``{"train": [stems], "val": [...], "test": [...]}``, a JSON list of such
    mappings (one per fold, like nnU-Net's ``splits_final.json``), or CSV rows ``stem,split``."""
    if not path.is_file():
        raise UnetlabError(f"split file '{path}' not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UnetlabError(f"split file '{path}': not valid JSON ({exc})") from None
        entries = data if isinstance(data, list) else [data]
        for i, entry in enumerate(entries):
            where = f"[{i}]" if isinstance(data, list) else ""
            if not isinstance(entry, dict) or not set(entry) <= set(SPLITS) or not all(
                    isinstance(v, list) and all(isinstance(s, str) for s in v) for v in entry.values()):
                raise UnetlabError(f"split file '{path}'{where}: expected a mapping of train/val/test to lists of "
                                   "file stems")
        return data
    if path.suffix.lower() == ".csv":
        out: dict[str, list[str]] = {name: [] for name in SPLITS}
        for number, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row or (number == 1 and [c.strip().lower() for c in row] == ["stem", "split"]):
                continue
            if len(row) != 2 or row[1].strip() not in SPLITS:
                raise UnetlabError(f"split file '{path}', line {number}: expected 'stem,split' with split one of "
                                   f"{', '.join(SPLITS)}, got {','.join(row)!r}")
            out[row[1].strip()].append(row[0].strip())
        return out
    raise UnetlabError(f"split file '{path}': expected a .json or .csv file")


def split_from_file(path: Path, stems: list[str], fold: int | None) -> dict[str, list[str]]:
    """Assign ``stems`` to splits as the file says; a stem listed twice or without a file is an error."""
    data = read_split_file(path)
    if isinstance(data, list):
        index = fold or 0
        if not 0 <= index < len(data):
            raise UnetlabError(f"data.fold: {index} is out of range: split file '{path}' has {len(data)} fold(s)")
        data = data[index]
    known = set(stems)
    seen: dict[str, str] = {}
    for name, listed in data.items():
        for stem in listed:
            if stem in seen:
                raise UnetlabError(f"split file '{path}': '{stem}' is in both {seen[stem]} and {name}")
            seen[stem] = name
    unknown = sorted(set(seen) - known)
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise UnetlabError(f"split file '{path}' names samples with no image/mask pair: {', '.join(unknown[:5])}{more}")
    return {name: sorted(data.get(name, [])) for name in SPLITS}


def kfold(stems: list[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) of fold ``fold`` of a K-fold split of ``stems``, shuffled once by ``seed``."""
    if folds < 2:
        raise UnetlabError(f"data.folds: {folds} is too few (at least 2)")
    if not 0 <= fold < folds:
        raise UnetlabError(f"data.fold: {fold} is out of range for data.folds: {folds} (0..{folds - 1})")
    if folds > len(stems):
        raise UnetlabError(f"data.folds: {folds} folds need at least {folds} training samples, the pool has "
                           f"{len(stems)}")
    order = np.random.default_rng(seed).permutation(len(stems))
    parts = np.array_split(order, folds)
    val = {stems[i] for i in parts[fold]}
    return [s for s in stems if s not in val], [s for s in stems if s in val]


def random_split(stems: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): ``val_fraction`` of ``stems`` (at least one when it is > 0 and there are two) for validation."""
    if not 0 <= val_fraction < 1:
        raise UnetlabError(f"val_fraction: {val_fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = round(val_fraction * len(stems))
    if val_fraction > 0 and n_val == 0 and len(stems) > 1:
        n_val = 1
    val = {stems[i] for i in order[:n_val]}
    return [s for s in stems if s not in val], [s for s in stems if s in val]
