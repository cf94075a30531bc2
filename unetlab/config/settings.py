"""A run's config sections as typed objects: ``DataSettings``, ``ModelSettings``, ``TrainSettings`` and
``TrackingSettings``, built from the validated config (``RunSettings`` holds the four).

The experiment file's schema (``unetlab.config.schema.SCHEMA``) stays the one definition of the keys, their
defaults, bounds and documentation; these dataclasses mirror it with the same annotations so that the code that
reads a run's settings is type-checked (``t.lr`` is a float, a misspelt ``t.lrr`` is a mypy error instead of a
KeyError at run time). ``tests/test_settings.py`` holds them to the same names and types. Component specs
(``data.dataset``, ``model.encoder``, ``train.loss``...) stay ``Any``: their parameters are checked against the
component's own signature by the registry, not by the schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, Optional, TypeVar, Union

from unetlab.config.schema import SCHEMA, Auto, Channels

__all__ = ["DataSettings", "ModelSettings", "RunSettings", "TrackingSettings", "TrainSettings"]

_S = TypeVar("_S", bound="_Section")


class _Section:
    """What every section's settings share: the section they mirror, and building them from a run's config."""

    SECTION: ClassVar[str]

    @classmethod
    def from_config(cls: type[_S], config: Mapping[str, Any]) -> _S:
        """The section's settings in a run's config; a key the config lacks (a config written before the key
        existed, read back from a checkpoint) takes the schema's default, as validation would have given it."""
        section = config.get(cls.SECTION) or {}
        return cls(**{f.name: section.get(f.name, SCHEMA[cls.SECTION][f.name].default)
                      for f in fields(cls)})  # type: ignore[arg-type]  # subclasses are dataclasses


@dataclass(frozen=True)
class DataSettings(_Section):
    """The ``data`` section of one run's validated config."""

    SECTION: ClassVar[str] = "data"

    dataset: Any  # a component spec: built by the dataset registry
    batch_size: int
    val_batch_size: Optional[int]
    num_workers: int
    pin_memory: Union[bool, Auto]
    augment: Any  # a list of component specs
    patch_size: Optional[list[int]]
    foreground_oversample: float
    resize: Optional[list[int]]
    normalize: Optional[dict]
    folds: Optional[int]
    fold: int


@dataclass(frozen=True)
class ModelSettings(_Section):
    """The ``model`` section of one run's validated config."""

    SECTION: ClassVar[str] = "model"

    in_channels: Union[int, Auto]
    out_channels: Union[int, Auto]
    encoder: Any  # component specs, as for data.dataset
    upsampler: Any
    fusion: Any
    block: Any
    init: Any
    decoder_channels: Optional[list[Channels]]
    deep_supervision: bool


@dataclass(frozen=True)
class TrackingSettings(_Section):
    """The ``tracking`` section of one run's validated config."""

    SECTION: ClassVar[str] = "tracking"

    uri: Optional[str]
    log_model: bool
    checkpoint_dir: str
    figures: bool
    system_metrics: Union[bool, Auto]


@dataclass(frozen=True)
class TrainSettings(_Section):
    """The ``train`` section of one run's validated config (see the README's reference table for each key)."""

    SECTION: ClassVar[str] = "train"

    seed: int
    epochs: int
    max_steps: Optional[int]
    loss: Any  # component specs (a name, a mapping, or a weighted list): built by the loss registry
    metrics: Any  # component specs, as for loss
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float
    weight_decay: float
    momentum: float
    scheduler: Literal["none", "cosine", "step", "plateau"]
    warmup_epochs: int
    step_size: int
    gamma: float
    patience: int
    grad_clip: Optional[float]
    val_every: int
    monitor: str
    monitor_mode: Literal["auto", "max", "min"]
    early_stopping: Optional[int]
    device: str
    threads: int
    amp: Literal["auto", "off", "bf16", "fp16"]
    channels_last: Union[bool, Auto]
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]]
    sync_batchnorm: bool
    encoder_lr_mult: float
    freeze_encoder_epochs: int
    gradient_checkpointing: bool
    deterministic: bool


@dataclass(frozen=True)
class RunSettings:
    """The four sections of one run's validated config, typed."""

    data: DataSettings
    model: ModelSettings
    train: TrainSettings
    tracking: TrackingSettings

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Every section of a run's config (missing keys: the schema's defaults)."""
        return cls(DataSettings.from_config(config), ModelSettings.from_config(config),
                   TrainSettings.from_config(config), TrackingSettings.from_config(config))
