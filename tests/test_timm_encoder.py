"""The ``timm`` encoder (issue 21) checked against timm itself and segmentation_models_pytorch, offline.

Every "pretrained file" here is a timm model's own random-initialised state dict saved to disk, so nothing
is downloaded; HF_HUB_OFFLINE=1 makes any hub lookup an error. Skipped where timm is not installed (the
default test environment); CI runs this file in a second environment with the ``timm`` extra (README).
"""

from __future__ import annotations

import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402 - only with timm, which brings the extra

import unetlab  # noqa: E402
from unetlab.checkpoint import load_checkpoint  # noqa: E402
from unetlab.model.unet import build_unet, resolve_model_config  # noqa: E402
from unetlab.training.preflight import prepare  # noqa: E402
from unetlab.training.trainer import TrainSetup, train_run  # noqa: E402

from conftest import run_cli  # noqa: E402

REGISTRY = unetlab.default_host().registry
FAMILIES = ["resnet18", "efficientnet_b0", "convnext_atto", "regnetx_002", "mobilenetv3_small_100"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing pretrained is there


def weights_file(tmp_path, name: str, suffix: str = ".safetensors", seed: int = 0) -> tuple[str, dict]:
    """A timm classification model's own (random) weights saved as a pretrained file."""
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path), state


def encoder(model: str, in_channels: int = 3, **params):
    return REGISTRY.create("encoder", "timm", in_channels=in_channels, model=model, **params)


@pytest.mark.parametrize("name", FAMILIES)
def test_feature_maps_equal_timm_features_only_bit_for_bit(name, tmp_path):
    path, _ = weights_file(tmp_path, name)
    ours = encoder(name, pretrained=path, input_norm=False).eval()
    # the reference: timm's own features_only model, loading the same file its own way
    reference = timm.create_model(name, features_only=True, pretrained=True,
                                  pretrained_cfg_overlay={"file": path}).eval()
    assert ours.out_channels == reference.feature_info.channels()
    assert ours.strides == reference.feature_info.reduction()
    assert ours.strides[0] == (4 if name.startswith("convnext") else 2) and ours.strides[-1] == 32
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, expected = ours(x), reference(x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_pretrained_file_loads_exactly_every_tensor(suffix, tmp_path):
    path, state = weights_file(tmp_path, "resnet18", suffix)
    loaded = encoder("resnet18", pretrained=path).model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}  # the classifier is not a feature stage
    for key, tensor in loaded.items():
        assert torch.equal(tensor, state[key]), key
    # and through build_unet: a re-initialising initializer leaves the pretrained encoder alone
    config = resolve_model_config({"encoder": {"name": "timm", "model": "resnet18", "pretrained": path},
                                   "init": "kaiming"}, REGISTRY)
    model = build_unet(config, 3, 1, REGISTRY)
    for key, tensor in model.encoder.model.state_dict().items():
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize("channels", [1, 4])
def test_in_channels_adapt_the_first_convolution_as_timm_does(channels, tmp_path):
    path, state = weights_file(tmp_path, "resnet18")
    conv = encoder("resnet18", channels, pretrained=path).model.state_dict()["conv1.weight"]
    rgb = state["conv1.weight"]
    if channels == 1:  # one channel: the three filters summed
        expected = rgb.sum(dim=1, keepdim=True)
    else:  # more: the filters repeated in turn, scaled by 3/C to keep the activation's size
        expected = torch.cat([rgb, rgb[:, :1]], dim=1) * (3 / channels)
    torch.testing.assert_close(conv, expected)


def test_out_indices_pick_the_stages():
    picked = encoder("resnet18", out_indices=[2, 3, 4])
    assert picked.strides == [8, 16, 32] and picked.out_channels == [128, 256, 512]
    assert [f.shape[1] for f in picked(torch.randn(1, 3, 64, 64))] == [128, 256, 512]


def test_input_norm_applies_the_weights_mean_and_std(tmp_path):
    path, _ = weights_file(tmp_path, "resnet18")
    normalised = encoder("resnet18", pretrained=path).eval()  # pretrained: on by default
    plain = encoder("resnet18", pretrained=path, input_norm=False).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet's
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(normalised(x)[-1], plain((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))[-1])
    assert not encoder("resnet18").normalizes  # from scratch: off unless asked


