"""Conv-BN-activation unit shared by the plain-network zoo entries (ELAN/CSP, GhostNet, ShuffleNet, ...).

``conv_bn_act`` is ``_layers.conv_bn`` with 'same' padding and an activation appended, kept as
three named submodules (``conv``, ``bn``, ``act``) so the captured graph shows the
``conv2d`` → ``batch_norm`` → activation pattern that ``fold_bn`` folds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["channel_shuffle", "conv_bn_act"]


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[], nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """``act(bn(conv(x)))`` with padding ``kernel_size // 2``; ``act=None`` leaves the unit linear."""
    layers = OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(out_channels),
    )
    if act is not None:
        layers["act"] = act()
    return nn.Sequential(layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view ``(N, g, C/g, H, W)``, swap the two channel axes, flatten back.

    Channel ``i·(C/g) + j`` (group ``i``, index ``j``) moves to ``j·g + i``, so every group of the
    next grouped conv sees channels from every group of the previous one.
    """
    n, channels, h, w = x.shape
    return x.view(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)
