"""What ``--resume`` promises besides continuing: the resumed run's tags say what happened last, a resume that
matches nothing says so, and a run whose data or local plugin code changed since is refused; and ``predict``
tells a deleted weights artifact from one that was never logged."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import one_line_error, run_cli
from test_run import KILLER, client_for, experiment, runs_of


@pytest.mark.slow
def test_resume_refuses_changed_plugin_code_then_clears_the_interrupted_reason(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    path = experiment(tmp_path, epochs=2, extra="plugins: [killer.py]\n")
    killed = run_cli("run", str(path), "--quiet", cwd=tmp_path, env={"KILL_AT": "base/seed=0:1:SIGINT"})
    assert killed.returncode == 130, killed.stderr
    client = client_for(tmp_path)
    _, [child] = runs_of(client)
    assert child.info.status == "KILLED" and child.data.tags["unetlab.status_reason"] == "interrupted"

    (tmp_path / "killer.py").write_text(KILLER + "\n# edited after the run was killed\n")
    line = one_line_error(run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path))
    assert "--resume: run 'base/seed=0' was trained with other local plugin code" in line
    assert "killer.py" in line, line
    _, [same] = runs_of(client)
    assert same.info.status == "KILLED"  # refused before anything was touched

    (tmp_path / "killer.py").write_text(KILLER)  # the code it was trained with: resumes
    proc = run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, [resumed] = runs_of(client)
    assert resumed.info.run_id == child.info.run_id and resumed.info.status == "FINISHED"
    assert "unetlab.status_reason" not in resumed.data.tags, resumed.data.tags  # it was not interrupted

    # a --resume whose config matches no earlier run says so, and starts it from epoch 1
    proc = run_cli("run", str(path), "--quiet", "--resume", "--set", "train.lr=0.02", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (f"unetlab: --resume: no run of {path} matched an earlier run in experiment 'tiny'" in proc.stderr
            and "so it starts from epoch 1" in proc.stderr), proc.stderr


@pytest.mark.slow
def test_resume_refuses_a_run_whose_folder_data_changed(tmp_path):
    import numpy as np
    from skimage import io

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        io.imsave(root / "images" / f"c{i}.png", (rng.random((32, 32)) * 255).astype(np.uint8), check_contrast=False)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 6:18] = 255
        io.imsave(root / "masks" / f"c{i}.png", mask, check_contrast=False)
    (tmp_path / "killer.py").write_text(KILLER)
    path = experiment(tmp_path, epochs=2, extra="plugins: [killer.py]\ndata: {batch_size: 4}\n")
    config = yaml.safe_load(path.read_text())
    config["data"]["dataset"] = {"name": "folder", "root": str(root), "val_fraction": 0.25}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    killed = run_cli("run", str(path), "--quiet", cwd=tmp_path, env={"KILL_AT": "base/seed=0:1:SIGTERM"})
    assert killed.returncode == 143, killed.stderr
    image = io.imread(root / "images" / "c3.png")
    image[0, 0] = 255 - image[0, 0]  # one pixel of one image
    io.imsave(root / "images" / "c3.png", image, check_contrast=False)
    line = one_line_error(run_cli("run", str(path), "--quiet", "--resume", cwd=tmp_path))
    assert "--resume: run 'base/seed=0' was trained on other data (digest " in line, line
    _, [child] = runs_of(client_for(tmp_path))
    assert child.info.status == "KILLED"


@pytest.mark.slow
def test_predict_tells_a_deleted_weights_artifact_from_one_never_logged(tmp_path):
    import numpy as np
    from skimage import io

    path = experiment(tmp_path, epochs=1, log_model=True)
    assert run_cli("run", str(path), "--quiet", cwd=tmp_path).returncode == 0
    (tmp_path / "off").mkdir()
    off = experiment(tmp_path / "off", epochs=1)  # tracking.log_model: false
    assert run_cli("run", str(off), "--quiet", cwd=tmp_path / "off").returncode == 0
    io.imsave(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8), check_contrast=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, [logged] = runs_of(client_for(tmp_path))
    [weights] = [p for p in tmp_path.rglob("weights.pt") if logged.info.run_id in str(p)]
    os.remove(weights)  # deleted from the artifact store, as a cleanup script or a quota might
    line = one_line_error(run_cli("predict", logged.info.run_id, str(tmp_path / "a.png"), "--out",
                                  str(tmp_path / "masks"), "--tracking-uri", uri, cwd=tmp_path))
    assert "it was logged, and has since been deleted from the run's artifact store" in line, line
    assert "older unetlab" not in line
    _, [never] = runs_of(client_for(tmp_path / "off"))
    off_uri = f"sqlite:///{tmp_path / 'off' / 'mlflow.db'}"
    line = one_line_error(run_cli("predict", never.info.run_id, str(tmp_path / "a.png"), "--out",
                                  str(tmp_path / "masks"), "--tracking-uri", off_uri, cwd=tmp_path / "off"))
    assert "the run was trained with tracking.log_model off" in line, line
