"""``unetlab data FILE``: what the runs of an experiment file would train on, and every problem with it.

Per split: sample count, a size histogram, channels, dtype and class frequencies; then every problem
found (not just the first). Decoding here fills the decode cache, so the first run starts faster.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from unetlab.errors import UnetlabError
from unetlab.plugin_api.contracts import image_size_of, self_check_of

__all__ = ["check_data", "data_command", "describe_sizes"]

SPLITS = ("train", "val", "test")


def describe_sizes(sizes: list[tuple[int, int]], top: int = 2) -> str:
    """``256x256: 40, 512x512: 30, +5 other sizes (300x200 .. 1024x1400)``: a size histogram on one line."""
    if not sizes:
        return "-"
    counts = Counter(sizes).most_common()
    shown = ", ".join(f"{h}x{w}: {n}" for (h, w), n in counts[:top])
    if len(counts) > top:
        rest = [s for s, _ in counts[top:]]
        small, large = min(rest, key=lambda s: s[0] * s[1]), max(rest, key=lambda s: s[0] * s[1])
        shown += f", +{len(rest)} other sizes ({small[0]}x{small[1]} .. {large[0]}x{large[1]})"
    return shown


def _class_shares(masks: list, lut: np.ndarray, num_classes: int) -> str:
    pixels = np.zeros(num_classes + 1, np.int64)  # last: ignored
    for mask in masks:
        for value, count in zip(mask.meta["values"], mask.meta["counts"]):
            k = int(lut[value]) if value < len(lut) else -1
            pixels[k if 0 <= k < num_classes else num_classes] += count
    total = pixels.sum()
    if not total:
        return "-"
    text = "  ".join(f"{k}: {100 * pixels[k] / total:.1f}%" for k in range(num_classes))
    return text + (f"  ignored: {100 * pixels[-1] / total:.1f}%" if pixels[-1] else "")


def _folder_report(source: Any, name: str) -> tuple[list[str], list[str]]:
    built, problems = source.check()
    lines = [f"dataset {name}: {source.root}  ({source.layout or 'not scanned'})"]
    if built.channels is not None:
        values = built.class_values
        kind = "binary {0, 255}" if values == [0, 255] else f"values {values}"
        spec = built.normalization or {}
        norm = spec.get("mode", "-") + (f" (/{spec['scale'][0]:g})" if spec.get("mode") == "dtype" else "")
        lines.append(f"  images: {built.channels} channel(s), {built.dtype}; masks: {kind} -> "
                     f"{built.num_classes} classes; normalisation: {norm}")
        where = "held in RAM" if built.in_memory else "memory-mapped from the decode cache"
        size = built.image_size
        lines.append(f"  decoded: {built.decoded_bytes / 2 ** 20:.1f} MB, {where}; training input: "
                     f"{'x'.join(map(str, size)) if size else 'sizes differ'}")
    lines.append(f"  {'split':<6} {'count':>6}  {'sizes (HxW: count)':<52} class pixels")
    for split in SPLITS:
        samples = built.samples.get(split, [])
        sizes = [tuple(i.meta["source_shape"]) for i, _ in samples]
        shares = _class_shares([m for _, m in samples], built.lut, built.num_classes) if samples else "-"
        lines.append(f"  {split:<6} {len(samples):>6}  {describe_sizes(sizes):<52} {shares}")
    from unetlab.training.whole_image_validation import folder_validation_warnings

    lines += folder_validation_warnings(source, built)  # images too large to validate whole within the budget
    return lines, problems


def _generic_report(source: Any, name: str) -> tuple[list[str], list[str]]:
    lines = [(f"dataset {name}: {source.in_channels} channel(s), {source.num_classes} classes, image size "
              f"{image_size_of(source)}")]
    for split in SPLITS:
        data = source.split(split)
        tensors = getattr(data, "tensors", None)
        shares = "-"
        if tensors is not None and len(data):
            counts = np.bincount(tensors[1].numpy().ravel(), minlength=source.num_classes)
            shares = "  ".join(f"{k}: {100 * c / counts.sum():.1f}%" for k, c in enumerate(counts))
        lines.append(f"  {split:<6} {len(data):>6}  {shares}")
    return lines, []


def check_data(path: str, overrides: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Report lines and problems for every distinct data configuration of the file's runs."""
    from unetlab.config.experiment import load_experiment
    from unetlab.data.options import configure_source
    from unetlab.data.sources import build_source
    from unetlab.plugin_api.host import default_host
    from unetlab.plugin_api.registry import component_params

    host = default_host()
    experiment = load_experiment(path, overrides, host=host)
    groups: dict[str, list] = {}
    for run in experiment.runs:
        data = {k: v for k, v in run.config["data"].items() if k not in ("batch_size", "val_batch_size",
                                                                          "num_workers", "pin_memory", "augment")}
        groups.setdefault(json.dumps(data, sort_keys=True, default=str), []).append(run)
    lines: list[str] = []
    problems: list[str] = []
    for number, runs in enumerate(groups.values()):
        config = runs[0].config
        spec = config["data"]["dataset"]
        names = ", ".join(r.name for r in runs[:3]) + (f" (+{len(runs) - 3})" if len(runs) > 3 else "")
        source = host.registry.create("dataset", spec["name"], **component_params(spec))
        if self_check_of(source) is not None:  # a source that lists its problems instead of raising
            configure_source(source, config["data"], spec["name"])
            report, found = _folder_report(source, spec["name"])
        else:
            report, found = _generic_report(build_source(config, host.registry), spec["name"])
        if number and not found and len(report) > 4:  # folds and the like: one line each after the first
            counts = ", ".join(f"{line.split()[0]} {line.split()[1]}" for line in report[-3:])
            report = [f"  {names}: {counts}"]
        elif len(groups) > 1:
            report = [f"runs {names}:", *report]
        lines += report
        problems += [p for p in found if p not in problems]
    return lines, problems


def data_command(path: str, overrides: Sequence[str] = ()) -> int:
    """Print the report; raise ``UnetlabError`` (exit 2) after listing every problem."""
    lines, problems = check_data(path, overrides)
    print("\n".join(lines))
    if problems:
        print(f"problems ({len(problems)}):")
        for problem in problems:
            print(f"  - {problem}")
        raise UnetlabError(f"{path}: {len(problems)} problem(s) in the dataset (listed above)")
    print("no problems found")
    return 0
