"""Small building blocks shared by the standard components (norms, activations, conv units)."""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["batch", "instance", "group", "none"]
Activation = Literal["relu", "leaky_relu", "elu", "gelu", "silu"]
Padding = Literal["same", "valid"]


def make_norm(norm: Norm, channels: int, groups: int = 8) -> nn.Module:
    """A normalisation layer for ``channels`` feature maps (``none`` gives an identity)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return nn.GroupNorm(g, channels)
    return nn.Identity()


def make_activation(activation: Activation) -> nn.Module:
    """An activation module by name."""
    return {
        "relu": lambda: nn.ReLU(inplace=True),
        "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
        "elu": lambda: nn.ELU(inplace=True),
        "gelu": nn.GELU,
        "silu": lambda: nn.SiLU(inplace=True),
    }[activation]()


def conv_norm_act(in_channels: int, out_channels: int, padding: Padding = "same", norm: Norm = "batch",
                  activation: Activation = "relu", conv_bias: bool = True, groups: int = 8) -> nn.Sequential:
    """3x3 conv -> norm -> activation; ``valid`` padding shrinks each side by one pixel."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1 if padding == "same" else 0, bias=conv_bias),
        make_norm(norm, out_channels, groups),
        make_activation(activation),
    )


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> activation) x 2, the U-Net's unit of work at every level."""

    def __init__(self, in_channels: int, out_channels: int, padding: Padding = "same", norm: Norm = "batch",
                 activation: Activation = "relu", conv_bias: bool = True, groups: int = 8,
                 mid_channels: int | None = None) -> None:
        mid = mid_channels or out_channels
        super().__init__(
            conv_norm_act(in_channels, mid, padding, norm, activation, conv_bias, groups),
            conv_norm_act(mid, out_channels, padding, norm, activation, conv_bias, groups),
        )


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the spatial centre of ``x`` to ``height`` x ``width`` (the paper's "copy and crop")."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a shortcut (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, padding: Padding = "same",
                 norm: Norm = "batch", activation: Activation = "relu", groups: int = 8) -> None:
        super().__init__()
        pad = 1 if padding == "same" else 0
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=pad, bias=norm == "none")
        self.norm1 = make_norm(norm, out_channels, groups)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=pad, bias=norm == "none")
        self.norm2 = make_norm(norm, out_channels, groups)
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=norm == "none"),
                make_norm(norm, out_channels, groups),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.shortcut(x)
        if shortcut.shape[-2:] != y.shape[-2:]:  # valid padding shrinks the main path
            shortcut = center_crop(shortcut, y.shape[-2], y.shape[-1])
        return self.act2(y + shortcut)


# --- bilinear upsampling as two small matrix products --------------------------------------------------
#
# On CUDA, PyTorch's backward of bilinear interpolation has no deterministic kernel: in deterministic mode
# it falls back to a slow one (7x slower training measured on an H100, README "GPU"). Bilinear resizing
# is separable and linear, so ``up(x) = A_h @ x @ A_w^T`` with two small fixed interpolation matrices;
# the backward is two more matrix products, which cuBLAS computes deterministically.

@functools.lru_cache(maxsize=128)
def interpolation_matrix(size_in: int, size_out: int, align_corners: bool, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """The (size_out x size_in) matrix of 1-D linear interpolation with PyTorch's source-index rules.

    The weights are computed as PyTorch's kernel computes them (in float64 for float64, else in float32,
    its accumulation type), so both agree to rounding. Cached per (sizes, align_corners, dtype, device).
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    i = torch.arange(size_out, dtype=work)
    if align_corners:
        ratio = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        src = i * torch.tensor(ratio, dtype=work)
    else:  # half-pixel centres clamped at the border; the ratio is 1/scale, as for a given scale_factor
        src = ((i + 0.5) * torch.tensor(size_in / size_out, dtype=work) - 0.5).clamp_min(0)
    low = src.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = src - low.to(work)
    matrix = torch.zeros(size_out, size_in, dtype=work)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


def bilinear_matmul(x: torch.Tensor, scale: int, align_corners: bool) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=...)`` as two matrix products.

    Deterministic forward and backward on every device. A channels_last input is worked on in its own
    memory order (N, H, W, C viewed as batches of matrices: no copy) and the result is channels_last too.
    """
    n, c, h, w = x.shape
    ho, wo = h * scale, w * scale
    a_h = interpolation_matrix(h, ho, align_corners, x.dtype, x.device)
    a_w = interpolation_matrix(w, wo, align_corners, x.dtype, x.device)
    if c > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        nhwc = x.permute(0, 2, 3, 1)                                    # a view: memory is N, H, W, C
        y = torch.matmul(a_w, nhwc.reshape(n * h, w, c))                # (N*H, Wo, C): columns
        y = torch.matmul(a_h, y.reshape(n, h, wo * c))                  # (N, Ho, Wo*C): rows
        return y.reshape(n, ho, wo, c).permute(0, 3, 1, 2)              # channels_last N, C, Ho, Wo
    y = torch.matmul(x, a_w.t())                                        # (N, C, H, Wo): one GEMM
    return torch.matmul(a_h, y)                                         # (N, C, Ho, Wo)


BilinearMethod = Literal["auto", "matmul", "interpolate"]


def bilinear_upsample(
    x: torch.Tensor, scale: int, align_corners: bool, method: BilinearMethod = "auto"
) -> torch.Tensor:
    """x``scale`` bilinear upsampling; ``auto`` picks the fastest implementation that keeps determinism.

    ``auto``: the matrix products when deterministic algorithms are on and the tensor is on an
    accelerator (whose interpolation backward is not deterministic); PyTorch's kernel otherwise (CPU
    kernels are deterministic, and the meta device counts no FLOPs for interpolation, as before).
    """
    if method == "auto":
        accelerator = x.device.type not in ("cpu", "meta")
        method = "matmul" if accelerator and torch.are_deterministic_algorithms_enabled() else "interpolate"
    if method == "matmul":
        return bilinear_matmul(x, scale, align_corners)
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=align_corners)


class BilinearUpsample(nn.Module):
    """x``scale`` bilinear upsampling (``bilinear_upsample``); no parameters."""

    def __init__(self, scale: int = 2, align_corners: bool = True, method: BilinearMethod = "auto") -> None:
        super().__init__()
        self.scale, self.align_corners, self.method = int(scale), bool(align_corners), method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bilinear_upsample(x, self.scale, self.align_corners, self.method)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, align_corners={self.align_corners}, method={self.method}"
