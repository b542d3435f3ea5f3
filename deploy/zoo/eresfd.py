"""EResFD: a channel-reduced ResNet face detector with separated feature aggregation, training-time form.

Jeong et al., "EResFD: Rediscovery of the Effectiveness of Standard Convolution for Lightweight Face
Detection" (standard 3×3 convolutions in a heavily channel-reduced ResNet beat depthwise-separable
backbones at equal size; plus a feature aggregation that maximizes detection performance).

- Backbone: early, aggressive downsampling (a stride-2 3×3 unit and a stride-2 max pool: stride 4 after two
  layers), then stages of very narrow ResNet basic blocks (8-64 channels at ``width=1``) at strides 4, 8, 16,
  32, 64; the last four are the detection levels.
- Feature aggregation (separated pyramid): lateral 1×1 conv-BN units; the coarse half of the levels gets a
  top-down path (``P_i += up2(P_{i+1})``), the fine half a bottom-up path (``P_{i+1} += maxpool2(P_i)``),
  each level then a 3×3 conv-BN-ReLU.
- Context and heads: per level an SSH-style context unit (3×3 and two stacked 3×3 branches, concatenated,
  ReLU) and separate 3×3 classification (``anchors * num_classes``) and box (``anchors * 4``) convs.

Returns ``(class maps, box maps)``, one map per level each, finest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._det_layers import BasicBlock, ConvBNAct, stage_outputs, upsample_to
from ._layers import scale_channels

__all__ = ["ContextModule", "EResFD", "eresfd"]


class ContextModule(nn.Module):
    """``relu(cat(bn(conv3x3(x)), bn(conv3x3(relu(bn(conv3x3(x)))))))``: receptive fields 3 and 5."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.narrow = ConvBNAct(c, c // 2, 3, act=None)
        self.wide = nn.Sequential(ConvBNAct(c, c // 2, 3), ConvBNAct(c // 2, c // 2, 3, act=None))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(torch.cat((self.narrow(x), self.wide(x)), 1))


class EResFD(nn.Module):
    def __init__(self, num_classes: int = 2, width: float = 1.0, widths: tuple[int, ...] = (16, 24, 32, 48, 64),
                 depths: tuple[int, ...] = (1, 1, 1, 1, 1), neck: int = 16, anchors: int = 2, levels: int = 4) -> None:
        super().__init__()
        c = lambda ch: scale_channels(ch, width)  # noqa: E731
        w = [c(ch) for ch in widths]
        self.stem = ConvBNAct(3, c(8), 3, 2)
        chans = [c(8), *w]
        self.stages = nn.ModuleList(
            nn.Sequential(*(BasicBlock(chans[i] if j == 0 else chans[i + 1], chans[i + 1], 2 if j == 0 and i > 0 else 1)
                            for j in range(depths[i])))
            for i in range(len(w)))
        n = c(neck)
        self.levels = levels
        self.lateral = nn.ModuleList(ConvBNAct(ch, n, 1, act=None) for ch in w[-levels:])
        self.smooth = nn.ModuleList(ConvBNAct(n, n, 3) for _ in range(levels))
        self.context = nn.ModuleList(ContextModule(n) for _ in range(levels))
        self.cls = nn.ModuleList(nn.Conv2d(n, anchors * num_classes, 3, padding=1) for _ in range(levels))
        self.box = nn.ModuleList(nn.Conv2d(n, anchors * 4, 3, padding=1) for _ in range(levels))

    def forward(self, x):
        feats = stage_outputs(F.max_pool2d(self.stem(x), 2), self.stages)
        p = [lat(f) for lat, f in zip(self.lateral, feats[-self.levels:])]
        half = self.levels // 2
        for i in range(self.levels - 2, half - 1, -1):  # top-down over the coarse half
            p[i] = p[i] + upsample_to(p[i + 1], p[i])
        for i in range(1, half):  # bottom-up over the fine half
            p[i] = p[i] + F.max_pool2d(p[i - 1], 2)
        p = [ctx(smooth(t)) for ctx, smooth, t in zip(self.context, self.smooth, p)]
        return [cls(t) for cls, t in zip(self.cls, p)], [box(t) for box, t in zip(self.box, p)]


def eresfd(num_classes: int = 2, width: float = 1.0) -> EResFD:
    return EResFD(num_classes=num_classes, width=width)
