"""The comparison contract: what the variants of a comparison differ in, and what a reviewer checks for confounds.

From one record per run (its variant, declared config and measured costs) it states

- the **declared factor**: every config key whose values differ between variants (keys that vary inside
  a variant, seed and fold, are replicates, not the factor; keys a ``tune:`` section searched are listed
  apart, as tuned per variant within one search space);
- the **confound columns**, one row per variant: parameter count, forward GFLOPs per image, epochs,
  optimizer steps, training compute (forward FLOPs x images seen), training time, peak memory, data
  digest and split sizes. ``unetlab validate`` knows the first ones before training; ``unetlab compare``
  adds what was measured;
- **warnings**: variants whose training compute or training time differ by more than ``ratio``
  (default ``COMPUTE_RATIO``, an experiment's ``compare.compute_ratio``): an improvement that is really
  more compute (Isensee et al. 2024, "nnU-Net Revisited"); variants trained or judged on different data.

Pure: no MLflow, no torch. Values are taken as given (``None``: unknown), so callers validate store content.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COMPUTE_RATIO", "ComparisonContract", "RunRecord", "VariantCosts", "build_contract", "contract_from_dict",
           "differing_keys", "format_contract", "variant_label"]

COMPUTE_RATIO = 1.5   # variants whose compute differs by more than this factor get a warning
_ABSENT = "(absent)"
_REPLICATE_PART = re.compile(r"^(seed|fold|data\.fold)=")


def variant_label(run_name: str) -> str:
    """A run's name without its replicate parts (``seed=N``, ``fold=K``): its variant and matrix cell."""
    return "/".join(part for part in run_name.split("/") if not _REPLICATE_PART.match(part))


@dataclass(frozen=True)
class RunRecord:
    """One run as the contract sees it; ``None`` where a value is unknown (e.g. time before training)."""

    variant: str
    config: Mapping[str, Any]                  # declared config, flattened to dotted keys
    params: int | None = None                  # trainable parameter count
    gflops_per_image: float | None = None      # forward GFLOPs for one image at the training size
    batch_size: int | None = None              # images per optimizer step
    epochs: int | None = None
    steps: int | None = None                   # optimizer steps
    train_seconds: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str | None = None             # what peak_memory_mb measures, e.g. "CUDA max allocated"
    data_digest: str | None = None
    splits: Mapping[str, int] | None = None    # split name -> images


@dataclass(frozen=True)
class VariantCosts:
    """One variant's confound columns: a value, or a ``(low, high)`` range when its runs differ."""

    variant: str
    runs: int
    params: tuple[int, int] | None
    gflops_per_image: tuple[float, float] | None
    epochs: tuple[int, int] | None
    steps: tuple[int, int] | None
    compute_tflop: float | None              # mean over runs of forward FLOPs x images seen, in TFLOP
    train_seconds: float | None              # mean over runs
    peak_memory_mb: float | None             # max over runs
    memory_kind: str | None
    data_digests: tuple[str, ...]
    splits: tuple[str, ...]                  # "train 320 / val 96 / test 64", one per distinct set of sizes


@dataclass(frozen=True)
class ComparisonContract:
    """The declared factor, the tuned keys, the confound columns per variant and the warnings."""

    factor: dict[str, dict[str, list[str]]]   # key -> variant -> the values its runs have (JSON text)
    tuned: list[str]
    variants: list[VariantCosts]
    ratio: float
    warnings: list[str] = field(default_factory=list)
    ratio_source: str = "default"             # where ratio came from: "default", "compare.compute_ratio", a flag

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``compare --format json`` and ``compare.json``."""
        return {"factor": self.factor, "tuned": self.tuned, "compute_ratio": self.ratio,
                "compute_ratio_source": self.ratio_source, "warnings": self.warnings,
                "variants": [vars(v) for v in self.variants]}


def contract_from_dict(data: Mapping[str, Any]) -> ComparisonContract:
    """The contract back from ``ComparisonContract.as_dict()`` (e.g. a comparison's plain data)."""
    def costs(item: Mapping[str, Any]) -> VariantCosts:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in item.items()}
        return VariantCosts(**fields)

    return ComparisonContract(factor=dict(data["factor"]), tuned=list(data["tuned"]),
                              variants=[costs(v) for v in data["variants"]], ratio=float(data["compute_ratio"]),
                              warnings=list(data["warnings"]),
                              ratio_source=str(data.get("compute_ratio_source") or "default"))


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value


