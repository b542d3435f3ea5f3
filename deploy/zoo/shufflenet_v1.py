"""ShuffleNet (v1), training-time form.

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018.

Characteristic unit (``ShuffleUnit``): a pointwise GROUP conv, a channel shuffle so the next
grouped conv sees every group, a depthwise 3×3, a second pointwise group conv::

    b = bn(gconv1x1(dw(shuffle(relu(bn(gconv1x1(x)))))))      dw = bn(dwconv3x3, stride s)
    y = relu(x + b)                        stride 1
    y = relu(cat(avgpool3x3_s2(x), b))     stride 2 (b makes out - in channels)

``shuffle`` is reshape ``(N, g, C/g, H, W)`` → transpose → reshape; it is a fixed permutation
of channels and survives in the deploy graph (nothing linear sits on both sides of it without a
ReLU in between). The bottleneck is a quarter of the unit's output width; the first pointwise
conv of the first stage is not grouped (its input is narrow), as in the paper.

Default network: g = 3, stem 3×3 stride 2 (24), no max pool (64×64 inputs), three stages of
widths 60, 120, 240 (the paper's 0.25× of 240/480/960) and depths (2, 2, 2), the first unit of
each stage with stride 2; classifier head.
"""

from __future__ import annotations

import torch
from torch import nn

from ._conv_act import channel_shuffle, conv_bn_act
from ._layers import ClassifierHead, scale_channels

__all__ = ["ShuffleNetV1", "ShuffleUnit", "shufflenet_v1"]


class ShuffleUnit(nn.Module):
    """``relu(x + b)`` or ``relu(cat(avgpool(x), b))`` with ``b`` gconv → shuffle → dw → gconv."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 3, stride: int = 1,
                 group_first: bool = True) -> None:
        super().__init__()
        if stride == 1 and in_channels != out_channels:
            raise ValueError(f"a stride-1 ShuffleUnit keeps its width, got {in_channels} -> {out_channels}")
        branch = out_channels - in_channels if stride == 2 else out_channels
        mid = out_channels // 4
        self.groups, self.stride = groups, stride
        self.reduce = conv_bn_act(in_channels, mid, 1, groups=groups if group_first else 1)
        self.depthwise = conv_bn_act(mid, mid, 3, stride, groups=mid, act=None)
        self.expand = conv_bn_act(mid, branch, 1, groups=groups, act=None)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None
        self.act = nn.ReLU()

    def forward(self, x):
        b = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.groups)))
        if self.pool is None:
            return self.act(x + b)
        return self.act(torch.cat((self.pool(x), b), 1))


class ShuffleNetV1(nn.Module):
    """Stem, stages of ``ShuffleUnit`` (first of each stride 2), classifier head."""

    def __init__(self, widths: tuple[int, ...] = (60, 120, 240), depths: tuple[int, ...] = (2, 2, 2),
                 groups: int = 3, stem: int = 24, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        c = scale_channels(stem, width, groups)
        self.stem = conv_bn_act(3, c, 3, 2)
        units = []
        for i, (w, depth) in enumerate(zip(widths, depths)):
            w = max(scale_channels(w, width, 4 * groups), c + groups)  # out must exceed in: the branch makes out - in
            for j in range(depth):
                units.append(ShuffleUnit(c, w, groups, 2 if j == 0 else 1, group_first=i > 0 or j > 0))
                c = w
        self.units = nn.Sequential(*units)
        self.head = ClassifierHead(c, num_classes)

    def forward(self, x):
        return self.head(self.units(self.stem(x)))


def shufflenet_v1(num_classes: int = 1000, width: float = 1.0, groups: int = 3) -> ShuffleNetV1:
    return ShuffleNetV1(groups=groups, num_classes=num_classes, width=width)
