"""The ``tune:`` section's own checks (``unetlab.config.tune.parse_tune``): every mistake is one line naming
the place, the key path and what is allowed; a good section becomes a frozen ``TuneSpec``."""

from __future__ import annotations

import dataclasses
import json

import pytest

from unetlab.config.tune import ParamSpace, Pruning, TuneSpec, parse_tune
from unetlab.errors import ConfigError

GOOD = {"params": {"train.lr": {"log_uniform": [1.0e-4, 1.0e-2]}, "train.weight_decay": {"uniform": [0, 0.001]},
                   "data.batch_size": {"choice": [4, 8]}, "model.encoder.depth": {"int": [2, 4]}},
        "trials": 3, "epochs": 2, "sampler": "random", "seed": 7,
        "pruning": {"median": {"warmup_epochs": 1, "startup_trials": 2}}, "metric": "val_dice"}


def at(key_path):
    return f"exp.yaml:{len(key_path)}"


def test_a_good_section_becomes_a_frozen_spec():
    spec = parse_tune(GOOD, at)
    assert spec == TuneSpec(
        params=(ParamSpace("train.lr", "log_uniform", 1.0e-4, 1.0e-2),
                ParamSpace("train.weight_decay", "uniform", 0.0, 0.001),
                ParamSpace("data.batch_size", "choice", choices=(4, 8)),
                ParamSpace("model.encoder.depth", "int", 2, 4)),
        trials=3, sampler="random", seed=7, epochs=2, pruning=Pruning("median", 1, 2), metric="val_dice")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.trials = 4
    assert json.loads(spec.space_json()) == GOOD["params"]
    assert spec.budget_text().startswith("3 trial(s) x 2 epoch(s), sampler random (seed 7)")


def test_defaults():
    spec = parse_tune({"params": {"train.lr": {"uniform": [0.001, 0.01]}}, "trials": 1, "max_steps": 50})
    assert (spec.sampler, spec.seed, spec.pruning, spec.metric, spec.epochs, spec.max_steps) == \
        ("tpe", 0, None, None, None, 50)
    assert parse_tune({**GOOD, "pruning": "median"}).pruning == Pruning("median", 0, 5)  # Optuna's defaults
    assert parse_tune({**GOOD, "pruning": False}).pruning is None


@pytest.mark.parametrize("change, message", [
    ({"params": {"train.lr": {"log_uniform": [0, 0.01]}}},
     "exp.yaml:4: tune.params.train.lr.log_uniform: expected 0 < lo < hi (a log scale), got [0, 0.01]"),
    ({"params": {"train.lr": {"log_unifrom": [0.1, 1]}}},
     "exp.yaml:4: tune.params.train.lr.log_unifrom: unknown range; did you mean 'log_uniform'? "
     "(allowed: choice, int, log_uniform, uniform)"),
    ({"params": {"train.lr": {"uniform": [0.1, 0.1]}}},
     "exp.yaml:4: tune.params.train.lr.uniform: expected finite numbers [lo, hi] with lo < hi, got [0.1, 0.1]"),
    ({"params": {"train.lr": {"uniform": [0.1, float("inf")]}}},
     "exp.yaml:4: tune.params.train.lr.uniform: expected finite numbers [lo, hi] with lo < hi, got [0.1, inf]"),
    ({"params": {"model.encoder.depth": {"int": [2, 4.5]}}},
     "exp.yaml:4: tune.params.model.encoder.depth.int: expected integers [lo, hi] with lo < hi, got [2, 4.5]"),
    ({"params": {"train.lr": {"uniform": [True, 2]}}},
     "exp.yaml:4: tune.params.train.lr.uniform: expected finite numbers [lo, hi] with lo < hi, got [True, 2]"),
    ({"params": {"data.batch_size": {"choice": [4]}}},
     "exp.yaml:4: tune.params.data.batch_size.choice: expected a list of 2 to 1000 values, got [4]"),
    ({"params": {"data.batch_size": {"choice": [4, 4]}}},
     "exp.yaml:4: tune.params.data.batch_size.choice: duplicate values in [4, 4]"),
    ({"params": {"data.batch_size": {"choice": [4, {"a": 1}]}}},
     "exp.yaml:5: tune.params.data.batch_size.choice.1: a choice must be a string, number, boolean or null, "
     "got {'a': 1}"),
    ({"params": {"train.lr": 0.01}},
     "exp.yaml:3: tune.params.train.lr: expected one range, one of choice, int, log_uniform, uniform "
     "(e.g. {log_uniform: [1.0e-4, 1.0e-2]}), got 0.01"),
    ({"params": {}}, "exp.yaml:2: tune.params: expected a mapping of dotted config keys to ranges"),
    ({"trials": 0}, "exp.yaml:2: tune.trials: expected an integer in [1, 10000], got 0"),
    ({"trials": 2.5}, "exp.yaml:2: tune.trials: expected an integer in [1, 10000], got 2.5"),
    ({"max_steps": 10}, "exp.yaml:1: tune: give the budget of each trial as exactly one of epochs or max_steps, "
                        "got both"),
    ({"epochs": None}, "exp.yaml:1: tune: give the budget of each trial as exactly one of epochs or max_steps, "
                       "got neither"),
    ({"sampler": "tpee"}, "exp.yaml:2: tune.sampler: unknown sampler 'tpee'; did you mean 'tpe'? "
                          "(allowed: qmc, random, tpe)"),
    ({"seed": -1}, "exp.yaml:2: tune.seed: expected an integer in [0, 4294967295], got -1"),
    ({"pruning": {"medain": {}}}, "exp.yaml:3: tune.pruning.medain: unknown pruner; did you mean 'median'? "
                                  "(allowed: median)"),
    ({"pruning": {"median": {"warmup": 1}}},
     "exp.yaml:4: tune.pruning.median.warmup: unknown key; did you mean 'warmup_epochs'? "
     "(allowed: startup_trials, warmup_epochs)"),
    ({"pruning": {"median": {"warmup_epochs": -1}}},
     "exp.yaml:4: tune.pruning.median.warmup_epochs: expected an integer in [0, 100000], got -1"),
    ({"pruning": True}, "exp.yaml:2: tune.pruning: expected false, median or"),
    ({"metric": 3}, "exp.yaml:2: tune.metric: expected a metric key such as val_iou, got 3"),
    ({"trails": 3}, "exp.yaml:2: tune.trails: unknown key; did you mean 'trials'? (allowed: epochs, max_steps, "
                    "metric, params, pruning, sampler, seed, trials)"),
])
def test_every_mistake_is_one_line_naming_the_key_path(change, message):
    with pytest.raises(ConfigError) as info:
        parse_tune({**GOOD, **change}, at)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_not_a_mapping_and_missing_keys():
    with pytest.raises(ConfigError, match=r"^exp.yaml:1: tune: expected a mapping"):
        parse_tune([1], at)
    with pytest.raises(ConfigError, match=r"^exp.yaml:1: tune: the key 'trials' is required"):
        parse_tune({"params": GOOD["params"], "epochs": 1}, at)


def test_without_a_place_the_error_carries_the_key_path():
    with pytest.raises(ConfigError) as info:
        parse_tune({**GOOD, "seed": "x"})
    assert info.value.path == "tune.seed"
    assert str(info.value) == "tune.seed: expected an integer in [0, 4294967295], got 'x'"