def _span(values: Sequence[Any]) -> tuple[Any, Any] | None:
    known = [v for v in values if v is not None]
    return (min(known), max(known)) if known else None


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def _compute_tflop(record: RunRecord) -> float | None:
    """Forward FLOPs x images seen in training (steps x batch size), in TFLOP."""
    if record.gflops_per_image is None or record.steps is None or record.batch_size is None:
        return None
    return record.gflops_per_image * record.steps * record.batch_size / 1e3


def _splits_text(splits: Mapping[str, int] | None) -> str | None:
    return None if not splits else " / ".join(f"{name} {size}" for name, size in splits.items())


def differing_keys(configs: Mapping[str, Sequence[Mapping[str, Any]]],
                   skip: Sequence[str] = ()) -> dict[str, dict[str, list[str]]]:
    """The keys whose values differ between variants (``configs``: variant -> its runs' flattened configs),
    each with the values every variant's runs have (JSON text). A key that differs between the runs of one
    variant (seed, fold: replicates) is not part of the factor, nor are the keys in ``skip``."""
    keys = sorted({k for group in configs.values() for c in group for k in c} - set(skip))
    factor = {}
    for key in keys:
        seen = {variant: sorted({_text(c.get(key, _ABSENT)) for c in group}) for variant, group in configs.items()}
        if any(len(values) > 1 for values in seen.values()):
            continue  # varies inside a variant: a replicate key
        if len({tuple(v) for v in seen.values()}) > 1:
            factor[key] = seen
    return factor


def _costs(variant: str, records: list[RunRecord]) -> VariantCosts:
    memory = [r.peak_memory_mb for r in records if r.peak_memory_mb is not None]
    kinds = sorted({r.memory_kind for r in records if r.memory_kind})
    return VariantCosts(
        variant=variant, runs=len(records), params=_span([r.params for r in records]),
        gflops_per_image=_span([r.gflops_per_image for r in records]), epochs=_span([r.epochs for r in records]),
        steps=_span([r.steps for r in records]), compute_tflop=_mean([_compute_tflop(r) for r in records]),
        train_seconds=_mean([r.train_seconds for r in records]), peak_memory_mb=max(memory) if memory else None,
        memory_kind=", ".join(kinds) or None,
        data_digests=tuple(sorted({r.data_digest for r in records if r.data_digest})),
        splits=tuple(sorted({s for s in (_splits_text(r.splits) for r in records) if s})))


def _ratio_warning(what: str, values: dict[str, float | None], ratio: float, unit: str) -> str | None:
    known = {v: x for v, x in values.items() if x is not None and x > 0}
    if len(known) < 2:
        return None
    low, high = min(known, key=known.__getitem__), max(known, key=known.__getitem__)
    factor = known[high] / known[low]
    if factor <= ratio:
        return None
    return (f"variants differ in {what} by {factor:.2f}x (more than the stated ratio {ratio:g}): {high} "
            f"{known[high]:.4g} {unit}, {low} {known[low]:.4g} {unit}; a difference between them may be "
            "more compute rather than the declared factor")


def _warnings(variants: list[VariantCosts], factor: dict[str, Any], ratio: float) -> list[str]:
    found = [
        _ratio_warning("training compute (forward FLOPs x images seen)",
                       {v.variant: v.compute_tflop for v in variants}, ratio, "TFLOP"),
        _ratio_warning("training time", {v.variant: v.train_seconds for v in variants}, ratio, "s"),
    ]
    data_is_the_factor = any(key.startswith("data.") for key in factor)  # then different data is the point
    if not data_is_the_factor and len({v.data_digests for v in variants if v.data_digests}) > 1:
        found.append("variants were trained on different data (data digests differ: "
                     + "; ".join(f"{v.variant} {', '.join(v.data_digests)}" for v in variants) + ")")
    if len({v.splits for v in variants if v.splits}) > 1:
        found.append("variants have different splits (" + "; ".join(f"{v.variant}: {', '.join(v.splits)}"
                                                                     for v in variants) + ")")
    return [w for w in found if w]


