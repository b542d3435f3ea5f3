"""Diverse Branch Block on a small ResNet, training-time form.

Ding et al., "Diverse Branch Block: Building a Convolution as an
Inception-like Unit", CVPR 2021.

Characteristic block (``DiverseBranchBlock``), replacing every k×k conv-BN::

    y = bn(convKxK(x))                                        # (a)
      + bn(conv1x1(x))                                        # (b)
      + bn(convKxK_pad0(bn_and_pad(conv1x1(x))))              # (c)
      + bn(avgpoolKxK_pad0(bn_and_pad(conv1x1(x))))           # (d)

``BNAndPad`` applies a BatchNorm and then pads by ``k // 2`` with the value the
BN gives a zero input, ``beta - mean·gamma/sqrt(var + eps)``, instead of zero.
That makes (c) and (d) exactly a single k×k conv: the padded border then holds
the 1×1 conv's folded bias, just as it would had the bias been applied before
a zero-padded k×k conv. The k×k conv and the average pool themselves use
padding 0 and the block's stride.

``zero_pad=True`` builds the naive variant: plain BN after the 1×1 and zero
padding in the k×k conv / average pool (``count_include_pad=True``). It is
*not* exactly mergeable (the border sees zero where it should see the BN
bias) and serves as a negative case.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import conv_bn
from .resnet import SmallResNet

__all__ = ["BNAndPad", "DiverseBranchBlock", "dbb_resnet"]


class BNAndPad(nn.Module):
    """BatchNorm, then pad each side by ``pad`` with the BN's response to a zero input."""

    def __init__(self, channels: int, pad: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps)
        self.pad = pad

    def forward(self, x):
        bn = self.bn
        y = bn(x)
        if self.pad == 0:
            return y
        v = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        return F.pad(y - v, [self.pad] * 4) + v


class DiverseBranchBlock(nn.Module):
    """Four-branch DBB: k×k, 1×1, 1×1→k×k and 1×1→avg-pool, each ending in BN, summed."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        zero_pad: bool = False,
    ) -> None:
        super().__init__()
        k, p = kernel_size, kernel_size // 2
        self.zero_pad = zero_pad
        self.kxk = conv_bn(in_channels, out_channels, k, stride=stride, padding=p)
        self.one_by_one = conv_bn(in_channels, out_channels, 1, stride=stride)
        mid = in_channels
        if zero_pad:
            pad_bn_mid, pad_bn_out, inner_pad = nn.BatchNorm2d(mid), nn.BatchNorm2d(out_channels), p
        else:
            pad_bn_mid, pad_bn_out, inner_pad = BNAndPad(mid, p), BNAndPad(out_channels, p), 0
        self.one_by_one_kxk = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, mid, 1, bias=False),
                bn1=pad_bn_mid,
                conv2=nn.Conv2d(mid, out_channels, k, stride=stride, padding=inner_pad, bias=False),
                bn2=nn.BatchNorm2d(out_channels),
            )
        )
        self.one_by_one_avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                bn1=pad_bn_out,
                avg=nn.AvgPool2d(k, stride=stride, padding=inner_pad, count_include_pad=True),
                bn2=nn.BatchNorm2d(out_channels),
            )
        )

    def forward(self, x):
        return self.kxk(x) + self.one_by_one(x) + self.one_by_one_kxk(x) + self.one_by_one_avg(x)


def dbb_resnet(
    num_classes: int = 1000,
    width: float = 1.0,
    widths: tuple[int, ...] = (32, 64, 128),
    depths: tuple[int, ...] = (2, 2, 2),
    zero_pad: bool = False,
) -> SmallResNet:
    def unit(in_channels: int, out_channels: int, stride: int) -> DiverseBranchBlock:
        return DiverseBranchBlock(in_channels, out_channels, stride, zero_pad=zero_pad)

    return SmallResNet(unit, widths, depths, num_classes, width)
