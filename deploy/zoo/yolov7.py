"""YOLOv7-tiny with RepConv heads and an implicit-knowledge detect head, training-time form.

Wang et al., "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for
real-time object detectors", CVPR 2023; implicit layers from Wang et al.,
"You Only Learn One Representation" (YOLOR), 2021.

Characteristic blocks:

- ``RepConv``: ``act(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn(x)])``, the
  identity BN only when ``c1 == c2`` and stride 1 (RepVGG's block with YOLO's
  activation, LeakyReLU(0.1) or SiLU). Used for the three heads in front of
  the detector.
- ``IDetect``: per level ``x = ImplicitM(conv1x1(ImplicitA(x)))`` where
  ImplicitA adds a learned ``(1, C, 1, 1)`` tensor and ImplicitM multiplies by
  one; both fold into the 1×1 conv when deployed. In eval mode it decodes boxes
  against a grid built in ``forward`` from the (static) feature-map shape.

The rest is YOLOv7-tiny: conv-BN-LeakyReLU units, ELAN blocks (two 1×1
branches, two chained 3×3, concatenation, 1×1 merge), max-pool downsampling,
an SPPCSPC neck with max pools 5 / 9 / 13, and a top-down / bottom-up
path-aggregation neck over strides 8, 16, 32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._layers import ConvBNAct, activation, conv_bn, scale_channels

__all__ = ["ANCHORS", "Conv", "ELAN", "IDetect", "ImplicitA", "ImplicitM", "RepConv", "SPPCSPC", "YOLOv7Tiny", "yolov7_tiny_rep"]

ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
STRIDES = (8.0, 16.0, 32.0)


class Conv(ConvBNAct):
    """YOLO's basic unit ``act(bn(conv(x)))`` with 'same' padding and YOLO's BatchNorm settings."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, act: str = "leaky") -> None:
        super().__init__(c1, c2, k, s, act=act, eps=1e-3, momentum=0.03)


