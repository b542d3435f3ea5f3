"""PANet neck (path aggregation) on a small residual backbone, training-time form.

Liu et al., "Path Aggregation Network for Instance Segmentation", CVPR 2018.

Characteristic block: the feature hierarchy gets two passes.

- FPN top-down: ``P5 = lat5(C5)``, ``P_i = lat_i(C_i) + up2(P_{i+1})`` (lateral 1×1 conv-BN, nearest
  upsampling, add), then a 3×3 conv-BN-ReLU smooths each ``P_i``.
- Bottom-up path augmentation: ``N3 = P3``, ``N_{i+1} = conv3x3(P_{i+1} + conv3x3_s2(N_i))``, which shortens
  the path from the fine, well-localized levels to the top of the pyramid.

Each ``N_i`` goes through a per-level 3×3 output conv-BN-ReLU and a 1×1 prediction conv (with bias) giving
``num_classes + 4`` channels; the model returns one map per level (strides 8, 16, 32). Adaptive feature
pooling and the mask branch (RoI-level parts) are not part of a dense deploy network and are left out.
"""

from __future__ import annotations

from torch import nn

from ._det_layers import ConvBNAct, ResidualBackbone, upsample_to
from ._layers import scale_channels

__all__ = ["PANet", "panet"]


class PANet(nn.Module):
    def __init__(self, num_classes: int = 80, width: float = 1.0, neck: int = 64,
                 widths: tuple[int, ...] = (64, 128, 256)) -> None:
        super().__init__()
        c = lambda ch: scale_channels(ch, width)  # noqa: E731
        self.backbone = ResidualBackbone((c(16), c(32)), tuple(c(w) for w in widths))
        n, levels = c(neck), len(widths)
        self.lateral = nn.ModuleList(ConvBNAct(ci, n, 1, act=None) for ci in self.backbone.out_channels)
        self.smooth = nn.ModuleList(ConvBNAct(n, n, 3) for _ in range(levels))
        self.down = nn.ModuleList(ConvBNAct(n, n, 3, 2) for _ in range(levels - 1))
        self.fuse = nn.ModuleList(ConvBNAct(n, n, 3) for _ in range(levels - 1))
        self.out = nn.ModuleList(ConvBNAct(n, n, 3) for _ in range(levels))
        self.pred = nn.ModuleList(nn.Conv2d(n, num_classes + 4, 1) for _ in range(levels))

    def forward(self, x):
        feats = self.backbone(x)
        p = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(p) - 2, -1, -1):  # top-down
            p[i] = p[i] + upsample_to(p[i + 1], p[i])
        p = [smooth(t) for smooth, t in zip(self.smooth, p)]
        n = [p[0]]
        for i in range(len(p) - 1):  # bottom-up path augmentation
            n.append(self.fuse[i](p[i + 1] + self.down[i](n[i])))
        return [pred(out(t)) for pred, out, t in zip(self.pred, self.out, n)]


def panet(num_classes: int = 80, width: float = 1.0) -> PANet:
    return PANet(num_classes=num_classes, width=width)
