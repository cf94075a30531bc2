"""``unetlab export``: torch.export (.pt2) and ONNX round trips against PyTorch, dynamic shapes."""

from __future__ import annotations

import pytest
import torch

import unetlab
from unetlab.checkpoint import save_atomic
from unetlab.model.unet import build_unet

from conftest import run_cli

REGISTRY = unetlab.default_host().registry


def checkpoint(tmp_path, valid: bool = False):
    def spec(kind, name, **p):
        return {"name": name, **REGISTRY.get(kind, name).defaults(), **p}
    extra = {"padding": "valid", "norm": "none"} if valid else {}
    config = {"encoder": spec("encoder", "classic", depth=3, base_channels=4, **extra),
              "upsampler": spec("upsampler", "transpose" if valid else "bilinear"),
              "fusion": spec("fusion", "attention"),
              "block": spec("block", "double_conv", **({"norm": "none"} if valid else {})),
              "init": spec("initializer", "default"), "decoder_channels": None}
    torch.manual_seed(0)
    model = build_unet(config, 1, 2, REGISTRY).eval()
    path = tmp_path / "best.pt"
    save_atomic({"model": model.state_dict(), "model_config": config, "in_channels": 1, "out_channels": 2}, path)
    return path, model


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_same_padding_export_has_dynamic_batch_and_size(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    path, model = checkpoint(tmp_path)
    out = tmp_path / f"model.{fmt}"
    proc = run_cli("export", str(path), "--format", fmt, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "dynamic: batch, height and width (multiples of 4)" in proc.stdout
    from unetlab.deploy.export import check_export

    # sizes and batches never seen at export time, stated tolerance 1e-4
    assert check_export(model, fmt, out, [(1, 1, 20, 36), (5, 1, 44, 28)]) < 1e-4


def test_valid_padding_export_keeps_its_tile_size(tmp_path):
    path, model = checkpoint(tmp_path, valid=True)
    out = tmp_path / "valid.pt2"
    proc = run_cli("export", str(path), "--format", "pt2", "--out", str(out), "--size", "92")
    assert proc.returncode == 0, proc.stderr
    from unetlab.deploy.export import check_export

    assert check_export(model, "pt2", out, [(3, 1, 92, 92)]) < 1e-4
    assert torch.export.load(str(out)).module()(torch.randn(1, 1, 92, 92)).shape == (1, 2, 52, 52)
