"""BatchNorms that no single neighbour absorbs: ``fold_bn_region`` folds the ones with an exact change of
coordinates around them, and every one left is listed with the op that blocks it.

Fixtures follow the authors' blocks: timm's CoAtNet ``MbConvBlock`` (pre-norm with an activation, the
shortcut an average pool and a 1x1 conv), ResNetV2's pre-activation basic block (BN -> ReLU on the residual
stream), and DenseNet's dense layer (BN -> ReLU on a concatenation every later layer reads). The second half
runs whole timm-style models (tests/authors/bn_leftovers_style.py: CoAtNet, ResNetV2, DenseNet, Lambda,
MobileNetV4) and checks each count, which BatchNorms stay, and both halves of their reasons, with negative
cases (a padded reader, zero padding averaged in, a zero scale, a negative scale behind a max pool).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusers
from authors import bn_leftovers_style as timm_style
from fusers.graph import op_counts
from fusers.numerics import max_rel_error
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


# ------------------------------------------------------------------ per model family: counts, reasons, negatives
# (timm-style fixtures from tests/authors/bn_leftovers_style.py; leftover reasons checked part by part)

def run(model, *shape, tweak=None):
    """Reparameterize ``model`` (random BN statistics, then ``tweak(model)``); return (report, BN count, leftovers
    by module path, float32 error)."""
    model = randomize_bn(model)
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    x = torch.randn(*shape)
    deploy = fusers.reparameterize(model, (x,))
    report = deploy.reparam_report
    assert report.float64_error <= 1e-9, report.summary()
    with torch.no_grad():
        err = max_rel_error(model(x), deploy(x))
    assert err <= 1e-5, report.summary()
    ops = op_counts(deploy)
    assert ops == report.ops_after
    left = {x.path: x.reason for x in report.leftovers if x.kind == "batchnorm"}
    return report, ops.get("batch_norm", 0), left, err


def both_ways(reason: str) -> tuple[str, str]:
    """The two halves of a leftover BatchNorm's reason: why not back, why not forward."""
    assert reason.startswith("fold_bn_region: BatchNorm not folded: not movable back ("), reason
    back, forward = reason.split(") or forward (")
    return back, forward


# ----------------------------------------------------------------------------------------------- CoAtNet
@pytest.mark.parametrize("pool_type", ["avg2", "avg"])
def test_coatnet_first_pre_norm_folds_into_the_stem_conv_its_pooled_shortcut_also_reads(pool_type):
    report, bns, left, _ = run(timm_style.CoAtNetLike(pool_type=pool_type), 2, 3, 16, 16)
    assert report.ops_before["batch_norm"] == 10 and bns == 2 and report.count("fold_bn_region") == 1
    assert sorted(left) == ["blocks.1.pre_norm", "blocks.2.pre_norm"]  # the stream now feeds SiLU unnormalised
    for path, reason in left.items():
        back, forward = both_ways(reason)
        assert "(silu) reads" in back and back.endswith("and is nonlinear")
        assert "(silu) reads" in forward and forward.endswith("and is nonlinear)")


def test_coatnet_shortcut_with_an_expand_conv_ends_the_region_each_stream_folds_one():
    report, bns, left, _ = run(timm_style.CoAtNetLike(8, 12), 2, 3, 16, 16)
    assert bns == 1 and report.count("fold_bn_region") == 2 and list(left) == ["blocks.2.pre_norm"]


def test_coatnet_shortcut_averaging_in_zero_padding_passes_no_shift():
    """``AvgPool2d(3, 2, 1)`` counts padded zeros: ``avg(a*v + c) != a*avg(v) + c`` at the border."""
    report, bns, left, _ = run(timm_style.CoAtNetLike(depth=1, pool_type="avg_pad"), 2, 3, 16, 16)
    assert bns == 1 and report.count("fold_bn_region") == 0
    back, forward = both_ways(left["blocks.0.pre_norm"])
    assert "its shift would reach avg_pool2d" in back and "which averages in zero padding" in back
    assert "(silu) reads" in forward
    report, bns, left, _ = run(timm_style.CoAtNetLike(depth=1, pool_type="avg"), 2, 3, 16, 16)  # padding not counted
    assert bns == 0 and report.count("fold_bn_region") == 1


def test_a_padded_conv_reading_the_conv_takes_no_shift():
    report, bns, left, _ = run(timm_style.ConvFeedsPaddedConv(), 2, 3, 8, 8)
    assert bns == 1 and report.count("fold_bn_region") == 0
    back, forward = both_ways(left["pre_norm"])
    assert "its shift would reach conv2d" in back and "which zero-pads its input conv2d" in back
    assert "(silu) reads" in forward


