"""Plugin discovery, listing and the plugin errors, through the CLI and the public API."""

from __future__ import annotations

import json

import pytest
import torch

import unetlab
from unetlab.plugin_api.host import PluginHost, module_from_functions

from conftest import make_distribution, one_line_error, run_cli

FIRST_PARTY = {"unetlab_std.encoders", "unetlab_std.upsamplers", "unetlab_std.fusions", "unetlab_std.blocks",
               "unetlab_std.initializers", "unetlab_std.losses", "unetlab_std.metrics", "unetlab_std.datasets",
               "unetlab_std.augmentations", "unetlab_timm.encoders", "unetlab_timm.normalization"}

GOOD_PLUGIN = '''
import torch, unetlab

class MaxFusion(torch.nn.Module):
    """Element-wise maximum of skip and upsampled map."""
    def __init__(self, skip_channels: int, up_channels: int, scale: float = 1.0):
        super().__init__()
        self.out_channels = up_channels
        self.project = torch.nn.Conv2d(skip_channels, up_channels, 1)
    def forward(self, skip, up):
        return torch.maximum(self.project(skip), up)

@unetlab.hookimpl
def register_fusions(register):
    register("max", MaxFusion)
'''


def test_plugins_json_lists_first_party_through_entry_points():
    proc = run_cli("plugins", "--json", check=True)
    report = {p["name"]: p for p in json.loads(proc.stdout)}
    assert FIRST_PARTY <= set(report)
    for name in FIRST_PARTY:
        assert report[name]["distribution"] == "unetlab"
        assert report[name]["version"] == unetlab.__version__
        assert report[name]["first_party"] and not report[name]["broken"]
        assert report[name]["source"].startswith("entry point")
    fusions = {c["name"]: c for c in report["unetlab_std.fusions"]["components"]}
    assert set(fusions) == {"concat", "add", "attention", "none"}
    assert report["unetlab_std.fusions"]["hooks"] == ["register_fusions"]
    encoder = {c["name"]: c for c in report["unetlab_std.encoders"]["components"]}["classic"]
    depth = {p["name"]: p for p in encoder["params"]}["depth"]
    assert depth == {"name": "depth", "type": "int in [1, 8]", "required": False, "default": 5}
    # contract arguments are supplied by unetlab, never shown as user parameters
    assert "in_channels" not in {p["name"] for p in encoder["params"]}


def test_plugins_text_lists_components_with_defaults():
    proc = run_cli("plugins", "--kind", "fusion", check=True)
    assert "fusion      attention" in proc.stdout
    assert "inter_channels: int in [1, 65536]|null = null" in proc.stdout  # with its declared range


