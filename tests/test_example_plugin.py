"""The example third-party plugin project: pip-installed on its own, listed, used, and passing its tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

EXAMPLE = REPO / "plugins" / "unetlab-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install`` the example project into a folder of its own (no network, test env untouched)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(EXAMPLE)],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {"PYTHONPATH": str(target)}


def test_listed_with_its_version(installed):
    report = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=installed, check=True).stdout)}
    example = report["unetlab_example"]
    assert (example["distribution"], example["version"], example["first_party"]) == ("unetlab-example", "0.1.0", False)
    kinds = {c["kind"] for c in example["components"]}
    assert kinds == {"encoder", "upsampler", "fusion", "block", "initializer", "loss", "metric", "dataset",
                     "augmentation"}


def test_an_experiment_uses_its_components(installed, tmp_path):
    proc = run_cli("run", str(EXAMPLE / "experiments" / "example.yaml"), "--quiet", "--set", "train.epochs=2",
                   "--set", "data.dataset.n_train=16", "--set", "data.dataset.n_val=8",
                   "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "--set", "tracking.log_model=false",
                   "--set", f"tracking.checkpoint_dir={tmp_path / 'ckpt'}", cwd=tmp_path, env=installed)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("FINISHED") == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("example_plugin").experiment_id])
    child = next(r for r in runs if r.info.run_name == "max/seed=0")
    assert child.data.params["model.encoder.name"] == "tiny_resnet"
    assert child.data.params["plugin.unetlab_example"] == "unetlab-example 0.1.0"
    assert "val_volume_similarity" in child.data.metrics


def test_its_own_tests_pass(installed):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          check=False, capture_output=True, text=True, env={**__import__("os").environ, **installed})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "9 passed" in proc.stdout


def test_new_plugin_scaffold_passes_its_own_tests(tmp_path):
    proc = run_cli("new-plugin", "demo", "--dir", str(tmp_path), check=True)
    project = tmp_path / "unetlab-demo"
    assert str(project) in proc.stdout
    assert {p.name for p in project.iterdir()} == {"pyproject.toml", "README.md", "unetlab_demo", "tests"}
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(project)],
                         check=False, capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project / "tests")],
                           check=False, capture_output=True, text=True, env=env, cwd=project)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "9 passed" in tests.stdout
    listed = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env={"PYTHONPATH": str(site)},
                                                       check=True).stdout)}
    assert listed["unetlab_demo"]["distribution"] == "unetlab-demo"
    # a second scaffold of the same name is refused, one line, exit 2
    again = run_cli("new-plugin", "demo", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert run_cli("new-plugin", "Bad-Name").returncode == 2
