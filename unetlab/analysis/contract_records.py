"""The comparison contract's inputs (``unetlab.analysis.contract.RunRecord``), from an experiment file before
training (``unetlab validate``) or from finished MLflow runs (``unetlab compare``).

Before training: each run's model is built once (as ``unetlab summary`` does) for its parameter count and
forward GFLOPs at the training size, its data source for the digest and split sizes, and the steps it
will take at most: epochs x batches per epoch (``ceil(train images / batch size)``), capped by
``train.max_steps`` (early stopping may take fewer).

After training: what each run logged (``unetlab.runs.run_outputs``): params ``model.num_params``,
``model.gflops_per_image``, ``data.batch_size``; metrics ``train_time_s``, ``train_steps``, ``train_epochs``,
``peak_memory_mb`` with its kind in the ``unetlab.peak_memory_kind`` tag; the ``unetlab.data_digest`` tag and
the split sizes of the run's MLflow dataset input. Store content is validated: a value that is missing or
not a number is unknown (``-``), never a crash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from unetlab.analysis.contract import ComparisonContract, RunRecord, build_contract, variant_label
from unetlab.tracking import tags as run_tags

__all__ = ["DERIVED_PARAMS", "contract_before_training", "records_before_training", "records_from_runs"]

# logged as params beside the config, but derived from it (or shown as the contract's own columns)
DERIVED_PARAMS = ("model.num_params", "model.gflops_per_image", "model.in_channels_resolved",
                  "model.out_channels_resolved", "data.num_classes")


def records_before_training(experiment: Any, registry: Any) -> list[RunRecord]:
    """One record per run of a loaded experiment, with what is known before any training."""
    from unetlab.config.experiment import flatten
    from unetlab.training.dataset_identity import data_identity
    from unetlab.training.preflight import check_model, dataset_key, model_cost

    tuned = [p.key for p in experiment.tune.params] if experiment.tune is not None else []
    records: list[RunRecord] = []
    sources: dict[str, Any] = {}  # dataset key -> the data source its runs share
    for run in experiment.runs:
        checked = check_model(run, registry, sources.get(dataset_key(run.config)))
        sources.setdefault(dataset_key(run.config), checked.source)
        params, gflops = model_cost(run.config, registry, checked)
        _, digest, splits, _ = data_identity(run.config, checked.source)
        data, train = run.settings.data, run.settings.train
        per_epoch = math.ceil(len(checked.source.split("train")) / data.batch_size)
        steps = train.epochs * per_epoch
        if train.max_steps is not None:
            steps = min(steps, train.max_steps)
        config = {k: v for k, v in flatten(run.config).items() if k not in tuned}
        records.append(RunRecord(variant_label(run.name), config, params=params, gflops_per_image=gflops,
                                 batch_size=data.batch_size, epochs=train.epochs, steps=steps,
                                 data_digest=digest, splits=splits))
    return records


def contract_before_training(experiment: Any, registry: Any) -> ComparisonContract:
    """The comparison contract of a loaded experiment, as far as it is known before training."""
    tuned = [p.key for p in experiment.tune.params] if experiment.tune is not None else []
    return build_contract(records_before_training(experiment, registry), tuned=tuned, ratio=experiment.compute_ratio)


def _number(text: Any, kind: Callable[[Any], Any] = float) -> Any:
    """A store value as a finite, non-negative ``kind`` (None when it is not one)."""
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return kind(value)


def _splits(run: Any) -> dict[str, int] | None:
    """The split sizes of the run's dataset input (its profile's ``splits``), validated."""
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    for item in inputs:
        try:
            profile = json.loads(item.dataset.profile or "{}")
        except (ValueError, RecursionError, AttributeError):
            continue
        splits = profile.get("splits") if isinstance(profile, dict) else None
        if isinstance(splits, dict) and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                            and v >= 0 for k, v in splits.items()):
            return dict(splits)
    return None


def records_from_runs(runs: Sequence[tuple[str, Any]], tuned: Sequence[str] = ()) -> list[RunRecord]:
    """One record per finished MLflow run; ``runs``: (variant, run) pairs; ``tuned``: keys a tune section
    searched (left out of the declared config)."""
    skip = set(DERIVED_PARAMS) | set(tuned)
    records = []
    for variant, run in runs:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        config = {k: v for k, v in params.items() if k not in skip and not k.startswith("tune.")}
        memory = _number(metrics.get("peak_memory_mb"))
        records.append(RunRecord(
            variant, config, params=_number(params.get("model.num_params"), int),
            gflops_per_image=_number(params.get("model.gflops_per_image")),
            batch_size=_number(params.get("data.batch_size"), int), epochs=_number(metrics.get("train_epochs"), int),
            steps=_number(metrics.get("train_steps"), int), train_seconds=_number(metrics.get("train_time_s")),
            peak_memory_mb=memory,
            memory_kind=(tags.get(run_tags.PEAK_MEMORY_KIND, "")[:80] or None) if memory is not None else None,
            data_digest=tags.get(run_tags.DATA_DIGEST, "")[:36] or None, splits=_splits(run)))
    return records