class RepConv(nn.Module):
    """``act(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn(x)])``."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, act: str = "leaky") -> None:
        super().__init__()
        self.dense = conv_bn(c1, c2, k, stride=s, padding=k // 2)
        self.one_by_one = conv_bn(c1, c2, 1, stride=s)
        self.identity = nn.BatchNorm2d(c1) if c1 == c2 and s == 1 else None
        self.act = activation(act)

    def forward(self, x):
        y = self.dense(x) + self.one_by_one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class ELAN(nn.Module):
    """Tiny ELAN: ``merge(cat(b4, b3, b2, b1))`` with ``b1, b2`` 1×1 of ``x``, ``b3 = 3×3(b2)``, ``b4 = 3×3(b3)``."""

    def __init__(self, c1: int, hidden: int, c2: int, act: str = "leaky") -> None:
        super().__init__()
        self.cv1 = Conv(c1, hidden, 1, act=act)
        self.cv2 = Conv(c1, hidden, 1, act=act)
        self.cv3 = Conv(hidden, hidden, 3, act=act)
        self.cv4 = Conv(hidden, hidden, 3, act=act)
        self.merge = Conv(4 * hidden, c2, 1, act=act)

    def forward(self, x):
        b1 = self.cv1(x)
        b2 = self.cv2(x)
        b3 = self.cv3(b2)
        b4 = self.cv4(b3)
        return self.merge(torch.cat((b4, b3, b2, b1), 1))


class SPPCSPC(nn.Module):
    """Tiny SPPCSPC: a cross-stage split, one side max-pooled at 5 / 9 / 13 and concatenated."""

    def __init__(self, c1: int, c2: int, act: str = "leaky") -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 1, act=act)
        self.cv2 = Conv(c1, c2, 1, act=act)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in (5, 9, 13))
        self.cv3 = Conv(4 * c2, c2, 1, act=act)
        self.cv4 = Conv(2 * c2, c2, 1, act=act)

    def forward(self, x):
        shortcut = self.cv1(x)
        y = self.cv2(x)
        pooled = [pool(y) for pool in self.pools]
        y = self.cv3(torch.cat((pooled[2], pooled[1], pooled[0], y), 1))
        return self.cv4(torch.cat((y, shortcut), 1))


class ImplicitA(nn.Module):
    """``implicit + x`` with a learned ``(1, C, 1, 1)`` tensor, initialised N(0, 0.02)."""

    def __init__(self, channels: int, mean: float = 0.0, std: float = 0.02) -> None:
        super().__init__()
        self.implicit = nn.Parameter(torch.zeros(1, channels, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    """``implicit * x`` with a learned ``(1, C, 1, 1)`` tensor, initialised N(1, 0.02)."""

    def __init__(self, channels: int, mean: float = 1.0, std: float = 0.02) -> None:
        super().__init__()
        self.implicit = nn.Parameter(torch.ones(1, channels, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x):
        return self.implicit * x


class IDetect(nn.Module):
    """Detection head with implicit layers; eval mode returns ``(boxes (bs, N, nc + 5), raw maps)``."""

    def __init__(
        self,
        nc: int,
        channels: tuple[int, ...],
        anchors: tuple[tuple[int, ...], ...] = ANCHORS,
        strides: tuple[float, ...] = STRIDES,
    ) -> None:
        super().__init__()
        if not len(channels) == len(anchors) == len(strides):
            raise ValueError(
                f"IDetect needs one anchor set and one stride per level: got {len(channels)} levels, "
                f"{len(anchors)} anchor sets, {len(strides)} strides"
            )
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.strides = tuple(float(s) for s in strides)
        self.register_buffer("anchor_grid", torch.tensor(anchors, dtype=torch.float32).view(self.nl, 1, self.na, 1, 1, 2))
        self.ia = nn.ModuleList(ImplicitA(c) for c in channels)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in channels)
        self._init_biases()

    @torch.no_grad()
    def _init_biases(self, image_size: int = 640) -> None:
        """Prior biases: about 8 objects per image, class probability ~0.6 / nc."""
        for conv, stride in zip(self.m, self.strides):
            b = conv.bias.view(self.na, self.no)
            b[:, 4] += math.log(8 / (image_size / stride) ** 2)
            b[:, 5:] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, xs: list[torch.Tensor]):
        z, maps = [], []
        for i in range(self.nl):
            x = self.im[i](self.m[i](self.ia[i](xs[i])))
            bs, _, ny, nx = x.shape
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            maps.append(x)
            if self.training:
                continue
            yv, xv = torch.meshgrid(
                torch.arange(ny, device=x.device), torch.arange(nx, device=x.device), indexing="ij"
            )
            grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float()
            y = x.sigmoid()
            xy = (y[..., 0:2] * 2.0 - 0.5 + grid) * self.strides[i]
            wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
            y = torch.cat((xy, wh, y[..., 4:]), -1)
            z.append(y.view(bs, -1, self.no))
        return maps if self.training else (torch.cat(z, 1), maps)


class YOLOv7Tiny(nn.Module):
    """YOLOv7-tiny backbone and neck, RepConv heads, ``IDetect``."""

    def __init__(self, nc: int = 80, width: float = 1.0, act: str = "leaky",
                 anchors: tuple[tuple[int, ...], ...] = ANCHORS) -> None:
        super().__init__()

        def c(channels: int) -> int:
            return scale_channels(channels, width)

        # Backbone: strides 2, 4 by conv, then 8, 16, 32 by max pool.
        self.stem1 = Conv(3, c(32), 3, 2, act=act)
        self.stem2 = Conv(c(32), c(64), 3, 2, act=act)
        self.elan1 = ELAN(c(64), c(32), c(64), act=act)
        self.down = nn.MaxPool2d(2, 2)
        self.elan2 = ELAN(c(64), c(64), c(128), act=act)  # P3 / 8
        self.elan3 = ELAN(c(128), c(128), c(256), act=act)  # P4 / 16
        self.elan4 = ELAN(c(256), c(256), c(512), act=act)  # P5 / 32
        # Neck, top-down.
        self.sppcspc = SPPCSPC(c(512), c(256), act=act)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.reduce5 = Conv(c(256), c(128), 1, act=act)
        self.lateral4 = Conv(c(256), c(128), 1, act=act)
        self.elan_td4 = ELAN(c(256), c(64), c(128), act=act)
        self.reduce4 = Conv(c(128), c(64), 1, act=act)
        self.lateral3 = Conv(c(128), c(64), 1, act=act)
        self.elan_out3 = ELAN(c(128), c(32), c(64), act=act)
        # Neck, bottom-up.
        self.down3 = Conv(c(64), c(128), 3, 2, act=act)
        self.elan_out4 = ELAN(c(256), c(64), c(128), act=act)
        self.down4 = Conv(c(128), c(256), 3, 2, act=act)
        self.elan_out5 = ELAN(c(512), c(128), c(256), act=act)
        # Heads.
        self.rep3 = RepConv(c(64), c(128), act=act)
        self.rep4 = RepConv(c(128), c(256), act=act)
        self.rep5 = RepConv(c(256), c(512), act=act)
        self.detect = IDetect(nc, (c(128), c(256), c(512)), anchors=anchors)

    def forward(self, x):
        x = self.elan1(self.stem2(self.stem1(x)))
        p3 = self.elan2(self.down(x))
        p4 = self.elan3(self.down(p3))
        p5 = self.sppcspc(self.elan4(self.down(p4)))

        t4 = self.elan_td4(torch.cat((self.lateral4(p4), self.up(self.reduce5(p5))), 1))
        o3 = self.elan_out3(torch.cat((self.lateral3(p3), self.up(self.reduce4(t4))), 1))
        o4 = self.elan_out4(torch.cat((self.down3(o3), t4), 1))
        o5 = self.elan_out5(torch.cat((self.down4(o4), p5), 1))
        return self.detect([self.rep3(o3), self.rep4(o4), self.rep5(o5)])


def yolov7_tiny_rep(num_classes: int = 80, width: float = 1.0, act: str = "leaky",
                    anchors: tuple[tuple[int, ...], ...] = ANCHORS) -> YOLOv7Tiny:
    """YOLOv7-tiny; ``anchors`` (pixels, three (w, h) pairs per level for strides 8, 16, 32) default to COCO's."""
    return YOLOv7Tiny(nc=num_classes, width=width, act=act, anchors=anchors)
