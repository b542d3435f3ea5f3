import pytest
import torch
from torch import nn

from fusers import RefusalCode
from helpers import reparam


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups,stride,dilation,padding", [(1, 1, 1, 1), (2, 2, 1, 1), (8, 1, 2, 2), (4, 2, 2, 0)])
def test_conv2d_bn_folds(bias, groups, stride, dilation, padding):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride, padding, dilation, groups, bias), nn.BatchNorm2d(16))
    deploy, report, ops, err = reparam(model, 2, 8, 12, 12)
    assert ops.get("batch_norm", 0) == 0 and ops["conv2d"] == 1
    assert report.count("fold_bn") == 1
    assert err <= 1e-5


def test_conv1d_bn_folds():
    deploy, report, ops, err = reparam(nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6)), 2, 4, 10)
    assert ops == {"conv1d": 1} and err <= 1e-5


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_bn_folds(groups):
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, 2, groups=groups), nn.BatchNorm2d(6))
    deploy, report, ops, err = reparam(model, 2, 4, 5, 5)
    assert ops == {"conv_transpose2d": 1} and err <= 1e-5


def test_linear_bn1d_folds():
    deploy, report, ops, err = reparam(nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5)), 3, 7)
    assert ops == {"linear": 1} and err <= 1e-5
    assert sum(p.numel() for p in deploy.parameters()) == 7 * 5 + 5


def test_bn_without_running_stats_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    deploy, report, ops, err = reparam(model, 2, 3, 8, 8)
    assert ops["batch_norm"] == 1 and report.count() == 0
    (refusal,) = report.refusals()
    assert (refusal.pass_name, refusal.code) == ("fold_bn", RefusalCode.NO_RUNNING_STATS) and refusal.reason
    assert err <= 1e-6


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y.relu()


def test_conv_with_two_users_is_refused():
    deploy, report, ops, err = reparam(Shared(), 1, 3, 4, 4)
    assert ops["batch_norm"] == 1
    assert [(r.pass_name, r.code) for r in report.refusals()] == [("fold_bn", RefusalCode.OTHER_USERS)]
    assert err <= 1e-6


class CalledTwice(nn.Module):
    """One conv + BN module applied at two places (a head shared across pyramid levels)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, a):
        return self.bn(self.conv(a)), self.bn(self.conv(a[:, :, ::2, ::2]))


def test_shared_module_keeps_one_folded_copy():
    deploy, report, ops, err = reparam(CalledTwice(), 1, 8, 6, 6)
    assert ops["conv2d"] == 2 and "batch_norm" not in ops and err <= 1e-5
    assert sum(p.numel() for p in deploy.parameters()) == 8 * 8 * 9 + 8


class CatThenBN(nn.Module):
    """A BatchNorm after a channel cat of two convs (one on a nonlinear input): split per producer."""

    def __init__(self, affine_op=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.affine_op = affine_op
        self.register_buffer("scale", torch.randn(1, 8, 1, 1))

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(torch.relu(x))], 1)
        return torch.relu(y * self.scale if self.affine_op else self.bn(y))


def test_a_batchnorm_or_channel_scale_after_a_cat_folds_into_each_producer():
    for affine_op in (False, True):
        _, report, ops, err = reparam(CatThenBN(affine_op), 2, 4, 6, 6)
        assert ops == {"cat": 1, "conv2d": 2, "relu": 2} and err <= 1e-5, report.summary()


class CatWithInputThenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(torch.cat([self.a(x), x], 1)))  # DenseNet: the input is no conv


def test_a_batchnorm_after_a_cat_with_a_non_conv_piece_stays():
    _, report, ops, _ = reparam(CatWithInputThenBN(), 2, 4, 6, 6)
    assert ops["batch_norm"] == 1 and [x.kind for x in report.leftovers] == ["batchnorm"]


class LinearNorm(nn.Module):
    """LeViT's LinearNorm: ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``."""

    def __init__(self, c_in=6, c_out=5):
        super().__init__()
        self.c, self.bn = nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out)

    def forward(self, x):
        y = self.c(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def test_a_batchnorm1d_over_flattened_tokens_folds_into_the_linear():
    _, report, ops, err = reparam(LinearNorm(), 2, 7, 6)
    assert "batch_norm" not in ops and ops["linear"] == 1 and err <= 1e-5, report.summary()
