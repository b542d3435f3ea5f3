"""Diverse Branch Block in the shape its authors write it (DingXiaoH/DiverseBranchBlock).

Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit", CVPR 2021.
The forward code keeps what makes the original awkward for a graph matcher:

* ``BNAndPadLayer`` runs its BatchNorm, zero-pads with ``F.pad`` and then *overwrites the four border
  strips in place* (``out[:, :, 0:p, :] = v`` ...) with the value the BN gives a zero input,
  ``v = beta - mean * gamma / sqrt(var + eps)``, read from ``.detach()``-ed parameters;
* ``IdentityBasedConv1x1`` adds a constant identity tensor (a plain attribute, not a buffer) to its
  weight inside ``forward`` and calls ``F.conv2d`` itself;
* the branches are summed with in-place ``out += ...``;
* branch layout: ``dbb_origin`` (kxk conv-BN), ``dbb_1x1`` (1x1 conv-BN, only when ``groups <
  out_channels``), ``dbb_avg`` (1x1 conv -> BN-and-pad -> kxk average pool -> BN when ``groups <
  out_channels``, else a zero-padded average pool -> BN), ``dbb_1x1_kxk`` (identity-based 1x1 or a
  widening 1x1 -> BN-and-pad -> kxk conv -> BN, with ``in_channels`` internal channels when
  ``groups < out_channels`` and twice that otherwise).

``switch_to_deploy`` is the authors' conversion: every branch folded to a kxk (kernel, bias), the
sequential ones composed per group, all summed into ``dbb_reparam``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_bn", "IdentityBasedConv1x1", "BNAndPadLayer", "DiverseBranchBlock", "fuse_bn", "compose_1x1_kxk",
           "avg_kernel", "widen_kernel"]


# ---- the authors' conversion math (dbb_transforms.py), in our words --------------------------------------


def fuse_bn(kernel: torch.Tensor, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel followed by an eval BatchNorm, as one (kernel, bias)."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def compose_1x1_kxk(k1, b1, k2, b2, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grouped 1x1 conv ``(k1, b1)`` then a grouped kxk conv ``(k2, b2)`` with the same groups, as one kxk conv.

    Per group ``g``: ``K[o, i] = sum_m k2[o, m] * k1[m, i]`` and ``b[o] = b2[o] + sum_{m,h,w} k2[o, m, h, w] * b1[m]``
    (``b1`` is what the border holds, which is why DBB pads with the BN's response to zero).
    """
    mid, in_per_group = k1.shape[0], k1.shape[1]
    out, k_h, k_w = k2.shape[0], k2.shape[2], k2.shape[3]
    first = k1.reshape(groups, mid // groups, in_per_group)
    second = k2.reshape(groups, out // groups, mid // groups, k_h, k_w)
    kernel = torch.einsum("gomhw,gmi->goihw", second, first).reshape(out, in_per_group, k_h, k_w)
    bias = torch.einsum("gomhw,gm->go", second, b1.reshape(groups, mid // groups)).reshape(out)
    return kernel, bias + b2


def avg_kernel(channels: int, kernel_size: int, groups: int) -> torch.Tensor:
    """A kxk average pool as a grouped conv kernel: ``1 / k^2`` from each channel to itself."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size)
    kernel[torch.arange(channels), torch.arange(channels) % per_group] = 1.0 / kernel_size ** 2
    return kernel


def widen_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """A small centred kernel zero-padded to ``size x size``."""
    dh, dw = (size - kernel.shape[2]) // 2, (size - kernel.shape[3]) // 2
    return F.pad(kernel, [dw, dw, dh, dh])


# ---- the layers, in the authors' forward-code shape ----------------------------------------------------


def conv_bn(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    """A bias-free conv and its BatchNorm in a Sequential whose children are named ``conv`` and ``bn``."""
    block = nn.Sequential()
    block.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                       dilation=dilation, groups=groups, bias=False))
    block.add_module("bn", nn.BatchNorm2d(out_channels))
    return block


class IdentityBasedConv1x1(nn.Conv2d):
    """A square grouped 1x1 conv whose effective kernel is ``weight + I`` (the weight starts at zero)."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        assert channels % groups == 0
        per_group = channels // groups
        eye = torch.zeros(channels, per_group, 1, 1)
        eye[torch.arange(channels), torch.arange(channels) % per_group] = 1.0
        self.id_tensor = eye.type_as(self.weight)  # a plain tensor attribute, as upstream: not a buffer
        nn.init.zeros_(self.weight)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)

    def get_actual_kernel(self):
        return self.weight + self.id_tensor.to(self.weight.device)


class BNAndPadLayer(nn.Module):
    """BatchNorm, then pad by ``pad_pixels`` and write the BN's zero response into the border, in place."""

    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        p = self.pad_pixels
        if p > 0:
            inv_std = 1.0 / torch.sqrt(self.bn.running_var + self.bn.eps)
            if self.bn.affine:
                fill = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() * inv_std
            else:
                fill = -self.bn.running_mean * inv_std
            output = F.pad(output, [p] * 4)
            fill = fill.view(1, -1, 1, 1)
            output[:, :, 0:p, :] = fill
            output[:, :, -p:, :] = fill
            output[:, :, :, 0:p] = fill
            output[:, :, :, -p:] = fill
        return output

    # the conversion reads the layer as if it were the BN itself
    @property
    def weight(self):
        return self.bn.weight

    @property
    def bias(self):
        return self.bn.bias

    @property
    def running_mean(self):
        return self.bn.running_mean

    @property
    def running_var(self):
        return self.bn.running_var

    @property
    def eps(self):
        return self.bn.eps


class DiverseBranchBlock(nn.Module):
    """The four-branch DBB (``deploy=False``) or its single converted conv ``dbb_reparam``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 internal_channels_1x1_3x3=None, deploy=False, nonlinear=None):
        super().__init__()
        self.deploy = deploy
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size = kernel_size
        self.out_channels = out_channels
        self.groups = groups
        assert padding == kernel_size // 2

        if deploy:
            self.dbb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                         dilation=dilation, groups=groups, bias=True)
            return

        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                  dilation=dilation, groups=groups)

        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0,
                                                      groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride=stride, padding=0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))

        if internal_channels_1x1_3x3 is None:  # the authors widen the depthwise case (MobileNet) to 2x
            internal_channels_1x1_3x3 = in_channels if groups < out_channels else 2 * in_channels
        mid = internal_channels_1x1_3x3
        self.dbb_1x1_kxk = nn.Sequential()
        if mid == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups=groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, mid, 1, stride=1, padding=0, groups=groups,
                                                           bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=mid, affine=True))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(mid, out_channels, kernel_size, stride=stride, padding=0,
                                                       groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs):
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    # ---- the authors' conversion ----

    def get_equivalent_kernel_bias(self):
        k = self.kernel_size
        branches = [fuse_bn(self.dbb_origin.conv.weight, self.dbb_origin.bn)]

        if hasattr(self, "dbb_1x1"):
            kernel, bias = fuse_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            branches.append((widen_kernel(kernel, k), bias))

        seq = self.dbb_1x1_kxk
        first = seq.idconv1.get_actual_kernel() if hasattr(seq, "idconv1") else seq.conv1.weight
        k1, b1 = fuse_bn(first, seq.bn1)
        k2, b2 = fuse_bn(seq.conv2.weight, seq.bn2)
        branches.append(compose_1x1_kxk(k1, b1, k2, b2, self.groups))

        pool = avg_kernel(self.out_channels, k, self.groups).to(self.dbb_avg.avgbn.weight.device)
        k2, b2 = fuse_bn(pool, self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, "conv"):
            k1, b1 = fuse_bn(self.dbb_avg.conv.weight, self.dbb_avg.bn)
            k2, b2 = compose_1x1_kxk(k1, b1, k2, b2, self.groups)
        branches.append((k2, b2))
        return sum(kb[0] for kb in branches), sum(kb[1] for kb in branches)

    def switch_to_deploy(self):
        if hasattr(self, "dbb_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        origin = self.dbb_origin.conv
        self.dbb_reparam = nn.Conv2d(origin.in_channels, origin.out_channels, origin.kernel_size, stride=origin.stride,
                                     padding=origin.padding, dilation=origin.dilation, groups=origin.groups, bias=True)
        self.dbb_reparam.weight.data = kernel
        self.dbb_reparam.bias.data = bias
        for para in self.parameters():
            para.detach_()
        for name in ("dbb_origin", "dbb_avg", "dbb_1x1", "dbb_1x1_kxk"):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True
