"""``unetlab compare`` does not trust what it reads from the store.

Real runs in a real sqlite MLflow store, tagged as ``unetlab run`` tags them (``unetlab.metric_ranges``
included), two variants x two seeds x 32 images; then one run's ``per_image_metrics.json`` is replaced by a
real file holding what the issue found: text that is not JSON, nesting deep enough to exhaust the parser,
wrong types, NaN rows (32 -> 10 images), IoU values of 5.0, a table over the size limit. Each case gives
exit 0, one warning line naming the run (name and id), and a verdict line that says what was dropped;
before, each was a traceback or a silent verdict on what was left.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from unetlab.tracking.per_image import log_per_image_metrics

SEEDS, IMAGES = [1, 2], 32
RANGES = {"val_iou": [0.0, 1.0], "val_hd95": [0.0, None]}


def known_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    x = rng.uniform(0.55, 0.9, (len(SEEDS), IMAGES))
    return {"x": np.round(x, 8), "y": np.round(x - 0.05 + rng.normal(0, 0.01, x.shape), 8)}


def table_text(rows: list[dict]) -> str:
    """An MLflow table as log_table writes it (NaN as null)."""
    columns = list(rows[0])
    return json.dumps({"columns": columns, "data": [[r[c] for c in columns] for r in rows]})


def good_rows(values: np.ndarray) -> list[dict]:
    return [{"image": f"im{i:02d}", "val_iou": float(v), "val_hd95": 3.0} for i, v in enumerate(values)]


def bad_tables() -> dict[str, str]:
    """case -> the text that replaces run y/seed=2's per_image_metrics.json."""
    rows = good_rows(known_values()["y"][1])
    nan_rows = [dict(r, val_iou=None if i >= 10 else r["val_iou"]) for i, r in enumerate(rows)]
    five = [dict(r, val_iou=5.0 if i == 3 else r["val_iou"]) for i, r in enumerate(rows)]
    return {
        "truncated": table_text(rows)[:-40],
        "deep": "[" * 100_000 + "]" * 100_000,
        "types": json.dumps({"columns": ["image", "val_iou"], "data": [["im00", [0.5]], ["im01", {"x": 1}]]}),
        "nan": table_text(nan_rows),
        "nan_literal": table_text(rows).replace(f"{rows[4]['val_iou']!r}", "NaN", 1),
        "five": table_text(five),
        # parses as a Python int but has no float value (float() raises OverflowError)
        "bigint": table_text(rows).replace(f"{rows[0]['val_iou']!r}", "9" * 400, 1),
        "huge": json.dumps({"columns": ["image", "val_iou"],
                            "data": [[f"pad{i:07d}", 0.5] for i in range(450_000)]}),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One experiment per case (plus a clean one); returns (uri, {case: (bad run's name, id)})."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('trust') / 'trust.db'}"
    client = MlflowClient(uri)
    bad_runs = {}
    for case, text in {"clean": None, **bad_tables()}.items():
        exp = client.create_experiment(case)
        parent = client.create_run(exp, run_name="parent", tags={"unetlab.parent": "true"}).info.run_id
        for variant, matrix in known_values().items():
            for s, seed in enumerate(SEEDS):
                tags = {"mlflow.parentRunId": parent, "unetlab.variant": variant, "unetlab.seed": str(seed),
                        "unetlab.metric_directions": json.dumps({"val_iou": "max", "val_hd95": "min"}),
                        "unetlab.metric_ranges": json.dumps(RANGES)}
                name = f"{variant}/seed={seed}"
                run = client.create_run(exp, run_name=name, tags=tags).info.run_id
                client.log_batch(run, metrics=[Metric("val_iou", float(matrix[s].mean()), 0, 1)],
                                 params=[Param("train.monitor", "val_iou")])
                if text is not None and name == "y/seed=2":
                    client.log_text(run, text, "per_image_metrics.json")  # a real file in the artifact store
                    bad_runs[case] = (name, run)
                else:
                    log_per_image_metrics(SimpleNamespace(client=client, run_id=run), good_rows(matrix[s]))
                client.set_terminated(run, "FINISHED")
    return uri, bad_runs


def compare(store, case, capsys, fmt="json"):
    from unetlab.cli.compare_command import compare_command

    uri, _ = store
    assert compare_command(case, None, fmt, f"{case}.png", None, uri, margin=0.01) == 0
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("unetlab: warning:")]
    return out.out, warnings


def test_a_clean_store_warns_about_nothing(store, capsys):
    out, warnings = compare(store, "clean", capsys)
    [pair] = json.loads(out)["pairs"]
    assert warnings == [] and pair["dropped"] is None and pair["verdict"] == "x better"
    assert pair["paired"]["n_images"] == IMAGES and pair["paired"]["n_pairs"] == IMAGES * len(SEEDS)


@pytest.mark.parametrize("case, says", [
    ("truncated", "per_image_metrics.json is not valid JSON (Expecting"),
    ("deep", "per_image_metrics.json is nested too deep to be a table"),
    ("types", "per_image_metrics.json: data[0].val_iou must be a number or null, got [0.5]"),
    ("five", "per_image_metrics.json: data[3].val_iou = 5 (image 'im03') is outside the metric's declared "
             "range [0, 1]"),
    ("bigint", "per_image_metrics.json: data[0].val_iou must be a number or null, got " + "9" * 40),
    ("huge", "per_image_metrics.json is 9.0 MiB, over the 8 MiB a per-image table may have (refused unread)"),
])
def test_a_bad_table_is_one_line_naming_the_run_and_the_verdict_says_what_was_dropped(store, capsys, case, says):
    out, warnings = compare(store, case, capsys)
    name, run_id = store[1][case]
    [line] = warnings
    assert line.startswith(f"unetlab: warning: run '{name}' (id {run_id}): {says}")
    assert line.endswith("; none of its per-image values are used")
    result = json.loads(out)
    [pair] = result["pairs"]
    [dropped] = result["dropped"]
    assert dropped["run_id"] == run_id and dropped["problem"].startswith(says)
    # seed 2 cannot be paired: its 32 images are dropped, the verdict rests on seed 1 and says so
    assert pair["paired"]["n_seeds"] == 1 and pair["paired"]["n_pairs"] == IMAGES
    assert pair["dropped"]["dropped"] == IMAGES and pair["dropped"]["values_total"] == 2 * IMAGES
    assert pair["verdict"].endswith(f"[from {IMAGES} of {2 * IMAGES} per-image values: {IMAGES} dropped (bad "
                                    f"per-image table in run '{name}'); see the warnings]")
    values = known_values()
    assert pair["paired"]["difference"] == pytest.approx((values["x"][0] - values["y"][0]).mean(), abs=1e-12)


def test_nan_rows_are_counted_per_run_and_in_the_verdict_line(store, capsys):
    out, warnings = compare(store, "nan", capsys)
    name, run_id = store[1]["nan"]
    assert warnings == [f"unetlab: warning: run '{name}' (id {run_id}): 22 of 32 images dropped from "
                        "per_image_metrics.json (val_iou is NaN, inf or null: 22)"]
    [pair] = json.loads(out)["pairs"]
    assert pair["paired"]["n_pairs"] == IMAGES + 10  # seed 1: 32 images, seed 2: the 10 left
    values = known_values()
    expected = np.concatenate([values["x"][0] - values["y"][0], values["x"][1, :10] - values["y"][1, :10]])
    assert pair["paired"]["difference"] == pytest.approx(expected.mean(), abs=1e-12)
    table, _ = compare(store, "nan", capsys, fmt="table")
    assert (f"x vs y: x better [from {IMAGES + 10} of {2 * IMAGES} per-image values: 22 dropped (val_iou is "
            f"NaN, inf or null in run '{name}' (22)); see the warnings]") in table


def test_a_nan_literal_is_dropped_and_counted(store, capsys):
    _, warnings = compare(store, "nan_literal", capsys)
    assert len(warnings) == 1 and "1 of 32 images dropped" in warnings[0]


def test_garbled_tags_and_params_are_warnings_not_tracebacks(store, capsys):
    from mlflow.tracking import MlflowClient

    uri, _ = store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("clean").experiment_id
    [run] = client.search_runs([exp], filter_string="attributes.run_name = 'x/seed=1'")
    client.set_tag(run.info.run_id, "unetlab.metric_ranges", "[" * 5000)
    client.log_param(run.info.run_id, "model.num_params", "lots")
    try:
        _, warnings = compare(store, "clean", capsys)
    finally:
        client.set_tag(run.info.run_id, "unetlab.metric_ranges", json.dumps(RANGES))
    assert any("tag unetlab.metric_ranges is not JSON" in w and run.info.run_id in w for w in warnings)
    assert any("param model.num_params = 'lots' is not a int" in w for w in warnings)


def test_the_reader_refuses_a_huge_table_before_downloading_it(store):
    from mlflow.tracking import MlflowClient

    from unetlab.analysis.compare_inputs import read_per_image

    uri, bad = store
    client = MlflowClient(uri)
    calls = []
    original = client.download_artifacts
    client.download_artifacts = lambda *a, **k: calls.append(a) or original(*a, **k)
    read = read_per_image(client, bad["huge"][1], "val_iou", {})
    assert read.values is None and "refused unread" in read.problem and calls == []
    assert math.isclose(read_per_image(client, bad["nan"][1], "val_iou", {}).dropped_count, 22)
