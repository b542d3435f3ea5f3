"""Small models for the exporter and runtime tests (CPU, 32x32 inputs, non-trivial BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn

from deploy import zoo


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ConvNet(nn.Module):
    """Three conv+BN+ReLU layers and a linear classifier: (N, 3, 32, 32) -> (N, 10) logits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(3, 8), conv_bn_relu(8, 16, 2), conv_bn_relu(16, 16, 2))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class NestedNet(nn.Module):
    """Nested outputs: ``(logits, [features, {"pooled": ..., "peak": ...}])`` -> 4 leaves."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(3, 8), conv_bn_relu(8, 16, 2))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.body(x)
        pooled = y.mean((2, 3))
        return self.head(pooled), [y, {"pooled": pooled, "peak": y.amax((2, 3))}]


class PowHead(nn.Module):
    """A YOLO-style decode: 5-D tensor, ``(wh * 2) ** exponent * anchors`` (batch baked into a view)."""

    def __init__(self, exponent=2):
        super().__init__()
        self.exponent = exponent
        self.conv = nn.Conv2d(3, 18, 1)
        self.register_buffer("anchors", torch.rand(1, 3, 1, 1, 2, generator=torch.Generator().manual_seed(1)) * 10)

    def forward(self, x):
        b, _, ny, nx = x.shape
        y = self.conv(x).view(b, 3, 6, ny, nx).permute(0, 1, 3, 4, 2).contiguous().sigmoid()
        wh = (y[..., 2:4] * 2) ** self.exponent * self.anchors
        return torch.cat((y[..., :2], wh, y[..., 4:]), -1).view(b, -1, 6)


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"convnet": ConvNet, "nested": NestedNet, "conv": lambda: nn.Conv2d(3, 4, 3, padding=1),
             "pow": PowHead}[name]()
    return zoo.randomize_batchnorm(model, seed).eval()


def capture(model: nn.Module, *args) -> torch.fx.GraphModule:
    """What the compiler hands the exporters: ``torch.export.export(..., strict=False).module()``."""
    return torch.export.export(model.eval(), args, strict=False).module()


def example(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
