"""Deep supervision (nnU-Net's scheme) and the fine-tuning controls (encoder lr multiplier, frozen epochs),
checked against hand computations; end to end through ``unetlab run`` and ``unetlab export``."""

from __future__ import annotations

import textwrap

import pytest
import torch

import unetlab
from unetlab.model.deep_supervision import deep_supervision_loss, deep_supervision_weights, level_target
from unetlab.model.unet import build_unet, resolve_model_config
from unetlab.training.preflight import prepare
from unetlab.training.trainer import TrainSetup, train_run

from conftest import run_cli

REGISTRY = unetlab.default_host().registry


def ds_model(encoder: dict | None = None, **model) -> torch.nn.Module:
    config = resolve_model_config({"encoder": encoder or {"name": "classic", "depth": 5, "base_channels": 4},
                                   "deep_supervision": True, **model}, REGISTRY)
    torch.manual_seed(0)
    return build_unet(config, 1, 2, REGISTRY)


def test_weights_halve_per_level_and_sum_to_one():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]


def test_outputs_in_training_only_the_full_resolution_head_otherwise():
    model = ds_model()  # depth 5: 4 decoder levels -> the main head and 2 auxiliary heads, the coarsest dropped
    assert len(model.aux_heads) == 2
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    main = model(x)
    assert isinstance(main, torch.Tensor) and main.shape == (2, 2, 32, 32)
    model.return_auxiliary = True
    assert isinstance(model(x), torch.Tensor)  # eval mode: the main head even when asked for more
    model.train()
    outputs = model(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 2, 32, 32), (2, 2, 16, 16), (2, 2, 8, 8)]
    # the auxiliary heads change nothing in the main output: the same weights without them give the same logits
    config = resolve_model_config({"encoder": {"name": "classic", "depth": 5, "base_channels": 4}}, REGISTRY)
    plain = build_unet(config, 1, 2, REGISTRY)
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert set(missing.unexpected_keys) == {"aux_heads.0.weight", "aux_heads.0.bias", "aux_heads.1.weight",
                                            "aux_heads.1.bias"}
    plain.train()
    torch.testing.assert_close(plain(x), outputs[0], rtol=0, atol=0)


def test_targets_are_nearest_neighbour_and_the_loss_is_the_weighted_sum_by_hand():
    masks = torch.randint(0, 3, (2, 16, 16))
    masks[0, :4, :4] = 255  # the ignore value survives downsampling
    outputs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    # nearest-exact picks the source pixel under each target pixel's centre: 2i+1 for a factor 2, 4i+2 for 4
    hand = [masks, masks[:, 1::2, 1::2], masks[:, 2::4, 2::4]]
    for k, out in enumerate(outputs):
        assert torch.equal(level_target(masks, out, k), hand[k])
    assert (hand[1] == 255).any()

    def loss_fn(logits, target):
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=255)

    total, levels = deep_supervision_loss(loss_fn, outputs, masks)
    expected = [loss_fn(o, t) for o, t in zip(outputs, hand)]
    torch.testing.assert_close(levels, torch.stack(expected))
    torch.testing.assert_close(total, (4 * expected[0] + 2 * expected[1] + expected[2]) / 7)


@pytest.mark.parametrize("loss", sorted(REGISTRY.components["loss"]))
def test_every_loss_trains_every_head(loss):
    component = REGISTRY.get("loss", loss)
    classes = 2 if component.binary_only else 3
    config = resolve_model_config({"encoder": {"name": "classic", "depth": 4, "base_channels": 4},
                                   "deep_supervision": True}, REGISTRY)
    model = build_unet(config, 1, 1 if classes == 2 else classes, REGISTRY).train()
    model.return_auxiliary = True
    loss_fn = REGISTRY.create("loss", loss, num_classes=classes)
    outputs = model(torch.randn(2, 1, 16, 16))
    total, levels = deep_supervision_loss(loss_fn, outputs, torch.randint(0, classes, (2, 16, 16)))
    total.backward()
    assert torch.isfinite(levels).all() and len(levels) == 2
    assert model.aux_heads[0].weight.grad is not None and model.head.weight.grad is not None


@pytest.mark.parametrize("encoder", [{"name": "classic", "depth": 4, "base_channels": 4},
                                     {"name": "residual", "depth": 4, "base_channels": 4},
                                     {"name": "classic", "depth": 4, "base_channels": 4, "padding": "valid",
                                      "norm": "none"}])
def test_every_encoder_gives_one_output_per_supervised_level(encoder):
    model = ds_model(encoder).train()
    model.return_auxiliary = True
    size = 140 if encoder.get("padding") == "valid" else 32
    outputs = model(torch.randn(1, 1, size, size))
    masks = torch.randint(0, 2, (1, size, size))
    for k, out in enumerate(outputs):
        assert level_target(masks, out, k, model.padding).shape == out.shape[:1] + out.shape[2:]


