import torch
import torch.nn.functional as F
from torch import nn

from fusers import RefusalCode
from helpers import reparam


class BNAndPad(nn.Module):
    """BatchNorm, then pad with the value the BN gives a zero input (DBB)."""

    def __init__(self, c, pad):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(c), pad

    def forward(self, x):
        bn = self.bn
        v = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        return F.pad(bn(x) - v, [self.pad] * 4) + v


class Sequence(nn.Module):
    def __init__(self, c=6, groups=1, second="conv", zero_pad=False, mid=None):
        super().__init__()
        mid = mid or c
        self.first = nn.Conv2d(c, mid, 1, groups=groups, bias=False)
        self.pad = nn.BatchNorm2d(mid) if zero_pad else BNAndPad(mid, 1)
        if second == "conv":
            self.second = nn.Conv2d(mid, c, 3, padding=1 if zero_pad else 0, groups=groups, bias=False)
        else:
            self.second = nn.AvgPool2d(3, 1, 0)
        self.bn = nn.BatchNorm2d(c if second == "conv" else mid)

    def forward(self, x):
        return self.bn(self.second(self.pad(self.first(x))))


def test_dbb_1x1_bnpad_kxk_becomes_one_conv():
    deploy, report, ops, err = reparam(Sequence(), 2, 6, 8, 8)
    assert ops == {"conv2d": 1} and report.count("merge_sequence") == 1 and err <= 1e-5


def test_grouped_sequence():
    deploy, report, ops, err = reparam(Sequence(groups=2), 2, 6, 8, 8)
    assert ops == {"conv2d": 1} and err <= 1e-5


class AvgBranchSum(nn.Module):
    """DBB's 1x1 -> BN-and-pad -> avg-pool -> BN branch beside a 3x3 conv branch."""

    def __init__(self):
        super().__init__()
        self.seq = Sequence(second="avg")
        self.conv = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))

    def forward(self, x):
        return self.seq(x) + self.conv(x)


def test_dbb_1x1_bnpad_avgpool_branch_merges_into_the_sum():
    deploy, report, ops, err = reparam(AvgBranchSum(), 2, 6, 8, 8)
    assert ops == {"conv2d": 1} and err <= 1e-5


def test_lone_1x1_avgpool_sequence_is_kept_for_cost():
    deploy, report, ops, err = reparam(Sequence(second="avg"), 2, 6, 8, 8)
    assert ops["avg_pool2d"] == 1 and err <= 1e-5
    assert ("merge_sequence", RefusalCode.WOULD_GROW) in [(r.pass_name, r.code) for r in report.refusals()]


def test_zero_padded_sequence_is_refused():
    deploy, report, ops, err = reparam(Sequence(zero_pad=True), 2, 6, 8, 8)
    assert ops["conv2d"] == 2 and err <= 1e-5
    assert [(r.pass_name, r.code) for r in report.refusals()] == [("merge_sequence", RefusalCode.ZERO_PAD_WITH_BIAS)]


def test_bottleneck_sequence_is_not_merged():
    model = nn.Sequential(nn.Conv2d(16, 2, 1, bias=False), nn.Conv2d(2, 16, 3, padding=1))
    deploy, report, ops, err = reparam(model, 1, 16, 6, 6)
    assert ops["conv2d"] == 2 and err <= 1e-5
    assert [(r.pass_name, r.code) for r in report.refusals()] == [("merge_sequence", RefusalCode.WOULD_GROW)]


def test_bottleneck_sequence_merges_in_the_grow_pass_set():
    """``default+grow`` (measured by ``deploy tune``) merges what the default keeps for cost."""
    from deploy.ranking import PASS_SETS

    model = nn.Sequential(nn.Conv2d(16, 2, 1, bias=False), nn.Conv2d(2, 16, 3, padding=1))
    deploy, report, ops, err = reparam(model, 1, 16, 6, 6, passes=PASS_SETS["default+grow"])
    assert ops == {"conv2d": 1} and err <= 1e-5 and not report.refusals()
    (w,) = [p for p in deploy.parameters() if p.dim() == 4]
    assert tuple(w.shape) == (16, 16, 3, 3)


def test_merged_1x1_kernels_keep_row_major_strides_so_outputs_stay_nchw():
    """MobileNetV3's linear bottleneck: a 1x1 projection (no activation) feeds the next block's 1x1 expansion.
    The composed kernel comes out of a matrix product with transposed strides (``(72, 16, 1, 1)`` strided
    ``(16, 1, 16, 16)``, channels-last); a conv with it returns channels-last outputs, which the ONNX exporter
    turns into ``as_strided`` after a global pool (``Gather``, which ncnn cannot express)."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1))
    deploy, report, ops, err = reparam(model, 1, 8, 5, 5)
    assert ops == {"conv2d": 1, "relu": 1, "adaptive_avg_pool2d": 1} and report.count("merge_sequence") == 1
    for name, t in deploy.state_dict().items():
        assert t.stride() == torch.empty(t.shape).stride(), name
    with torch.no_grad():
        assert deploy(torch.randn(1, 8, 5, 5)).is_contiguous()
