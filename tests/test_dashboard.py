"""The MLflow dashboard: the comparison on the parent run, the runs view URL, `unetlab ui`'s host check, and the
predictions figure."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, run_cli, wait_for_http

TINY = """
name: dash_pair
data:
  dataset: {name: shapes, image_size: 32, n_train: 16, n_val: 6, seed: 3}
  batch_size: 8
model:
  encoder: {name: classic, depth: 2, base_channels: 4}
train: {epochs: 1, lr: 0.01, device: cpu, loss: bce_iou, metrics: [iou]}
tracking: {uri: "sqlite:///STORE", checkpoint_dir: CKPT, log_model: false, figures: false}
variants:
  concat: {model.fusion: concat}
  add: {model.fusion: add}
seeds: [1, 2]
compare: {margin: 0.05}
"""


def write_tiny(folder: Path) -> Path:
    """The 2 variants x 2 seeds, 1 epoch experiment file, logging to folder/t.db."""
    path = folder / "tiny.yaml"
    path.write_text(TINY.replace("STORE", str(folder / "t.db")).replace("CKPT", str(folder / "ckpt")))
    return path


# --- what the UI reads: checked against the MLflow installed here -----------------------------------------


def _mlflow_ui_bundle() -> str:
    import mlflow

    folder = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(p.read_text(errors="replace") for p in folder.glob("*.js"))


def test_the_view_uses_only_what_the_installed_mlflow_ui_reads():
    # the shared-view tag prefix, the URL key and every field of our view state exist in this MLflow's UI:
    # a renamed field would silently open an ungrouped page
    from unetlab.analysis.dashboard import VIEW_TAG_PREFIX, view_state

    bundle = _mlflow_ui_bundle()
    assert f'"{VIEW_TAG_PREFIX}"' in bundle and '"viewStateShareKey"' in bundle
    ui_fields = re.search(r'\["selectedColumns",(?:"\w+",)*"groupBy",(?:"\w+",?)*\]', bundle).group(0)
    facets = re.search(r'\["searchFilter","orderByKey",(?:"\w+",?)*\]', bundle).group(0)
    for key in view_state("abc", "val_iou", ["model.fusion.name"]):
        assert f'"{key}"' in ui_fields or f'"{key}"' in facets, key
    assert 'Tag="tag"' in bundle and 'Average="average"' in bundle  # RunGroupingMode, aggregate function


def test_urls_open_the_training_runs_view():
    from unetlab.analysis.dashboard import experiment_runs_url, run_url, ui_base_url, view_key

    base = ui_base_url(None, "0.0.0.0", 5123)
    assert base == "http://127.0.0.1:5123"  # a wildcard host is opened locally
    assert ui_base_url("http://tracking:5000/", "127.0.0.1", 1) == "http://tracking:5000"
    assert ui_base_url(None, "::1", 80) == "http://[::1]:80"
    assert experiment_runs_url(base, "7", view_key("p1")) == (
        "http://127.0.0.1:5123/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=unetlab-p1")
    assert run_url(base, "7", "p1") == "http://127.0.0.1:5123/#/experiments/7/runs/p1?workflowType=machine_learning"


def test_factor_keys_and_groups_are_what_differs_between_variants_not_replicates(tmp_path):
    from unetlab.analysis.dashboard import factor_keys, group_tags
    from unetlab.config.experiment import load_experiment

    path = write_tiny(tmp_path)
    runs = load_experiment(path).runs
    assert factor_keys(runs) == ["model.fusion.name"] and group_tags(runs) == ["unetlab.variant"]
    tiny = path.read_text()
    path.write_text(tiny + "matrix:\n  train.lr: [0.01, 0.02]\n")  # variants x a matrix: both tell runs apart
    runs = load_experiment(path).runs
    assert factor_keys(runs) == ["model.fusion.name", "train.lr"]  # seeds differ too, but within a variant
    assert group_tags(runs) == ["unetlab.variant", "unetlab.matrix.train.lr"]
    path.write_text(tiny.replace("data:\n", "data:\n  folds: 2\n") + "matrix:\n  data.fold: [0, 1]\n")
    runs = load_experiment(path).runs
    assert factor_keys(runs) == ["model.fusion.name"] and group_tags(runs) == ["unetlab.variant"]  # folds replicate


def test_summary_metrics_match_scipy_and_are_valid_mlflow_names():
    from mlflow.utils.validation import _validate_metric_name
    from scipy import stats

    from unetlab.analysis.dashboard import summary_metrics

    values = {"a": {"1": 0.80, "2": 0.84, "3": 0.83}, "lr=0.1": {"1": 0.70, "2": 0.74}}
    result = {"metric": "val_iou", "seed_bests": values, "pairs": [
        {"a": "a", "b": "lr=0.1", "paired": {"difference": 0.1, "ci_low": 0.05, "ci_high": 0.15}}]}
    out = summary_metrics(result)
    for name in out:
        _validate_metric_name(name)
    a = list(values["a"].values())
    low, high = stats.t.interval(0.95, len(a) - 1, loc=np.mean(a), scale=stats.sem(a))
    assert out["summary/a/best_val_iou_mean"] == pytest.approx(np.mean(a))
    assert out["summary/a/best_val_iou_std"] == pytest.approx(np.std(a, ddof=1))
    assert out["summary/a/best_val_iou_ci_low"] == pytest.approx(low)
    assert out["summary/a/best_val_iou_ci_high"] == pytest.approx(high)
    assert out["summary/a/best_val_iou_n"] == 3
    assert out["summary/lr_0.1/best_val_iou_mean"] == pytest.approx(0.72)  # '=' is not allowed in a name
    assert out["paired/a_vs_lr_0.1/ci_high"] == 0.15


# --- the end of `unetlab run` and `unetlab compare` ---------------------------------------------------------


def test_run_leaves_the_comparison_on_its_parent_and_compare_updates_it(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from unetlab.analysis.compare import compare_runs
    from unetlab.cli.main import main

    path = write_tiny(tmp_path)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{tmp_path / 't.db'}")
    experiment = client.get_experiment_by_name("dash_pair")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`unetlab.parent` = 'true'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    expected = compare_runs(client, experiment.experiment_id, None, parent.info.run_id, 0.05)
    verdict = expected.pairs[0]["verdict"]
    # the verdict, said at the end of the run and written in the parent's description
    assert f"concat vs add: {verdict}" in out
    note = parent.data.tags["mlflow.note.content"]
    assert f"| concat vs add | **{verdict}** |" in note
    # first, the summary line that the UI's collapsed description shows (after the file's own description)
    assert note.split("-->", 1)[1].lstrip().startswith(
        f"Comparison of best val_iou (higher is better; margin ±0.05): **concat vs add: {verdict.split(':')[0]}**")
    assert parent.data.tags["unetlab.compare.margin"] == "0.05"
    # summary metrics: the mean of the children's own best values, read back independently
    bests = [c.data.metrics["best_val_iou"] for c in children if c.data.tags["unetlab.variant"] == "concat"]
    assert len(bests) == 2
    assert parent.data.metrics["summary/concat/best_val_iou_mean"] == pytest.approx(statistics.mean(bests))
    assert parent.data.metrics["summary/concat/best_val_iou_std"] == pytest.approx(statistics.stdev(bests))
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"compare_val_iou.png", "compare.json"} <= logged
    saved = json.loads(Path(client.download_artifacts(parent.info.run_id, "compare.json", str(tmp_path))).read_text())
    assert saved["pairs"][0]["verdict"] == verdict and saved["margin"] == 0.05
    # children: the factor that differs is named, and is a param to group by
    for child in children:
        assert child.data.tags["unetlab.factor"] == "model.fusion.name"
        assert child.data.params["model.fusion.name"] == child.data.tags["unetlab.variant"]
    # the printed URL opens the shared view stored on the experiment: this parent's runs, grouped by variant
    key = f"unetlab-{parent.info.run_id}"
    assert (f"dashboard: http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?"
            f"workflowType=machine_learning&viewStateShareKey={key}") in out
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "unetlab.variant"}]
    assert view["selectedColumns"][:2] == ["metrics.`best_val_iou`", "metrics.`val_iou`"]

    # compare with another margin: the parent's verdicts follow, and it says so in one line
    assert main(["compare", str(path), "--margin", "0.5", "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "comparison logged to parent run" in line]) == 1
    assert "margin 0.05 -> 0.5: verdicts updated" in err
    updated = client.get_run(parent.info.run_id)
    new_verdict = compare_runs(client, experiment.experiment_id, None, parent.info.run_id, 0.5).pairs[0]["verdict"]
    assert updated.data.tags["unetlab.compare.margin"] == "0.5"
    assert f"| concat vs add | **{new_verdict}** |" in updated.data.tags["mlflow.note.content"]
    assert updated.data.tags["mlflow.note.content"].count("Comparison of best val_iou") == 1  # replaced, not appended


def test_a_comparison_that_fails_is_one_warning_and_keeps_the_exit_status(tmp_path, capsys, monkeypatch):
    import unetlab.analysis.compare
    from unetlab.cli.main import main

    def broken(*args, **kwargs):
        raise ValueError("per-image table of run x: not a table")

    monkeypatch.setattr(unetlab.analysis.compare, "compare_runs", broken)
    assert main(["run", str(write_tiny(tmp_path)), "--quiet"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "comparison not logged" in line]
    assert warnings == [line for line in err.splitlines() if line.startswith("unetlab: warning: comparison")]
    assert len(warnings) == 1 and "not a table" in warnings[0]


def test_an_experiment_file_changed_during_the_run_does_not_change_its_comparison(tmp_path, capsys):
    from unetlab.cli.main import main

    path = write_tiny(tmp_path)
    # a plugin that breaks the file's compare.margin while the runs train (an editor saving mid-run)
    (tmp_path / "editor.py").write_text(f"""
