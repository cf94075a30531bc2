"""Experiment files: expansion, overrides, strictness and error locations."""

from __future__ import annotations

import json
import textwrap

import pytest

import unetlab
from unetlab.config.experiment import flatten

from conftest import one_line_error, run_cli


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_variants_matrix_seeds_expand_with_stable_names(tmp_path):
    path = write(tmp_path, """
        variants:
          concat: {model.fusion: concat}
          add: {model: {fusion: add}}
        matrix:
          model.upsampler: [bilinear, transpose]
          model.encoder.depth: [3, 4]
        seeds: [1, 2, 3]
    """)
    exp = unetlab.load_experiment(path)
    assert len(exp.runs) == 2 * 2 * 2 * 3
    assert exp.runs[0].name == "concat/upsampler=bilinear/depth=3/seed=1"
    assert exp.runs[-1].name == "add/upsampler=transpose/depth=4/seed=3"
    assert len({r.name for r in exp.runs}) == len(exp.runs)
    run = exp.run("add/upsampler=transpose/depth=3/seed=2")
    assert run.config["model"]["fusion"]["name"] == "add"
    assert run.config["model"]["upsampler"]["name"] == "transpose"
    assert run.config["model"]["encoder"]["depth"] == 3
    assert run.config["train"]["seed"] == run.seed == 2
    assert exp.name == "exp"  # the file's stem when no name is given


def test_variants_only_and_seed_count(tmp_path):
    exp = unetlab.load_experiment(write(tmp_path, """
        name: fusions
        variants: {concat: {}, add: {model.fusion: add}}
        seeds: 2
    """))
    assert [r.name for r in exp.runs] == ["concat/seed=0", "concat/seed=1", "add/seed=0", "add/seed=1"]
    assert exp.name == "fusions"


def test_no_variants_no_matrix_gives_one_base_run(tmp_path):
    exp = unetlab.load_experiment(write(tmp_path, "train: {seed: 7}\n"))
    assert [r.name for r in exp.runs] == ["base/seed=7"]


def test_set_overrides_win_and_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, """
        train: {epochs: 10, lr: 0.1}
        variants:
          a: {train.epochs: 5}
    """)
    exp = unetlab.load_experiment(path, ["train.epochs=3", "model.fusion=add", "train.grad_clip=null",
                                         "model.encoder={name: residual, depth: 3}", "train.lr=1e-2"])
    config = exp.runs[0].config
    assert config["train"]["epochs"] == 3
    assert config["model"]["fusion"] == {"name": "add"}
    assert config["train"]["grad_clip"] is None
    assert config["train"]["lr"] == pytest.approx(0.01)
    assert config["model"]["encoder"]["name"] == "residual" and config["model"]["encoder"]["depth"] == 3
    # defaults of the component are filled in, so the run records exactly what ran
    assert config["model"]["encoder"]["blocks_per_level"] == 2


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; users write it for learning rates all the time.
    exp = unetlab.load_experiment(write(tmp_path, "train: {lr: 1e-3, weight_decay: 5E-4, epochs: 2}\n"))
    assert exp.runs[0].config["train"]["lr"] == pytest.approx(1e-3)
    assert exp.runs[0].config["train"]["weight_decay"] == pytest.approx(5e-4)


def test_component_params_merge_and_replace(tmp_path):
    path = write(tmp_path, """
        model:
          encoder: {name: classic, depth: 3, base_channels: 8}
        variants:
          deeper: {model.encoder.depth: 4}
          wider: {model.encoder: {base_channels: 16}}
          resnet: {model.encoder: residual}
    """)
    runs = {r.variant: r.config["model"]["encoder"] for r in unetlab.load_experiment(path).runs}
    assert (runs["deeper"]["depth"], runs["deeper"]["base_channels"]) == (4, 8)
    assert (runs["wider"]["depth"], runs["wider"]["base_channels"]) == (3, 16)
    assert runs["resnet"]["name"] == "residual" and runs["resnet"]["depth"] == 5  # replaced, not merged


def test_loss_list_with_weights(tmp_path):
    path = write(tmp_path, "train: {loss: [{name: bce, weight: 0.5}, {name: dice, weight: 0.5, smooth: 0.0}]}\n")
    loss = unetlab.load_experiment(path).runs[0].config["train"]["loss"]
    assert loss[0]["name"] == "bce" and loss[0]["weight"] == 0.5
    assert loss[1] == {"name": "dice", "weight": 0.5, "smooth": 0.0, "class_weights": None, "ignore_index": None}


