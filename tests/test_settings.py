"""The typed settings mirror the schema: the same keys, the same annotations, the validated values."""

from __future__ import annotations

import typing
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

import unetlab
from unetlab.config.schema import SCHEMA
from unetlab.config.settings import DataSettings, ModelSettings, RunSettings, TrackingSettings, TrainSettings

SECTIONS = {"data": DataSettings, "model": ModelSettings, "train": TrainSettings, "tracking": TrackingSettings}


def test_every_run_section_of_the_schema_has_its_settings() -> None:
    assert sorted(k for k, v in SCHEMA.items() if isinstance(v, dict)) == sorted(SECTIONS)
    assert [f.name for f in fields(RunSettings)] == list(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_of_a_section_is_a_setting_and_nothing_else(section: str) -> None:
    assert [f.name for f in fields(SECTIONS[section])] == list(SCHEMA[section])


@pytest.mark.parametrize("section, key", [(s, k) for s in SECTIONS for k, field in SCHEMA[s].items()
                                          if field.annotation is not None])
def test_a_settings_annotation_is_the_schemas(section: str, key: str) -> None:
    # include_extras: an Annotated element type (decoder_channels' Channels) is compared with its Range; the
    # bounds of scalar keys live in the schema's Field.bounds, which validation applies, not in the annotation
    hints = typing.get_type_hints(SECTIONS[section], include_extras=True)
    assert hints[key] == SCHEMA[section][key].annotation, key


def test_settings_carry_the_validated_values_of_a_real_experiment() -> None:
    experiment = unetlab.load_experiment(Path(__file__).parents[1] / "experiments" / "concat_vs_add.yaml",
                                         overrides=["train.lr=0.02", "train.max_steps=7", "train.optimizer=sgd",
                                                    "data.batch_size=5", "tracking.figures=false",
                                                    "model.decoder_channels=[8,4]"])
    config = experiment.runs[0].config
    settings = RunSettings.from_config(config)
    assert (settings.train.lr, settings.train.max_steps, settings.train.optimizer) == (0.02, 7, "sgd")
    assert (settings.data.batch_size, settings.tracking.figures, settings.model.decoder_channels) == (5, False, [8, 4])
    for section in SECTIONS:
        typed = getattr(settings, section)
        assert {f.name: getattr(typed, f.name) for f in fields(typed)} == config[section]
    with pytest.raises(FrozenInstanceError):
        settings.train.lr = 1.0  # type: ignore[misc]


def test_a_key_missing_from_an_older_config_takes_the_schema_default() -> None:
    settings = RunSettings.from_config({"train": {"lr": 0.5}})
    assert settings.train.lr == 0.5 and settings.train.threads == SCHEMA["train"]["threads"].default
    assert settings.tracking.checkpoint_dir == SCHEMA["tracking"]["checkpoint_dir"].default
    assert settings.data.fold == SCHEMA["data"]["fold"].default