def test_third_party_plugin_found_and_broken_one_marked(tmp_path):
    site = make_distribution(tmp_path / "site", "unetlab-maxfusion", "2.3.4", {"maxfusion": "maxfusion_plugin"},
                             {"maxfusion_plugin": GOOD_PLUGIN})
    make_distribution(site, "unetlab-broken", "0.0.1", {"broken": "broken_plugin"},
                      {"broken_plugin": "import not_a_real_module_xyz\n"})
    env = {"PYTHONPATH": str(site)}
    report = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=env, check=True).stdout)}
    assert report["maxfusion_plugin"]["distribution"] == "unetlab-maxfusion"
    assert report["maxfusion_plugin"]["version"] == "2.3.4"
    assert not report["maxfusion_plugin"]["first_party"]
    assert [c["name"] for c in report["maxfusion_plugin"]["components"]] == ["max"]
    broken = report["broken_plugin"]
    assert broken["broken"]
    assert "entry point 'broken = broken_plugin'" in broken["error"]
    assert "unetlab-broken 0.0.1" in broken["error"]
    assert "ModuleNotFoundError" in broken["error"] and "not_a_real_module_xyz" in broken["error"]
    assert FIRST_PARTY <= set(report)  # everything else still listed
    text = run_cli("plugins", env=env, check=True).stdout
    assert "broken_plugin" in text and "BROKEN" in text

    # other commands still work and warn on one line
    exp = tmp_path / "exp.yaml"
    exp.write_text("model: {fusion: max}\n")
    proc = run_cli("validate", str(exp), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "fusion=max" in proc.stdout
    assert "warning" in proc.stderr and "broken_plugin" in proc.stderr


def test_disable_autoload_keeps_only_first_party(tmp_path):
    site = make_distribution(tmp_path / "site", "unetlab-maxfusion", "2.3.4", {"maxfusion": "maxfusion_plugin"},
                             {"maxfusion_plugin": GOOD_PLUGIN})
    env = {"PYTHONPATH": str(site), "UNETLAB_DISABLE_PLUGIN_AUTOLOAD": "1"}
    names = {p["name"] for p in json.loads(run_cli("plugins", "--json", env=env, check=True).stdout)}
    assert names == FIRST_PARTY


def test_plugin_raising_in_hook_is_marked_and_others_go_on(tmp_path):
    source = GOOD_PLUGIN + '''
@unetlab.hookimpl
def register_losses(register):
    raise RuntimeError("boom in hook")
'''
    site = make_distribution(tmp_path / "site", "unetlab-raiser", "1.0", {"raiser": "raiser_plugin"},
                             {"raiser_plugin": source})
    report = {p["name"]: p for p in json.loads(
        run_cli("plugins", "--json", env={"PYTHONPATH": str(site)}, check=True).stdout)}
    assert report["raiser_plugin"]["broken"]
    assert ("plugin 'raiser_plugin' (distribution 'unetlab-raiser 1.0') raised in register_losses: "
            "RuntimeError: boom in hook") in report["raiser_plugin"]["error"]
    # nothing of a broken plugin is half-registered
    assert report["raiser_plugin"]["components"] == []
    assert not report["unetlab_std.losses"]["broken"]


def test_duplicate_component_names_both_plugins(tmp_path):
    dup = '''
import unetlab
from unetlab_std.fusions import AddFusion

@unetlab.hookimpl
def register_fusions(register):
    register("concat", AddFusion)
'''
    site = make_distribution(tmp_path / "site", "unetlab-dup", "1.0", {"dup": "dup_plugin"}, {"dup_plugin": dup})
    line = one_line_error(run_cli("plugins", env={"PYTHONPATH": str(site)}))
    assert "fusion 'concat' is registered twice" in line
    assert "unetlab_std.fusions" in line and "dup_plugin" in line


def test_local_plugin_file_named_in_experiment_is_loaded_relative_to_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my_plugin.py").write_text(GOOD_PLUGIN)
    exp = tmp_path / "sub" / "exp.yaml"
    exp.write_text("plugins: [my_plugin.py]\nmodel: {fusion: {name: max, scale: 2}}\n")
    proc = run_cli("validate", str(exp), "--json", cwd=tmp_path, check=True)
    config = json.loads(proc.stdout)["runs"][0]["config"]
    assert config["model"]["fusion"] == {"name": "max", "scale": 2.0}


def test_local_plugin_file_errors_name_the_file(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("plugins: [missing.py]\n")
    line = one_line_error(run_cli("validate", str(exp)))
    assert "exp.yaml:1: plugins[0]" in line and "missing.py" in line
    (tmp_path / "bad.py").write_text("def oops(:\n")
    exp.write_text("plugins:\n  - bad.py\n")
    line = one_line_error(run_cli("validate", str(exp)))
    assert "exp.yaml:2: plugins[0]" in line and "SyntaxError" in line


def test_in_process_registration_and_create():
    host = PluginHost(autoload=False)

    class Twice:
        """Doubles things."""

        def __init__(self, num_classes: int, factor: float = 2.0):
            self.factor = factor

    def register_losses(register):
        register("twice", Twice)

    host.register(module_from_functions("inline", register_losses=register_losses))
    component = host.registry.get("loss", "twice")
    assert component.description == "Doubles things."
    assert [(p.name, p.default) for p in component.params] == [("factor", 2.0)]
    assert host.registry.create("loss", "twice", num_classes=2, factor=3).factor == 3.0
    with pytest.raises(unetlab.ConfigError, match=r"factr: unknown parameter of loss 'twice'; did you mean 'factor'"):
        host.registry.create("loss", "twice", num_classes=2, factr=3)
    with pytest.raises(unetlab.ConfigError, match=r"factor: expected float, got 'x'"):
        host.registry.create("loss", "twice", num_classes=2, factor="x")
    with pytest.raises(unetlab.ConfigError, match=r"unknown loss 'twic'; did you mean 'twice'\? \(known: twice\)"):
        host.registry.get("loss", "twic")


def test_public_api_lists_and_creates():
    assert unetlab.list_components("upsampler") == ["bilinear", "nearest", "pixel_shuffle", "transpose"]
    assert unetlab.list_components("encoder", "res*") == ["residual"]
    fusion = unetlab.create("fusion", "add", skip_channels=8, up_channels=4)
    assert fusion.out_channels == 4
    with pytest.raises(unetlab.ConfigError, match="unknown component kind 'fusions'; did you mean 'fusion'"):
        unetlab.list_components("fusions")


TYPO_PLUGIN = '''
import unetlab
from unetlab_std.fusions import AddFusion

@unetlab.hookimpl
def register_fusion(register):          # no "s": not a hook
    register("typo_add", AddFusion)

def register_blocks(register):          # an unmarked module function named like a hook is a hook
    pass
'''


def test_unknown_hook_in_local_plugin_file_is_broken_with_did_you_mean(tmp_path):
    (tmp_path / "typo.py").write_text(TYPO_PLUGIN)
    (tmp_path / "lifecycle_typo.py").write_text("def on_epoch_ended(run_name, epoch):\n    pass\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("plugins: [typo.py, lifecycle_typo.py]\n")
    text = run_cli("plugins", "--file", str(exp), check=True).stdout
    typo_line = next(line for line in text.splitlines() if "typo.py" in line and "lifecycle" not in line)
    assert typo_line.endswith("BROKEN"), text
    assert ("defines 'register_fusion', which is not a unetlab hook; did you mean 'register_fusions'?"
            in text), text
    report = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", "--file", str(exp), check=True).stdout)}
    typo = report[f"file:{(tmp_path / 'typo.py').resolve()}"]
    assert typo["broken"] and typo["components"] == []
    assert "'register_fusion'" in typo["error"] and "register_fusions" in typo["error"]
    lifecycle = report[f"file:{(tmp_path / 'lifecycle_typo.py').resolve()}"]
    assert lifecycle["broken"] and "did you mean 'on_epoch_end'?" in lifecycle["error"]
    # an experiment that names it fails the unetlab way (load_experiment turns this into its one line)
    with pytest.raises(unetlab.PluginError, match="did you mean 'register_fusions'"):
        PluginHost(autoload=False).load_path_or_module("typo.py", base_dir=tmp_path)


def test_unmarked_module_functions_named_like_hooks_are_registered(tmp_path):
    plugin = GOOD_PLUGIN.replace("@unetlab.hookimpl\n", "")
    (tmp_path / "plain.py").write_text(plugin)
    host = PluginHost(autoload=False)
    info = host.load_path_or_module("plain.py", base_dir=tmp_path)
    assert info.hooks == ["register_fusions"]
    assert host.registry.get("fusion", "max").plugin == info.name


RAISING_HOOK = '''
import unetlab

@unetlab.hookimpl
def on_epoch_end(run_name, epoch):
    if run_name.startswith("hook_fails/"):
        raise RuntimeError(f"hook bug at epoch {epoch}")
'''


def test_lifecycle_hook_error_fails_its_run_and_monitor_mode_follows_the_metric_direction(tmp_path):
    (tmp_path / "raiser.py").write_text(RAISING_HOOK)
    exp = tmp_path / "tiny.yaml"
    exp.write_text(f"""
plugins: [raiser.py]
data: {{dataset: {{name: shapes, image_size: 32, n_train: 8, n_val: 4}}, batch_size: 8}}
model: {{encoder: {{name: classic, depth: 2, base_channels: 4}}}}
train: {{epochs: 1, metrics: [iou, hd95], monitor: val_hd95}}
variants: {{hook_fails: {{}}, fine: {{}}}}
tracking: {{uri: "sqlite:///{tmp_path / 'm.db'}", checkpoint_dir: "{tmp_path / 'ckpt'}", log_model: false,
           figures: false}}
""")
    proc = run_cli("run", str(exp), "--quiet", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    plugin = f"file:{(tmp_path / 'raiser.py').resolve()}"
    expected = f"plugin '{plugin}' raised in on_epoch_end: RuntimeError: hook bug at epoch 1"
    assert "raised in on_epoch_end: RuntimeError: hook bug at epoch 1" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    assert runs["hook_fails/seed=0"].info.status == "FAILED"
    assert expected in runs["hook_fails/seed=0"].data.tags["unetlab.error"]
    fine = runs["fine/seed=0"]
    assert fine.info.status == "FINISHED"
    # monitor_mode 'auto' resolved from hd95's declared direction, and every logged key's direction recorded
    assert fine.data.params["train.monitor_mode"] == "min"
    assert json.loads(fine.data.tags["unetlab.metric_directions"]) == {
        "train_loss": "min", "val_loss": "min", "val_iou": "max", "val_hd95": "min"}
    assert {k for k in fine.data.metrics if k.startswith(("val_", "train_loss"))} >= {"val_iou", "val_hd95"}


def test_metric_directions_cover_every_logged_key():
    from unetlab.plugin_api.registry import metric_directions, resolve_monitor_mode

    registry = unetlab.default_host().registry
    train = {"metrics": [{"name": "dice", "include_background": False, "ignore_index": None},
                         {"name": "hd95", "include_background": False}], "monitor": "val_hd95_c2",
             "monitor_mode": "auto"}
    directions = metric_directions(train, 3, registry)
    # the keys are exactly what the metrics compute on three classes, prefixed val_
    dice = registry.create("metric", "dice", num_classes=3)
    dice.update(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 1], [2, 1]]]))
    assert {f"val_{k}" for k in dice.compute()} == {"val_dice", "val_dice_c0", "val_dice_c1", "val_dice_c2"}
    assert directions == {"train_loss": "min", "val_loss": "min", "val_dice": "max", "val_dice_c0": "max",
                          "val_dice_c1": "max", "val_dice_c2": "max", "val_hd95": "min", "val_hd95_c1": "min",
                          "val_hd95_c2": "min"}
    assert resolve_monitor_mode(train, directions) == "min"
    assert resolve_monitor_mode({**train, "monitor": "val_dice"}, directions) == "max"
    assert resolve_monitor_mode({**train, "monitor_mode": "max"}, directions) == "max"  # explicit wins