def test_pickled_and_ill_fitting_files_are_refused_in_one_line(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"conv1.weight": Payload()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="pickled objects") as info:
        encoder("resnet18", pretrained=str(tmp_path / "bad.pth"))
    assert "\n" not in str(info.value) and not (tmp_path / "pwned").exists()
    other, _ = weights_file(tmp_path, "resnet34")
    with pytest.raises(ValueError, match="does not fit timm model 'resnet18': 96 unexpected") as info:
        encoder("resnet18", pretrained=other)  # timm itself loads a features model non-strictly: it would pass
    # 96 = resnet34's 8 extra basic blocks x (2 convs + 2 BatchNorms x 5 entries)
    assert "\n" not in str(info.value)
    smaller, _ = weights_file(tmp_path, "resnet18")
    with pytest.raises(ValueError, match="does not fit timm model 'resnet34': 80 weight\\(s\\) missing"):
        encoder("resnet34", pretrained=smaller)  # 8 x (2 + 2 x 4): a missing num_batches_tracked is not reported


def test_resnet34_encoder_has_smp_unet_resnet34_encoder_parameter_count():
    smp = pytest.importorskip("segmentation_models_pytorch")
    reference = smp.Unet("resnet34", encoder_weights=None, classes=2)
    expected = sum(p.numel() for p in reference.encoder.parameters())
    model = unetlab.build_model({"encoder": {"name": "timm", "model": "resnet34"}}, 3, 2)
    assert sum(p.numel() for p in model.encoder.parameters()) == expected == 21_284_672


def _setup(tmp_path, model: str, *overrides: str, pretrained: str = "check") -> TrainSetup:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "e.yaml"
    path.write_text(textwrap.dedent(f"""
        data: {{dataset: {{name: shapes, image_size: 32, n_train: 8, n_val: 4}}, batch_size: 4}}
        model: {{encoder: {{name: timm, model: {model}}}}}
        train: {{epochs: 1, lr: 0.001, device: cpu}}
    """))
    run = unetlab.load_experiment(path, list(overrides)).runs[0]
    return TrainSetup(prepare(run, REGISTRY, pretrained=pretrained), REGISTRY, tmp_path / "ckpt")


def test_resnet34_unet_trains_end_to_end_on_shapes(tmp_path):
    result = train_run(_setup(tmp_path, "resnet34", "model.deep_supervision=true"))
    assert result.status == "FINISHED" and math.isfinite(result.history[-1]["val_loss"])
    assert {"train_loss_level0", "train_loss_level1", "train_loss_level2"} <= set(result.history[-1])


def test_resume_rebuilds_a_pretrained_run_without_its_file(tmp_path):
    path, state = weights_file(tmp_path, "resnet18")
    first = _setup(tmp_path / "a", "resnet18", f"model.encoder.pretrained={path}", "train.epochs=2",
                   "train.max_steps=2")
    train_run(first)  # one epoch (2 steps), then the step budget stops it
    last = load_checkpoint(first.checkpoint_dir / "last.pt")
    (tmp_path / "resnet18.safetensors").unlink()  # the file is gone: resume must not need it
    again = _setup(tmp_path / "a", "resnet18", f"model.encoder.pretrained={path}", "train.epochs=2",
                   pretrained="skip")
    again.resume = last
    result = train_run(again)
    assert result.epochs == 2 and result.status == "FINISHED"
    # and a fresh start cannot: one line naming the file, before any training
    with pytest.raises(unetlab.UnetlabError, match="pretrained file .* not found"):
        _setup(tmp_path / "b", "resnet18", f"model.encoder.pretrained={path}")


