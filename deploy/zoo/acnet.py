"""ACNet (asymmetric convolution blocks) on a small ResNet, training-time form.

Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via
Asymmetric Convolution Blocks", ICCV 2019.

Characteristic block (``ACBlock``), replacing every 3×3 conv-BN::

    y = bn(conv3x3(x)) + bn(conv1x3(x)) + bn(conv3x1(x))

with paddings (1, 1), (0, 1), (1, 0) and the same stride, so the 1×3 and 3×1
kernels add into the centre row and column of the 3×3 kernel when deployed.
"""

from __future__ import annotations

from torch import nn

from ._layers import conv_bn
from .resnet import SmallResNet

__all__ = ["ACBlock", "acnet_resnet"]


class ACBlock(nn.Module):
    """``bn(conv3x3(x)) + bn(conv1x3(x)) + bn(conv3x1(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.square = conv_bn(in_channels, out_channels, (3, 3), stride=stride, padding=(1, 1), groups=groups)
        self.horizontal = conv_bn(in_channels, out_channels, (1, 3), stride=stride, padding=(0, 1), groups=groups)
        self.vertical = conv_bn(in_channels, out_channels, (3, 1), stride=stride, padding=(1, 0), groups=groups)

    def forward(self, x):
        return self.square(x) + self.horizontal(x) + self.vertical(x)


def acnet_resnet(
    num_classes: int = 1000,
    width: float = 1.0,
    widths: tuple[int, ...] = (32, 64, 128),
    depths: tuple[int, ...] = (2, 2, 2),
) -> SmallResNet:
    return SmallResNet(ACBlock, widths, depths, num_classes, width)
