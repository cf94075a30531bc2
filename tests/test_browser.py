"""The MLflow dashboard in a real browser: headless Chromium opens the URL `unetlab ui` prints for a finished
comparison and must land on the training runs grouped by variant, and the parent run must show the verdict.

Chromium is driven by its command line (``--dump-dom``: the page's DOM after its scripts ran). Debian's
``chromium`` package is what CI installs; without a Chromium the test is skipped and says why.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_dashboard import write_tiny

from conftest import free_port, run_cli, wait_for_http

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium): the dashboard test needs a "
                             "real browser")]


def page_text(url: str) -> str:
    """The visible text of ``url`` once its scripts have run, as headless Chromium renders it."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                               "--dump-dom", url], capture_output=True, text=True, timeout=180)
    dom = re.sub(r"<(script|style|svg)\b.*?</\1>", " ", proc.stdout, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def page_with(url: str, expected: str, tries: int = 3) -> str:
    """``page_text(url)`` once it shows ``expected`` (a slow server may answer after the first render)."""
    for _ in range(tries):
        text = page_text(url)
        if expected in text:
            break
    return text


def test_the_printed_url_opens_the_runs_grouped_by_variant_and_the_parent_shows_the_verdict(tmp_path):
    from mlflow.tracking import MlflowClient

    path = write_tiny(tmp_path)
    run_cli("run", str(path), "--quiet", cwd=tmp_path, check=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 't.db'}")
    experiment = client.get_experiment_by_name("dash_pair")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`unetlab.parent` = 'true'")
    saved = json.loads(Path(client.download_artifacts(parent.info.run_id, "compare.json", str(tmp_path))).read_text())
    verdict = saved["pairs"][0]["verdict"]

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unetlab", "ui", str(path), "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert lines[0] == f"MLflow UI: http://127.0.0.1:{port}"
        runs_url = lines[1].split(": ", 1)[1]
        parent_url = lines[2].split(": ", 1)[1]
        assert lines[1].startswith("training runs of 'dash_pair', grouped by variant: ")
        assert parent.info.run_id in parent_url
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)

        runs = page_with(runs_url, "Group: add")
        assert "Group by: unetlab.variant" in runs  # grouped without a click
        for name in ("Group: concat", "Group: add", "concat/seed=1", "concat/seed=2", "add/seed=1", "add/seed=2"):
            assert name in runs, name
        assert "best_val_iou" in runs  # the monitored metric is a column
        assert "Token Usage" not in runs and "Traces 0" not in runs  # not the GenAI overview

        page = page_with(parent_url, "Comparison of best val_iou")
        assert f"Comparison of best val_iou (higher is better; margin ±0.05): concat vs add: {verdict.split(':')[0]}" \
            in page
        assert f"concat vs add {verdict}" in page  # the verdict table's row
        assert "summary/concat/best_val_iou_mean" in page  # the summary metrics
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
