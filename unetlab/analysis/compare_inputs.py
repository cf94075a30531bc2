"""What ``unetlab compare`` reads from the store, read as data to validate, never trusted.

A run's per-image table (``per_image_metrics.json``, an MLflow table: ``{"columns": [...], "data":
[[...], ...]}``) may be missing (a run logged before tables existed), damaged (truncated, not JSON, nested
too deep, wrong types), edited (values outside the metric's declared range) or huge. ``read_per_image``
returns, for the one metric compared, the values compare may use and an account of what it could not:

- a table over ``MAX_TABLE_BYTES`` is refused from its listed size, before anything is downloaded or
  parsed (and again from the downloaded file's size, should the listing have none);
- a table that is not JSON, is nested too deep for the parser, or breaks the schema (``columns``: unique
  strings including ``image``; ``data``: rows of as many cells; ``image``: a string or integer; values:
  numbers or null) is *bad*: one line naming the run and what is wrong; none of its values are used;
- a finite value outside its key's declared range (the run's ``unetlab.metric_ranges`` tag, recorded at
  the run's start from each metric's ``value_range``: ``unetlab.metric_ranges``) makes the table bad too:
  it is not what the run wrote;
- a row whose compared value is null, NaN or infinite is dropped and counted (an undefined metric on an
  image is possible; silence about it is not).

The last row of an image wins (``log_table`` appends when a resumed run logs its table again).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unetlab.tracking import tags as run_tags

__all__ = ["MAX_TABLE_BYTES", "RANGES_TAG", "PerImageRead", "declared_ranges", "read_per_image"]

MAX_TABLE_BYTES = 8 * 2**20  # ~20,000 images x 20 metric columns; parsing costs ~20x the file in memory
RANGES_TAG = run_tags.METRIC_RANGES
ARTIFACT = "per_image_metrics.json"


@dataclass
class PerImageRead:
    """One run's per-image values of the compared metric, and what could not be used.

    ``values``: image id -> finite value (None: the run has no table, or a bad one); ``images``: every
    image id the table names (also those dropped); ``problem``: why the table is bad, or None;
    ``dropped``: rows not used, by reason.
    """

    values: dict[Any, float] | None
    images: list[Any] = field(default_factory=list)
    problem: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_count(self) -> int:
        """How many of the table's images were not used."""
        return sum(self.dropped.values())


def _number(value: Any) -> bool:
    """A JSON number that is a float: an integer of hundreds of digits parses but has no float value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return False
    return True


def declared_ranges(tags: dict[str, str]) -> tuple[dict[str, tuple[float, float]], str | None]:
    """The run's declared value ranges (key -> (low, high), null sides unbounded) and a problem, if any."""
    text = tags.get(RANGES_TAG)
    if text is None:
        return {}, None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return {}, f"tag {RANGES_TAG} is not JSON ({exc.__class__.__name__}); no ranges checked"
    if not isinstance(data, dict):
        return {}, f"tag {RANGES_TAG} is not a mapping; no ranges checked"
    out = {}
    for key, pair in data.items():
        if (not isinstance(pair, list) or len(pair) != 2 or not all(v is None or _number(v) for v in pair)
                or (pair[0] is not None and pair[1] is not None and pair[0] > pair[1])):
            return {}, f"tag {RANGES_TAG}: {key!r} is not [low, high]; no ranges checked"
        out[key] = (-math.inf if pair[0] is None else float(pair[0]), math.inf if pair[1] is None else float(pair[1]))
    return out, None


def _bad(problem: str) -> PerImageRead:
    return PerImageRead(None, problem=problem)


def read_per_image(client: Any, run_id: str, metric: str, ranges: dict[str, tuple[float, float]],
                   max_bytes: int = MAX_TABLE_BYTES, artifact: str = ARTIFACT) -> PerImageRead:
    """Read and validate run ``run_id``'s per-image table; return the finite values of ``metric`` (see the
    module docstring); ``artifact``: the table's name (``per_image_test_metrics.json`` for the test split).
    Never raises for what the file holds: a bad table comes back with ``problem`` set."""
    listed = {a.path: a for a in client.list_artifacts(run_id)}
    if artifact not in listed:
        return PerImageRead(None)
    size = listed[artifact].file_size
    if size is not None and size > max_bytes:
        return _bad(f"{artifact} is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB a per-image table "
                    "may have (refused unread)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(client.download_artifacts(run_id, artifact, tmp))
        size = path.stat().st_size
        if size > max_bytes:
            return _bad(f"{artifact} is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB a per-image "
                        "table may have (refused unparsed)")
        raw = path.read_bytes()
    try:
        table = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return _bad(f"{artifact} is not UTF-8 text")
    except RecursionError:
        return _bad(f"{artifact} is nested too deep to be a table")
    except ValueError as exc:
        return _bad(f"{artifact} is not valid JSON ({str(exc).splitlines()[0]})")
    return _validated(table, metric, ranges, artifact)


def _validated(table: Any, metric: str, ranges: dict[str, tuple[float, float]], artifact: str) -> PerImageRead:
    if not isinstance(table, dict) or not isinstance(table.get("columns"), list) or \
            not isinstance(table.get("data"), list):
        return _bad(f"{artifact} is not an MLflow table (expected {{\"columns\": [...], \"data\": [[...], ...]}})")
    columns = table["columns"]
    if not all(isinstance(c, str) for c in columns) or len(set(columns)) != len(columns) or "image" not in columns:
        return _bad(f"{artifact}: columns must be distinct strings including 'image', got "
                    f"{json.dumps(columns)[:80]}")
    image_at = columns.index("image")
    rows: dict[Any, list] = {}
    for n, row in enumerate(table["data"]):
        if not isinstance(row, list) or len(row) != len(columns):
            return _bad(f"{artifact}: data[{n}] is not a row of {len(columns)} cells")
        image = row[image_at]
        if not (isinstance(image, str) or (isinstance(image, int) and not isinstance(image, bool))):
            return _bad(f"{artifact}: data[{n}]: image must be a string or an integer, got {json.dumps(image)[:40]}")
        for column, value in zip(columns, row):
            if column == "image":
                continue
            if value is not None and not _number(value):
                return _bad(f"{artifact}: data[{n}].{column} must be a number or null, got "
                            f"{json.dumps(value)[:40]}")
            low, high = ranges.get(column, (-math.inf, math.inf))
            if value is not None and math.isfinite(value) and not low <= value <= high:
                return _bad(f"{artifact}: data[{n}].{column} = {value:g} (image {image!r}) is outside the "
                            f"metric's declared range [{low:g}, {high:g}]")
        rows[image] = row  # the last row of an image wins
    values: dict[Any, float] = {}
    read = PerImageRead(values, list(rows))
    if metric not in columns:  # a metric that is not per-image (train_loss): nothing to pair, nothing dropped
        return read
    at, reason = columns.index(metric), f"{metric} is NaN, inf or null"
    for image, row in rows.items():
        value = row[at]
        if value is None or not math.isfinite(value):
            read.dropped[reason] = read.dropped.get(reason, 0) + 1
        else:
            values[image] = float(value)
    return read
