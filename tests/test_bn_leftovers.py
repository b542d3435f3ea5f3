"""BatchNorms that no single neighbour absorbs: ``fold_bn_region`` folds the ones with an exact change of
coordinates around them, and every one left is listed with the op that blocks it.

Fixtures follow the authors' blocks: timm's CoAtNet ``MbConvBlock`` (pre-norm with an activation, the
shortcut an average pool and a 1x1 conv), ResNetV2's pre-activation basic block (BN -> ReLU on the residual
stream), and DenseNet's dense layer (BN -> ReLU on a concatenation every later layer reads).
"""

from __future__ import annotations

import torch
from torch import nn

from helpers import randomize_bn, reparam


def _bns(ops) -> int:
    return sum(v for k, v in ops.items() if "batch_norm" in k)


class MbConvFirst(nn.Module):
    """Stem conv, then a stride-2 MBConv whose shortcut average-pools and projects the stem's output and whose
    main path starts with BN -> SiLU (``pre_norm_act``)."""

    def __init__(self, c=8, out=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c, out, 1))
        self.pre_norm = nn.BatchNorm2d(c)
        self.down = nn.AvgPool2d(2, 2)
        self.conv1_1x1 = nn.Conv2d(c, out, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(out)

    def forward(self, x):
        x = self.stem(x)
        shortcut = self.shortcut(x)
        x = self.conv1_1x1(self.down(nn.functional.silu(self.pre_norm(x))))
        return nn.functional.silu(self.norm1(x)) + shortcut


def test_coatnet_pre_norm_beside_a_pooled_shortcut_folds():
    _, report, ops, err = reparam(MbConvFirst(), 2, 3, 8, 8)
    assert _bns(report.ops_before) == 2 and _bns(ops) == 0 and err <= 1e-5
    assert report.count("fold_bn_region") >= 1 and report.float64_error <= 1e-9


class PreActBasic(nn.Module):
    """ResNetV2: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``."""

    def __init__(self, c=8):
        super().__init__()
        self.norm1, self.norm2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))


class PreActNet(nn.Module):
    def __init__(self, c=8, negative=False):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.blocks = nn.Sequential(PreActBasic(c), PreActBasic(c))
        self.norm = nn.BatchNorm2d(c)
        self.negative = negative

    def forward(self, x):
        return torch.relu(self.norm(self.blocks(self.pool(self.stem(x)))))


def test_pre_activation_resnet_keeps_no_batchnorm():
    _, report, ops, err = reparam(PreActNet(), 2, 3, 12, 12)
    assert _bns(report.ops_before) == 5 and _bns(ops) == 0 and err <= 1e-5
    assert report.leftovers == []


def test_a_negative_scale_cannot_pass_a_relu_and_is_listed_with_the_reason():
    """``relu(a * v) = a * relu(v)`` only for ``a > 0``: a BN -> ReLU with a negative scale stays."""
    import fusers

    model = randomize_bn(PreActNet())
    with torch.no_grad():
        model.blocks[0].norm1.weight[0] = -1.0
    report = fusers.reparameterize(model, (torch.randn(2, 3, 12, 12),)).reparam_report
    assert report.float64_error <= 1e-9
    left = [x for x in report.leftovers if x.kind == "batchnorm"]
    assert [x.path for x in left] == ["blocks.0.norm1"] and "relu" in left[0].reason, report.summary()


class DenseLayer(nn.Module):
    """DenseNet: ``cat(features)`` -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv, appended to the features."""

    def __init__(self, cin, growth=4):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, c=8, layers=2, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(DenseLayer(c + i * growth, growth) for i in range(layers))

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


def test_dense_layer_pre_norms_stay_with_a_true_reason():
    """Each norm1's shift would have to pass a ReLU (its own, or the other layer's reading the same features):
    a ReLU passes a positive scale, never a shift. norm2 follows a conv that only it reads: it folds."""
    _, report, ops, err = reparam(DenseBlock(), 2, 3, 8, 8)
    assert _bns(report.ops_before) == 4 and _bns(ops) == 2 and err <= 1e-5
    left = [x for x in report.leftovers if x.kind == "batchnorm"]
    assert [x.path.rsplit(".", 1)[-1] for x in left] == ["norm1", "norm1"]
    assert all("passes a positive scale but not a shift" in x.reason for x in left)


# ------------------------------------------------------------------ the same cases in timm's own block code

def _timm_style(name):
    from authors import bn_leftovers_style as s

    return getattr(s, name)()


def test_timm_style_coatnet_keeps_only_stream_pre_norms_that_feed_silu():
    _, report, ops, err = reparam(_timm_style("CoAtNetLike"), 2, 3, 32, 32)
    assert err <= 1e-5 and _bns(ops) < _bns(report.ops_before)
    left = [x for x in report.leftovers if x.kind == "batchnorm"]
    assert all(x.path.endswith("pre_norm") and "silu" in x.reason for x in left), report.summary()
    assert "blocks.0.pre_norm" not in [x.path for x in left]  # beside the pooled shortcut: folded


def test_timm_style_resnetv2_and_mobilenetv4_keep_no_batchnorm():
    for name, shape in (("ResNetV2Like", (2, 3, 32, 32)), ("MobileNetV4Like", (2, 3, 32, 32))):
        _, report, ops, err = reparam(_timm_style(name), *shape)
        assert _bns(report.ops_before) > 0 and _bns(ops) == 0 and err <= 1e-5, (name, report.summary())


def test_timm_style_padded_reader_blocks_the_shift_and_says_so():
    _, report, ops, err = reparam(_timm_style("ConvFeedsPaddedConv"), 2, 3, 8, 8)
    (left,) = [x for x in report.leftovers if x.kind == "batchnorm"]
    assert err <= 1e-5 and left.path == "pre_norm" and left.reason.startswith("fold_bn_region:")
