import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusers import RefusalCode
from helpers import reparam


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Sum(nn.Module):
    """relu(sum of branches(x)) with an optional BN after the sum."""

    def __init__(self, *branches, identity=False, post_bn=None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity
        self.post = post_bn or nn.Identity()

    def forward(self, x):
        y = sum(b(x) for b in self.branches)
        if self.identity:
            y = y + x
        return F.relu(self.post(y))


@pytest.mark.parametrize("groups", [1, 2])
def test_repvgg_block_becomes_one_conv(groups):
    block = Sum(conv_bn(8, 8, 3, 1, 1, groups), conv_bn(8, 8, 1, groups=groups), nn.BatchNorm2d(8))
    deploy, report, ops, err = reparam(block, 2, 8, 10, 10)
    assert ops == {"conv2d": 1, "relu": 1}
    assert err <= 1e-5


def test_acnet_block_with_bn_after_sum():
    block = Sum(conv_bn(6, 8, 3, 2, 1), conv_bn(6, 8, (1, 3), 2, (0, 1)), conv_bn(6, 8, (3, 1), 2, (1, 0)),
                post_bn=nn.BatchNorm2d(8))
    deploy, report, ops, err = reparam(block, 2, 6, 11, 11)
    assert ops == {"conv2d": 1, "relu": 1} and err <= 1e-5
    (w,) = [p for p in deploy.parameters() if p.dim() == 4]
    assert tuple(w.shape) == (8, 6, 3, 3)


def test_mobileone_depthwise_k4_with_scale_and_identity():
    c = 8
    block = Sum(*[conv_bn(c, c, 3, 1, 1, c) for _ in range(4)], conv_bn(c, c, 1, groups=c), nn.BatchNorm2d(c))
    deploy, report, ops, err = reparam(block, 1, c, 9, 9)
    assert ops == {"conv2d": 1, "relu": 1} and err <= 1e-5
    (w,) = [p for p in deploy.parameters() if p.dim() == 4]
    assert tuple(w.shape) == (c, 1, 3, 3)


def test_avgpool_and_5x5_and_bare_identity():
    block = Sum(conv_bn(4, 4, 5, 1, 2), nn.AvgPool2d(3, 1, 1), conv_bn(4, 4, 1), identity=True)
    deploy, report, ops, err = reparam(block, 2, 4, 8, 8)
    assert ops == {"conv2d": 1, "relu": 1} and err <= 1e-5


class Scaled(nn.Module):
    """LayerScale, ImplicitM and FastViT's RepMixer ``x + gamma * (mixer(x) - norm(x))``."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.mixer = conv_bn(c, c, 3, 1, 1, c)
        self.norm = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.m = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)

    def forward(self, x):
        x = x + self.gamma * (self.mixer(x) - self.norm(x))
        return (self.m * self.conv(x)).relu()


def test_layerscale_implicit_and_repmixer():
    deploy, report, ops, err = reparam(Scaled(), 2, 6, 7, 7)
    assert ops == {"conv2d": 2, "relu": 1} and err <= 1e-5


class Residual(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 3, 1, 1), conv_bn(c, c, 3, 1, 1)

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + x)


def test_residual_from_another_input_is_left_alone():
    deploy, report, ops, err = reparam(Residual(), 1, 4, 6, 6)
    assert ops == {"add": 1, "conv2d": 2, "relu": 2} and err <= 1e-5


class Nonlinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, 1, 1), conv_bn(4, 4, 1)

    def forward(self, x):
        return F.relu(self.a(x)) + self.b(x)


def test_branch_with_nonlinearity_is_refused():
    deploy, report, ops, err = reparam(Nonlinear(), 1, 4, 6, 6)
    assert ops["add"] == 1 and ops["conv2d"] == 2
    assert [(r.pass_name, r.code) for r in report.refusals()] == [("merge_linear", RefusalCode.NONLINEAR_BRANCH)]
    assert err <= 1e-5


class Strides(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 1, stride=2), conv_bn(4, 4, 5)

    def forward(self, x):  # both give 4x4 from 8x8, from different strides
        return self.a(x) + self.b(x)


def test_mismatched_strides_are_refused():
    deploy, report, ops, err = reparam(Strides(), 1, 4, 8, 8)
    assert ops["add"] == 1 and ops["conv2d"] == 2
    (refusal,) = report.refusals()
    assert (refusal.pass_name, refusal.code) == ("merge_linear", RefusalCode.STRIDE_MISMATCH) and err <= 1e-5
    assert len(refusal.nodes) == 2  # the two branches


def test_linear_branches_and_residual_merge():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return self.a(x) + self.b(x) * 0.5 + x

    deploy, report, ops, err = reparam(M(), 3, 5, 6)
    assert ops == {"linear": 1} and err <= 1e-5


def test_spatial_constant_is_not_a_bias():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pos = nn.Conv2d(3, 4, 1), nn.Parameter(torch.randn(1, 4, 5, 5))

        def forward(self, x):
            return self.conv(x) + self.pos + 1.0

    deploy, report, ops, err = reparam(M(), 2, 3, 5, 5)
    assert ops["add"] >= 1 and ops["conv2d"] == 1 and err <= 1e-6


class Dilated(nn.Module):
    """A large kernel with dilated small kernels beside it (UniRepLKNet-style), depthwise."""

    def __init__(self, c=4, large=7):
        super().__init__()
        self.large = conv_bn(c, c, large, 1, large // 2, c) if large else None
        self.d2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=c, bias=False), nn.BatchNorm2d(c))
        self.d3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=3, dilation=3, groups=c, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.d2(x) + self.d3(x)
        return y + self.large(x) if self.large is not None else y


def test_dilated_branches_merge_into_a_large_kernel():
    deploy, report, ops, err = reparam(Dilated(), 1, 4, 12, 12)
    assert ops == {"conv2d": 1} and err <= 1e-5
    (w,) = [p for p in deploy.parameters() if p.dim() == 4]
    assert tuple(w.shape) == (4, 1, 7, 7)


def test_dilated_branches_without_a_large_kernel_merge_as_the_authors_do():
    """Two dilated 3x3s (9 + 9 taps each) become one 7x7 (49 taps): more weights, one conv and no add."""
    deploy, report, ops, err = reparam(Dilated(large=0), 1, 4, 12, 12)
    assert ops == {"conv2d": 1} and err <= 1e-5 and not report.refusals()
    (w,) = [p for p in deploy.parameters() if p.dim() == 4]
    assert tuple(w.shape) == (4, 1, 7, 7)


class AvgBranchBlock(nn.Module):
    """DBB without its 1x1 before the pool: ``bn(conv1x1(x)) + bn(avgpool3x3(x))``, then an activation.

    Average pooling with ``count_include_pad`` is a depthwise conv whose taps are ``1/9``; its BatchNorm
    folds into it and the branch merges with the 1x1 conv into one dense 3x3 conv.
    """

    def __init__(self, c=8, count_include_pad=True):
        super().__init__()
        self.dbb_1x1 = conv_bn(c, c, 1, 1, 0, 1)
        self.dbb_avg = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.dbb_1x1(x) + self.dbb_avg(x))


def test_average_pool_branch_and_its_batchnorm_merge_with_the_conv():
    deploy, report, ops, err = reparam(AvgBranchBlock(), 2, 8, 8, 8)
    assert ops == {"conv2d": 1, "relu": 1} and err <= 1e-5 and not report.refusals()
    (w,) = [p for p in deploy.parameters() if p.dim() == 4]
    assert tuple(w.shape) == (8, 8, 3, 3)


def test_average_pool_that_excludes_padding_is_not_a_conv_and_stays():
    """``count_include_pad=False`` divides border windows by fewer taps: not a fixed kernel, no merge."""
    deploy, report, ops, err = reparam(AvgBranchBlock(count_include_pad=False), 2, 8, 8, 8)
    assert ops["avg_pool2d"] == 1 and ops["conv2d"] == 1 and err <= 1e-5


class BNAfterSum(nn.Module):
    """bn(conv(x) + conv(relu(conv(x)))): a BatchNorm after a sum with a nonlinear branch."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.f1, self.f2 = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.a(x) + self.f2(torch.relu(self.f1(x))))


def test_a_batchnorm_after_a_sum_is_distributed_into_the_last_conv_of_every_branch():
    _, report, ops, err = reparam(BNAfterSum(), 2, 4, 6, 6)
    assert ops == {"conv2d": 3, "relu": 1, "add": 1} and err <= 1e-5
    assert report.leftovers == []


class BNAfterResidual(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.f = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(x + self.f(torch.relu(x)))


def test_a_batchnorm_after_a_residual_stays_the_identity_cannot_take_its_scale():
    _, report, ops, err = reparam(BNAfterResidual(), 2, 4, 6, 6)
    assert ops["batch_norm"] == 1 and ops["conv2d"] == 1 and err <= 1e-5
