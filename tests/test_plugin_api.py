"""The declared plugin API: its version, a plugin's stated range, deprecations and components refused alone."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

import unetlab
from unetlab.plugin_api.host import PluginHost, module_from_functions

from conftest import make_distribution, run_cli

# A plugin written against the 0.1 docs: its metric says nothing about which way is better.
OLD_STYLE_PLUGIN = '''
import torch, unetlab

class MaxFusion(torch.nn.Module):
    """Element-wise maximum of skip and upsampled map."""
    def __init__(self, skip_channels: int, up_channels: int):
        super().__init__()
        self.out_channels = up_channels
        self.project = torch.nn.Conv2d(skip_channels, up_channels, 1)
    def forward(self, skip, up):
        return torch.maximum(self.project(skip), up)

class PixelAgreement:
    """Share of pixels whose predicted class is right."""
    def __init__(self, num_classes: int):
        self.right = self.total = 0.0
    def reset(self):
        self.right = self.total = 0.0
    def update(self, logits, target):
        pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        self.right += float((pred == target).sum())
        self.total += target.numel()
    def compute(self):
        return {"agreement": self.right / max(self.total, 1.0)}

@unetlab.hookimpl
def register_fusions(register):
    register("oldmax", MaxFusion)

@unetlab.hookimpl
def register_metrics(register):
    register("agreement", PixelAgreement)
'''


def test_plugin_api_version_is_public_and_the_version_has_one_home():
    import importlib.metadata

    assert unetlab.PLUGIN_API_VERSION == 2
    assert "PLUGIN_API_VERSION" in unetlab.__all__
    assert unetlab.__version__ == importlib.metadata.version("unetlab")


def test_old_style_plugin_is_listed_whole_and_trains_with_one_warning(tmp_path):
    (tmp_path / "oldstyle.py").write_text(OLD_STYLE_PLUGIN)
    exp = tmp_path / "old.yaml"
    exp.write_text(f"""
plugins: [oldstyle.py]
data: {{dataset: {{name: shapes, image_size: 32, n_train: 8, n_val: 4}}, batch_size: 8}}
model: {{encoder: {{name: classic, depth: 2, base_channels: 4}}, fusion: oldmax}}
train: {{epochs: 1, metrics: [iou, agreement], monitor: val_agreement}}
tracking: {{uri: "sqlite:///{tmp_path / 'm.db'}", checkpoint_dir: "{tmp_path / 'ckpt'}", log_model: false,
           figures: false}}
