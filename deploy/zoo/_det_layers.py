"""Conv-BN-activation units, a narrow residual backbone and resizing helpers shared by the detector entries.

Every unit keeps the training-time ``conv`` -> ``bn`` -> ``act`` order as three named submodules, so the
captured graph shows ``conv2d`` -> ``batch_norm`` for ``fold_bn``; convolutions have no bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import ConvBNAct, activation

__all__ = ["BasicBlock", "ConvBNAct", "ResidualBackbone", "activation", "downsample_to", "stage_outputs",
           "upsample_to"]




class BasicBlock(nn.Module):
    """ResNet basic block ``act(bn(conv3x3(act(bn(conv3x3(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1×1 conv-BN when the stride or width changes.
    """

    def __init__(self, c1: int, c2: int, s: int = 1, act: str = "relu") -> None:
        super().__init__()
        self.cv1 = ConvBNAct(c1, c2, 3, s, act=act)
        self.cv2 = ConvBNAct(c2, c2, 3, act=None)
        self.shortcut = nn.Identity() if s == 1 and c1 == c2 else ConvBNAct(c1, c2, 1, s, act=None)
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.cv2(self.cv1(x)) + self.shortcut(x))


class ResidualBackbone(nn.Module):
    """Stride-2 stem unit, then one stage per width: a stride-2 ``BasicBlock`` plus ``depth - 1`` more.

    Returns the outputs of the last ``num_outputs`` stages (finest first); with the default three stages
    after a stride-4 stem those are C3, C4, C5 at strides 8, 16, 32.
    """

    def __init__(self, stem: tuple[int, int], widths: tuple[int, ...], depth: int = 1, num_outputs: int = 3,
                 act: str = "relu") -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, stem[0], 3, 2, act=act), ConvBNAct(stem[0], stem[1], 3, 2, act=act))
        chans = (stem[1], *widths)
        self.stages = nn.ModuleList(
            nn.Sequential(*(BasicBlock(chans[i] if j == 0 else chans[i + 1], chans[i + 1], 2 if j == 0 else 1, act)
                            for j in range(depth)))
            for i in range(len(widths)))
        self.num_outputs = num_outputs
        self.out_channels = tuple(widths[-num_outputs:])

    def forward(self, x) -> list[torch.Tensor]:
        return stage_outputs(self.stem(x), self.stages)[-self.num_outputs:]


def stage_outputs(x: torch.Tensor, stages) -> list[torch.Tensor]:
    """Run ``stages`` in sequence on ``x``; the output of every stage, finest first."""
    feats = []
    for stage in stages:
        x = stage(x)
        feats.append(x)
    return feats


def upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Nearest upsampling of ``x`` by the integer factor that gives ``ref``'s spatial size."""
    factor = ref.shape[-1] // x.shape[-1]
    return x if factor == 1 else F.interpolate(x, scale_factor=float(factor), mode="nearest")


def downsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Average pooling of ``x`` by the integer factor that gives ``ref``'s spatial size."""
    factor = x.shape[-1] // ref.shape[-1]
    return x if factor == 1 else F.avg_pool2d(x, factor)