def test_a_zero_batchnorm_scale_is_not_undone():
    def zero(model):
        model.blocks[0].pre_norm.weight[3] = 0.0

    report, bns, left, _ = run(timm_style.CoAtNetLike(depth=1), 2, 3, 16, 16, tweak=zero)
    assert bns == 1 and report.count("fold_bn_region") == 0
    assert "its scale is 0.0e+00 in channel 3, under 1e-06 of its largest" in left["blocks.0.pre_norm"]


# ----------------------------------------------------------------------------------------------- ResNetV2
def test_resnetv2_pre_activation_batchnorms_all_fold_through_relu_and_max_pool():
    """conv -> max pool -> BN -> ReLU, and BN -> ReLU on the residual stream: the stream carries each change,
    ReLU and max pooling pass positive scales, the convs ending the branches take the shifts."""
    report, bns, left, _ = run(timm_style.ResNetV2Like(), 2, 3, 32, 32)
    assert report.ops_before["batch_norm"] == 9 and bns == 0 and left == {}
    assert report.count("fold_bn_region") >= 4 and report.leftovers == []


def test_resnetv2_stem_batchnorm_with_a_negative_scale_stays_behind_the_max_pool():
    def negative(model):
        model.stages[0].norm1.weight[1] = -0.7

    report, bns, left, _ = run(timm_style.ResNetV2Like(), 2, 3, 32, 32, tweak=negative)
    assert bns == 1 and list(left) == ["stages.0.norm1"]
    back, forward = both_ways(left["stages.0.norm1"])
    assert "(max_pool2d) passes only positive scales and 1 channel(s) would need a negative one" in back
    assert "(relu) passes only positive scales" in forward


# ----------------------------------------------------------------------------------------------- DenseNet
def test_densenet_concat_batchnorms_fold_once_per_block_where_the_first_part_is_a_conv():
    """A BN on ``cat(parts)`` moves into the parts' producers only if every other reader of a part can take the
    change: after one fold a part feeds ReLU, which passes a scale but not the next BN's shift."""
    report, bns, left, _ = run(timm_style.DenseNetLike(), 2, 3, 32, 32)
    assert report.ops_before["batch_norm"] == 15 and bns == 7 and report.count("fold_bn_region") == 1
    assert "features.denseblock2.denselayer1.norm1" not in left  # its only part: the transition's pooled conv
    assert sorted(left) == sorted(["features.denseblock1.denselayer1.norm1", "features.denseblock1.denselayer2.norm1",
                                   "features.denseblock1.denselayer3.norm1", "features.transition1.norm",
                                   "features.denseblock2.denselayer2.norm1", "features.denseblock2.denselayer3.norm1",
                                   "features.norm5"])
    for reason in left.values():
        back, forward = both_ways(reason)
        assert "its shift would reach relu" in back and back.endswith("which passes a positive scale but not a shift")
        assert "its shift would reach relu" in forward


# ----------------------------------------------------------------------------------------------- Lambda
def test_lambda_q_and_v_batchnorms_fold_into_their_slices_of_the_qkv_conv():
    report, bns, left, _ = run(timm_style.LambdaBottleneck(), 2, 8, 6, 6)
    assert report.ops_before["batch_norm"] == 5 and bns == 1 and report.count("fold_bn_region") == 2
    back, forward = both_ways(left["post_attn"])
    assert "is computed by reshape, which moves data across the channel dim" in back  # heads x V -> channels
    assert "its shift would reach relu" in forward


# ----------------------------------------------------------------------------------------------- MobileNetV4
def test_mobilenetv4_attention_norms_before_padded_depthwise_convs_fold_into_the_stream():
    """The norm feeds a 1x1 query and zero-padded depthwise key / value convs: the stream takes its scale (zero
    padding passes a scale) and each UIR's last conv takes the shift so that no padded conv sees one."""
    report, bns, left, _ = run(timm_style.MobileNetV4Like(), 2, 3, 16, 16)
    assert report.ops_before["batch_norm"] == 16 and bns == 0 and left == {}
    assert report.count("fold_bn_region") == 2


def test_the_pass_runs_alone_and_says_nothing_it_cannot_prove():
    """``fold_bn_region`` is an ordinary pass: alone it also folds a conv -> BN, and refuses nothing itself
    (``fold_bn`` refuses each BatchNorm once; the left-unfused list carries this pass's reason)."""
    model = randomize_bn(timm_style.ConvFeedsPaddedConv())
    deploy = fusers.reparameterize(model, (torch.randn(2, 3, 8, 8),), passes=["fold_bn_region"])
    report = deploy.reparam_report
    assert report.count("fold_bn_region") == 0 and report.refusals() == []
    assert [x.reason.split(":")[0] for x in report.leftovers] == ["fold_bn_region"]
    model = randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    deploy = fusers.reparameterize(model, (torch.randn(2, 3, 8, 8),), passes=["fold_bn_region"])
    assert "batch_norm" not in op_counts(deploy) and deploy.reparam_report.float64_error <= 1e-9
