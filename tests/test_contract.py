"""The comparison contract on fabricated run records: the declared factor, the confound columns, the
compute-ratio warning (checked by hand)."""

from __future__ import annotations

import json

import pytest

from unetlab.analysis.contract import RunRecord, build_contract, format_contract

BASE = {"model.fusion.name": "concat", "model.encoder.base_channels": 16, "train.lr": 0.003, "train.seed": 1,
        "data.dataset.n_train": 320}


def record(variant, seed, **changes):
    costs = {k: changes.pop(k) for k in list(changes) if k in RunRecord.__dataclass_fields__}
    config = {**BASE, "train.seed": seed, **{k.replace("__", "."): v for k, v in changes.items()}}
    defaults = {"params": 1000, "gflops_per_image": 0.5, "batch_size": 16, "epochs": 10, "steps": 200,
                "data_digest": "d1", "splits": {"train": 320, "val": 96}}
    return RunRecord(variant=variant, config=config, **{**defaults, **costs})


def test_factor_is_the_keys_that_differ_between_variants_not_the_seed():
    records = [record(v, s, model__fusion__name=v) for v in ("concat", "add") for s in (1, 2)]
    contract = build_contract(records)
    assert contract.factor == {"model.fusion.name": {"concat": ["concat"], "add": ["add"]}}
    assert contract.warnings == []
    assert [v.variant for v in contract.variants] == ["concat", "add"]
    text = "\n".join(format_contract(contract))
    assert "declared factor: model.fusion.name (concat: concat; add: add)" in text
    assert "  warning:" not in text


def test_compute_warning_by_hand():
    # base_channels 8 vs 32: 16x the FLOPs per image; the same steps and batch size.
    records = [record("small", s, model__encoder__base_channels=8, gflops_per_image=0.1, params=500)
               for s in (1, 2)]
    records += [record("large", s, model__encoder__base_channels=32, gflops_per_image=1.6, params=8000)
                for s in (1, 2)]
    contract = build_contract(records)
    small, large = contract.variants
    assert small.compute_tflop == pytest.approx(0.1 * 200 * 16 / 1e3)   # 0.32 TFLOP
    assert large.compute_tflop == pytest.approx(1.6 * 200 * 16 / 1e3)   # 5.12 TFLOP
    [warning] = contract.warnings
    assert "training compute" in warning and "16.00x" in warning and "large 5.12 TFLOP, small 0.32 TFLOP" in warning
    assert list(contract.factor) == ["model.encoder.base_channels"]


def test_ratio_is_a_threshold_and_time_is_checked_too():
    records = [record("a", 1, train_seconds=100.0, model__fusion__name="a"),
               record("b", 1, train_seconds=140.0, steps=280, model__fusion__name="b")]
    assert build_contract(records).warnings == []          # 1.4x: under 1.5
    warnings = build_contract(records, ratio=1.3).warnings  # both compute and time are 1.4x
    assert len(warnings) == 2 and all("1.40x" in w and "stated ratio 1.3" in w for w in warnings)
    with pytest.raises(ValueError):
        build_contract(records, ratio=1.0)


def test_tuned_keys_are_listed_apart_and_unknowns_are_left_out():
    records = [RunRecord("a", {**BASE, "train.lr": 0.01, "model.fusion.name": "concat"}, params=10, epochs=3),
               RunRecord("b", {**BASE, "train.lr": 0.002, "model.fusion.name": "add"}, params=10, epochs=3)]
    contract = build_contract(records, tuned=["train.lr"])
    assert list(contract.factor) == ["model.fusion.name"] and contract.tuned == ["train.lr"]
    lines = format_contract(contract)
    assert any("tuned per variant" in line and "train.lr" in line for line in lines)
    header = next(line for line in lines if line.strip().startswith("variant"))
    assert "params" in header and "epochs" in header and "train s" not in header and "peak MB" not in header
    assert contract.warnings == []  # unknown compute: nothing to compare, no false warning


