"""GiraffeDet: a light space-to-depth backbone and a heavy generalized-FPN (GFPN) neck, training-time form.

Jiang et al., "GiraffeDet: A Heavy-Neck Paradigm for Object Detection", ICLR 2022.

- Backbone ("S2D chain"): a stride-2 3×3 conv-BN-SiLU stem, then stages of space-to-depth
  (``pixel_unshuffle(x, 2)``: every 2×2 block becomes 4 channels, no information is lost) followed by a
  1×1 conv-BN-SiLU. Strides 2, 4, 8, 16, 32; the last three feed the neck.
- Neck (GFPN): ``depth`` layers of nodes, one node per level per layer. Layer 0 is the backbone features
  projected by 1×1 units. *Queen fusion*: node ``(k, i)`` concatenates the same-level nodes of earlier
  layers, the finer level ``i - 1`` of layer ``k - 1`` max-pooled by 2 and the coarser level ``i + 1`` of
  layer ``k - 1`` upsampled by 2 (nearest), then applies a 1×1 and a 3×3 conv-BN-SiLU. *Skip-layer
  connections*: with ``skip="log2n"`` the same-level inputs are layers ``k - 2^j`` (``j = 0, 1, ...``), with
  ``skip="dense"`` all earlier layers.

The last layer's nodes each get a 1×1 prediction conv (``num_classes + 4`` channels); one map per level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._det_layers import ConvBNAct, stage_outputs, upsample_to
from ._layers import scale_channels

__all__ = ["GiraffeDet", "SpaceToDepthStage", "giraffedet", "skip_sources"]


def skip_sources(k: int, skip: str) -> list[int]:
    """Earlier layers whose same-level node feeds layer ``k`` (layer 0 is the backbone)."""
    if skip == "dense":
        return list(range(k))
    if skip == "log2n":
        return sorted({k - 2**j for j in range(k.bit_length()) if k - 2**j >= 0})
    raise ValueError(f"unknown GFPN skip connection {skip!r}; expected 'log2n' or 'dense'")


class SpaceToDepthStage(nn.Module):
    """``act(bn(conv1x1(pixel_unshuffle(x, 2))))``: halves the resolution without discarding pixels."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.unit = ConvBNAct(4 * c1, c2, 1, act="silu")

    def forward(self, x):
        return self.unit(F.pixel_unshuffle(x, 2))


class GiraffeDet(nn.Module):
    def __init__(self, num_classes: int = 80, width: float = 1.0, backbone: tuple[int, ...] = (16, 24, 32, 48, 64),
                 neck: tuple[int, ...] = (32, 48, 64), depth: int = 3, skip: str = "log2n") -> None:
        super().__init__()
        c = lambda ch: scale_channels(ch, width)  # noqa: E731
        bb, nk = [c(w) for w in backbone], [c(w) for w in neck]
        self.stem = ConvBNAct(3, bb[0], 3, 2, act="silu")
        self.stages = nn.ModuleList(SpaceToDepthStage(a, b) for a, b in zip(bb, bb[1:]))
        levels = len(nk)
        self.inputs = nn.ModuleList(ConvBNAct(ci, co, 1, act="silu") for ci, co in zip(bb[-levels:], nk))
        self.sources = [skip_sources(k, skip) for k in range(1, depth + 1)]
        nodes = []
        for src in self.sources:
            layer = nn.ModuleList()
            for i in range(levels):
                cin = len(src) * nk[i] + (nk[i - 1] if i > 0 else 0) + (nk[i + 1] if i + 1 < levels else 0)
                layer.append(nn.Sequential(ConvBNAct(cin, nk[i], 1, act="silu"),
                                           ConvBNAct(nk[i], nk[i], 3, act="silu")))
            nodes.append(layer)
        self.nodes = nn.ModuleList(nodes)
        self.pred = nn.ModuleList(nn.Conv2d(ch, num_classes + 4, 1) for ch in nk)

    def forward(self, x):
        feats = stage_outputs(self.stem(x), self.stages)
        layers = [[unit(f) for unit, f in zip(self.inputs, feats[-len(self.inputs):])]]
        for src, layer in zip(self.sources, self.nodes):  # queen fusion with skip-layer connections
            prev, out = layers[-1], []
            for i, node in enumerate(layer):
                parts = [layers[k][i] for k in src]
                if i > 0:
                    parts.append(F.max_pool2d(prev[i - 1], 2))
                if i + 1 < len(layer):
                    parts.append(upsample_to(prev[i + 1], prev[i]))
                out.append(node(torch.cat(parts, 1)))
            layers.append(out)
        return [pred(t) for pred, t in zip(self.pred, layers[-1])]


def giraffedet(num_classes: int = 80, width: float = 1.0, depth: int = 3, skip: str = "log2n") -> GiraffeDet:
    return GiraffeDet(num_classes=num_classes, width=width, depth=depth, skip=skip)
