"""A BatchNorm behind pure data movement (channel shuffle, chunk) folds into the convs after it."""

import torch
from torch import nn

from fusers import RefusalCode
from helpers import reparam


def shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleThenConv(nn.Module):
    def __init__(self, padding=0):
        super().__init__()
        self.c0, self.bn, self.c1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1, padding=padding)

    def forward(self, x):
        return self.c1(shuffle(self.bn(torch.relu(self.c0(x))), 3))


class ChunkThenConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.a, self.b = nn.BatchNorm2d(6), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        u, v = self.bn(torch.relu(x)).chunk(2, 1)
        return self.a(u)[..., 1:-1, 1:-1] + self.b(v)


def test_bn_before_a_channel_shuffle_folds():
    deploy, report, ops, err = reparam(ShuffleThenConv(), 1, 6, 8, 8)
    assert "batch_norm" not in ops and report.count("push_affine") == 1 and err <= 1e-5


def test_bn_before_a_chunk_folds_into_both_convs():
    deploy, report, ops, err = reparam(ChunkThenConvs(), 1, 6, 8, 8)
    assert "batch_norm" not in ops and ops["conv2d"] == 2 and err <= 1e-5


def test_bn_before_a_padded_conv_stays():
    deploy, report, ops, err = reparam(ShuffleThenConv(padding=1), 1, 6, 8, 8)
    assert ops["batch_norm"] == 1 and err <= 1e-5
    assert ("push_affine", RefusalCode.PADDED_CONV) in [(r.pass_name, r.code) for r in report.refusals()]
