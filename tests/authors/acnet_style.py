"""Asymmetric Convolution Block in the shape its authors write it (DingXiaoH/ACNet, ``acnet/acb.py``).

Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric Convolution
Blocks", ICCV 2019. Three conv-BN branches summed: ``square_conv``/``square_bn`` (kxk),
``ver_conv``/``ver_bn`` (kx1) and ``hor_conv``/``hor_bn`` (1xk), each with separate module attributes.

The asymmetric convs get per-side paddings chosen so their sliding windows line up with the square
one's centre row and column. When ``padding < kernel_size // 2`` the alignment needs a *negative*
padding, which the authors do by cropping the input in ``forward`` (``input[:, :, :, c:-c]`` for the
vertical branch, ``input[:, :, c:-c, :]`` for the horizontal one): a slice in front of a conv.

``switch_to_deploy`` is the authors' conversion: each branch's BN folded into its kernel, the
asymmetric kernels added into the centre row / column of the square kernel in place, one ``fused_conv``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["ACBlock"]


class ACBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros", deploy=False, use_affine=True):
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.fused_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride=stride,
                                        padding=padding, dilation=dilation, groups=groups, bias=True,
                                        padding_mode=padding_mode)
            return

        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride=stride,
                                     padding=padding, dilation=dilation, groups=groups, bias=False,
                                     padding_mode=padding_mode)
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)

        centre = kernel_size // 2
        if padding >= centre:
            # usual case (k=3, p=1): the short side of each asymmetric conv is padded less by the centre offset
            self.crop = 0
            hor_padding = [padding - centre, padding]
            ver_padding = [padding, padding - centre]
        else:
            # the offset would be a negative padding: crop the input in forward instead
            self.crop = centre - padding
            hor_padding = [0, padding]
            ver_padding = [padding, 0]

        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride=stride, padding=ver_padding,
                                  dilation=dilation, groups=groups, bias=False, padding_mode=padding_mode)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride=stride, padding=hor_padding,
                                  dilation=dilation, groups=groups, bias=False, padding_mode=padding_mode)
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)

    def forward(self, input):
        if self.deploy:
            return self.fused_conv(input)
        square_outputs = self.square_conv(input)
        square_outputs = self.square_bn(square_outputs)
        if self.crop > 0:
            ver_input = input[:, :, :, self.crop:-self.crop]
            hor_input = input[:, :, self.crop:-self.crop, :]
        else:
            ver_input = input
            hor_input = input
        vertical_outputs = self.ver_conv(ver_input)
        vertical_outputs = self.ver_bn(vertical_outputs)
        horizontal_outputs = self.hor_conv(hor_input)
        horizontal_outputs = self.hor_bn(horizontal_outputs)
        result = square_outputs + vertical_outputs + horizontal_outputs
        return result

    # ---- the authors' conversion ----

    @staticmethod
    def _fuse_bn_tensor(conv, bn):
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    @staticmethod
    def _add_to_square_kernel(square_kernel, asym_kernel):
        """Add a kx1 or 1xk kernel into the centre column or row of a kxk kernel, in place."""
        ah, aw = asym_kernel.shape[2], asym_kernel.shape[3]
        top = square_kernel.shape[2] // 2 - ah // 2
        left = square_kernel.shape[3] // 2 - aw // 2
        square_kernel[:, :, top:top + ah, left:left + aw] += asym_kernel

    def get_equivalent_kernel_bias(self):
        hor_k, hor_b = self._fuse_bn_tensor(self.hor_conv, self.hor_bn)
        ver_k, ver_b = self._fuse_bn_tensor(self.ver_conv, self.ver_bn)
        square_k, square_b = self._fuse_bn_tensor(self.square_conv, self.square_bn)
        self._add_to_square_kernel(square_k, hor_k)
        self._add_to_square_kernel(square_k, ver_k)
        return square_k, hor_b + ver_b + square_b

    def switch_to_deploy(self):
        kernel, bias = self.get_equivalent_kernel_bias()
        self.deploy = True
        sq = self.square_conv
        self.fused_conv = nn.Conv2d(sq.in_channels, sq.out_channels, sq.kernel_size, stride=sq.stride,
                                    padding=sq.padding, dilation=sq.dilation, groups=sq.groups, bias=True,
                                    padding_mode=sq.padding_mode)
        for name in ("square_conv", "square_bn", "hor_conv", "hor_bn", "ver_conv", "ver_bn"):
            delattr(self, name)
        self.fused_conv.weight.data = kernel
        self.fused_conv.bias.data = bias
