"""SA-FPN (scale-attention FPN) with a sequential detection head, training-time form.

From the paper proposing SA-FPN and Seq-Head as zero-cost improvements of general object detection
networks (scale attention to fuse multi-level feature maps; a sequential instead of a parallel head).

- Scale attention (``ScaleAttentionFusion``): lateral 1×1 conv-BN units bring C3..C5 to one width. For each
  output level ``l``, every level ``j`` is resized to ``l``'s scale (nearest upsampling or average pooling by
  the integer factor); the globally pooled features of all levels, concatenated, go through a 1×1 conv that
  gives one logit per level; a softmax over the levels turns them into weights and
  ``out_l = conv3x3(sum_j w_{l,j} * resize(P_j))``.
- Seq-Head (``SequentialHead``): one head shared by every level and run level by level; classification
  follows regression instead of running beside it: ``r = reg_tower(x)``, ``box = conv1x1(r)``,
  ``cls = conv1x1(cls_tower(r))``. Each level returns ``cat(box, cls)`` (``4 + num_classes`` channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._det_layers import ConvBNAct, ResidualBackbone, downsample_to, upsample_to
from ._layers import scale_channels

__all__ = ["SAFPN", "ScaleAttentionFusion", "SequentialHead", "sa_fpn"]


def _resize(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return upsample_to(x, ref) if x.shape[-1] <= ref.shape[-1] else downsample_to(x, ref)


class ScaleAttentionFusion(nn.Module):
    """Softmax-weighted sum over pyramid levels, resized to each output level in turn, then a 3×3 unit."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.attend = nn.ModuleList(nn.Conv2d(levels * channels, levels, 1) for _ in range(levels))
        self.smooth = nn.ModuleList(ConvBNAct(channels, channels, 3) for _ in range(levels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        pooled = torch.cat([F.adaptive_avg_pool2d(f, 1) for f in feats], 1)
        outs = []
        for ref, attend, smooth in zip(feats, self.attend, self.smooth):
            weights = torch.softmax(attend(pooled), dim=1)  # (B, levels, 1, 1)
            fused = sum(weights[:, j:j + 1] * _resize(f, ref) for j, f in enumerate(feats))
            outs.append(smooth(fused))
        return outs


class SequentialHead(nn.Module):
    """Regression tower, then the classification tower on the regression features; shared across levels."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.reg_tower = nn.Sequential(ConvBNAct(channels, channels, 3), ConvBNAct(channels, channels, 3))
        self.box = nn.Conv2d(channels, 4, 1)
        self.cls_tower = ConvBNAct(channels, channels, 3)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        r = self.reg_tower(x)
        return torch.cat((self.box(r), self.cls(self.cls_tower(r))), 1)


class SAFPN(nn.Module):
    def __init__(self, num_classes: int = 80, width: float = 1.0, neck: int = 64,
                 widths: tuple[int, ...] = (64, 128, 256)) -> None:
        super().__init__()
        c = lambda ch: scale_channels(ch, width)  # noqa: E731
        self.backbone = ResidualBackbone((c(16), c(32)), tuple(c(w) for w in widths))
        n = c(neck)
        self.lateral = nn.ModuleList(ConvBNAct(ci, n, 1, act=None) for ci in self.backbone.out_channels)
        self.fusion = ScaleAttentionFusion(n, len(widths))
        self.head = SequentialHead(n, num_classes)

    def forward(self, x):
        feats = [lat(f) for lat, f in zip(self.lateral, self.backbone(x))]
        return [self.head(f) for f in self.fusion(feats)]


def sa_fpn(num_classes: int = 80, width: float = 1.0) -> SAFPN:
    return SAFPN(num_classes=num_classes, width=width)
