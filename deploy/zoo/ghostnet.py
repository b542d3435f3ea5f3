"""GhostNet with C-Ghost bottlenecks and a G-Ghost stage, training-time form.

Han et al., "GhostNets on Heterogeneous Devices via Cheap Operations", IJCV 2022
(C-GhostNet for CPUs, G-GhostNet for GPUs; the C-Ghost module is CVPR 2020's GhostNet).

Characteristic blocks:

- ``GhostModule`` (C-Ghost): a primary 1×1 unit makes ``m = ceil(out / ratio)`` intrinsic
  maps, a cheap depthwise 3×3 unit makes ``(ratio - 1)·m`` ghost maps from them, and the
  concatenation is cut to ``out`` channels::

      y = cat(p(x), d(p(x)))[:, :out]        p = bn(conv1x1), d = bn(dwconv3x3), ReLU optional

- ``GhostBottleneck``: ghost module (ReLU) expands, a depthwise 3×3 stride-2 unit downsamples
  when needed, a linear ghost module projects; the shortcut is the identity or depthwise 3×3 +
  1×1 units::

      y = g2(dw(g1(x))) + shortcut(x)

- ``GGhostStage`` (G-Ghost): the stage's first block makes the intrinsic features ``X1``; the
  deep path (the other blocks) makes only ``(1 - λ)·out`` channels; the remaining ``λ·out`` are
  cheap 1×1 features of ``X1``, compensated by a 1×1 unit on the pooled intermediate deep
  features (the paper's "mix" of stage-wise information), and concatenated::

      z_1..z_k = deep blocks(X1);   c = relu(bn(conv1x1(X1)) + bn(conv1x1(cat(gap(z_1..z_k)))))
      y = cat(z_k, c)

  Its blocks are plain residual conv units (the GPU-efficient design avoids depthwise convs).

Default network: stem 16; C-Ghost bottlenecks (in, expansion, out, stride) 16-16-16/1,
16-48-24/2, 24-72-24/1, 24-72-40/2; a G-Ghost stage 40→64 of 3 blocks with λ = 0.5; 1×1 unit
to 128; classifier head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._conv_act import conv_bn_act
from ._layers import ClassifierHead, conv_bn, scale_channels
from .resnet import BasicBlock

__all__ = ["GGhostStage", "GhostBottleneck", "GhostModule", "GhostNet", "ghostnet", "residual_unit"]

C_GHOST = ((16, 16, 16, 1), (16, 48, 24, 2), (24, 72, 24, 1), (24, 72, 40, 2))


class GhostModule(nn.Module):
    """``cat(p(x), d(p(x)))[:, :out]``: intrinsic 1×1 maps and their cheap depthwise ghosts."""

    def __init__(self, in_channels: int, out_channels: int, ratio: int = 2, relu: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        intrinsic = math.ceil(out_channels / ratio)
        act = nn.ReLU if relu else None
        self.primary = conv_bn_act(in_channels, intrinsic, 1, act=act)
        self.cheap = conv_bn_act(intrinsic, intrinsic * (ratio - 1), 3, groups=intrinsic, act=act)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat((y, self.cheap(y)), 1)[:, : self.out_channels]


class GhostBottleneck(nn.Module):
    """``g2(dw(g1(x))) + shortcut(x)``; ``dw`` only for stride 2."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.expand = GhostModule(in_channels, hidden, relu=True)
        self.down = conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=None) if stride > 1 else nn.Identity()
        self.project = GhostModule(hidden, out_channels, relu=False)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                conv_bn_act(in_channels, in_channels, 3, stride, groups=in_channels, act=None),
                conv_bn_act(in_channels, out_channels, 1, act=None),
            )

    def forward(self, x):
        return self.project(self.down(self.expand(x))) + self.shortcut(x)


def residual_unit(in_channels: int, out_channels: int, stride: int = 1) -> BasicBlock:
    """``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``: the plain residual block of the G-Ghost stage."""
    return BasicBlock(in_channels, out_channels, stride, _conv3x3_bn)


def _conv3x3_bn(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return conv_bn(in_channels, out_channels, 3, stride=stride, padding=1)


class GGhostStage(nn.Module):
    """``cat(z_k, relu(cheap(X1) + mix(cat(gap(z_1), ..., gap(z_k)))))`` with ``X1`` the first block's output."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 3, cheap_ratio: float = 0.5) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"a G-Ghost stage needs a first block and a deep path, got depth={depth}")
        cheap = max(1, int(out_channels * cheap_ratio))
        deep = out_channels - cheap
        self.first = residual_unit(in_channels, out_channels, stride=2)
        self.deep = nn.ModuleList(residual_unit(out_channels if i == 0 else deep, deep) for i in range(depth - 1))
        self.cheap = conv_bn_act(out_channels, cheap, 1, act=None)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mix = conv_bn_act(deep * (depth - 1), cheap, 1, act=None)
        self.act = nn.ReLU()

    def forward(self, x):
        intrinsic = self.first(x)
        z, pooled = intrinsic, []
        for block in self.deep:
            z = block(z)
            pooled.append(self.pool(z))
        ghost = self.act(self.cheap(intrinsic) + self.mix(torch.cat(pooled, 1)))
        return torch.cat((z, ghost), 1)


class GhostNet(nn.Module):
    """Stem, C-Ghost bottlenecks, a G-Ghost stage, a 1×1 unit, classifier head."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, stem: int = 16, g_ghost: tuple[int, int] = (64, 3),
                 last: int = 128) -> None:
        super().__init__()
        c = scale_channels(stem, width)
        self.stem = conv_bn_act(3, c, 3, 2)
        blocks = []
        for _, hidden, out, stride in C_GHOST:
            hidden, out = scale_channels(hidden, width), scale_channels(out, width)
            blocks.append(GhostBottleneck(c, hidden, out, stride))
            c = out
        self.c_ghost = nn.Sequential(*blocks)
        g_out = scale_channels(g_ghost[0], width)
        self.g_ghost = GGhostStage(c, g_out, g_ghost[1])
        self.last = conv_bn_act(g_out, scale_channels(last, width), 1)
        self.head = ClassifierHead(scale_channels(last, width), num_classes)

    def forward(self, x):
        return self.head(self.last(self.g_ghost(self.c_ghost(self.stem(x)))))


def ghostnet(num_classes: int = 1000, width: float = 1.0) -> GhostNet:
    return GhostNet(num_classes=num_classes, width=width)
