"""MobileOne, training-time form.

Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023.

Characteristic block (``MobileOneBlock``): ``k`` over-parameterised conv-BN
branches of the same kernel size, plus a 1×1 conv-BN "scale" branch when the
kernel is larger than 1×1, plus an identity BatchNorm when shapes allow, all
summed, then ReLU::

    y = relu(sum_i bn_i(conv_i(x)) + bn(conv1x1(x)) + bn(x))

A MobileOne unit is a depthwise 3×3 block (groups = channels, carries the
stride) followed by a pointwise 1×1 block. Each block reparameterizes into one
conv with bias. MobileOne-S0 uses ``k = 4``, stages of ``[2, 8, 10, 1]`` units
with widths ``64, 128, 256, 512`` × ``(0.75, 1.0, 1.0, 2.0)``, a dense 3×3
stem of width ``min(64, 64·0.75)`` with a single conv branch, average pool and
a Linear head: about 2.1 M parameters when deployed.
"""

from __future__ import annotations

from torch import nn

from ._layers import ClassifierHead, conv_bn, scale_channels

__all__ = ["MobileOne", "MobileOneBlock", "MobileOneUnit", "mobileone_s0"]


class MobileOneBlock(nn.Module):
    """``relu(sum of k conv-BN branches + 1×1 scale conv-BN + identity BN)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 1,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups)
            for _ in range(num_branches)
        )
        self.scale = conv_bn(in_channels, out_channels, 1, stride=stride, groups=groups) if kernel_size > 1 else None
        self.identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class MobileOneUnit(nn.Sequential):
    """Depthwise 3×3 ``MobileOneBlock`` (with the stride) then pointwise 1×1 ``MobileOneBlock``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_branches: int) -> None:
        super().__init__()
        self.depthwise = MobileOneBlock(in_channels, in_channels, 3, stride, groups=in_channels, num_branches=num_branches)
        self.pointwise = MobileOneBlock(in_channels, out_channels, 1, 1, groups=1, num_branches=num_branches)


class MobileOne(nn.Module):
    """Dense stem, four stages of ``MobileOneUnit``, classifier head."""

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 8, 10, 1),
        width_multipliers: tuple[float, ...] = (0.75, 1.0, 1.0, 2.0),
        num_branches: int = 4,
        num_classes: int = 1000,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(width_multipliers):
            raise ValueError(
                f"MobileOne needs one width multiplier per stage: got depths {tuple(depths)} "
                f"and width_multipliers {tuple(width_multipliers)}"
            )
        base = (64, 128, 256, 512, 1024, 2048)[: len(depths)]
        stem = scale_channels(min(64, int(64 * width_multipliers[0])), width)
        self.stem = MobileOneBlock(3, stem, 3, stride=2, num_branches=1)
        stages, in_channels = [], stem
        for depth, c, m in zip(depths, base, width_multipliers):
            out_channels = scale_channels(int(c * m), width)
            units = []
            for i in range(depth):
                units.append(MobileOneUnit(in_channels, out_channels, 2 if i == 0 else 1, num_branches))
                in_channels = out_channels
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(in_channels, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def mobileone_s0(
    num_classes: int = 1000,
    width: float = 1.0,
    depths: tuple[int, ...] = (2, 8, 10, 1),
    num_branches: int = 4,
) -> MobileOne:
    return MobileOne(depths, (0.75, 1.0, 1.0, 2.0), num_branches, num_classes, width)
