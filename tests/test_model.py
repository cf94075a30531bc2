"""U-Net assembly: every registered combination builds and trains, sizes behave, references match."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import unetlab
from unetlab.model.unet import build_unet, count_parameters, forward_flops, output_shape
from unetlab.plugin_api.host import default_host

from conftest import REPO, one_line_error, run_cli
from reference_unet import ReferenceUNet

REGISTRY = default_host().registry


def model_config(encoder="classic", upsampler="bilinear", fusion="concat", block="double_conv", **enc):
    """A resolved model section (component defaults filled in, as validation would)."""
    def spec(kind, name, **params):
        return {"name": name, **REGISTRY.get(kind, name).defaults(), **params}
    return {"encoder": spec("encoder", encoder, **enc), "upsampler": spec("upsampler", upsampler),
            "fusion": spec("fusion", fusion), "block": spec("block", block),
            "init": spec("initializer", "kaiming"), "decoder_channels": None}


def encoder_setups():
    """Every registered encoder, small, in each padding mode it supports."""
    for name in REGISTRY.list("encoder"):
        if REGISTRY.get("encoder", name).plugin.startswith("unetlab_timm."):
            continue  # needs the timm extra and a model name: tests/test_timm_encoder.py builds it with every part
        params = {p.name for p in REGISTRY.get("encoder", name).params}
        small = {"depth": 3, "base_channels": 4} if {"depth", "base_channels"} <= params else {}
        yield name, small, 32
        if "padding" in params:
            yield name, {**small, "padding": "valid", "norm": "none"} if "norm" in params else {**small,
                                                                                                 "padding": "valid"}, 44


COMBINATIONS = [(enc, up, fu, params, size) for (enc, params, size), up, fu in itertools.product(
    list(encoder_setups()), REGISTRY.list("upsampler"), REGISTRY.list("fusion"))]


@pytest.mark.parametrize("encoder, upsampler, fusion, params, size", COMBINATIONS,
                         ids=[f"{e}-{u}-{f}-{p.get('padding', 'same')}" for e, u, f, p, _ in COMBINATIONS])
def test_every_combination_trains(encoder, upsampler, fusion, params, size):
    torch.manual_seed(0)
    model = build_unet(model_config(encoder, upsampler, fusion, **params), 3, 2, REGISTRY)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    expected = output_shape(model, 3, size, size)
    assert out.shape == (2, *expected)
    if params.get("padding") == "valid":
        assert out.shape[-1] < size
    else:
        assert out.shape[-2:] == (size, size)
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if fusion == "none" and ".fusions." in name:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if fusion != "none":
            assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("fusion", ["none", "concat"])
def test_no_skip_fusion_ignores_skips(fusion):
    torch.manual_seed(0)
    model = build_unet(model_config(fusion=fusion, depth=3, base_channels=4), 3, 1, REGISTRY)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    baseline = model(x)
    # replace every skip (all encoder features but the deepest) with noise; the bottleneck path is untouched
    model.encoder.register_forward_hook(lambda m, i, out: [torch.randn_like(f) for f in out[:-1]] + [out[-1]])
    changed = model(x)
    if fusion == "none":
        assert torch.equal(changed, baseline)
    else:  # the same check fails for a fusion that uses its skips: the test can tell them apart
        assert not torch.allclose(changed, baseline)


@pytest.mark.parametrize("size", [31, 33, 45, 64])
def test_same_padding_any_size(size):
    model = build_unet(model_config(depth=4, base_channels=4), 1, 1, REGISTRY)
    assert model(torch.randn(1, 1, size, size + 3)).shape == (1, 1, size, size + 3)


def test_too_small_is_a_clear_error():
    model = build_unet(model_config(depth=5, base_channels=4, padding="valid", norm="none"), 1, 2, REGISTRY)
    with pytest.raises(unetlab.UnetlabError, match=r"input size 60x60 is too small for a U-Net of depth 5 "
                                                    r"with valid padding"):
        output_shape(model, 1, 60, 60)


def test_reference_counts_and_paper_shape_through_summary():
    seed = json.loads(run_cli("summary", str(REPO / "experiments" / "seed_unet.yaml"), "--json", check=True).stdout)
    assert {r["run"]: r["params"] for r in seed} == {"bilinear/seed=0": 28_954_561, "transpose/seed=0": 31_043_521}
    paper = json.loads(run_cli("summary", str(REPO / "experiments" / "paper_unet.yaml"), "--json",
                               "--input-size", "572", "572", check=True).stdout)
    assert paper[0]["params"] == 31_030_658
    assert paper[0]["input_shape"] == [1, 572, 572] and paper[0]["output_shape"] == [2, 388, 388]
    text = run_cli("summary", str(REPO / "experiments" / "seed_unet.yaml"), check=True).stdout
    assert "28,954,561" in text and "31,043,521" in text


def test_summary_size_error_is_one_line():
    line = one_line_error(run_cli("summary", str(REPO / "experiments" / "paper_unet.yaml"),
                                  "--input-size", "60", "60"))
    assert "too small" in line


@pytest.mark.parametrize("valid, up, bn", [(False, "transpose", True), (True, "transpose", False),
                                           (False, "bilinear", True)])
def test_assembled_matches_hand_written_reference(valid, up, bn):
    config = model_config("classic", up, "concat", depth=4, base_channels=8, padding="valid" if valid else "same",
                          norm="batch" if bn else "none")
    config["block"]["norm"] = "batch" if bn else "none"
    assembled = build_unet(config, 1, 2, REGISTRY)
    reference = ReferenceUNet(1, 2, base=8, depth=4, valid=valid, bn=bn, up=up)
    size = 92 if valid else 64
    assert count_parameters(assembled) == count_parameters(reference)
    assert forward_flops(assembled, 1, size, size) == forward_flops(reference, 1, size, size)
    # same weights in the same order give the same function
    with torch.no_grad():
        for p_ref, p_asm in zip(reference.parameters(), assembled.parameters()):
            assert p_ref.shape == p_asm.shape
            p_asm.copy_(p_ref)
        for b_ref, b_asm in zip(reference.buffers(), assembled.buffers()):
            b_asm.copy_(b_ref)
    assembled.eval(), reference.eval()
    x = torch.randn(2, 1, size, size)
    torch.testing.assert_close(assembled(x), reference(x), rtol=1e-4, atol=1e-5)


def test_seed_unet_structure_matches_the_blog():
    # The blog: Dropout2d(0.5) after the two deepest levels; bilinear up halves channels with a 1x1 conv + ReLU.
    run = unetlab.load_experiment(REPO / "experiments" / "seed_unet.yaml").runs[0]
    model = unetlab.build_model(run.config["model"], 3, 1)
    drops = [type(d).__name__ for d in model.encoder.dropouts]
    assert drops == ["Identity", "Identity", "Identity", "Dropout2d", "Dropout2d"]
    first_up = model.upsamplers[0].body
    assert [type(m).__name__ for m in first_up] == ["BilinearUpsample", "Conv2d", "ReLU"]
    assert first_up[1].in_channels == 1024 and first_up[1].out_channels == 512


def test_encoder_contract_violation_is_reported():
    class NoChannels(torch.nn.Module):
        def __init__(self, in_channels: int):
            super().__init__()

    host = unetlab.PluginHost()
    from unetlab.plugin_api.host import module_from_functions

    host.register(module_from_functions("bad_encoder", register_encoders=lambda register: register("bad", NoChannels)))
    config = model_config()
    config["encoder"] = {"name": "bad"}
    with pytest.raises(unetlab.UnetlabError, match="breaks the encoder contract: it must declare out_channels"):
        build_unet(config, 3, 1, host.registry)


def test_gradient_checkpointing_same_gradients_less_saved_memory():
    torch.manual_seed(0)
    model = build_unet(model_config(depth=3, base_channels=4), 1, 1, REGISTRY).train()
    x = torch.randn(2, 1, 32, 32)
    grads, saved = {}, {}
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()
        grads[flag] = [p.grad.clone() for p in model.parameters()]
        saved[flag] = total
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert saved[True] < 0.5 * saved[False]