def test_too_shallow_a_model_is_refused_with_its_key():
    with pytest.raises(unetlab.ConfigError, match="model.deep_supervision: needs at least 3 decoder levels"):
        ds_model({"name": "classic", "depth": 3, "base_channels": 4})


def _setup(tmp_path, *overrides: str) -> TrainSetup:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "e.yaml"
    path.write_text(textwrap.dedent("""
        data: {dataset: {name: blobs, image_size: 32, n_train: 8, n_val: 4}, batch_size: 8}
        model: {encoder: {name: classic, depth: 4, base_channels: 4}}
        train: {epochs: 1, max_steps: 1, lr: 0.5, optimizer: sgd, momentum: 0, device: cpu}
    """))
    run = unetlab.load_experiment(path, list(overrides)).runs[0]
    return TrainSetup(prepare(run, REGISTRY), REGISTRY, tmp_path / "ckpt")


def _one_step_deltas(tmp_path, *overrides: str) -> tuple[dict, dict]:
    """Each state entry's change in one SGD step, and the state after it."""
    setup = _setup(tmp_path, *overrides)
    torch.manual_seed(0)
    before = build_unet(setup.prepared.run.config["model"], 1, 1, REGISTRY).state_dict()
    after = train_run(setup).model.state_dict()
    return {k: after[k] - before[k] for k in before}, after


def test_encoder_lr_mult_scales_the_encoder_step(tmp_path):
    one, _ = _one_step_deltas(tmp_path / "a")
    half, _ = _one_step_deltas(tmp_path / "b", "train.encoder_lr_mult=0.5")
    trained = [k for k in one if k.endswith(("weight", "bias"))]
    encoder = [k for k in trained if k.startswith("encoder.")]
    assert encoder and any(one[k].abs().max() > 1e-4 for k in encoder)
    for k in trained:
        if k in encoder:  # the same gradient at half the rate (up to the rounding of weight - step)
            torch.testing.assert_close(half[k], one[k] * 0.5, rtol=1e-4, atol=1e-6)
        else:  # the decoder's step is the very same computation
            torch.testing.assert_close(half[k], one[k], rtol=0, atol=0)


def test_frozen_encoder_epochs_keep_weights_and_batchnorm_statistics(tmp_path):
    setup = _setup(tmp_path, "train.freeze_encoder_epochs=1")
    torch.manual_seed(0)
    before = build_unet(setup.prepared.run.config["model"], 1, 1, REGISTRY).state_dict()
    after = train_run(setup).model.state_dict()
    encoder = [k for k in before if k.startswith("encoder.")]
    assert any("running_mean" in k for k in encoder)
    for k in encoder:  # weights, running statistics and the batch counter: untouched
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks."))
    # the second epoch trains the encoder again
    setup = _setup(tmp_path / "two", "train.freeze_encoder_epochs=1", "train.epochs=2", "train.max_steps=2")
    result = train_run(setup)
    after_two = torch.load(setup.checkpoint_dir / "last.pt", weights_only=True)["model"]  # not best.pt: epoch 2
    assert any(not torch.equal(before[k], after_two[k]) for k in encoder)
    assert all(p.requires_grad for p in result.model.parameters())


def test_deep_supervision_run_logs_each_level_and_exports_one_output(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tmp_path / "ds.yaml"
    exp.write_text(textwrap.dedent(f"""
        name: ds
        data: {{dataset: {{name: shapes, image_size: 32, n_train: 8, n_val: 4}}, batch_size: 4}}
        model: {{encoder: {{name: classic, depth: 4, base_channels: 4}}, deep_supervision: true}}
        train: {{epochs: 1, lr: 0.01, loss: dice, metrics: [iou, hd95]}}
        tracking: {{uri: '{uri}', checkpoint_dir: '{tmp_path / 'ckpt'}', figures: false}}
    """))
    proc = run_cli("run", str(exp), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = next(r for r in client.search_runs([client.get_experiment_by_name("ds").experiment_id])
               if "mlflow.parentRunId" in r.data.tags)
    metrics = run.data.metrics
    assert {"train_loss_level0", "train_loss_level1"} <= set(metrics) and "train_loss_level2" not in metrics
    w = deep_supervision_weights(2)
    assert metrics["train_loss"] == pytest.approx(w[0] * metrics["train_loss_level0"]
                                                  + w[1] * metrics["train_loss_level1"], rel=1e-5)
    out = tmp_path / "m.pt2"
    proc = run_cli("export", run.info.run_id, "--format", "pt2", "--out", str(out), "--tracking-uri", uri,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    program = torch.export.load(str(out)).module()
    result = program(torch.randn(2, 3, 32, 32))
    assert isinstance(result, torch.Tensor) and result.shape == (2, 1, 32, 32)
