"""The value range each logged metric key declares, recorded with a run so that readers can check values.

A metric declares the range of every value its ``compute()`` returns with a class (or factory) attribute
``value_range = (low, high)``, ``None`` for an unbounded side: IoU and Dice ``(0.0, 1.0)``, HD95
``(0.0, None)``. A metric without one declares nothing (no range is checked for it). ``unetlab run``
records the ranges of a run's keys in its ``unetlab.metric_ranges`` tag (JSON ``{"val_iou": [0.0, 1.0]}``,
null for an unbounded side), next to ``unetlab.metric_directions``; ``unetlab compare`` refuses a
per-image table holding a value outside them (``unetlab.analysis.compare_inputs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unetlab.errors import PluginError
from unetlab.plugin_api.registry import Registry, metric_keys

__all__ = ["declared_value_range", "metric_ranges"]


def declared_value_range(factory: Any) -> tuple[float | None, float | None] | None:
    """The factory's ``value_range`` as (low, high), or None when it declares none; a malformed one is a
    ``PluginError`` naming the factory."""
    declared = getattr(factory, "value_range", None)
    if declared is None:
        return None
    ok = (isinstance(declared, (tuple, list)) and len(declared) == 2
          and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in declared)
          and (None in declared or declared[0] <= declared[1]))
    if not ok:
        raise PluginError(f"{getattr(factory, '__name__', factory)!s}: value_range must be (low, high) with "
                          f"low <= high, None for an unbounded side, got {declared!r}")
    return (None if declared[0] is None else float(declared[0]), None if declared[1] is None else float(declared[1]))


def metric_ranges(train_config: Mapping[str, Any], num_classes: int,
                  registry: Registry) -> dict[str, list[float | None]]:
    """Every ``val_<key>`` of the run's metrics whose metric declares a ``value_range`` -> [low, high].

    The keys are found as ``registry.metric_directions`` finds them: each metric is built, fed one tiny
    batch holding every class and asked for ``compute()``.
    """
    ranges: dict[str, list[float | None]] = {}
    for spec in train_config["metrics"]:
        declared = declared_value_range(registry.get("metric", spec["name"]).factory)
        if declared is not None:
            ranges.update({f"val_{key}": list(declared) for key in metric_keys(spec, num_classes, registry)})
    return ranges