def build_contract(records: Sequence[RunRecord], *, tuned: Sequence[str] = (),
                   ratio: float | None = None, ratio_source: str = "compare.compute_ratio") -> ComparisonContract:
    """The comparison contract of these runs, variants in the order they first appear.

    ``tuned``: config keys a ``tune:`` section searched per variant (listed apart, never the factor).
    ``ratio``: the compute and time ratio between variants above which a warning is given (> 1; None:
    ``COMPUTE_RATIO``, named "default"), which ``ratio_source`` names ("compare.compute_ratio", "--compute-ratio").
    """
    if ratio is None:
        ratio, ratio_source = COMPUTE_RATIO, "default"
    if not ratio > 1:
        raise ValueError(f"the compute ratio must be greater than 1, got {ratio!r}")
    by_variant: dict[str, list[RunRecord]] = {}
    for record in records:
        by_variant.setdefault(record.variant, []).append(record)
    variants = [_costs(name, group) for name, group in by_variant.items()]
    factor = differing_keys({name: [r.config for r in group] for name, group in by_variant.items()}, tuned)
    return ComparisonContract(factor=factor, tuned=sorted(tuned), variants=variants, ratio=ratio,
                              warnings=_warnings(variants, factor, ratio), ratio_source=ratio_source)


def _range_text(span: tuple[Any, Any] | None, fmt: str = "{:,}") -> str:
    if span is None:
        return "-"
    low, high = span
    return fmt.format(low) if low == high else f"{fmt.format(low)}..{fmt.format(high)}"


def _columns(contract: ComparisonContract) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "runs", "params", "GFLOPs/img", "epochs", "steps", "compute TFLOP", "train s",
              "peak MB", "data digest", "split"]
    rows = [[v.variant, str(v.runs), _range_text(v.params), _range_text(v.gflops_per_image, "{:.3f}"),
             _range_text(v.epochs), _range_text(v.steps),
             "-" if v.compute_tflop is None else f"{v.compute_tflop:.3g}",
             "-" if v.train_seconds is None else f"{v.train_seconds:.1f}",
             "-" if v.peak_memory_mb is None else f"{v.peak_memory_mb:.0f}",
             ", ".join(v.data_digests) or "-", ", ".join(v.splits) or "-"] for v in contract.variants]
    keep = [i for i in range(len(header)) if i < 2 or any(row[i] != "-" for row in rows)]  # unknown yet: left out
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows]


def format_contract(contract: ComparisonContract) -> list[str]:
    """The contract as text lines: the factor, the tuned keys, the confound table, the warnings."""
    lines = ["comparison contract:"]
    if len(contract.variants) < 2:
        lines.append("  one variant: nothing is compared")
    elif not contract.factor:
        lines.append("  declared factor: none (the variants' configs are identical)")
    for key, seen in contract.factor.items():
        values = "; ".join(f"{variant}: {' | '.join(texts)}" for variant, texts in seen.items())
        lines.append(f"  declared factor: {key} ({values})")
    if contract.tuned:
        lines.append(f"  tuned per variant (one search space and budget): {', '.join(contract.tuned)}")
    header, rows = _columns(contract)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else []
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    kinds = {kind for v in contract.variants if v.memory_kind for kind in v.memory_kind.split(", ")}
    notes = ["compute: forward FLOPs x images seen in training (steps x batch size)"]
    if kinds:
        shared = any("before)" in kind for kind in kinds)  # sequential runs share one process peak
        notes.append(f"peak memory: {', '.join(sorted({kind.split(' (')[0] for kind in kinds}))}"
                     + (", some of a process that trained other runs before (an upper bound)" if shared else ""))
    source = " (the default; compare.compute_ratio in the experiment file sets it)" \
        if contract.ratio_source == "default" else f" (set by {contract.ratio_source})"
    notes.append(f"a warning when variants differ in compute or time by more than {contract.ratio:g}x{source}")
    lines.append("  (" + "; ".join(notes) + ")")
    lines += [f"  warning: {w}" for w in contract.warnings]
    return lines
