"""GoogLe2Net (ResFRI blocks), training-time form.

"GoogLe2Net: Going Transverse with Convolutions", arXiv 2301.00424, 2023.

Characteristic block (``ResFRI``, residual feature-reutilization inception): four inception
branches of increasing receptive field, each starting with its own 1×1 unit; a transverse
passage adds a branch's output to the next branch's input before its 3×3 units, so later
branches reuse the features of earlier ones; concatenation, a 1×1 conv-BN, the residual::

    b_1 = r_1(x)                                       receptive field 1
    b_2 = K_2(r_2(x) + b_1)                            3
    b_3 = K_3b(K_3a(r_3(x) + b_2))                     5
    b_4 = K_4(r_4(maxpool3x3(x)) + b_3)                7 and more
    y = relu(bn(conv1x1(cat(b_1, b_2, b_3, b_4))) + x)

``r`` are 1×1 conv-BN-ReLU units of width ``C/4``, ``K`` 3×3 conv-BN-ReLU units. Downsampling
between stages is a 3×3 stride-2 unit.

Default network: stem 3×3 stride 2 (32), stages of widths 32, 64, 128 with one ResFRI each;
classifier head.
"""

from __future__ import annotations

import torch
from torch import nn

from ._conv_act import conv_bn_act
from ._layers import ClassifierHead, conv_bn, scale_channels

__all__ = ["GoogLe2Net", "ResFRI", "googlenet2"]


class ResFRI(nn.Module):
    """``relu(bn(conv1x1(cat(b_1..b_4))) + x)`` with each branch reusing (adding) the previous one's output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = max(1, channels // 4)
        self.reduce = nn.ModuleList(conv_bn_act(channels, c, 1) for _ in range(4))
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.k2 = conv_bn_act(c, c, 3)
        self.k3 = nn.Sequential(conv_bn_act(c, c, 3), conv_bn_act(c, c, 3))
        self.k4 = conv_bn_act(c, c, 3)
        self.merge = conv_bn(4 * c, channels, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        b1 = self.reduce[0](x)
        b2 = self.k2(self.reduce[1](x) + b1)
        b3 = self.k3(self.reduce[2](x) + b2)
        b4 = self.k4(self.reduce[3](self.pool(x)) + b3)
        return self.act(self.merge(torch.cat((b1, b2, b3, b4), 1)) + x)


class GoogLe2Net(nn.Module):
    """Stem; per stage a 3×3 stride-2 unit (not for the first) and ``ResFRI`` blocks; classifier head."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), depths: tuple[int, ...] = (1, 1, 1), stem: int = 32,
                 num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        c = scale_channels(stem, width)
        self.stem = conv_bn_act(3, c, 3, 2)
        layers = []
        for i, (w, depth) in enumerate(zip(widths, depths)):
            w = scale_channels(w, width)
            if i > 0 or w != c:
                layers.append(conv_bn_act(c, w, 3, 1 if i == 0 else 2))
            layers += [ResFRI(w) for _ in range(depth)]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = ClassifierHead(c, num_classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def googlenet2(num_classes: int = 1000, width: float = 1.0) -> GoogLe2Net:
    return GoogLe2Net(num_classes=num_classes, width=width)
