"""Small-object detector: YOLOv3-style network with a dilated feature-fusion module and attention, training-time form.

From the paper on small-object detection "based on feature fusion and dilated convolution" (a YOLOv3
baseline; dilated convolutions widen the receptive field at every scale, a multi-scale fusion module and
an attention mechanism keep the shallow small-object features and filter noise).

- Backbone: Darknet-style, conv-BN-LeakyReLU(0.1) units; each stage is a stride-2 3×3 unit followed by
  residual units ``x + conv3x3(conv1x1(x))``. Outputs at strides 8, 16 and 32.
- ``DilatedFusion``: parallel 3×3 conv-BN-LeakyReLU branches with dilation 1, 2 and 3 (padding equal to the
  dilation), concatenated with the input and merged by a 1×1 unit. The branches pass through their own
  activations, so the compiler must keep three separate dilated convolutions.
- ``Attention``: CBAM-style channel attention (a shared two-layer 1×1 MLP on the average- and max-pooled
  features, summed, sigmoid) followed by spatial attention (channel mean and max, 7×7 conv, sigmoid).
- Neck and heads as in YOLOv3: the deepest map goes through fusion + attention, is reduced, upsampled and
  concatenated with the next finer backbone map, and so on; each scale ends in a 3×3 unit and a 1×1
  prediction conv with ``3 * (5 + num_classes)`` channels. Returns ``scales`` maps, coarsest first.
"""

from __future__ import annotations

import torch
from torch import nn

from ._det_layers import ConvBNAct, stage_outputs, upsample_to
from ._layers import scale_channels

__all__ = ["Attention", "DarknetResidual", "DilatedFusion", "SmallObjectYOLO", "small_object_det"]


class DarknetResidual(nn.Module):
    """``x + conv3x3(conv1x1(x))`` with a half-width bottleneck."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(c, c // 2, 1, act="leaky")
        self.cv2 = ConvBNAct(c // 2, c, 3, act="leaky")

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class DilatedFusion(nn.Module):
    """``merge(cat(x, b1(x), b2(x), b3(x)))``, ``b_d`` a 3×3 unit with dilation ``d``."""

    def __init__(self, c: int, dilations: tuple[int, ...] = (1, 2, 3)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(ConvBNAct(c, c // 2, 3, d=d, act="leaky") for d in dilations)
        self.merge = ConvBNAct(c + len(dilations) * (c // 2), c, 1, act="leaky")

    def forward(self, x):
        return self.merge(torch.cat([x, *(b(x) for b in self.branches)], 1))


class Attention(nn.Module):
    """CBAM: ``x * sigmoid(mlp(avg(x)) + mlp(max(x)))``, then ``* sigmoid(conv7x7(cat(mean_c, max_c)))``."""

    def __init__(self, c: int, reduction: int = 4, spatial: bool = True) -> None:
        super().__init__()
        hidden = max(c // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, c, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3) if spatial else None

    def forward(self, x):
        gate = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(gate)
        if self.spatial is not None:
            maps = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)
            x = x * torch.sigmoid(self.spatial(maps))
        return x


class SmallObjectYOLO(nn.Module):
    def __init__(self, num_classes: int = 80, width: float = 1.0, widths: tuple[int, ...] = (16, 32, 64, 128, 256),
                 depths: tuple[int, ...] = (1, 1, 1, 1, 1), scales: int = 3) -> None:
        super().__init__()
        if not 2 <= scales <= 3:
            raise ValueError(f"small_object_det predicts at 2 or 3 scales, got scales={scales}")
        c = lambda ch: scale_channels(ch, width)  # noqa: E731
        w = [c(ch) for ch in widths]
        self.stem = ConvBNAct(3, c(16), 3, act="leaky")
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBNAct(cin, cout, 3, 2, act="leaky"), *(DarknetResidual(cout) for _ in range(n)))
            for cin, cout, n in zip([c(16), *w[:-1]], w, depths))
        outs = w[-scales:][::-1]  # coarsest first
        self.fusion = nn.ModuleList(DilatedFusion(ch) for ch in outs)
        self.attention = nn.ModuleList(Attention(ch) for ch in outs)
        self.reduce = nn.ModuleList(ConvBNAct(a, b, 1, act="leaky") for a, b in zip(outs, outs[1:]))
        self.lateral = nn.ModuleList(ConvBNAct(2 * b, b, 1, act="leaky") for b in outs[1:])
        self.head = nn.ModuleList(ConvBNAct(ch, ch, 3, act="leaky") for ch in outs)
        self.pred = nn.ModuleList(nn.Conv2d(ch, 3 * (5 + num_classes), 1) for ch in outs)
        self.scales = scales

    def forward(self, x):
        feats = stage_outputs(self.stem(x), self.stages)
        feats = feats[-self.scales:][::-1]
        maps, y = [], None
        for i, f in enumerate(feats):
            if y is not None:  # fuse the deeper semantics into the shallower map
                f = self.lateral[i - 1](torch.cat((f, upsample_to(self.reduce[i - 1](y), f)), 1))
            y = self.attention[i](self.fusion[i](f))
            maps.append(self.pred[i](self.head[i](y)))
        return maps


def small_object_det(num_classes: int = 80, width: float = 1.0, scales: int = 3) -> SmallObjectYOLO:
    return SmallObjectYOLO(num_classes=num_classes, width=width, scales=scales)