def test_deep_supervision_with_a_stride_4_encoder(tmp_path):
    model = unetlab.build_model({"encoder": {"name": "timm", "model": "convnext_atto"}, "deep_supervision": True},
                                3, 2).train()
    model.return_auxiliary = True
    outputs = model(torch.randn(1, 3, 64, 64))  # stages at 4..32: the main head at 4, interpolated to 64
    assert [tuple(o.shape[-2:]) for o in outputs] == [(64, 64), (8, 8)]
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_normalization_mismatch_is_one_warning_naming_both():
    from unetlab_timm.normalization import normalization_warning

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    inside = SimpleNamespace(pretrained_weights=True, normalizes=True, weights_mean=mean, weights_std=std)
    outside = SimpleNamespace(pretrained_weights=True, normalizes=False, weights_mean=mean, weights_std=std)
    assert normalization_warning(inside, None) is None
    twice = normalization_warning(inside, {"mode": "zscore"})
    assert "both normalise" in twice and "zscore" in twice and "0.485" in twice
    # fixed on the uint8 scale (255 x the weights' values) is what the weights expect: no warning
    assert normalization_warning(outside, {"mode": "fixed", "mean": [123.675, 116.28, 103.53],
                                           "std": [58.395, 57.12, 57.375]}) is None
    wrong = normalization_warning(outside, {"mode": "fixed", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    assert "'mean': [0.5, 0.5, 0.5]" in wrong and "0.485" in wrong and "\n" not in wrong
    assert "data.normalize unset" in normalization_warning(outside, None)


def test_cli_lists_validates_runs_and_predicts_offline(tmp_path):
    from conftest import REPO

    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    listed = run_cli("plugins", "--kind", "encoder", env=env)
    assert listed.returncode == 0 and "timm" in listed.stdout
    shipped = run_cli("validate", str(REPO / "experiments" / "encoders.yaml"), env=env)
    assert shipped.returncode == 0, shipped.stderr
    path, _ = weights_file(tmp_path, "resnet18")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tmp_path / "timm.yaml"
    exp.write_text(textwrap.dedent(f"""
        name: timm_e2e
        data: {{dataset: {{name: shapes, image_size: 32, n_train: 8, n_val: 4}}, batch_size: 4}}
        model: {{encoder: {{name: timm, model: resnet18, pretrained: '{path}'}}}}
        train: {{epochs: 1, lr: 0.001, encoder_lr_mult: 0.1, freeze_encoder_epochs: 1}}
        tracking: {{uri: '{uri}', checkpoint_dir: '{tmp_path / 'ckpt'}', figures: false}}
    """))
    for override, message in (("model.encoder.model=vit_tiny_patch16_224", "has no feature pyramid"),
                              ("model.encoder.pretrained=true", "set pretrained: PATH"),
                              ("model.encoder.model=resnet_18", "did you mean 'resnet18'")):
        proc = run_cli("validate", str(exp), "--set", override, env=env)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr
    proc = run_cli("run", str(exp), "--quiet", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = next(r for r in client.search_runs([client.get_experiment_by_name("timm_e2e").experiment_id])
               if "mlflow.parentRunId" in r.data.tags)
    assert run.data.params["timm.input_norm"] == "applied"
    assert run.data.params["train.encoder_lr_mult"] == "0.1"
    (tmp_path / "resnet18.safetensors").unlink()  # predict and export rebuild from the run's own weights
    from skimage import io

    io.imsave(tmp_path / "a.png", (torch.rand(40, 52, 3) * 255).to(torch.uint8).numpy())
    proc = run_cli("predict", run.info.run_id, str(tmp_path / "a.png"), "--out", str(tmp_path / "masks"),
                   "--tracking-uri", uri, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "masks" / "a_mask.png").exists()
    proc = run_cli("export", run.info.run_id, "--format", "pt2", "--out", str(tmp_path / "m.pt2"),
                   "--tracking-uri", uri, env=env)
    assert proc.returncode == 0, proc.stderr


def test_every_upsampler_and_fusion_builds_and_trains_on_a_timm_encoder():
    pairs = [(u, "concat") for u in REGISTRY.list("upsampler")] + [("bilinear", f) for f in REGISTRY.list("fusion")]
    for upsampler, fusion in pairs:
        model = unetlab.build_model({"encoder": {"name": "timm", "model": "mobilenetv3_small_100"},
                                     "upsampler": upsampler, "fusion": fusion}, 3, 2)
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 2, 32, 32), (upsampler, fusion)
        out.square().mean().backward()
        assert model.encoder.model.conv_stem.weight.grad is not None