def on_run_end(run_name):
    from pathlib import Path
    p = Path({str(path)!r})
    p.write_text(p.read_text().replace("margin: 0.05", "margin: -1"))
""")
    path.write_text("plugins: [editor.py]\n" + path.read_text())
    assert main(["run", str(path), "--quiet"]) == 0  # was exit 2: the margin was read again after training
    err = capsys.readouterr().err
    assert "margin" not in err and "comparison not logged" not in err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 't.db'}")
    [parent] = [r for r in client.search_runs([client.get_experiment_by_name("dash_pair").experiment_id])
                if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["unetlab.compare.margin"] == "0.05"


# --- `unetlab ui` ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_ui_refuses_a_non_loopback_host_without_expose(host, tmp_path):
    proc = run_cli("ui", "--host", host, "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}", timeout=60)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"unetlab: error: --host {host}: not a loopback address") and "--expose" in line
    assert not (tmp_path / "x.db").exists() and proc.stdout == ""


def test_ui_refuses_web_server_options_that_could_bind_elsewhere_without_expose(tmp_path):
    # mlflow ui hands MLFLOW_GUNICORN_OPTS to gunicorn, which binds every -b it is given
    env = {"MLFLOW_GUNICORN_OPTS": "-b 0.0.0.0:58231"}
    proc = run_cli("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}", env=env, timeout=60)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("unetlab: error: unetlab ui: MLFLOW_GUNICORN_OPTS is set") and "--expose" in line


def test_ui_on_a_tracking_server_points_at_its_ui_and_starts_nothing():
    # nothing listens there: the command must not try mlflow ui on an http store (it raised a traceback)
    proc = run_cli("ui", "--tracking-uri", "http://127.0.0.1:9", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "the store is a tracking server: its own UI is at http://127.0.0.1:9" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_long_variant_names_fit_mlflow_key_limits():
    from mlflow.utils.validation import _validate_metric_name, _validate_tag_name

    from unetlab.analysis.dashboard import MAX_KEY_LENGTH, _fit

    long_a, long_b = "a" * 200 + "/x", "a" * 200 + "/y"
    keys = {_fit(f"unetlab.verdict.{long_a}_vs_{long_b}"), _fit(f"unetlab.verdict.{long_a}_vs_{long_a}")}
    assert len(keys) == 2 and all(len(k) == MAX_KEY_LENGTH for k in keys)
    for key in keys:
        _validate_tag_name(key)
        _validate_metric_name(key)
    assert _fit("short") == "short"


def test_loopback_hosts_need_no_opt_in():
    from unetlab.cli.main import _check_ui_host

    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert _check_ui_host(host, expose=False) is False
    assert _check_ui_host("0.0.0.0", expose=True) is True


def test_ui_urls_never_create_a_store(tmp_path):
    from unetlab.analysis.dashboard import ui_urls

    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert ui_urls(uri, None, "127.0.0.1", 5000) == [
        "MLflow UI: http://127.0.0.1:5000", f"no runs yet in {uri}: 'unetlab run FILE' first"]
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_ui_with_expose_listens_beyond_loopback_and_says_what_it_exposes(tmp_path):
    import os
    import signal
    import socket

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unetlab", "ui", "--host", "0.0.0.0", "--expose", "--port",
                             str(port), "--tracking-uri", f"sqlite:///{tmp_path / 'ui.db'}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        # bound to every interface: this host's own non-loopback address answers too, where it has one
        address = socket.gethostbyname(socket.gethostname())
        if not address.startswith("127."):
            wait_for_http(f"http://{address}:{port}/health", proc, timeout=10)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    warning = [line for line in err.splitlines() if line.startswith("unetlab: warning: --expose")]
    assert len(warning) == 1
    for words in ("to every host", "readable and writable", "no authentication", "mlflow server --app-name basic-auth",
                  str(tmp_path / "ui.db")):
        assert words in warning[0]


# --- the predictions figure --------------------------------------------------------------------------------


def test_prediction_figure_draws_masks_side_by_side_and_outlines_where_the_masks_end():
    import matplotlib.pyplot as plt

    from unetlab.analysis.figures import foreground_iou, prediction_figure

    truth = np.zeros((32, 32), dtype=np.int64)
    truth[4:12, 6:20] = 1
    pred = np.zeros_like(truth)
    pred[6:14, 8:20] = 1
    image = np.random.default_rng(0).normal(size=(1, 32, 32)).astype(np.float32)
    fig = prediction_figure([image], [truth], [pred], 2)
    try:
        axes = fig.axes
        # by hand: |T & P| = 6 x 12 = 72, |T| = 8 x 14 = 112, |P| = 8 x 12 = 96, union 136
        assert foreground_iou(truth, pred, 2) == pytest.approx(72 / 136)
        assert axes[2].get_title() == f"prediction (IoU {72 / 136:.2f})"
        # the prediction is a solid mask, the same colours as the truth (not a tint over the image)
        shown_truth, shown_pred = axes[1].get_images()[0].get_array(), axes[2].get_images()[0].get_array()
        assert np.array_equal(shown_pred[..., 0] > 0, pred == 1) and np.array_equal(shown_truth[..., 0] > 0, truth == 1)
        assert np.allclose(shown_pred[pred == 1], shown_truth[truth == 1][0])
        # outlines: half a pixel outside each mask (pixel centres at integer coordinates)
        contours = [c for c in axes[3].collections if hasattr(c, "get_paths")]
        assert len(contours) == 2
        for contour, mask in zip(contours, (truth, pred)):
            vertices = np.concatenate([p.vertices for p in contour.get_paths()])
            rows, cols = np.nonzero(mask)
            assert vertices[:, 0].min() == pytest.approx(cols.min() - 0.5)
            assert vertices[:, 0].max() == pytest.approx(cols.max() + 0.5)
            assert vertices[:, 1].min() == pytest.approx(rows.min() - 0.5)
            assert vertices[:, 1].max() == pytest.approx(rows.max() + 0.5)
        assert contours[0].get_linestyle() != contours[1].get_linestyle()  # truth solid, prediction dashed
    finally:
        plt.close(fig)
