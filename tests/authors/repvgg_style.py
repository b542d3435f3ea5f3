"""RepVGG block in the shape its authors write it (DingXiaoH/RepVGG, ``repvgg.py``).

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021. Branches ``rbr_dense``
(3x3 conv-BN in a Sequential named ``conv``/``bn``), ``rbr_1x1`` (1x1 conv-BN, padding
``padding - kernel_size // 2``) and ``rbr_identity`` (a bare BatchNorm of the input, only when the
block keeps its shape; otherwise the attribute is ``None`` and ``forward`` adds the Python int ``0``).
The sum goes through ``self.se`` (``nn.Identity`` here) and ``self.nonlinearity`` (ReLU).

``get_equivalent_kernel_bias`` / ``switch_to_deploy`` are the authors' conversion: the 1x1 kernel
zero-padded to 3x3, the identity BN read as a 3x3 kernel with a 1 at the centre (cached in
``self.id_tensor``), all summed into ``rbr_reparam``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_bn", "RepVGGBlock"]


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                        groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros", deploy=False):
        super().__init__()
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels
        assert kernel_size == 3 and padding == 1
        padding_11 = padding - kernel_size // 2
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()

        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                         dilation=dilation, groups=groups, bias=True, padding_mode=padding_mode)
            return
        keeps_shape = out_channels == in_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(in_channels) if keeps_shape else None
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, padding_11, groups=groups)

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    # ---- the authors' conversion ----

    def get_equivalent_kernel_bias(self):
        k3, b3 = self._fuse_bn_tensor(self.rbr_dense)
        k1, b1 = self._fuse_bn_tensor(self.rbr_1x1)
        kid, bid = self._fuse_bn_tensor(self.rbr_identity)
        return k3 + self._pad_1x1_to_3x3_tensor(k1) + kid, b3 + b1 + bid

    @staticmethod
    def _pad_1x1_to_3x3_tensor(kernel1x1):
        return 0 if kernel1x1 is None else F.pad(kernel1x1, [1, 1, 1, 1])

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, nn.Sequential):
            kernel, bn = branch.conv.weight, branch.bn
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                per_group = self.in_channels // self.groups
                eye = torch.zeros(self.in_channels, per_group, 3, 3, dtype=branch.weight.dtype,
                                  device=branch.weight.device)
                eye[torch.arange(self.in_channels), torch.arange(self.in_channels) % per_group, 1, 1] = 1
                self.id_tensor = eye
            kernel, bn = self.id_tensor, branch
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    def switch_to_deploy(self):
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        dense = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(dense.in_channels, dense.out_channels, dense.kernel_size, stride=dense.stride,
                                     padding=dense.padding, dilation=dense.dilation, groups=dense.groups, bias=True)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = bias
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "id_tensor"):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True
