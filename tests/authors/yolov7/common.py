"""YOLOv7's blocks as its authors write them (WongKinYiu/yolov7 ``models/common.py``; ``make_divisible`` from
``utils/general.py``, ``fuse_conv_and_bn`` and ``initialize_weights`` from ``utils/torch_utils.py``, kept here
so that the package is two files).

What their forward code does that a graph matcher has to live with:

* ``Conv``: ``act(bn(conv(x)))`` with a bias-free conv; ``fuseforward`` is ``act(conv(x))``, used once
  ``Model.fuse`` has replaced ``conv`` by ``fuse_conv_and_bn`` (the BN scale as a diagonal matrix times the
  flattened kernel) and deleted ``bn``.
* ``RepConv``: ``rbr_dense`` (3x3 conv-BN Sequential), ``rbr_1x1`` (1x1 conv-BN), ``rbr_identity`` (a bare
  BatchNorm, only when ``c1 == c2`` and stride 1, else ``None`` and ``forward`` adds the int ``0``);
  ``fuse_repvgg_block`` folds each branch, turns the identity BN into a 1x1 conv with a unit diagonal, pads the
  1x1 kernels to 3x3, sums into ``rbr_dense`` and renames it ``rbr_reparam``.
* ``ImplicitA`` / ``ImplicitM`` (YOLOR): ``implicit + x`` and ``implicit * x``, a ``(1, C, 1, 1)`` parameter.
* ``MP`` (stride-2 max pool), ``SP`` (stride-1 'same' max pool), ``Concat`` (a list in, ``torch.cat`` out).
* ``ReOrg``: the W6/E6 stem, space-to-depth by four strided slices ``x[..., r::2, c::2]`` concatenated on
  channels.
* ``DownC``: the E6/D6 downsampler, ``cat(cv2(cv1(x)), cv3(maxpool(x)))`` (a strided 3x3 conv beside a pool).
* ``SPPCSPC``: CSP around an SPP: ``cv4(cv3(cv1(x)))`` pooled at 5 / 9 / 13 (stride 1) and concatenated with
  itself, ``cv6(cv5(.))``, concatenated with the shortcut ``cv2(x)``, merged by ``cv7``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["autopad", "make_divisible", "fuse_conv_and_bn", "initialize_weights", "MP", "SP", "ReOrg", "Concat",
           "Conv", "DownC", "SPPCSPC", "ImplicitA", "ImplicitM", "RepConv"]


def autopad(k, p=None):
    """'same' padding for an odd kernel unless ``p`` is given."""
    if p is None:
        p = k // 2 if isinstance(k, int) else [side // 2 for side in k]
    return p


def make_divisible(x, divisor):
    """The smallest multiple of ``divisor`` not below ``x`` (channel counts after ``width_multiple``)."""
    return math.ceil(x / divisor) * divisor


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new biased conv computing ``bn(conv(x))``: the BN scale as a diagonal matrix times the flattened
    kernel, the conv bias through the same matrix plus the BN shift."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, groups=conv.groups, bias=True).requires_grad_(False)
    scale = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    flat = conv.weight.clone().view(conv.out_channels, -1)
    fused.weight.copy_(torch.mm(scale, flat).view(fused.weight.shape))
    conv_bias = conv.bias if conv.bias is not None else torch.zeros(conv.weight.size(0))
    shift = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fused.bias.copy_(torch.mm(scale, conv_bias.reshape(-1, 1)).reshape(-1) + shift)
    return fused


def initialize_weights(model: nn.Module) -> None:
    """BatchNorm ``eps`` 1e-3 and momentum 0.03, activations in place (what the repository does to every model)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6):
            m.inplace = True


class MP(nn.Module):
    def __init__(self, k=2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x):
        return self.m(x)


class SP(nn.Module):
    def __init__(self, k=3, s=1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x):
        return self.m(x)


