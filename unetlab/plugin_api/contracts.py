"""The typed contracts of plugin components: what a dataset source, a metric, a loss and a run tracker offer.

A dataset source must have ``in_channels``, ``num_classes`` and ``split(name)`` (:class:`DatasetSource`). Every
other attribute is an optional capability with its own small runtime-checkable Protocol and one accessor here,
which returns the documented default for a source without it: a third-party source written against the 0.1 docs
keeps working. Code reads the optional parts only through these accessors (one home, no scattered ``getattr``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DatasetSource",
    "Loss",
    "Metric",
    "Tracker",
    "HasIgnoreIndex",
    "HasImageSize",
    "HasNormalization",
    "HasRoot",
    "HasWholeImageValidation",
    "ChecksItself",
    "ignore_index_of",
    "image_size_of",
    "normalization_of",
    "root_of",
    "validates_whole_images",
    "self_check_of",
]


@runtime_checkable
class DatasetSource(Protocol):
    """The required part of a dataset source: channels, classes (background included) and its splits."""

    @property
    def in_channels(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    def split(self, name: str) -> Any:
        """The ``torch.utils.data.Dataset`` of ``"train"``, ``"val"`` or ``"test"``: (image, mask) pairs."""
        ...


@runtime_checkable
class HasImageSize(Protocol):
    """A source whose images have one size, ``(H, W)``, or ``None`` when they vary."""

    @property
    def image_size(self) -> Sequence[int] | None: ...


@runtime_checkable
class HasIgnoreIndex(Protocol):
    """A source whose masks mark pixels that count nowhere (padding, unlabeled) with one label value."""

    @property
    def ignore_index(self) -> int | None: ...


@runtime_checkable
class HasNormalization(Protocol):
    """A source that fitted an image normalization, recorded with the model so prediction applies it."""

    @property
    def normalization(self) -> Mapping[str, Any] | None: ...


@runtime_checkable
class HasWholeImageValidation(Protocol):
    """A source that trains on patches and wants validation on whole images, as prediction sees them."""

    @property
    def whole_image_validation(self) -> bool: ...


@runtime_checkable
class HasRoot(Protocol):
    """A source read from a folder on disk (its identity includes that folder)."""

    @property
    def root(self) -> str | Path | None: ...


@runtime_checkable
class ChecksItself(Protocol):
    """A source that lists its problems (one line each) instead of raising at the first."""

    def check(self) -> Sequence[str]: ...


def image_size_of(source: object) -> tuple[int, ...] | None:
    """The source's fixed image size, or ``None`` (sizes vary, or the source does not say)."""
    size = source.image_size if isinstance(source, HasImageSize) else None
    return tuple(int(s) for s in size) if size else None


def ignore_index_of(source: object) -> int | None:
    """The mask value the loss and the metrics skip, or ``None`` (every pixel counts)."""
    value = source.ignore_index if isinstance(source, HasIgnoreIndex) else None
    return None if value is None else int(value)


def normalization_of(source: object) -> Mapping[str, Any] | None:
    """The normalization the source fitted (saved with the model), or ``None``."""
    return source.normalization if isinstance(source, HasNormalization) else None


def validates_whole_images(source: object) -> bool:
    """Whether validation runs on whole images by sliding window (``False`` for a source without the capability)."""
    return bool(source.whole_image_validation) if isinstance(source, HasWholeImageValidation) else False


def root_of(source: object) -> str | Path | None:
    """The folder the source reads, or ``None`` (generated data, or the source does not say)."""
    return source.root if isinstance(source, HasRoot) else None


def self_check_of(source: object) -> Callable[[], Sequence[str]] | None:
    """The source's own ``check()`` listing its problems, or ``None`` when it has none."""
    check = source.check if isinstance(source, ChecksItself) else None
    return check if callable(check) else None


class Metric(Protocol):
    """A metric accumulator: counts over the whole validation set, then one score per key."""

    def reset(self) -> None: ...

    def update(self, logits: Any, target: Any) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Loss(Protocol):
    """A loss: ``loss(logits N x C x H x W, target N x H x W int64)`` -> a scalar tensor."""

    def __call__(self, logits: Any, target: Any) -> Any: ...


class Tracker(Protocol):
    """The public surface of one run's tracker (``unetlab.tracking.run_tracker.RunTracker``) that plugins and
    lifecycle hooks see: code that takes "a tracker" is typed against this."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_metric(self, key: str, value: float, step: int = 0) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def record_failure(self, message: str, traceback_text: str | None = None) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...

    def log_dataset(self, name: str, digest: str, splits: dict[str, int], source: str) -> None: ...

    def log_model(self, model: Any, pip_requirements: list[str]) -> str: ...
