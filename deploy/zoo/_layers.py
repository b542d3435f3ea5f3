"""Small building blocks shared by the zoo models.

Every branch of a training-time block is a ``conv_bn``: an ``nn.Conv2d`` without
bias followed by an ``nn.BatchNorm2d``, kept as two named submodules
(``conv``, ``bn``) so the captured graph shows the plain ``conv2d`` →
``batch_norm`` pattern the fusers look for.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def scale_channels(channels: int, width: float, divisor: int = 4) -> int:
    """Scale a channel count by ``width``, rounded to a multiple of ``divisor`` (at least ``divisor``).

    Every base channel count in the zoo is a multiple of 4, so ``width=1.0``
    returns the published width unchanged.
    """
    if width == 1.0:
        return channels
    return max(divisor, int(channels * width + divisor / 2) // divisor * divisor)


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    bn_eps: float = 1e-5,
) -> nn.Sequential:
    """``Conv2d(bias=False)`` followed by ``BatchNorm2d``: one branch of a multi-branch block."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=False
            ),
            bn=nn.BatchNorm2d(out_channels, eps=bn_eps),
        )
    )


class ClassifierHead(nn.Module):
    """Global average pool, flatten, ``Linear``."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))
