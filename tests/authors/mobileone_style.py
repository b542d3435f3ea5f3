"""MobileOne block in the shape its authors write it (apple/ml-mobileone, ``mobileone.py``).

Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023. Branches:
``rbr_conv`` (a ModuleList of ``num_conv_branches`` over-parameterized kxk conv-BNs),
``rbr_scale`` (a 1x1 conv-BN, only when ``kernel_size > 1``) and ``rbr_skip`` (a bare BatchNorm of
the input when the block keeps its shape), each ``None`` when absent. ``forward`` starts from the
Python ints ``0`` for missing branches, ``out = scale_out + identity_out``, then adds the conv
branches with in-place ``out += ...``; ``se`` (``nn.Identity`` unless ``use_se``) and ReLU follow.

``reparameterize`` is the authors' conversion (after RepVGG's): the scale kernel zero-padded to kxk,
the skip BN as a kxk kernel with a 1 at the centre, all summed into ``reparam_conv``;
:func:`reparameterize_model` applies it to a deep copy of a model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SEBlock", "MobileOneBlock", "reparameterize_model"]


class SEBlock(nn.Module):
    """Squeeze and excite: global average pool, 1x1 reduce, ReLU, 1x1 expand, sigmoid, scale the input."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, int(in_channels * rd_ratio), kernel_size=1, stride=1, bias=True)
        self.expand = nn.Conv2d(int(in_channels * rd_ratio), in_channels, kernel_size=1, stride=1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        _, c, h, w = inputs.size()
        x = F.avg_pool2d(inputs, kernel_size=[h, w])
        x = torch.sigmoid(self.expand(F.relu(self.reduce(x))))
        return inputs * x.view(-1, c, 1, 1)


class MobileOneBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, inference_mode: bool = False, use_se: bool = False,
                 num_conv_branches: int = 1) -> None:
        super().__init__()
        self.inference_mode = inference_mode
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()

        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                          dilation=dilation, groups=groups, bias=True)
            return
        keeps_shape = out_channels == in_channels and stride == 1
        self.rbr_skip = nn.BatchNorm2d(in_channels) if keeps_shape else None
        self.rbr_conv = nn.ModuleList([self._conv_bn(kernel_size, padding) for _ in range(num_conv_branches)])
        self.rbr_scale = self._conv_bn(1, 0) if kernel_size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))

    def _conv_bn(self, kernel_size: int, padding: int) -> nn.Sequential:
        mod_list = nn.Sequential()
        mod_list.add_module("conv", nn.Conv2d(self.in_channels, self.out_channels, kernel_size, stride=self.stride,
                                              padding=padding, groups=self.groups, bias=False))
        mod_list.add_module("bn", nn.BatchNorm2d(self.out_channels))
        return mod_list

    # ---- the authors' conversion ----

    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        kernel, bias = self._get_kernel_bias()
        ref = self.rbr_conv[0].conv
        self.reparam_conv = nn.Conv2d(ref.in_channels, ref.out_channels, ref.kernel_size, stride=ref.stride,
                                      padding=ref.padding, dilation=ref.dilation, groups=ref.groups, bias=True)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        for para in self.parameters():
            para.detach_()
        for name in ("rbr_conv", "rbr_scale", "rbr_skip"):
            if hasattr(self, name):
                delattr(self, name)
        self.inference_mode = True

    def _get_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = 0, 0
        if self.rbr_scale is not None:
            k, b = self._fuse_bn_tensor(self.rbr_scale)
            pad = self.kernel_size // 2
            kernel, bias = kernel + F.pad(k, [pad, pad, pad, pad]), bias + b
        if self.rbr_skip is not None:
            k, b = self._fuse_bn_tensor(self.rbr_skip)
            kernel, bias = kernel + k, bias + b
        for branch in self.rbr_conv:
            k, b = self._fuse_bn_tensor(branch)
            kernel, bias = kernel + k, bias + b
        return kernel, bias

    def _fuse_bn_tensor(self, branch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(branch, nn.Sequential):
            kernel, bn = branch.conv.weight, branch.bn
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                per_group = self.in_channels // self.groups
                centre = self.kernel_size // 2
                eye = torch.zeros(self.in_channels, per_group, self.kernel_size, self.kernel_size,
                                  dtype=branch.weight.dtype, device=branch.weight.device)
                eye[torch.arange(self.in_channels), torch.arange(self.in_channels) % per_group, centre, centre] = 1
                self.id_tensor = eye
            kernel, bn = self.id_tensor, branch
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def reparameterize_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every block that has ``reparameterize`` converted."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return model
