"""A small ResNet skeleton whose 3×3 conv-BN units are pluggable.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

Characteristic block (``BasicBlock``)::

    y = relu(unit2(relu(unit1(x))) + shortcut(x))

where ``unit`` is any module standing for "3×3 conv + BatchNorm" (a plain
``conv_bn``, an ACNet block, a Diverse Branch Block) and ``shortcut`` is the
identity, or a 1×1 conv-BN when the stride or width changes. The ACNet and DBB
zoo entries build this skeleton with their own units; the residual adds stay
in the deploy form (only the units collapse to single convs).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ._layers import ClassifierHead, conv_bn, scale_channels

__all__ = ["BasicBlock", "SmallResNet", "UnitFactory", "resnet_small"]

# (in_channels, out_channels, stride) -> module computing bn(conv3x3(x)) or an equivalent multi-branch sum.
UnitFactory = Callable[[int, int, int], nn.Module]


class BasicBlock(nn.Module):
    """``relu(unit2(relu(unit1(x))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, unit: UnitFactory) -> None:
        super().__init__()
        self.unit1 = unit(in_channels, out_channels, stride)
        self.act1 = nn.ReLU()
        self.unit2 = unit(out_channels, out_channels, 1)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = conv_bn(in_channels, out_channels, 1, stride=stride)
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.unit2(self.act1(self.unit1(x))) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stride-2 stem unit, three stages of ``BasicBlock`` (strides 1, 2, 2), classifier head."""

    def __init__(
        self,
        unit: UnitFactory,
        widths: tuple[int, ...] = (32, 64, 128),
        depths: tuple[int, ...] = (2, 2, 2),
        num_classes: int = 1000,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"SmallResNet needs one width per stage: got widths {widths} and depths {depths}")
        widths = tuple(scale_channels(c, width) for c in widths)
        self.stem = nn.Sequential(unit(3, widths[0], 2), nn.ReLU())
        stages, in_channels = [], widths[0]
        for s, (out_channels, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for i in range(depth):
                stride = 2 if i == 0 and s > 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, unit))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(in_channels, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def _plain_unit(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return conv_bn(in_channels, out_channels, 3, stride=stride, padding=1)


def resnet_small(
    num_classes: int = 1000,
    width: float = 1.0,
    widths: tuple[int, ...] = (32, 64, 128),
    depths: tuple[int, ...] = (2, 2, 2),
) -> SmallResNet:
    """The plain skeleton (3x3 conv-BN units): the RM operation's test bed."""
    return SmallResNet(_plain_unit, widths, depths, num_classes, width)
