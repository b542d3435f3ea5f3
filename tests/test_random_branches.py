"""Random multi-branch blocks: every linear branch group becomes one conv, no BatchNorm stays, nothing is left
unfused; the conv count is what the structure allows (one per group of linear branches of the block input,
two per branch that passes a ReLU)."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import reparam


class AuthorsBNAndPad(nn.Module):
    """BatchNorm, then the border written in place with what the BatchNorm gives a zero input."""

    def __init__(self, c, p):
        super().__init__()
        self.bn, self.p = nn.BatchNorm2d(c), p

    def forward(self, x):
        out = self.bn(x)
        bn = self.bn
        v = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
        out = F.pad(out, [self.p] * 4)
        out[:, :, :self.p, :] = v
        out[:, :, -self.p:, :] = v
        out[:, :, :, :self.p] = v
        out[:, :, :, -self.p:] = v
        return out


def conv_bn(c_in, c_out, k, stride=1, groups=1, padding=None):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2 if padding is None else padding, groups=groups,
                                   bias=False), nn.BatchNorm2d(c_out))


def branch(kind, c, stride, rng):
    k = rng.choice((1, 3, 5))
    if kind == "main":  # the dense kxk branch every such block has (RepVGG, ACNet, DBB): the merge never grows it
        return conv_bn(c, c, 5, stride)
    if kind == "conv":
        return conv_bn(c, c, k, stride, groups=rng.choice((1, c)))
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "avg":
        return nn.Sequential(nn.AvgPool2d(3, stride, 1), nn.BatchNorm2d(c))
    if kind == "seq":  # DBB's 1x1 -> BN-and-pad -> kxk
        k = rng.choice((3, 5))
        return nn.Sequential(nn.Conv2d(c, c, 1, bias=False), AuthorsBNAndPad(c, k // 2), conv_bn(c, c, k, stride, padding=0))
    return nn.Sequential(conv_bn(c, c, 1), nn.ReLU(), conv_bn(c, c, 3, stride))  # "relu": not linear in x


class Block(nn.Module):
    def __init__(self, kinds, c, stride, bn_after, rng):
        super().__init__()
        self.branches = nn.ModuleList(branch(k, c, stride, rng) for k in kinds)
        self.bn = nn.BatchNorm2d(c) if bn_after else nn.Identity()

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return torch.relu(self.bn(out))


def random_net(seed, c=4):
    rng = random.Random(seed)
    blocks, expected = [], 0
    for _ in range(rng.choice((2, 3))):
        stride = rng.choice((1, 2))
        kinds = ["main"] + [rng.choice(("conv", "avg", "seq", "relu") + (("bn",) if stride == 1 else ()))
                            for _ in range(rng.choice((1, 2, 3)))]
        rng.shuffle(kinds)
        blocks.append(Block(kinds, c, stride, rng.random() < 0.5, rng))
        expected += 1 + 2 * kinds.count("relu")
    return nn.Sequential(*blocks), expected


@pytest.mark.parametrize("seed", [*range(10), *(pytest.param(s, marks=pytest.mark.e2e) for s in range(10, 30))])
def test_random_multi_branch_network_is_fully_plain(seed):
    model, expected = random_net(seed)
    _, report, ops, err = reparam(model, 2, 4, 12, 12)
    assert err <= 1e-5
    assert not [k for k in ops if "batch_norm" in k] and report.leftovers == [], report.summary()
    assert ops["conv2d"] == expected, (ops, report.summary())
