"""The Optuna side of tuning (``unetlab.runs.tuning``): samplers with one seed for every variant, the journal
storage shared by processes, the budget counted from the stored trials, and stored data validated."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from unetlab.config.tune import parse_tune
from unetlab.errors import UnetlabError
from unetlab.runs import tuning

SPACE = {"train.lr": {"log_uniform": [1.0e-4, 1.0e-1]}, "train.weight_decay": {"uniform": [0.0, 0.01]},
         "model.encoder.depth": {"int": [2, 5]}, "data.batch_size": {"choice": [4, 8, 16]}}


def spec(sampler: str, trials: int = 4, **extra):
    return parse_tune({"params": SPACE, "trials": trials, "epochs": 1, "sampler": sampler, "seed": 11, **extra})


def ask(study, s, n):
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(tuning.suggest(trial, s))
        study.tell(trial, float(len(out)))
    return out


@pytest.mark.parametrize("sampler", ["random", "qmc", "tpe"])
def test_every_sampler_stays_in_the_space_and_gives_every_variant_the_same_first_trial(tmp_path, sampler):
    s = spec(sampler)
    journal = tmp_path / "studies.journal"
    a = ask(tuning.open_study(journal, "p/concat", s, "max"), s, 4)
    b = ask(tuning.open_study(journal, "p/add", s, "max"), s, 4)
    assert a[0] == b[0]
    for values in a + b:
        assert 1.0e-4 <= values["train.lr"] <= 1.0e-1 and 0.0 <= values["train.weight_decay"] <= 0.01
        assert values["model.encoder.depth"] in range(2, 6) and values["data.batch_size"] in (4, 8, 16)
    if sampler != "tpe":  # tpe's later trials depend on the values told, identical here too
        assert a == b


def test_random_trial_n_depends_on_seed_n_and_key_only(tmp_path):
    s = spec("random")
    first = ask(tuning.open_study(tmp_path / "a.journal", "p/x", s, "max"), s, 3)
    # another journal, another study name, trials asked after two others were discarded: trial 2 is the same
    study = tuning.open_study(tmp_path / "b.journal", "q/y", s, "min")
    for _ in range(2):
        study.tell(study.ask(), state=__import__("optuna").trial.TrialState.FAIL)
    assert tuning.suggest(study.ask(), s) == first[2]
    other = ask(tuning.open_study(tmp_path / "c.journal", "p/x", spec("random", seed=12), "max"), s, 1)
    assert other[0] != first[0]


def test_log_uniform_draws_are_uniform_in_the_log(tmp_path):
    import optuna

    dist = optuna.distributions.FloatDistribution(1.0e-4, 1.0e-1, log=True)
    draws = np.log10([tuning.draw(dist, 3, n, "train.lr") for n in range(2000)])
    assert stats.kstest(draws, stats.uniform(loc=-4, scale=3).cdf).pvalue > 0.001
    ints = [tuning.draw(optuna.distributions.IntDistribution(2, 5), 3, n, "d") for n in range(2000)]
    assert sorted(set(ints)) == [2, 3, 4, 5]
    assert stats.chisquare(np.bincount(ints)[2:]).pvalue > 0.001


def test_a_study_stored_with_the_other_direction_is_refused(tmp_path):
    s = spec("random")
    tuning.open_study(tmp_path / "j.journal", "p/x", s, "max")
    with pytest.raises(UnetlabError, match="stored as maximize, this file asks to minimize"):
        tuning.open_study(tmp_path / "j.journal", "p/x", s, "min")


def test_the_budget_and_the_best_trial_are_counted_from_the_stored_trials(tmp_path):
    import optuna

    s = spec("random", trials=5)
    study = tuning.open_study(tmp_path / "j.journal", "p/x", s, "min")
    # (state, value, epochs, steps, seconds): a hand-made history
    made = [("complete", 0.30, 3, 30, 1.5), ("pruned", 0.90, 1, 10, 0.5), ("complete", 0.20, 3, 30, 1.25),
            ("failed", None, 2, 20, 0.75), ("complete", 0.20, 3, 30, 1.0), ("running", None, 0, 0, 0.0)]
    for state, value, epochs, steps, seconds in made:
        trial = study.ask()
        tuning.suggest(trial, s)
        for key, item in {"epochs": epochs, "steps": steps, "seconds": seconds, "last_value": value}.items():
            trial.set_user_attr(key, item)
        if state == "complete":
            study.tell(trial, value)
        elif state != "running":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned" else
                       optuna.trial.TrialState.FAIL)
    records = tuning.trial_records(study)
    assert [r.state for r in records] == [m[0] for m in made]
    assert records[1].value == 0.90  # a pruned trial keeps its last reported value
    assert tuning.count_budget(records) == tuning.Budget(trials=5, pruned=1, failed=1, epochs=12, steps=120,
                                                         seconds=5.0)
    assert tuning.best_trial(records, "min").number == 2  # 0.20 twice: the earlier trial
    assert tuning.best_trial(records, "max").number == 0  # the pruned 0.90 is not a result


def test_malformed_stored_budget_is_refused(tmp_path):
    s = spec("random")
    study = tuning.open_study(tmp_path / "j.journal", "p/x", s, "max")
    trial = study.ask()
    trial.set_user_attr("epochs", -3)
    study.tell(trial, 0.5)
    with pytest.raises(UnetlabError, match="trial 0 holds malformed budget attributes"):
        tuning.trial_records(study)


def test_the_pruner_stops_a_trial_worse_than_the_median_and_reports_its_last_value(tmp_path):
    s = spec("random", pruning={"median": {"warmup_epochs": 1, "startup_trials": 1}})
    study = tuning.open_study(tmp_path / "j.journal", "p/x", s, "max")
    good = tuning.TrialReporter(study.ask(), "val_iou", "max", prune=True)
    for epoch, value in enumerate([0.5, 0.6, 0.7], 1):
        assert good.stop_reason(epoch, epoch * 10, {"val_iou": value}) == ""
    study.tell(good.trial, good.objective())
    bad = tuning.TrialReporter(study.ask(), "val_iou", "max", prune=True)
    assert bad.stop_reason(1, 10, {"val_iou": 0.1}) == ""  # warmup: epoch 1 is never pruned
    assert bad.stop_reason(2, 20, {"val_iou": 0.2}).startswith("pruned: val_iou 0.2 at epoch 2")
    assert (bad.pruned, bad.objective(), bad.epochs, bad.steps) == (True, 0.2, 2, 20)
    assert good.objective() == 0.7 and not math.isnan(good.objective())