""")
    listed = json.loads(run_cli("plugins", "--json", "--file", str(exp), check=True).stdout)
    plugin = next(p for p in listed if p["name"].endswith("oldstyle.py"))
    assert not plugin["broken"]
    assert {(c["kind"], c["name"], c["direction"]) for c in plugin["components"]} == {
        ("fusion", "oldmax", None), ("metric", "agreement", "max")}
    assert len(plugin["warnings"]) == 1 and "metric 'agreement' declares no direction" in plugin["warnings"][0]

    proc = run_cli("run", str(exp), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    deprecations = [line for line in proc.stderr.splitlines() if "declares no direction" in line]
    assert len(deprecations) == 1, proc.stderr
    assert re.fullmatch(r"unetlab: warning: plugin 'file:.*oldstyle\.py': metric 'agreement' declares no direction; "
                        r"treated as higher-is-better\. Deprecated since plugin API 2 .*", deprecations[0])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("old").experiment_id])
              if "mlflow.parentRunId" in r.data.tags]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.monitor_mode"] == "max"  # monitored by the assumed direction
    assert 0.0 <= run.data.metrics["val_agreement"] <= 1.0


def test_a_component_that_breaks_its_contract_is_refused_alone():
    class Loss(torch.nn.Module):
        """A loss."""

        def __init__(self, num_classes: int):
            super().__init__()

    class Score:
        """A score."""

        def __init__(self, num_classes: int):
            pass

    def register_metrics(register):
        register("sideways", Score, direction="up")  # not 'max' or 'min'
        register("fine", Score, direction="min")

    def register_losses(register):
        register("flagged", Loss, binary_only="yes")  # not a bool
        register("plain", Loss)
        register("builtin", max)  # a factory whose signature cannot be read

    host = PluginHost(autoload=False)
    info = host.register(module_from_functions("mixed", register_metrics=register_metrics,
                                               register_losses=register_losses))
    assert not info.broken
    assert host.registry.list("metric") == ["fine"] and host.registry.list("loss") == ["plain"]
    assert len(info.refused) == 3
    assert any("metric 'sideways': direction must be 'max' or 'min', got 'up'" in line for line in info.refused)
    assert any("loss 'flagged': binary_only must be True or False" in line for line in info.refused)
    assert any("loss 'builtin'" in line and "parameters cannot be read" in line for line in info.refused)
    lines = host.problem_lines()
    assert len(lines) == 3 and all(line.endswith("(refused; the plugin's other components load)") for line in lines)


def test_undirected_metric_in_process_warns_and_is_higher_is_better():
    class Score:
        """A score."""

        def __init__(self, num_classes: int):
            pass

    host = PluginHost(autoload=False)
    info = host.register(module_from_functions("undirected", register_metrics=lambda register: register(
        "score", Score)))
    assert host.registry.get("metric", "score").direction == "max"
    assert info.warnings == [
        "plugin 'undirected': metric 'score' declares no direction; treated as higher-is-better. Deprecated since "
        "plugin API 2 (unetlab 0.2): register('score', factory, direction='max') or direction='min'"]
    # the registry's own add() (no plugin host) warns the Python way, once per call
    registry = unetlab.Registry()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry.add("metric", "score", Score, None, "notebook").direction == "max"
    assert [w.category for w in caught] == [unetlab.PluginDeprecationWarning]


@pytest.mark.parametrize("stated, loads", [(">=2,<3", True), (">=1", True), ("<2", False), ("==3", False),
                                           ("two", False)])
def test_a_plugin_states_the_plugin_api_versions_it_supports(tmp_path, stated, loads):
    header = "import torch, unetlab\n"
    source = OLD_STYLE_PLUGIN.replace(header, f"{header}UNETLAB_PLUGIN_API = {stated!r}\n")
    site = make_distribution(tmp_path / "site", "unetlab-ranged", "1.0", {"ranged": "ranged_plugin"},
                             {"ranged_plugin": source})
    report = {p["name"]: p for p in json.loads(
        run_cli("plugins", "--json", env={"PYTHONPATH": str(site)}, check=True).stdout)}
    plugin = report["ranged_plugin"]
    assert plugin["broken"] is (not loads)
    if loads:
        assert {c["name"] for c in plugin["components"]} == {"oldmax", "agreement"}
    elif stated == "two":
        assert "UNETLAB_PLUGIN_API = 'two' is not a version specifier" in plugin["error"]
    else:
        assert plugin["error"] == (f"plugin 'ranged_plugin' supports unetlab plugin API {stated}, but this unetlab "
                                   f"({unetlab.__version__}) has plugin API 2: install a version of the plugin made "
                                   f"for it")
        assert plugin["components"] == []


def test_scaffold_pins_a_unetlab_minor_range_and_the_plugin_api(tmp_path):
    from unetlab.cli.new_plugin import scaffold_plugin

    root = scaffold_plugin("pinned", tmp_path)
    major, minor = (int(p) for p in unetlab.__version__.split(".")[:2])
    assert f'dependencies = ["unetlab>={major}.{minor},<{major}.{minor + 1}"]' in (root / "pyproject.toml").read_text()
    assert 'UNETLAB_PLUGIN_API = ">=2,<3"' in (root / "unetlab_pinned" / "__init__.py").read_text()


def test_warnings_are_not_repeated_when_the_registry_is_rebuilt():
    class Score:
        """A score."""

        def __init__(self, num_classes: int):
            pass

    host = PluginHost(autoload=False)
    host.register(module_from_functions("first", register_metrics=lambda register: (
        register("score", Score), register("odd", Score, direction="up"))))
    _ = host.registry
    host.register(module_from_functions("second", register_fusions=lambda register: None))
    _ = host.registry  # a second plugin rebuilds the registry, running the first one's hooks again
    assert len(host.problem_lines()) == 2
