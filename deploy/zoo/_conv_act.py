"""Conv-BN-activation unit shared by the plain-network zoo entries (ELAN/CSP, GhostNet, ShuffleNet, ...).

``conv_bn_act`` is ``_layers.ConvBNAct`` in the argument order these entries use (groups before
the activation, which is a module class such as ``nn.ReLU``, or ``None`` for a linear unit).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._layers import ConvBNAct

__all__ = ["channel_shuffle", "conv_bn_act"]


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[], nn.Module] | None = nn.ReLU,
) -> ConvBNAct:
    """``act(bn(conv(x)))`` with padding ``kernel_size // 2``; ``act=None`` leaves the unit linear."""
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, groups=groups, act=act)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view ``(N, g, C/g, H, W)``, swap the two channel axes, flatten back.

    Channel ``i·(C/g) + j`` (group ``i``, index ``j``) moves to ``j·g + i``, so every group of the
    next grouped conv sees channels from every group of the previous one.
    """
    n, channels, h, w = x.shape
    return x.view(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)