class ReOrg(nn.Module):
    """Space to depth: (b, c, h, w) -> (b, 4c, h/2, w/2), the four phases of the 2x2 grid on channels in the
    order (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)."""

    def forward(self, x):
        return torch.cat([x[..., row::2, col::2] for col in (0, 1) for row in (0, 1)], 1)


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Conv(nn.Module):
    """conv (no bias) -> bn -> act; ``act=True`` means SiLU, a module is used as given."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def fuseforward(self, x):
        return self.act(self.conv(x))


class DownC(nn.Module):
    """Halve the resolution twice over and concatenate: a 1x1 then a strided 3x3 conv, beside a max pool then
    a 1x1 conv, each giving half of ``c2``."""

    def __init__(self, c1, c2, n=1, k=2):
        super().__init__()
        hidden = int(c1)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden, c2 // 2, 3, k)
        self.cv3 = Conv(c1, c2 // 2, 1, 1)
        self.mp = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x):
        return torch.cat((self.cv2(self.cv1(x)), self.cv3(self.mp(x))), dim=1)


class SPPCSPC(nn.Module):
    """Cross-stage-partial SPP: the pooled path (1x1, 3x3, 1x1, max pools of ``k`` concatenated with their
    input, 1x1, 3x3) and a 1x1 shortcut path, concatenated and merged by a 1x1 conv."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5, k=(5, 9, 13)):
        super().__init__()
        hidden = int(2 * c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(hidden, hidden, 3, 1)
        self.cv4 = Conv(hidden, hidden, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=size, stride=1, padding=size // 2) for size in k])
        self.cv5 = Conv(4 * hidden, hidden, 1, 1)
        self.cv6 = Conv(hidden, hidden, 3, 1)
        self.cv7 = Conv(2 * hidden, c2, 1, 1)

    def forward(self, x):
        pooled = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([pooled] + [pool(pooled) for pool in self.m], 1)))
        y2 = self.cv2(x)
        return self.cv7(torch.cat((y1, y2), dim=1))


class ImplicitA(nn.Module):
    def __init__(self, channel, mean=0.0, std=0.02):
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    def __init__(self, channel, mean=1.0, std=0.02):
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)

    def forward(self, x):
        return self.implicit * x


class RepConv(nn.Module):
    """RepVGG's block with YOLO's activation; ``rbr_reparam`` after ``fuse_repvgg_block``."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False):
        super().__init__()
        assert k == 3 and autopad(k, p) == 1
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2
        pad_1x1 = autopad(k, p) - k // 2
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(num_features=c1) if c2 == c1 and s == 1 else None
            self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False),
                                           nn.BatchNorm2d(num_features=c2))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, pad_1x1, groups=g, bias=False),
                                         nn.BatchNorm2d(num_features=c2))

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    def fuse_conv_bn(self, conv, bn):
        """A new biased conv with the same geometry as ``conv`` computing ``bn(conv(x))``."""
        std = (bn.running_var + bn.eps).sqrt()
        shift = bn.bias - bn.running_mean * bn.weight / std
        kernel = conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                          padding_mode=conv.padding_mode)
        fused.weight = nn.Parameter(kernel)
        fused.bias = nn.Parameter(shift)
        return fused

    def fuse_repvgg_block(self):
        if self.deploy:
            return
        self.rbr_dense = self.fuse_conv_bn(self.rbr_dense[0], self.rbr_dense[1])
        self.rbr_1x1 = self.fuse_conv_bn(self.rbr_1x1[0], self.rbr_1x1[1])
        bias_1x1 = self.rbr_1x1.bias
        kernel_1x1 = nn.functional.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if isinstance(self.rbr_identity, nn.BatchNorm2d):
            # the identity as a 1x1 conv with ones on the diagonal, then folded with the identity BN
            unit = nn.Conv2d(self.in_channels, self.out_channels, kernel_size=1, stride=1, padding=0,
                             groups=self.groups, bias=False)
            unit.weight.data = unit.weight.data.squeeze().squeeze()
            unit.weight.data.fill_(0.0)
            unit.weight.data.fill_diagonal_(1.0)
            unit.weight.data = unit.weight.data.unsqueeze(2).unsqueeze(3)
            unit = self.fuse_conv_bn(unit, self.rbr_identity)
            bias_id = unit.bias
            kernel_id = nn.functional.pad(unit.weight, [1, 1, 1, 1])
        else:
            bias_id = nn.Parameter(torch.zeros_like(bias_1x1))
            kernel_id = nn.Parameter(torch.zeros_like(kernel_1x1))
        self.rbr_dense.weight = nn.Parameter(self.rbr_dense.weight + kernel_1x1 + kernel_id)
        self.rbr_dense.bias = nn.Parameter(self.rbr_dense.bias + bias_1x1 + bias_id)
        self.rbr_reparam = self.rbr_dense
        self.deploy = True
        if self.rbr_identity is not None:
            del self.rbr_identity
            self.rbr_identity = None
        if self.rbr_1x1 is not None:
            del self.rbr_1x1
            self.rbr_1x1 = None
