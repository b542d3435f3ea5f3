"""ThreshNet, training-time form.

Ju et al., "Threshnet: An Efficient DenseNet Using Threshold Mechanism to Reduce Connections",
arXiv 2201.03013, 2022.

Characteristic block (``ThreshBlock``): DenseNet-style layers (3×3 conv-BN-ReLU, ``growth``
channels each) whose input concatenates only some earlier layers, chosen by a threshold rule
(a HarDNet-like harmonic pattern capped by the threshold ``T``). With layer 0 the block input
and ``y_k`` the output of layer ``k``::

    links(k) = [k - 2^i  for i = 0, 1, ...  while 2^i <= k and 2^i <= T]
    y_k = relu(bn(conv3x3(cat(y_j for j in links(k)))))

so a layer sees at most ``floor(log2 T) + 1`` earlier outputs instead of DenseNet's all ``k``.
The block outputs the concatenation of its odd-numbered layers and its last layer (the layers
no later layer reads with its nearest link, as in HarDNet). A transition unit (1×1 conv-BN-ReLU
then 2×2 average pooling) follows each block but the last.

Default network: stem 3×3 stride 2 (24); three blocks of 4 layers with growth 12, 16, 24 and
threshold 4; transitions to 32 and 64 channels; a 1×1 unit to 128; classifier head.
"""

from __future__ import annotations

import torch
from torch import nn

from ._conv_act import conv_bn_act
from ._layers import ClassifierHead, scale_channels

__all__ = ["ThreshBlock", "ThreshNet", "threshnet", "threshold_links"]


def threshold_links(k: int, threshold: int) -> list[int]:
    """Indices of the earlier outputs layer ``k`` (1-based, 0 = block input) concatenates."""
    links, step = [], 1
    while step <= k and step <= threshold:
        links.append(k - step)
        step *= 2
    return links


class ThreshBlock(nn.Module):
    """Layers ``y_k = unit(cat(y_j for j in threshold_links(k)))``; output ``cat`` of odd and last layers."""

    def __init__(self, in_channels: int, growth: int, num_layers: int = 4, threshold: int = 4) -> None:
        super().__init__()
        widths = [in_channels] + [growth] * num_layers
        self.links = [threshold_links(k, threshold) for k in range(1, num_layers + 1)]
        self.layers = nn.ModuleList(conv_bn_act(sum(widths[j] for j in links), growth, 3) for links in self.links)
        self.outputs = [k for k in range(1, num_layers + 1) if k % 2 == 1 or k == num_layers]
        self.out_channels = growth * len(self.outputs)

    def forward(self, x):
        ys = [x]
        for links, layer in zip(self.links, self.layers):
            inputs = [ys[j] for j in links]
            ys.append(layer(inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)))
        return torch.cat([ys[k] for k in self.outputs], 1)


class ThreshNet(nn.Module):
    """Stem, ``ThreshBlock`` s separated by transition units (1×1 unit + 2×2 average pool), 1×1 unit, head."""

    def __init__(self, growths: tuple[int, ...] = (12, 16, 24), transitions: tuple[int, ...] = (32, 64),
                 num_layers: int = 4, threshold: int = 4, stem: int = 24, last: int = 128,
                 num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        if len(transitions) != len(growths) - 1:
            raise ValueError(f"ThreshNet needs one transition between consecutive blocks, got {len(growths)} blocks "
                             f"and {len(transitions)} transitions")
        c = scale_channels(stem, width)
        self.stem = conv_bn_act(3, c, 3, 2)
        body = []
        for i, g in enumerate(growths):
            block = ThreshBlock(c, scale_channels(g, width), num_layers, threshold)
            body.append(block)
            c = block.out_channels
            if i < len(transitions):
                t = scale_channels(transitions[i], width)
                body += [conv_bn_act(c, t, 1), nn.AvgPool2d(2)]
                c = t
        self.body = nn.Sequential(*body)
        last = scale_channels(last, width)
        self.last = conv_bn_act(c, last, 1)
        self.head = ClassifierHead(last, num_classes)

    def forward(self, x):
        return self.head(self.last(self.body(self.stem(x))))


def threshnet(num_classes: int = 1000, width: float = 1.0, threshold: int = 4) -> ThreshNet:
    return ThreshNet(threshold=threshold, num_classes=num_classes, width=width)
