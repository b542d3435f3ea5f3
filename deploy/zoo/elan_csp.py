"""ELAN blocks in CSP stages: the gradient-path design strategies, training-time form.

Wang, Liao, Yeh, "Designing Network Design Strategies Through Gradient Path Analysis", 2022
(the layer-level, stage-level and network-level strategies behind YOLOv7's ELAN).

Characteristic blocks:

- ``ELANBlock`` (network level): two 1×1 units ``a = u1(x)``, ``b = u2(x)``; a stack of
  ``n`` 3×3 units on ``b``, ``c_1 = k_1(b)``, ``c_i = k_i(c_{i-1})``; every intermediate output
  is concatenated and a 1×1 transition merges them::

      y = t(cat(a, b, c_1, ..., c_n))

  so the shortest and longest gradient paths through the block differ by ``n`` layers.
- ``CSPStage`` (stage level): the input is split by two 1×1 units into a part that crosses the
  stage untouched and a part that goes through the ELAN blocks; both are concatenated and a
  1×1 transition ends the stage::

      y = t(cat(blocks(p2(x)), p1(x)))

Every unit is conv-BN-SiLU (YOLO's activation), so each BatchNorm folds into its conv and the
deploy network has exactly one conv per unit. Stages: a 3×3 stride-2 downsampling unit then one
CSP stage of ELAN blocks; default widths 16 (stem), 32, 64, 128, one ELAN (n = 4) per stage.
"""

from __future__ import annotations

import torch
from torch import nn

from ._conv_act import conv_bn_act
from ._layers import ClassifierHead, scale_channels

__all__ = ["CSPStage", "ELANBlock", "ELANCSPNet", "elan_csp"]


def _unit(c1: int, c2: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return conv_bn_act(c1, c2, k, s, act=nn.SiLU)


class ELANBlock(nn.Module):
    """``t(cat(u1(x), u2(x), k_1(u2(x)), ..., k_n(...k_1(u2(x)))))``."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, depth: int = 4) -> None:
        super().__init__()
        self.short = _unit(in_channels, hidden)
        self.long = _unit(in_channels, hidden)
        self.stack = nn.ModuleList(_unit(hidden, hidden, 3) for _ in range(depth))
        self.transition = _unit((depth + 2) * hidden, out_channels)

    def forward(self, x):
        y = self.long(x)
        outs = [self.short(x), y]
        for conv in self.stack:
            y = conv(y)
            outs.append(y)
        return self.transition(torch.cat(outs, 1))


class CSPStage(nn.Module):
    """``t(cat(blocks(p2(x)), p1(x)))``: half the channels cross the stage, half go through ELAN blocks."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 1, depth: int = 4) -> None:
        super().__init__()
        half = out_channels // 2
        self.cross = _unit(in_channels, half)
        self.part = _unit(in_channels, half)
        self.blocks = nn.Sequential(*(ELANBlock(half, max(1, half // 2), half, depth) for _ in range(num_blocks)))
        self.transition = _unit(2 * half, out_channels)

    def forward(self, x):
        return self.transition(torch.cat((self.blocks(self.part(x)), self.cross(x)), 1))


class ELANCSPNet(nn.Module):
    """3×3 stride-2 stem; per stage a 3×3 stride-2 unit and a ``CSPStage``; classifier head."""

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        num_blocks: tuple[int, ...] = (1, 1, 1),
        stem: int = 16,
        depth: int = 4,
        num_classes: int = 1000,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        c = scale_channels(stem, width)
        self.stem = _unit(3, c, 3, 2)
        stages = []
        for w, n in zip(widths, num_blocks):
            w = scale_channels(w, width)
            stages.append(nn.Sequential(_unit(c, w, 3, 2), CSPStage(w, w, n, depth)))
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(c, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def elan_csp(num_classes: int = 1000, width: float = 1.0, depth: int = 4) -> ELANCSPNet:
    return ELANCSPNet(depth=depth, num_classes=num_classes, width=width)
