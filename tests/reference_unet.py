"""An independent, hand-written U-Net (no unetlab code), used as the reference in tests and benchmarks.

Written the plain way, as the seed blog and the paper describe it: double 3x3 conv per level, 2x2 max
pooling, up-sampling that halves the channels (2x2 transposed conv, or bilinear + 1x1 conv + ReLU),
concatenation with the (cropped) skip, double conv, 1x1 head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def double_conv(cin: int, cout: int, pad: int, bn: bool) -> nn.Sequential:
    layers = []
    for a, b in ((cin, cout), (cout, cout)):
        layers += [nn.Conv2d(a, b, 3, padding=pad)] + ([nn.BatchNorm2d(b)] if bn else []) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ReferenceUNet(nn.Module):
    def __init__(self, in_ch: int = 3, out_ch: int = 1, base: int = 64, depth: int = 5, valid: bool = False,
                 bn: bool = True, up: str = "transpose") -> None:
        super().__init__()
        chans = [base * 2 ** i for i in range(depth)]
        pad = 0 if valid else 1
        self.valid = valid
        self.downs = nn.ModuleList([double_conv(in_ch, chans[0], pad, bn)] +
                                   [double_conv(chans[i - 1], chans[i], pad, bn) for i in range(1, depth)])
        self.ups, self.convs = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(1, depth)):
            if up == "transpose":
                self.ups.append(nn.ConvTranspose2d(chans[i], chans[i - 1], 2, stride=2))
            else:
                self.ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                              nn.Conv2d(chans[i], chans[i - 1], 1), nn.ReLU(inplace=True)))
            self.convs.append(double_conv(chans[i], chans[i - 1], pad, bn))
        self.head = nn.Conv2d(chans[0], out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.downs):
            x = down(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        x = skips.pop()
        for up, conv in zip(self.ups, self.convs):
            x = up(x)
            skip = skips.pop()
            if self.valid:
                dy, dx = (skip.shape[-2] - x.shape[-2]) // 2, (skip.shape[-1] - x.shape[-1]) // 2
                skip = skip[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
            x = conv(torch.cat([skip, x], dim=1))
        return self.head(x)
