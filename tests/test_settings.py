"""The typed ``train`` settings mirror the schema: the same keys, the same annotations, the validated values."""

from __future__ import annotations

import typing
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

import unetlab
from unetlab.config.schema import SCHEMA
from unetlab.config.settings import TrainSettings


def test_every_train_key_of_the_schema_is_a_setting_and_nothing_else() -> None:
    assert [f.name for f in fields(TrainSettings)] == list(SCHEMA["train"])


@pytest.mark.parametrize("key", [k for k, field in SCHEMA["train"].items() if field.annotation is not None])
def test_a_settings_annotation_is_the_schemas(key: str) -> None:
    hints = typing.get_type_hints(TrainSettings)
    assert hints[key] == SCHEMA["train"][key].annotation, key


def test_settings_carry_the_validated_values_of_a_real_experiment() -> None:
    experiment = unetlab.load_experiment(Path(__file__).parents[1] / "experiments" / "concat_vs_add.yaml",
                                         overrides=["train.lr=0.02", "train.max_steps=7", "train.optimizer=sgd"])
    config = experiment.runs[0].config
    settings = TrainSettings.from_config(config)
    assert (settings.lr, settings.max_steps, settings.optimizer) == (0.02, 7, "sgd")
    assert {f.name: getattr(settings, f.name) for f in fields(settings)} == config["train"]
    with pytest.raises(FrozenInstanceError):
        settings.lr = 1.0  # type: ignore[misc]


def test_a_key_missing_from_an_older_config_takes_the_schema_default() -> None:
    settings = TrainSettings.from_config({"train": {"lr": 0.5}})
    assert settings.lr == 0.5 and settings.threads == SCHEMA["train"]["threads"].default
