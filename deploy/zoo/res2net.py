"""Res2Net, training-time form.

Gao et al., "Res2Net: A New Multi-scale Backbone Architecture", TPAMI 2021.

Characteristic block (``Res2NetBlock``): a 1×1 unit, its output split into ``s`` groups of
``w`` channels ``x_1..x_s``, hierarchical 3×3 units where each group also receives the previous
group's output, concatenation, a 1×1 conv-BN, the residual::

    y_1 = x_1,  y_2 = K_2(x_2),  y_i = K_i(x_i + y_{i-1})  (2 < i <= s)      K = relu(bn(conv3x3))
    out = relu(bn(conv1x1(cat(y_1, ..., y_s))) + shortcut(x))

so group ``i`` sees a receptive field of ``2i - 1``. In a stride-2 block (first of a stage) the
groups do not feed each other (``y_i = K_i(x_i)`` with stride 2) and ``x_1`` is average-pooled
instead, as in the paper; the shortcut is then a strided 1×1 conv-BN.

Default network: stem 3×3 stride 2 (32), stages of bottleneck widths 16, 32, 64 (outputs ×4),
depths (1, 2, 1), scale s = 4, group width w = bottleneck width / 2; classifier head.
"""

from __future__ import annotations

import torch
from torch import nn

from ._conv_act import conv_bn_act
from ._layers import ClassifierHead, conv_bn, scale_channels

__all__ = ["Res2Net", "Res2NetBlock", "res2net"]


class Res2NetBlock(nn.Module):
    """``relu(bn(conv1x1(cat(y_1..y_s))) + shortcut(x))`` with hierarchical 3×3 groups ``y_i``."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, group_width: int, scale: int = 4, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.scale, self.group_width, self.stride = scale, group_width, stride
        self.reduce = conv_bn_act(in_channels, group_width * scale, 1)
        self.convs = nn.ModuleList(conv_bn_act(group_width, group_width, 3, stride) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, stride, 1) if stride > 1 else None
        self.expand = conv_bn(group_width * scale, out_channels, 1)
        same = stride == 1 and in_channels == out_channels
        self.shortcut = nn.Identity() if same else conv_bn(in_channels, out_channels, 1, stride=stride)
        self.act = nn.ReLU()

    def forward(self, x):
        groups = torch.split(self.reduce(x), self.group_width, 1)
        outs, y = [], None
        for i, conv in enumerate(self.convs):
            xi = groups[i + 1]
            y = conv(xi if y is None or self.pool is not None else xi + y)
            outs.append(y)
        first = groups[0] if self.pool is None else self.pool(groups[0])
        return self.act(self.expand(torch.cat([first] + outs, 1)) + self.shortcut(x))


class Res2Net(nn.Module):
    """Stem, stages of ``Res2NetBlock`` (first of stages 2.. with stride 2), classifier head."""

    def __init__(self, planes: tuple[int, ...] = (16, 32, 64), depths: tuple[int, ...] = (1, 2, 1), scale: int = 4,
                 stem: int = 32, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        c = scale_channels(stem, width)
        self.stem = conv_bn_act(3, c, 3, 2)
        blocks = []
        for i, (p, depth) in enumerate(zip(planes, depths)):
            p = scale_channels(p, width)
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Res2NetBlock(c, p, max(1, p // 2), scale, stride))
                c = p * Res2NetBlock.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = ClassifierHead(c, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def res2net(num_classes: int = 1000, width: float = 1.0, scale: int = 4) -> Res2Net:
    return Res2Net(scale=scale, num_classes=num_classes, width=width)
