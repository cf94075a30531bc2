"""Every bad experiment file or ``--set`` value is refused the same way, before anything is written.

The promise (README, "Experiment files"): exit code 2, ONE stderr line starting ``unetlab: error:``
that names the file (and line) or the ``--set`` key, no traceback, and nothing written: no MLflow
store, no checkpoints. The corpus below is generated here (a 1 MiB file and an alias bomb do not
belong in the repository). Most cases go through ``unetlab validate``; the values that used to pass
validation and fail inside a run (issue 13.10) go through ``unetlab run`` with a tracking URI of
their own, which must not exist afterwards.

The CLI is called in-process (``unetlab.cli.main``): an exception escaping it fails the test just
as a traceback would, and it keeps the corpus to a fraction of a second per case. One case runs in a
real subprocess to check the whole path to the exit code.
"""

from __future__ import annotations

import os
import time

import pytest

from unetlab.cli.main import main
from unetlab.config.experiment import load_experiment
from unetlab.config.yaml_loader import MAX_BYTES, MAX_DEPTH, MAX_VALUES
from unetlab.errors import ConfigError

from conftest import one_line_error, run_cli


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """A "billion laughs" document: ``width ** levels`` values once every alias is expanded."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\nvariants: {big: {description: x}}\n"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


LONG_VARIANT = "v" * 300

# name -> (file text, --set overrides, text the error line must contain)
CORPUS: dict[str, tuple[str, list[str], str]] = {
    "unknown key": ("trian: {epochs: 3}\n", [], "exp.yaml:1: trian: unknown key; did you mean 'train'?"),
    "unknown nested key": ("model:\n  fusoin: add\n", [], "exp.yaml:2: model.fusoin: unknown key; did you mean"),
    "unknown component": ("model: {fusion: atention}\n", [],
                          "exp.yaml:1: model.fusion: unknown fusion 'atention'; did you mean 'attention'?"),
    "unknown component parameter": ("model:\n  encoder: {name: classic, dpeth: 3}\n", [],
                                    "exp.yaml:2: model.encoder.dpeth: unknown parameter of encoder 'classic'"),
    "wrong type": ("train: {epochs: ten}\n", [], "exp.yaml:1: train.epochs: expected int in [1, 100000], got 'ten'"),
    "python tag": ("train:\n  epochs: !!python/object/apply:os.system ['touch pwned']\n", [],
                   "exp.yaml:2: train.epochs: YAML tag '!!python/object/apply:os.system' is not allowed"),
    "duplicate key": ("train: {epochs: 3}\ntrain: {epochs: 4}\n", [], "exp.yaml:2: train: duplicate key"),
    "syntax error": ("train: {epochs: [3\n", [], "exp.yaml:2: invalid YAML"),
    "tab indentation": ("train:\n\tepochs: 3\n", [], "exp.yaml:2: invalid YAML"),
    "control character": ("description: \x07\n", [], "exp.yaml: invalid YAML: unacceptable character"),
    "empty file": ("", [], "exp.yaml: the experiment file is empty; a minimal file sets at least one key"),
    "only comments": ("# nothing yet\n\n", [], "exp.yaml: the experiment file is empty"),
    "only null": ("null\n", [], "exp.yaml: the experiment file is empty"),
    "empty mapping": ("{}\n", [], "exp.yaml: the experiment file is an empty mapping"),
    "top level list": ("- train\n", [], "exp.yaml: the top level must be a mapping"),
    "alias bomb": (alias_bomb(), [], f"the document expands to more than {MAX_VALUES:,} values"),
    "huge flow collection": ("train:\n  loss: [" + "bce, " * 200_000 + "]\n", [],
                             f"exp.yaml:2: more than {MAX_VALUES:,} values"),
    "self-referencing alias": ("variants: &v\n  a: *v\n", [], f"nested deeper than {MAX_DEPTH} levels"),
    "deep nesting in the file": (f"train:\n  loss: {nested(5000)}\n", [],
                                 f"exp.yaml:2: nested deeper than {MAX_DEPTH} levels"),
    "deep nesting in --set": ("train: {epochs: 1}\n", [f"train.lr={nested(5000)}"],
                              f"--set train.lr: nested deeper than {MAX_DEPTH} levels"),
    "huge file": ("description: '" + "x" * MAX_BYTES + "'\n", [], "exp.yaml: the file is 1,048,"),
    "integer too long to read": ("seeds: [" + "1" * 5000 + "]\n", [], "exp.yaml:1: seeds[0]: Exceeds the limit"),
    "negative epochs in the file": ("train: {epochs: -3}\n", [],
                                    "exp.yaml:1: train.epochs: must be >= 1, got -3 (allowed: [1, 100000])"),
    "nan learning rate": ("train: {lr: .nan}\n", [], "exp.yaml:1: train.lr: must be a finite number"),
    "encoder too deep": ("model:\n  encoder: {name: classic, depth: 9}\n", [],
                         "exp.yaml:2: model.encoder.depth: must be <= 8, got 9"),
    "parameter of a block-mapping component": ("data:\n  dataset:\n    name: shapes\n    n_val: 0\n", [],
                                               "exp.yaml:4: data.dataset.n_val: must be >= 1, got 0"),
    "weight in a list of losses": ("train:\n  loss:\n    - bce\n    - name: dice\n      weight: -2\n", [],
                                   "exp.yaml:5: train.loss[1].weight: must be >= 0, got -2"),
    "list item parameter in --set": ("train: {loss: [bce, dice]}\n", ["train.loss.1.weight=-1"],
                                     "--set train.loss.1.weight: must be >= 0, got -1"),
    "probability above 1": ("data:\n  augment: [{name: hflip, p: 1.5}]\n", [],
                            "exp.yaml:2: data.augment[0].p: must be <= 1, got 1.5"),
    "negative loss weight": ("train: {loss: [{name: bce, weight: -1}]}\n", [],
                             "exp.yaml:1: train.loss[0].weight: must be >= 0, got -1"),
    "seed count too large": ("seeds: 100001\n", [], "exp.yaml:1: seeds: a count must be in [1, 10000]"),
    "negative seed": ("seeds: [1, -1]\n", [], "exp.yaml:1: seeds[1]: must be >= 0, got -1"),
    "run name too long": ('matrix:\n  description: ["' + "d" * 250 + '"]\n', [],
                          "exp.yaml: run name 'description=ddd"),
    "experiment name too long": ("name: " + "n" * 250 + "\n", [],
                                 "exp.yaml:1: name: an experiment name may be at most 200 characters, got 250"),
    "bad --set syntax": ("train: {epochs: 1}\n", ["train.lr={a: 1"], "--set train.lr: invalid YAML"),
    "python tag in --set": ("train: {epochs: 1}\n", ["train.lr=!!python/object/apply:os.getpid []"],
                            "--set train.lr: YAML tag"),
}

# Issue 13.10: values that passed validation and failed inside a run (FAILED runs, or worse).
RUN_TIME_FAILURES: dict[str, tuple[str, list[str], str]] = {
    "train.val_every=0": ("train: {epochs: 1}\n", ["train.val_every=0"], "--set train.val_every: must be >= 1, got 0"),
    "data.batch_size=0": ("train: {epochs: 1}\n", ["data.batch_size=0"], "--set data.batch_size: must be >= 1, got 0"),
    "data.num_workers=-1": ("train: {epochs: 1}\n", ["data.num_workers=-1"],
                            "--set data.num_workers: must be >= 0, got -1"),
    "train.lr=-1": ("train: {epochs: 1}\n", ["train.lr=-1"], "--set train.lr: must be > 0, got -1"),
    "data.dataset.n_train=0": ("train: {epochs: 1}\n", ["data.dataset.n_train=0"],
                               "--set data.dataset.n_train: must be >= 1, got 0 (allowed: [1, 1000000]) "
                               "for dataset 'shapes'"),
    "seeds=[99999999999999999999999]": ("train: {epochs: 1}\n", ["seeds=[99999999999999999999999]"],
                                        "--set seeds[0]: must be <= 4294967295, got 99999999999999999999999"),
    "300-character variant name": (f"variants:\n  {LONG_VARIANT}: {{}}\n", [],
                                   "exp.yaml:2: variants.vvvv"),
    "train.epochs=-1": ("train: {epochs: 1}\n", ["train.epochs=-1"], "--set train.epochs: must be >= 1, got -1"),
    "model.encoder.base_channels=0": ("train: {epochs: 1}\n", ["model.encoder.base_channels=0"],
                                      "--set model.encoder.base_channels: must be >= 1, got 0"),
}


def refused(capsys, tmp_path, command: str, text: str, overrides: list[str]) -> str:
    """Run ``unetlab COMMAND exp.yaml --set ...`` in ``tmp_path``; assert the one-line refusal; return the line."""
    (tmp_path / "exp.yaml").write_text(text, encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [command, "exp.yaml", *[a for s in overrides for a in ("--set", s)]]
    code = main(args)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("unetlab: error: "), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    return lines[0]


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_input_is_one_line_and_writes_nothing(case, capsys, tmp_path, monkeypatch):
    text, overrides, expected = CORPUS[case]
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "validate", text, overrides)
    assert expected in line, line
    assert "exp.yaml" in line or "--set" in line


@pytest.mark.parametrize("case", list(RUN_TIME_FAILURES))
def test_values_that_failed_inside_a_run_are_refused_before_mlflow(case, capsys, tmp_path, monkeypatch):
    text, overrides, expected = RUN_TIME_FAILURES[case]
    store = tmp_path.parent / f"{tmp_path.name}-mlflow.db"  # outside tmp_path, so "nothing written" stays exact
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "run", text, overrides)
    assert expected in line, line
    assert not store.exists(), "an MLflow store was created for a run that can never work"
    assert not (tmp_path / ".unetlab").exists() and not (tmp_path / "mlruns").exists()


def test_variant_name_length_is_capped_and_the_error_stays_short(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "validate", f"variants:\n  {LONG_VARIANT}: {{}}\n", [])
    assert "a variant name may be at most 64 characters, got 300" in line
    assert len(line) < 200, line  # the 300-character name is not echoed whole
    (tmp_path / "exp.yaml").write_text(f"variants:\n  {'v' * 64}: {{}}\n")
    assert [r.variant for r in load_experiment(tmp_path / "exp.yaml").runs] == ["v" * 64]


def test_values_on_the_bounds_are_accepted(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train: {epochs: 1, val_every: 1, lr: 10, weight_decay: 0, momentum: 1, gamma: 1}\n"
                    "data: {batch_size: 1, num_workers: 0, dataset: {name: shapes, n_train: 1, n_val: 1}}\n"
                    "model: {encoder: {name: classic, depth: 8, base_channels: 1}}\n"
                    "seeds: [0, 4294967295]\n")
    runs = load_experiment(path).runs
    assert [r.seed for r in runs] == [0, 4294967295]
    assert runs[0].config["train"]["lr"] == 10.0 and runs[0].config["model"]["encoder"]["depth"] == 8


@pytest.mark.parametrize("text, expected", [
    (alias_bomb(), "expands to more than"),  # 10**9 values expanded: `validate` ran for over a minute
    ("x: [" + "[[[[[[[[[[]]]]]]]]]], " * (MAX_BYTES // 23) + "]\n", "more than"),  # 1 MiB of nested lists
    ("x: " + "[" * (MAX_BYTES - 10) + "\n", "nested deeper than"),
])
def test_hostile_documents_fail_fast(tmp_path, text, expected):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=expected):
        load_experiment(path)
    assert time.perf_counter() - start < 5.0  # about 1 s on a busy 2-core machine; minutes before the bounds


def test_small_aliases_still_work(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: {encoder: &enc {name: classic, depth: 3}}\n"
                    "variants:\n  a: {}\n  b: {model.encoder: *enc}\n")
    runs = load_experiment(path).runs
    assert [r.config["model"]["encoder"]["depth"] for r in runs] == [3, 3]


def test_deep_set_value_through_the_real_cli(tmp_path):
    # a subprocess: the exit code, stderr and absence of a traceback as a user sees them (was ~3,000 lines)
    (tmp_path / "exp.yaml").write_text("train: {epochs: 1}\n")
    proc = run_cli("run", "exp.yaml", "--set", f"train.lr={nested(5000)}", cwd=tmp_path,
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    line = one_line_error(proc)
    assert f"--set train.lr: nested deeper than {MAX_DEPTH} levels" in line
    assert sorted(os.listdir(tmp_path)) == ["exp.yaml"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_file_is_read_only_up_to_the_limit(capsys):
    assert main(["validate", "/dev/zero"]) == 2  # a stat() size of 0 must not lead to an endless read
    err = capsys.readouterr().err.strip()
    assert err == ("unetlab: error: /dev/zero: the file is larger than that; an experiment file may be at most "
                   "1,048,576 bytes (1 MiB)")


BROKEN_DATASET = '''
import unetlab


def lookup(table: str = "missing"):
    """A dataset whose factory fails with an error that is neither ValueError nor TypeError."""
    return {}[table]


@unetlab.hookimpl
def register_datasets(register):
    register("lookup_NAME", lookup)
'''


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_dataset_factory_that_fails_is_the_same_one_line_in_validate_and_run(command, capsys, tmp_path,
                                                                                monkeypatch):
    # one name per command: the CLI's plugin host lives as long as this test process
    (tmp_path / "broken_dataset.py").write_text(BROKEN_DATASET.replace("NAME", command), encoding="utf-8")
    store = tmp_path.parent / f"{tmp_path.name}-mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.chdir(tmp_path)
    text = f"plugins: [broken_dataset.py]\ndata: {{dataset: lookup_{command}}}\ntrain: {{epochs: 1}}\n"
    line = refused(capsys, tmp_path, command, text, [])
    assert f"data.dataset: cannot build dataset 'lookup_{command}': KeyError: 'missing'" in line, line
    assert not store.exists()