BOOM_UPSAMPLER = '''
import torch, unetlab

def boom_up(in_channels: int, out_channels: int, scale: int = 2, factor: int = 2):
    """Nearest upsampling; refuses factor 3."""
    if factor == 3:
        raise ValueError("factor 3 is not supported")
    return torch.nn.Sequential(torch.nn.Upsample(scale_factor=scale), torch.nn.Conv2d(in_channels, out_channels, 1))

class Allocates(torch.nn.Module):
    """A block that would allocate a huge weight, fine on the meta device."""
    def __init__(self, in_channels: int, out_channels: int, padding: str = "same"):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.huge = torch.nn.Parameter(torch.empty(1 << 36))   # 256 GiB of float32 on a real device

@unetlab.hookimpl
def register_upsamplers(register):
    register("boom", boom_up)

@unetlab.hookimpl
def register_blocks(register):
    register("huge", Allocates)
'''


def test_validate_builds_components_and_reports_factory_errors(tmp_path):
    (tmp_path / "boom.py").write_text(BOOM_UPSAMPLER)
    exp = tmp_path / "exp.yaml"
    exp.write_text("plugins: [boom.py]\nmodel: {upsampler: {name: boom, factor: 3}, block: huge}\n"
                   "variants: {concat: {}, add: {model.fusion: add}}\nseeds: 2\n")
    line = one_line_error(run_cli("validate", str(exp)))
    assert line == (f"unetlab: error: {exp}: run 'concat/seed=0': model.upsampler: cannot build upsampler 'boom': "
                    "ValueError: factor 3 is not supported")
    # with a value the factory accepts it validates: built on the meta device, the 256 GiB block uses no memory
    from unetlab.model.meta_build import build_runs_on_meta

    host = PluginHost()
    experiment = unetlab.load_experiment(exp, ["model.upsampler.factor=2"], host=host)
    assert len(experiment.runs) == 4
    build_runs_on_meta(experiment.runs, host.registry, where=str(exp))


