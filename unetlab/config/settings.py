"""A run's ``train`` section as a typed object: ``TrainSettings``, built once from the validated config.

The experiment file's schema (``unetlab.config.schema.SCHEMA["train"]``) stays the one definition of the keys,
their defaults, bounds and documentation; this dataclass mirrors it with the same annotations so that the code
that reads a run's settings is type-checked (``t.lr`` is a float, a misspelt ``t.lrr`` is a mypy error instead
of a KeyError at run time). ``tests/test_settings.py`` holds the two to the same names and types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, Union

from unetlab.config.schema import SCHEMA, Auto

__all__ = ["TrainSettings"]


@dataclass(frozen=True)
class TrainSettings:
    """The ``train`` section of one run's validated config (see the README's reference table for each key)."""

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

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainSettings:
        """The settings of a run's config; a key the config lacks (a config written before the key existed,
        read back from a checkpoint) takes the schema's default, as validation would have given it."""
        section = config.get("train") or {}
        return cls(**{f.name: section.get(f.name, SCHEMA["train"][f.name].default) for f in fields(cls)})
