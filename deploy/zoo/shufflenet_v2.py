"""ShuffleNet V2, training-time form.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018.

Characteristic unit (``ShuffleV2Unit``)::

    stride 1:  x1, x2 = chunk(x, 2);  y = shuffle(cat(x1, r(x2)), 2)
    stride 2:                          y = shuffle(cat(l(x), r(x)), 2)

    r = relu(bn(conv1x1(bn(dwconv3x3_s(relu(bn(conv1x1(.))))))))      l = relu(bn(conv1x1(bn(dwconv3x3_s2(.)))))

Equal widths on both sides of every conv, no group convs, the elementwise add replaced by a
concatenation; ``shuffle`` (reshape → transpose → reshape) mixes the two halves for the next
unit and survives in the deploy graph.

Default network (the paper's 0.5× with shorter stages): stem 3×3 stride 2 (24), no max pool
(64×64 inputs), stages of widths 48, 96, 192 and depths (2, 2, 2), a 1×1 unit to 512,
classifier head.
"""

from __future__ import annotations

import torch
from torch import nn

from ._conv_act import channel_shuffle, conv_bn_act
from ._layers import ClassifierHead, scale_channels

__all__ = ["ShuffleNetV2", "ShuffleV2Unit", "shufflenet_v2"]


def _branch(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_act(in_channels, out_channels, 1),
                         conv_bn_act(out_channels, out_channels, 3, stride, groups=out_channels, act=None),
                         conv_bn_act(out_channels, out_channels, 1))


class ShuffleV2Unit(nn.Module):
    """Channel split, one branch (stride 1) or two (stride 2), concatenation, channel shuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        half = out_channels // 2
        self.stride = stride
        if stride == 1:
            if in_channels != out_channels:
                raise ValueError(f"a stride-1 ShuffleNet V2 unit keeps its width, got {in_channels} -> {out_channels}")
            self.left = None
            self.right = _branch(half, half, 1)
        else:
            self.left = nn.Sequential(conv_bn_act(in_channels, in_channels, 3, stride, groups=in_channels, act=None),
                                      conv_bn_act(in_channels, half, 1))
            self.right = _branch(in_channels, half, stride)

    def forward(self, x):
        if self.left is None:
            x1, x2 = x.chunk(2, dim=1)
            y = torch.cat((x1, self.right(x2)), 1)
        else:
            y = torch.cat((self.left(x), self.right(x)), 1)
        return channel_shuffle(y, 2)


class ShuffleNetV2(nn.Module):
    """Stem, stages of ``ShuffleV2Unit`` (first of each stride 2), 1×1 unit, classifier head."""

    def __init__(self, widths: tuple[int, ...] = (48, 96, 192), depths: tuple[int, ...] = (2, 2, 2), stem: int = 24,
                 last: int = 512, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        c = scale_channels(stem, width)
        self.stem = conv_bn_act(3, c, 3, 2)
        units = []
        for w, depth in zip(widths, depths):
            w = scale_channels(w, width)
            for j in range(depth):
                units.append(ShuffleV2Unit(c, w, 2 if j == 0 else 1))
                c = w
        self.units = nn.Sequential(*units)
        last = scale_channels(last, width)
        self.last = conv_bn_act(c, last, 1)
        self.head = ClassifierHead(last, num_classes)

    def forward(self, x):
        return self.head(self.last(self.units(self.stem(x))))


def shufflenet_v2(num_classes: int = 1000, width: float = 1.0) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes, width=width)
