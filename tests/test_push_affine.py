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


class TokensAttention(nn.Module):
    """Next-ViT's E-MHSA input: a BatchNorm after a residual add, then tokens (flatten, transpose) into the q
    Linear and, average-pooled per channel and normalised again, into the k and v Linears."""

    def __init__(self, c=8, pool=2):
        super().__init__()
        self.norm1, self.norm2 = nn.BatchNorm2d(c), nn.BatchNorm1d(c)
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.pool = pool

    def forward(self, x):
        y = self.norm1(x + torch.relu(x))
        tokens = y.flatten(2).transpose(1, 2)                                   # (B, N, C)
        kv = self.norm2(nn.functional.avg_pool1d(tokens.transpose(1, 2), self.pool, self.pool)).transpose(1, 2)
        return self.q(tokens), self.k(kv), self.v(kv)


def test_batchnorms_fold_into_linears_behind_tokens_and_per_channel_pooling():
    _, report, ops, err = reparam(TokensAttention(), 2, 8, 4, 4)
    assert not [k for k in ops if "batch_norm" in k] and ops["linear"] == 3 and err <= 1e-5, report.summary()
    assert report.count("push_affine") + report.count("fold_bn_region") == 2  # the region pass may take the second


class PoolAcrossChannels(nn.Module):
    """Average pooling over the channel dim (tokens transposed the other way) mixes channels: no move."""

    def __init__(self, c=8):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(32, 3)

    def forward(self, x):
        t = self.bn(x + torch.relu(x)).flatten(2).transpose(1, 2)              # (B, N, C)
        return self.fc(nn.functional.avg_pool1d(t, 2, 2).transpose(1, 2).flatten(1))


def test_pooling_that_averages_channels_is_not_data_movement():
    _, report, ops, err = reparam(PoolAcrossChannels(), 2, 8, 2, 4)
    assert ops["batch_norm"] == 1 and err <= 1e-5
    assert [r.code for r in report.refusals() if r.pass_name == "push_affine"] == [RefusalCode.MIXES_CHANNELS]
