import torch
from torch import nn

from fusers import RefusalCode
from helpers import reparam


class AffineThenConv(nn.Module):
    def __init__(self, kind, k=1, padding=0):
        super().__init__()
        self.kind = kind
        self.bn = nn.BatchNorm2d(6)
        self.a = nn.Parameter(torch.randn(1, 6, 1, 1))
        self.conv = nn.Conv2d(6, 4, k, padding=padding, groups=2)

    def forward(self, x):
        y = self.bn(x) if self.kind == "bn" else self.a + x
        return self.conv(y)


def test_bn_before_unpadded_conv_folds():
    deploy, report, ops, err = reparam(AffineThenConv("bn", k=3), 2, 6, 9, 9)
    assert ops == {"conv2d": 1} and report.count("fold_into_next") == 1 and err <= 1e-5


def test_implicit_add_before_1x1_folds():
    deploy, report, ops, err = reparam(AffineThenConv("add"), 2, 6, 5, 5)
    assert ops == {"conv2d": 1} and err <= 1e-5


def test_bn_before_padded_conv_is_refused():
    deploy, report, ops, err = reparam(AffineThenConv("bn", k=3, padding=1), 2, 6, 9, 9)
    assert ops["batch_norm"] == 1 and err <= 1e-6
    assert ("fold_into_next", RefusalCode.PADDED_CONV) in [(r.pass_name, r.code) for r in report.refusals()]


def test_bn1d_before_linear_folds():
    deploy, report, ops, err = reparam(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)), 4, 5)
    assert ops == {"linear": 1} and err <= 1e-5