def test_flatten_gives_dotted_keys():
    flat = flatten({"model": {"fusion": {"name": "add"}}, "train": {"loss": [{"name": "bce", "weight": 1.0}]}})
    assert flat == {"model.fusion.name": "add", "train.loss.0.name": "bce", "train.loss.0.weight": 1.0}


@pytest.mark.parametrize("text, expected", [
    ("model:\n  encoder: classic\n  fusoin: add\n",
     "exp.yaml:3: model.fusoin: unknown key; did you mean 'fusion'?"),
    ("trian: {epochs: 3}\n", "exp.yaml:1: trian: unknown key; did you mean 'train'?"),
    ("model:\n  encoder: {name: classic, depth: '3'}\n",
     "exp.yaml:2: model.encoder.depth: expected int in [1, 8], got '3' for encoder 'classic' (allowed: depth: int"),
    ("model:\n  encoder: {name: classic, dpeth: 3}\n",
     "exp.yaml:2: model.encoder.dpeth: unknown parameter of encoder 'classic'; did you mean 'depth'?"),
    ("variants:\n  a: {}\n  b:\n    model:\n      fusion: atention\n",
     "exp.yaml:5: variants.b.model.fusion: unknown fusion 'atention'; did you mean 'attention'? "
     "(known: add, attention, concat, none)"),
    ("matrix:\n  model.upsampler: [bilinear, transposed]\n",
     "exp.yaml:2: matrix.model.upsampler[1]: unknown upsampler 'transposed'; did you mean 'transpose'?"),
    ("train:\n  epochs: !!python/object/apply:os.system ['echo hacked']\n",
     "exp.yaml:2: train.epochs: YAML tag '!!python/object/apply:os.system' is not allowed"),
    ("train: {epochs: 3}\ntrain: {epochs: 4}\n", "exp.yaml:2: train: duplicate key (first at line 1)"),
    ("train: {epochs: [3\n", "exp.yaml:2: invalid YAML"),
    ("train: {optimizer: adamm}\n", "exp.yaml:1: train.optimizer: expected 'adam'|'adamw'|'sgd', got 'adamm'"),
    ("seeds: [1, 1]\n", "exp.yaml:1: seeds: duplicate seeds in [1, 1]"),
    ("variants:\n  'a b': {}\n", "exp.yaml:2: variants.a b: a variant name may hold letters"),
    ("train: {loss: [{name: bce, weight: heavy}]}\n", "exp.yaml:1: train.loss[0].weight: expected float"),
])
def test_errors_name_file_line_and_key_path(tmp_path, text, expected):
    path = write(tmp_path, text)
    line = one_line_error(run_cli("validate", path.name, cwd=tmp_path))
    assert expected in line, line


def test_python_tag_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    write(tmp_path, f"train:\n  epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    one_line_error(run_cli("validate", "exp.yaml", cwd=tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("override, expected", [
    ("model.fusion=ad", "--set model.fusion: unknown fusion 'ad'; did you mean 'add'?"),
    ("model.encoder.dept=3", "--set model.encoder.dept: unknown parameter of encoder 'classic'; did you mean 'depth'?"),
    ("trian.epochs=3", "--set trian.epochs=...: unknown key; did you mean 'train'?"),
    ("train.epochs", "--set train.epochs: expected KEY=VALUE"),
    ("train.epochs=three", "--set train.epochs: expected int in [1, 100000], got 'three'"),
])
def test_set_errors(tmp_path, override, expected):
    write(tmp_path, "train: {epochs: 2}\n")
    line = one_line_error(run_cli("validate", "exp.yaml", "--set", override, cwd=tmp_path))
    assert expected in line, line


def test_missing_file_is_one_line(tmp_path):
    line = one_line_error(run_cli("validate", "nope.yaml", cwd=tmp_path))
    assert "nope.yaml: no such file" in line