def test_build_model_accepts_the_forms_of_an_experiment_file():
    import torch

    from unetlab.model.unet import count_parameters

    model = unetlab.build_model({"encoder": {"depth": 3, "base_channels": 4}, "fusion": "add"}, 1, 2)
    assert len(model.blocks) == 2 and model(torch.zeros(1, 1, 16, 16)).shape == (1, 2, 16, 16)
    # a mapping without 'name' sets parameters of the default encoder, 'classic'; add keeps the channels
    same = unetlab.build_model({"encoder": {"name": "classic", "depth": 3, "base_channels": 4},
                                "fusion": {"name": "add"}, "upsampler": "bilinear"}, 1, 2)
    assert count_parameters(same) == count_parameters(model)
    concat = unetlab.build_model({"encoder": {"depth": 3, "base_channels": 4}}, 1, 2)  # default fusion: concat
    assert count_parameters(concat) > count_parameters(model)
    with torch.device("meta"):  # the default U-Net is large: shapes only
        default = unetlab.build_model(None, 3, 1)
    assert len(default.blocks) == 4 and default.encoder.out_channels[-1] == 1024  # classic: depth 5, 64 channels
    with pytest.raises(unetlab.ConfigError, match=r"^model\.fusion: unknown fusion 'ad'; did you mean 'add'\?"):
        unetlab.build_model({"fusion": "ad"}, 1, 1)
    with pytest.raises(unetlab.ConfigError, match=r"^model\.encoder\.depht: unknown parameter of encoder 'classic'; "
                                                   r"did you mean 'depth'\?"):
        unetlab.build_model({"encoder": {"depht": 3}}, 1, 1)
