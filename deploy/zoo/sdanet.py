"""SDA-Net (selective depth attention), training-time form.

Guo et al., "SDA-xNet: Selective Depth Attention Networks for Adaptive Multi-scale Feature
Representation", 2022.

Characteristic stage (``SDAStage``): a trunk of residual blocks (``resnet.BasicBlock`` of conv-BN
units) whose outputs ``Y_1..Y_n`` share the stage's resolution but have growing receptive fields
(depths), and an SE/SK-like attention branch that weighs them per channel with a softmax over
DEPTH::

    U = Y_1 + ... + Y_n;   z = relu(bn(conv1x1(gap(U))))
    a = softmax_over_i(conv1x1(z) reshaped to (N, n, C, 1, 1))
    out = sum_i a_i * Y_i

The attention is data dependent (a product of two activations), so it stays in the deploy graph
as ``softmax`` and ``mul``; only the BatchNorms fold.

Default network: stem 3×3 stride 2 (32), three SDA stages of widths 32, 64, 128 with two basic
residual blocks each (strides 1, 2, 2 on the first block), attention reduction 4 (at least 8
channels); classifier head.
"""

from __future__ import annotations

from torch import nn

from ._conv_act import conv_bn_act
from ._layers import ClassifierHead, conv_bn, scale_channels
from .resnet import BasicBlock

__all__ = ["SDANet", "SDAStage", "sdanet"]


def _conv3x3_bn(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return conv_bn(in_channels, out_channels, 3, stride=stride, padding=1)


class SDAStage(nn.Module):
    """``sum_i softmax_i(attention(gap(sum_j Y_j)))_i * Y_i`` over the block outputs ``Y_i`` of the stage."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 2, stride: int = 1, reduction: int = 4,
                 min_hidden: int = 8) -> None:
        super().__init__()
        self.depth, self.out_channels = depth, out_channels
        self.blocks = nn.ModuleList(
            BasicBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, _conv3x3_bn)
            for i in range(depth)
        )
        hidden = max(min_hidden, out_channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = conv_bn_act(out_channels, hidden, 1)
        self.select = nn.Conv2d(hidden, depth * out_channels, 1)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        total = outs[0]
        for y in outs[1:]:
            total = total + y
        logits = self.select(self.squeeze(self.pool(total)))
        weights = self.softmax(logits.view(logits.shape[0], self.depth, self.out_channels, 1, 1))
        out = outs[0] * weights[:, 0]
        for i in range(1, self.depth):
            out = out + outs[i] * weights[:, i]
        return out


class SDANet(nn.Module):
    """Stem, ``SDAStage`` s, classifier head."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), depths: tuple[int, ...] = (2, 2, 2), stem: int = 32,
                 num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        c = scale_channels(stem, width)
        self.stem = conv_bn_act(3, c, 3, 2)
        stages = []
        for i, (w, depth) in enumerate(zip(widths, depths)):
            w = scale_channels(w, width)
            stages.append(SDAStage(c, w, depth, stride=1 if i == 0 else 2))
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(c, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def sdanet(num_classes: int = 1000, width: float = 1.0) -> SDANet:
    return SDANet(num_classes=num_classes, width=width)