def test_validate_prints_runs_and_json(tmp_path):
    write(tmp_path, "variants: {concat: {}, add: {model.fusion: add}}\nseeds: [1, 2]\n")
    proc = run_cli("validate", "exp.yaml", cwd=tmp_path, check=True)
    assert "4 run(s)" in proc.stdout and "add/seed=2" in proc.stdout and "fusion=add" in proc.stdout
    data = json.loads(run_cli("validate", "exp.yaml", "--json", cwd=tmp_path, check=True).stdout)
    assert [r["name"] for r in data["runs"]] == ["concat/seed=1", "concat/seed=2", "add/seed=1", "add/seed=2"]


def test_shipped_experiments_validate():
    import importlib.util

    from conftest import REPO

    for path in sorted((REPO / "experiments").glob("*.yaml")):
        if "name: timm" in path.read_text() and importlib.util.find_spec("timm") is None:
            continue  # needs the timm extra: tests/test_timm_encoder.py validates it where timm is installed
        proc = run_cli("validate", str(path))
        assert proc.returncode == 0, (path, proc.stderr)


def test_a_plugin_declares_parameter_ranges_in_its_signature(tmp_path):
    from unetlab.plugin_api.host import PluginHost

    (tmp_path / "my_plugin.py").write_text(textwrap.dedent('''
        from __future__ import annotations  # string annotations: Range must survive get_type_hints

        from typing import Annotated, Optional

        import unetlab
        from unetlab.plugin_api.params import Range


        def gated(skip_channels: int, up_channels: int, heads: Annotated[int, Range(1, 8)] = 2,
                  scale: Optional[Annotated[float, Range(0, 1, min_exclusive=True)]] = None):
            """A fusion that is never built in this test."""


        @unetlab.hookimpl
        def register_fusions(register):
            register("gated", gated)
    '''))
    text = "plugins: [my_plugin.py]\nmodel:\n  fusion: {{name: gated, heads: {heads}, scale: {scale}}}\n"
    host = PluginHost()
    write(tmp_path, text.format(heads=8, scale=1))
    fusion = unetlab.load_experiment(tmp_path / "exp.yaml", host=host).runs[0].config["model"]["fusion"]
    assert fusion == {"name": "gated", "heads": 8, "scale": 1.0}
    assert [p.type_name() for p in host.registry.get("fusion", "gated").params] == [
        "int in [1, 8]", "float in (0, 1]|null"]
    for heads, scale, expected in [(0, "null", "model.fusion.heads: must be >= 1, got 0 (allowed: [1, 8])"),
                                   (9, "null", "model.fusion.heads: must be <= 8, got 9 (allowed: [1, 8])"),
                                   (2, 0, "model.fusion.scale: must be > 0, got 0 (allowed: (0, 1])")]:
        write(tmp_path, text.format(heads=heads, scale=scale))
        with pytest.raises(unetlab.ConfigError) as info:
            unetlab.load_experiment(tmp_path / "exp.yaml", host=PluginHost())
        assert f"exp.yaml:3: {expected} for fusion 'gated'" in str(info.value)


@pytest.mark.parametrize("value, annotation, expected", [
    (0, "Optional[Annotated[int, Range(1)]]", "must be >= 1, got 0"),
    (None, "Optional[Annotated[int, Range(1)]]", None),
    ("auto", "Union[Annotated[int, Range(1)], Literal['auto']]", "auto"),
    (0, "Union[Annotated[int, Range(1)], Literal['auto']]", "must be >= 1, got 0"),
    ([4, 0], "list[Annotated[int, Range(1, 8)]]", "must be >= 1, got 0 (allowed: [1, 8])"),
    (float("inf"), "Annotated[float, Range(0)]", "must be a finite number, got inf"),
    (10 ** 400, "float", "must be a finite number"),
    (1, "Annotated[float, Range(0, 1, max_exclusive=True)]", "must be < 1, got 1 (allowed: [0, 1))"),
    ("3", "Annotated[int, Range(1, 8)]", "expected int in [1, 8], got '3'"),
])
def test_check_value_enforces_declared_ranges(value, annotation, expected):
    from typing import Annotated, Literal, Optional, Union  # noqa: F401 (used by eval)

    from unetlab.plugin_api.params import OutOfRange, Range, check_value  # noqa: F401 (Range used by eval)

    hint = eval(annotation)
    if expected is None or expected == value:
        assert check_value(value, hint) == value
        return
    with pytest.raises(TypeError) as info:
        check_value(value, hint)
    assert str(info.value).startswith(expected), str(info.value)
    assert isinstance(info.value, OutOfRange) == expected.startswith("must")
