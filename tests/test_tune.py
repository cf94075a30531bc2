"""``unetlab run`` of a tuned experiment, end to end through the CLI: study runs, trial runs nested under them,
final runs with the best parameters, the budget counted, pruning, refusals before any MLflow run."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

N_TRAIN, BATCH = 12, 4      # 3 optimiser steps per epoch
TUNED = f"""
name: tuned
data:
  dataset: {{name: shapes, image_size: 16, n_train: {N_TRAIN}, n_val: 4, n_test: 4, seed: 3, min_size: 3}}
  batch_size: {BATCH}
model:
  encoder: {{name: classic, depth: 2, base_channels: 4}}
train:
  epochs: 2
  lr: 0.01
  device: cpu
  threads: 1
  loss: bce_iou
  metrics: [iou]
tracking:
  uri: sqlite:///STORE
  checkpoint_dir: CKPT
  log_model: false
  figures: false
variants:
  concat: {{model.fusion: concat}}
  add: {{model.fusion: add}}
seeds: [1, 2]
tune:
  params:
    train.lr: {{log_uniform: [1.0e-3, 3.0e-2]}}
    train.weight_decay: {{uniform: [0.0, 1.0e-3]}}
  trials: 3
  epochs: 1
  sampler: random
  seed: 5
"""


def write(tmp_path: Path, extra: str = "", drop: tuple[str, ...] = ()) -> Path:
    config = yaml.safe_load(TUNED.replace("STORE", str(tmp_path / "mlflow.db")).replace("CKPT", str(tmp_path / "ck")))
    for key, value in (yaml.safe_load(textwrap.dedent(extra)) or {}).items():
        merge = key in ("data", "train", "tune") and isinstance(value, dict)  # sections merge; variants replace
        config[key] = {**config[key], **value} if merge else value
    for key in drop:
        config.pop(key)
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def all_runs(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tuned")
    return client, (client.search_runs([exp.experiment_id], max_results=1000) if exp else [])


def history(client, run, key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def by_role(runs, role):
    return [r for r in runs if r.data.tags.get("unetlab.role") == role]


def test_three_trials_two_variants_two_seeds_end_to_end(tmp_path):
    proc = run_cli("run", str(write(tmp_path)), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client, runs = all_runs(tmp_path)
    [parent] = [r for r in runs if r.data.tags.get("unetlab.parent") == "true"]
    studies, trials, finals = by_role(runs, "study"), by_role(runs, "trial"), by_role(runs, "final")
    assert len(runs) == 1 + 2 + 6 + 4
    assert sorted(s.data.tags["unetlab.variant"] for s in studies) == ["add", "concat"]
    per_variant = {}
    for study in studies:
        variant = study.data.tags["unetlab.variant"]
        assert study.data.tags["mlflow.parentRunId"] == parent.info.run_id and study.info.status == "FINISHED"
        mine = [t for t in trials if t.data.tags["mlflow.parentRunId"] == study.info.run_id]
        assert len(mine) == 3 and {t.data.tags["unetlab.variant"] for t in mine} == {variant}
        assert sorted(int(t.data.tags["unetlab.trial_number"]) for t in mine) == [0, 1, 2]
        for t in mine:
            assert t.data.tags["unetlab.trial_state"] == "complete" and t.info.status == "FINISHED"
            assert t.data.params["train.epochs"] == "1"  # the per-trial budget, not train.epochs
            # the objective is the best validation IoU of the trial, read from its own history
            assert t.data.metrics["tune.objective"] == pytest.approx(max(history(client, t, "val_iou")))
        # budget against a hand count: 3 trials x 1 epoch x ceil(12 / 4) steps
        m = study.data.metrics
        assert (m["tune.trials"], m["tune.pruned"], m["tune.epochs"], m["tune.steps"]) == (3, 0, 3, 3 * 3)
        assert m["tune.seconds"] > 0
        p = study.data.params
        assert (p["tune.sampler"], p["tune.seed"], p["tune.metric"], p["tune.direction"]) == \
            ("random", "5", "val_iou", "max")
        assert set(yaml.safe_load(study.data.tags["unetlab.tune_space"])) == {"train.lr", "train.weight_decay"}
        best = max(mine, key=lambda t: (t.data.metrics["tune.objective"], -int(t.data.tags["unetlab.trial_number"])))
        assert float(p["tune.best.train.lr"]) == pytest.approx(float(best.data.params["train.lr"]))
        assert float(p["tune.best.train.weight_decay"]) == pytest.approx(float(best.data.params["train.weight_decay"]))
        per_variant[variant] = (study, {int(t.data.tags["unetlab.trial_number"]): t for t in mine})
    # one sampler seed for all variants: trial n draws the same values in every study (random sampler)
    for n in range(3):
        a, b = per_variant["concat"][1][n], per_variant["add"][1][n]
        assert a.data.params["train.lr"] == b.data.params["train.lr"]
        assert a.data.params["train.weight_decay"] == b.data.params["train.weight_decay"]
    assert per_variant["concat"][1][0].data.params["train.lr"] != per_variant["concat"][1][1].data.params["train.lr"]
    assert sorted(f.info.run_name for f in finals) == ["add/seed=1", "add/seed=2", "concat/seed=1", "concat/seed=2"]
    for final in finals:
        study = per_variant[final.data.tags["unetlab.variant"]][0]
        assert final.data.tags["mlflow.parentRunId"] == parent.info.run_id and final.info.status == "FINISHED"
        assert final.data.tags["unetlab.tuned_from"] == study.info.run_id
        assert final.data.params["train.epochs"] == "2"
        assert float(final.data.params["train.lr"]) == pytest.approx(float(study.data.params["tune.best.train.lr"]))
        assert len(history(client, final, "val_iou")) == 2
        # the final runs are scored on the held-out test split, once, with the best model
        assert {"test_iou", "test_loss"} <= set(final.data.metrics) and len(history(client, final, "test_iou")) == 1
        assert 0.0 <= final.data.metrics["test_iou"] <= 1.0
    # compare on this real store: the verdict on the test split, the budget per variant, the budget curve
    proc = run_cli("compare", str(tmp_path / "tuned.yaml"), "--out", str(tmp_path / "cmp.png"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "judged on the held-out test split (4 images)" in proc.stdout
    for variant in ("concat", "add"):  # trials, pruned, failed, epochs, steps spent: as the studies counted them
        line = next(x for x in proc.stdout.splitlines() if x.strip().startswith(f"{variant} ") and "train.lr=" in x)
        assert line.split()[:6] == [variant, "3", "0", "0", "3", "9"]
    assert (tmp_path / "cmp-budget.png").stat().st_size > 5000
    assert "expected best" in proc.stdout


@pytest.mark.slow
def test_resume_trains_no_finished_trial_or_final_run_again(tmp_path):
    path = write(tmp_path, extra="seeds: [1]\ntune: {trials: 2}")
    assert run_cli("run", str(path), "--quiet", cwd=tmp_path).returncode == 0
    _, before = all_runs(tmp_path)
    # Optuna's journal knows the trials, MLflow the final runs: nothing is trained again
    again = run_cli("run", str(path), "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    _, after = all_runs(tmp_path)
    assert len(after) == len(before) == 1 + 2 + 4 + 2
    assert again.stdout.count("SKIPPED") == 2 and "trial=" not in again.stdout
    assert {r.info.run_id: r.data.metrics.get("tune.trials") for r in by_role(after, "study")} == \
        {r.info.run_id: 2.0 for r in by_role(before, "study")}


@pytest.mark.parametrize("sampler", ["tpe", "qmc"])
def test_the_other_samplers_tune_end_to_end_within_the_space(tmp_path, sampler):
    path = write(tmp_path, extra=f"variants: {{concat: {{model.fusion: concat}}}}\nseeds: [1]\n"
                                 f"tune: {{trials: 3, sampler: {sampler}, seed: 11}}")
    proc = run_cli("run", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, runs = all_runs(tmp_path)
    [study], trials, [final] = by_role(runs, "study"), by_role(runs, "trial"), by_role(runs, "final")
    assert study.info.status == "FINISHED" and study.data.params["tune.sampler"] == sampler
    assert study.data.metrics["tune.trials"] == 3 and len(trials) == 3
    draws = {(t.data.params["train.lr"], t.data.params["train.weight_decay"]) for t in trials}
    assert len(draws) == 3  # three different points of the space
    for lr, wd in draws:
        assert 1e-3 <= float(lr) <= 3e-2 and 0.0 <= float(wd) <= 1e-3
    best = max(trials, key=lambda t: (t.data.metrics["tune.objective"], -int(t.data.tags["unetlab.trial_number"])))
    assert float(final.data.params["train.lr"]) == pytest.approx(float(best.data.params["train.lr"]), rel=1e-9)
    assert "test_iou" in final.data.metrics


def test_an_untuned_experiment_tags_its_runs_final(tmp_path):
    path = write(tmp_path, extra="seeds: [1]\ntrain: {epochs: 1}", drop=("tune",))
    assert run_cli("run", str(path), "--quiet", cwd=tmp_path).returncode == 0
    _, runs = all_runs(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and {c.data.tags["unetlab.role"] for c in children} == {"final"}


@pytest.mark.parametrize("extra, message", [
    ("tune: {params: {train.lrr: {uniform: [0.001, 0.01]}}}",
     r"tuned.yaml:\d+: tune.params.train.lrr: unknown key; did you mean 'lr'\?"),
    ("tune: {params: {train.lr: {uniform: [-0.01, 0.01]}}}", r"tuned.yaml:\d+: tune.params.train.lr.uniform: "),
    ("tune: {params: {model.fusion: {choice: [concat, add]}}}",
     r"tuned.yaml:\d+: tune.params.model.fusion: the variants differ in model.fusion"),
    ("tune: {trials: 0}", r"tuned.yaml:\d+: tune.trials: expected an integer in \[1, 10000\], got 0"),
    ("data: {dataset: {n_test: 0}}", r"tuned.yaml: tune: run 'concat/seed=1' has no test split"),
    ("tune: {metric: val_iu}", r"tune.metric: 'val_iu' is not logged on the validation split by run "
                               r"'concat/seed=1'; did you mean 'val_iou'\?"),
])
def test_a_bad_tune_section_is_one_line_exit_2_and_no_mlflow_run(tmp_path, extra, message):
    import re

    path = write(tmp_path, extra=extra)
    for command in ("validate", "run"):
        proc = run_cli(command, str(path), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert all_runs(tmp_path)[1] == []


def test_validate_shows_the_tune_plan(tmp_path):
    proc = run_cli("validate", str(write(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tune: 2 variant(s) x 3 trial(s) x 1 epoch(s), sampler random (seed 5)" in proc.stdout
    assert "train.lr: log_uniform [0.001, 0.03]" in proc.stdout
    assert "then 4 final run(s)" in proc.stdout
    as_json = run_cli("validate", str(write(tmp_path)), "--json", cwd=tmp_path)
    tune = __import__("json").loads(as_json.stdout)["tune"]
    assert (tune["trials"], tune["epochs"], tune["sampler"], tune["metric"]) == (3, 1, "random", "val_iou")


def test_pruning_stops_a_bad_trial_and_its_epochs_are_counted(tmp_path):
    # val_loss decides; a learning rate so small that the trial cannot move is pruned by the median of the
    # trial before it (startup 1 trial, no warmup), at its first epoch
    path = write(tmp_path, extra="""
        variants: {concat: {model.fusion: concat}}
        seeds: [1]
        tune:
          params: {train.lr: {choice: [0.03, 1.0e-9]}}
          trials: 3
          epochs: 3
          metric: val_loss
          pruning: {median: {warmup_epochs: 0, startup_trials: 1}}
    """)
    proc = run_cli("run", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client, runs = all_runs(tmp_path)
    [study], trials = by_role(runs, "study"), by_role(runs, "trial")
    states = {float(t.data.params["train.lr"]): t.data.tags["unetlab.trial_state"] for t in trials}
    pruned = [t for t in trials if t.data.tags["unetlab.trial_state"] == "pruned"]
    assert pruned and all(float(t.data.params["train.lr"]) == 1.0e-9 for t in pruned), states
    for t in pruned:  # a pruned trial is a finished run that stopped early; its value is its last one
        assert t.info.status == "FINISHED" and len(history(client, t, "val_loss")) < 3
        assert t.data.metrics["tune.objective"] == pytest.approx(history(client, t, "val_loss")[-1])
    epochs = sum(len(history(client, t, "val_loss")) for t in trials)  # every trial validates every epoch
    m = study.data.metrics
    assert (m["tune.trials"], m["tune.pruned"], m["tune.epochs"], m["tune.steps"]) == \
        (3, len(pruned), epochs, epochs * math.ceil(N_TRAIN / BATCH))
    assert float(study.data.params["tune.best.train.lr"]) == 0.03


@pytest.mark.slow
def test_jobs_and_ray_train_the_same_trials_with_the_same_numbers_as_one_process(tmp_path):
    import importlib.util

    schedules = ["sequential", "jobs"] + (["ray"] if importlib.util.find_spec("ray") else [])  # the [ray] extra
    trials, finals = {}, {}
    for how in schedules:
        folder = tmp_path / how
        folder.mkdir()
        path = write(folder, extra="variants: {concat: {model.fusion: concat}}\ntune: {trials: 2}")
        flags = {"sequential": [], "jobs": ["--jobs", "2"], "ray": ["--ray"]}[how]
        proc = run_cli("run", str(path), "--quiet", *flags, cwd=folder, timeout=600)
        assert proc.returncode == 0, proc.stderr
        client, runs = all_runs(folder)
        [parent] = [r for r in runs if r.data.tags.get("unetlab.parent") == "true"]
        [study] = by_role(runs, "study")
        assert parent.info.status == "FINISHED" and study.info.status == "FINISHED"
        assert (study.data.metrics["tune.trials"], study.data.metrics["tune.epochs"]) == (2, 2)
        mine = by_role(runs, "trial")
        assert {t.data.tags["mlflow.parentRunId"] for t in mine} == {study.info.run_id}
        assert {t.info.status for t in mine} == {"FINISHED"}
        # where the trials trained: the driver itself, or one worker process (--jobs, Ray task) each
        pids = {t.data.tags["unetlab.owner.pid"] for t in mine}
        in_driver = pids == {parent.data.tags["unetlab.owner.pid"]}
        assert in_driver == (how == "sequential") and len(pids) == (1 if how == "sequential" else 2)
        trials[how] = sorted((t.data.tags["unetlab.trial_number"], t.data.params["train.lr"],
                              t.data.params["train.weight_decay"], t.data.metrics["tune.objective"]) for t in mine)
        finals[how] = sorted((f.info.run_name, f.data.params["train.lr"], f.data.metrics["best_val_iou"])
                             for f in by_role(runs, "final"))
        assert len(finals[how]) == 2 and all(lr == study.data.params["tune.best.train.lr"] for _, lr, _ in finals[how])
    # the schedule is not the experiment: the same trials, objectives and final results every way
    assert all(trials[how] == trials["sequential"] and finals[how] == finals["sequential"] for how in schedules)
    assert len(trials["sequential"]) == 2


KILLER = '''
import os, signal, unetlab

@unetlab.hookimpl
def on_epoch_end(run_name, epoch, metrics, tracker):
    if run_name == os.environ.get("KILL_RUN") and epoch == 1 and not os.path.exists(os.environ["KILL_ONCE"]):
        open(os.environ["KILL_ONCE"], "w").close()
        os.kill(os.getpid(), signal.SIGINT)
'''


@pytest.mark.slow
def test_an_interrupted_trial_is_continued_by_resume_not_run_again(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    path = write(tmp_path, extra="""
        plugins: [killer.py]
        variants: {concat: {model.fusion: concat}}
        seeds: [1]
        tune: {trials: 2, epochs: 2}
    """)
    env = {"KILL_RUN": "concat/trial=1", "KILL_ONCE": str(tmp_path / "killed")}
    stopped = run_cli("run", str(path), "--quiet", cwd=tmp_path, env=env)
    assert stopped.returncode == 130, stopped.stderr
    client, runs = all_runs(tmp_path)
    assert {r.info.run_name: r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags} == \
        {"concat/study": "KILLED", "concat/trial=0": "FINISHED", "concat/trial=1": "KILLED"}
    resumed = run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    client, runs = all_runs(tmp_path)
    [study], trials = by_role(runs, "study"), by_role(runs, "trial")
    assert sorted(t.info.run_name for t in trials) == ["concat/trial=0", "concat/trial=1"]  # the same two runs
    for t in trials:  # the interrupted epoch is trained and logged again at the same step: one value per epoch
        values = list({m.step: m.value for m in client.get_metric_history(t.info.run_id, "val_iou")}.values())
        assert t.info.status == "FINISHED" and t.data.tags["unetlab.trial_state"] == "complete"
        assert len(values) == 2 and t.data.metrics["tune.objective"] == pytest.approx(max(values))
    m = study.data.metrics
    assert study.info.status == "FINISHED" and (m["tune.trials"], m["tune.epochs"], m["tune.steps"]) == (2, 4, 4 * 3)
    assert len(by_role(runs, "final")) == 1
