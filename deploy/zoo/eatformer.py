"""EATFormer: a pyramid of Evolutionary-Algorithm-based Transformer (EAT) blocks, training-time form.

Zhang et al., "EATFormer: Improving Vision Transformer Inspired by Evolutionary Algorithm", IJCV 2024.

Each ``EATBlock`` has three residual parts, ``x += MSRA(x)``, ``x += GLI(x)``, ``x += FFN(x)``:

- ``MSRA`` (multi-scale region aggregation): parallel depthwise 3×3 conv-BN branches with dilation 1, 2, 3
  are summed (the weighted aggregation of regions of several sizes), then GELU and a 1×1 conv-BN. The sum
  equals one depthwise 7×7 convolution: ``merge_linear`` puts the dilated taps on the common grid, so the
  deploy form has one depthwise conv per block (its BNs folded in).
- ``GLI`` (global and local interaction): LayerNorm over channels, then the channels are split: a local
  part goes through a depthwise 3×3 conv-BN-GELU, a global part through multi-head self-attention over
  the flattened tokens; concatenated and projected by a 1×1 conv-BN. The paper's modulated deformable
  MSA (MD-MSA) is replaced by plain MSA here, because deformable sampling (``grid_sample`` at learned
  offsets) cannot be exported to every target (TFLite in particular).
- ``FFN``: 1×1 conv-BN, GELU, 1×1 conv-BN (expansion 2).

Stem: two stride-2 3×3 conv-BN-GELU units; stride-2 3×3 units between stages; average pool and a Linear
classifier. The task-related head (TRH) is replaced by that plain classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from ._det_layers import ConvBNAct
from ._layers import ClassifierHead, scale_channels

__all__ = ["EATBlock", "EATFormer", "GlobalLocalInteraction", "MultiScaleRegionAggregation", "eatformer"]


class MultiScaleRegionAggregation(nn.Module):
    """``proj(gelu(sum_d bn_d(dwconv3x3_d(x))))`` over dilations ``d``."""

    def __init__(self, c: int, dilations: tuple[int, ...] = (1, 2, 3)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(ConvBNAct(c, c, 3, d=d, groups=c, act=None) for d in dilations)
        self.act = nn.GELU()
        self.proj = ConvBNAct(c, c, 1, act=None)

    def forward(self, x):
        return self.proj(self.act(sum(b(x) for b in self.branches)))


class GlobalLocalInteraction(nn.Module):
    """LayerNorm, then ``cat(local dwconv branch, multi-head self-attention branch)`` and a 1×1 projection."""

    def __init__(self, c: int, global_ratio: float = 0.5, head_dim: int = 8) -> None:
        super().__init__()
        self.g = max(1, int(c * global_ratio))
        self.heads = max(h for h in range(1, max(1, self.g // head_dim) + 1) if self.g % h == 0)
        self.norm = nn.LayerNorm(c)
        self.local = ConvBNAct(c - self.g, c - self.g, 3, groups=c - self.g, act="gelu")
        self.qkv = nn.Linear(self.g, 3 * self.g)
        self.attn_proj = nn.Linear(self.g, self.g)
        self.proj = ConvBNAct(c, c, 1, act=None)

    def attention(self, t: torch.Tensor) -> torch.Tensor:
        b, n, g = t.shape
        d = g // self.heads
        q, k, v = (u.reshape(b, n, self.heads, d).transpose(1, 2) for u in self.qkv(t).chunk(3, -1))
        weights = torch.softmax((q * d**-0.5) @ k.transpose(-2, -1), dim=-1)
        return self.attn_proj((weights @ v).transpose(1, 2).reshape(b, n, g))

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)
        local = self.local(t[..., : c - self.g].transpose(1, 2).reshape(b, c - self.g, h, w))
        glob = self.attention(t[..., c - self.g:]).transpose(1, 2).reshape(b, self.g, h, w)
        return self.proj(torch.cat((local, glob), 1))


class EATBlock(nn.Module):
    def __init__(self, c: int, expansion: int = 2) -> None:
        super().__init__()
        self.msra = MultiScaleRegionAggregation(c)
        self.gli = GlobalLocalInteraction(c)
        self.ffn = nn.Sequential(ConvBNAct(c, expansion * c, 1, act="gelu"), ConvBNAct(expansion * c, c, 1, act=None))

    def forward(self, x):
        x = x + self.msra(x)
        x = x + self.gli(x)
        return x + self.ffn(x)


class EATFormer(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, dims: tuple[int, ...] = (32, 64, 128),
                 depths: tuple[int, ...] = (1, 1, 1)) -> None:
        super().__init__()
        d = [scale_channels(ch, width) for ch in dims]
        self.stem = nn.Sequential(ConvBNAct(3, d[0] // 2, 3, 2, act="gelu"),
                                  ConvBNAct(d[0] // 2, d[0], 3, 2, act="gelu"))
        layers = []
        for i, (ch, n) in enumerate(zip(d, depths)):
            if i > 0:
                layers.append(ConvBNAct(d[i - 1], ch, 3, 2, act=None))
            layers.extend(EATBlock(ch) for _ in range(n))
        self.stages = nn.Sequential(*layers)
        self.head = ClassifierHead(d[-1], num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def eatformer(num_classes: int = 1000, width: float = 1.0, dims: tuple[int, ...] = (32, 64, 128),
              depths: tuple[int, ...] = (1, 1, 1)) -> EATFormer:
    if len(dims) != len(depths):
        raise ValueError(f"eatformer needs one depth per stage: got dims={dims}, depths={depths}")
    return EATFormer(num_classes=num_classes, width=width, dims=dims, depths=depths)