def test_different_data_and_absent_keys():
    records = [record("a", 1, data_digest="d1", model__fusion__name="a"),
               record("b", 1, data_digest="d2", splits={"train": 300, "val": 96}, model__fusion__name="b",
                      model__fusion__extra=3)]
    contract = build_contract(records)
    assert contract.factor["model.fusion.extra"] == {"a": ["(absent)"], "b": ["3"]}
    assert any("different data" in w for w in contract.warnings)
    assert any("different splits" in w for w in contract.warnings)
    # when the factor is a data key, different data is the point of the comparison: no warning for it
    records = [record("a", 1, data_digest="d1", data__dataset__n_train=320),
               record("b", 1, data_digest="d2", data__dataset__n_train=160)]
    assert not any("different data" in w for w in build_contract(records).warnings)


def test_one_variant_and_identical_configs():
    assert "one variant" in "\n".join(format_contract(build_contract([record("a", 1), record("a", 2)])))
    text = "\n".join(format_contract(build_contract([record("a", 1), record("b", 1)])))
    assert "declared factor: none" in text


COMPUTE_PAIR = """
name: compute_pair
data:
  dataset: {name: shapes, image_size: 32, n_train: 20, n_val: 4, n_test: 4, seed: 2}
  batch_size: 8
model:
  encoder: {name: classic, depth: 2, base_channels: 16}
train: {epochs: 3, device: cpu}
variants:
  small: {model.encoder.base_channels: 8}
  large: {model.encoder.base_channels: 32}
seeds: [1, 2]
"""


def test_validate_prints_the_contract_and_warns_when_compute_differs(tmp_path):
    import re

    from conftest import run_cli

    path = tmp_path / "pair.yaml"
    path.write_text(COMPUTE_PAIR)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "comparison contract:" in text
    assert "declared factor: model.encoder.base_channels (small: 8; large: 32)" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith(("small", "large"))}
    summary = json.loads(run_cli("summary", str(path), "--json", check=True).stdout)
    gflops = {r["run"].split("/")[0]: r["gflops"] for r in summary}
    # 20 images / batch 8 = 3 steps per epoch, 3 epochs: 9 steps of 8 images
    for variant in ("small", "large"):
        assert f"{gflops[variant]:.3f}" in rows[variant] and "9" in rows[variant]
    [warning] = [line for line in text.splitlines() if "warning:" in line]
    factor = float(re.search(r"by ([0-9.]+)x", warning).group(1))
    assert factor == pytest.approx(gflops["large"] / gflops["small"], rel=0.01) and factor > 10  # ~ channels squared
    assert "train 20 / val 4 / test 4" in text


@pytest.mark.parametrize("ratio, warned", [(None, True), (100, False), (1.01, True), (1.5, True)])
def test_the_compute_ratio_of_the_experiment_file_sets_the_warning(tmp_path, ratio, warned):
    from conftest import run_cli

    path = tmp_path / "pair.yaml"
    path.write_text(COMPUTE_PAIR + ("" if ratio is None else f"compare: {{compute_ratio: {ratio}}}\n"))
    proc = run_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    # large has 4x the channels of small, over 10x its FLOPs: warned at 1.5x and 1.01x, not at 100x
    assert any("warning:" in line and "compute" in line for line in proc.stdout.splitlines()) == warned
    said = "1.5x (the default; compare.compute_ratio" if ratio is None else f"{ratio}x (set by compare.compute_ratio)"
    assert f"differ in compute or time by more than {said}" in proc.stdout


@pytest.mark.parametrize("value, message", [
    ("0.5", "compare.compute_ratio: expected a number > 1, got 0.5"),
    ("1", "compare.compute_ratio: expected a number > 1, got 1"),
    ("true", "compare.compute_ratio: expected a number > 1, got True"),
    (".inf", "compare.compute_ratio: expected a number > 1, got inf"),
    ("'2'", "compare.compute_ratio: expected a number > 1, got '2'"),
    ("9" * 400, f"compare.compute_ratio: expected a number > 1, got {'9' * 400}"),  # too big for a float
])
def test_a_bad_compute_ratio_is_one_line_exit_2(tmp_path, value, message):
    from conftest import run_cli

    path = tmp_path / "pair.yaml"
    path.write_text(COMPUTE_PAIR + f"compare:\n  compute_ratio: {value}\n")
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"unetlab: error: {path}:{len(COMPUTE_PAIR.splitlines()) + 2}: {message}"]
