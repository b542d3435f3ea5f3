"""RepVGG, training-time form.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.

Characteristic block (``RepVGGBlock``)::

    y = relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x))

The identity branch (a lone BatchNorm) exists only when ``in == out`` and the
stride is 1; the 1×1 branch has padding 0 and the same stride and groups as the
3×3. After reparameterization each block is one 3×3 conv with bias, so
RepVGG-A0 deploys as 22 plain 3×3 convs + ReLU and a Linear (8.30 M params).

Stages have depths ``[1, 2, 4, 14, 1]`` (A) or ``[1, 4, 6, 16, 1]`` (B) and
widths ``min(64, 64a), 64a, 128a, 256a, 512b``; the first block of each stage
has stride 2. The ``g2`` variants use groups = 2 on blocks 2, 4, ..., 26
(counted from the stem, block 0). The ``se`` variant appends a
squeeze-and-excitation unit after each block's activation.
"""

from __future__ import annotations

from torch import nn

from ._layers import ClassifierHead, conv_bn, scale_channels

__all__ = ["RepVGG", "RepVGGBlock", "SEBlock", "repvgg_a0", "repvgg_a0_se", "repvgg_a1", "repvgg_b0", "repvgg_b1g2"]

DEPTHS_A = (1, 2, 4, 14, 1)
DEPTHS_B = (1, 4, 6, 16, 1)
G2_LAYERS = frozenset(range(2, 27, 2))


class SEBlock(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(conv1x1(relu(conv1x1(avgpool(x)))))``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.down = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.up = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.up(self.relu(self.down(self.pool(x)))))


class RepVGGBlock(nn.Module):
    """``relu(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn(x)])``, optionally followed by SE."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, use_se: bool = False):
        super().__init__()
        self.dense = conv_bn(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups)
        self.one_by_one = conv_bn(in_channels, out_channels, 1, stride=stride, padding=0, groups=groups)
        self.identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.act = nn.ReLU()
        self.se = SEBlock(out_channels) if use_se else None

    def forward(self, x):
        y = self.dense(x) + self.one_by_one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        y = self.act(y)
        if self.se is not None:
            y = self.se(y)
        return y


class RepVGG(nn.Module):
    """Five stages of ``RepVGGBlock`` and a classifier head."""

    def __init__(
        self,
        depths: tuple[int, ...],
        width_multiplier: tuple[float, float],
        num_classes: int = 1000,
        groupwise_layers: frozenset[int] = frozenset(),
        groups: int = 2,
        use_se: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if len(depths) != 5 or depths[0] != 1:
            raise ValueError(f"RepVGG depths must be 5 stages with a 1-block stem, got {tuple(depths)}")
        a, b = width_multiplier
        base = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        divisor = 4 * groups if groupwise_layers else 4
        widths = [scale_channels(c, width, divisor) for c in base]
        stages, in_channels, layer = [], 3, 0
        for depth, out_channels in zip(depths, widths):
            blocks = []
            for i in range(depth):
                g = groups if layer in groupwise_layers else 1
                blocks.append(RepVGGBlock(in_channels, out_channels, stride=2 if i == 0 else 1, groups=g, use_se=use_se))
                in_channels, layer = out_channels, layer + 1
            stages.append(nn.Sequential(*blocks))
        self.stage0, self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.head = ClassifierHead(in_channels, num_classes)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stage0(x)))))
        return self.head(x)


def repvgg_a0(num_classes: int = 1000, width: float = 1.0, depths: tuple[int, ...] = DEPTHS_A) -> RepVGG:
    return RepVGG(depths, (0.75, 2.5), num_classes, width=width)


def repvgg_a1(num_classes: int = 1000, width: float = 1.0, depths: tuple[int, ...] = DEPTHS_A) -> RepVGG:
    return RepVGG(depths, (1.0, 2.5), num_classes, width=width)


def repvgg_b0(num_classes: int = 1000, width: float = 1.0, depths: tuple[int, ...] = DEPTHS_B) -> RepVGG:
    return RepVGG(depths, (1.0, 2.5), num_classes, width=width)


def repvgg_b1g2(num_classes: int = 1000, width: float = 1.0, depths: tuple[int, ...] = DEPTHS_B) -> RepVGG:
    return RepVGG(depths, (2.0, 4.0), num_classes, groupwise_layers=G2_LAYERS, groups=2, width=width)


def repvgg_a0_se(num_classes: int = 1000, width: float = 1.0, depths: tuple[int, ...] = DEPTHS_A) -> RepVGG:
    return RepVGG(depths, (0.75, 2.5), num_classes, use_se=True, width=width)
