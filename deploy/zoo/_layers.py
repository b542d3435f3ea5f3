"""Small building blocks shared by the zoo models.

Every branch of a training-time block is a ``conv_bn``: an ``nn.Conv2d`` without
bias followed by an ``nn.BatchNorm2d``, kept as two named submodules
(``conv``, ``bn``) so the captured graph shows the plain ``conv2d`` →
``batch_norm`` pattern the fusers look for. ``ConvBNAct`` is the plain
networks' unit: the same two submodules with 'same' padding and an ``act``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "silu": nn.SiLU, "gelu": nn.GELU,
                None: nn.Identity}


def activation(act: str | Callable[[], nn.Module] | None) -> nn.Module:
    """``"relu"``, ``"leaky"`` (slope 0.1), ``"silu"``, ``"gelu"``, a module factory such as ``nn.Hardswish``,
    or ``None`` for the identity."""
    if callable(act):
        return act()
    if act not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(k for k in _ACTIVATIONS if k)}, a "
                         "module class, or None")
    return _ACTIVATIONS[act]()


class ConvBNAct(nn.Module):
    """``act(bn(conv(x)))``, 'same' padding for any dilation (``dilation * (k // 2)``), no conv bias."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, groups: int = 1,
                 act: str | Callable[[], nn.Module] | None = "relu", eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, d * (k // 2), dilation=d, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=eps, momentum=momentum)
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


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
