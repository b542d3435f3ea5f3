"""drop_noops: eval-mode identities (dropout, clone, detach, same-shape view, same-dtype cast) stop no fold."""

import torch
from torch import nn

from helpers import reparam


class LevitHead(nn.Module):
    """timm's LeViT / EfficientViT-MSRA head: BatchNorm1d -> Dropout -> Linear after a mean."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(self.drop(self.bn(x)))


def test_dropout_between_batchnorm_and_linear_no_longer_blocks_the_fold():
    _, report, ops, err = reparam(LevitHead(), 2, 3, 6, 6)
    assert "batch_norm" not in ops and "dropout" not in ops and ops["linear"] == 1 and err <= 1e-5
    assert report.count("drop_noops") == 1 and report.count("fold_into_next") == 1


class Copies(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x).clone().detach().contiguous().float().view(x.shape)
        return self.bn(y)


def test_copies_and_same_shape_views_go():
    _, _, ops, err = reparam(Copies(), 2, 4, 5, 5)
    assert ops == {"conv2d": 1} and err <= 1e-5


class CloneBeforeWrite(nn.Module):
    """The clone keeps the write from reaching ``y``, which is returned too: it must stay."""

    def forward(self, x):
        y = x * 2
        z = y.clone()
        z[:, 0] = 0
        return y, z


def test_a_clone_that_protects_from_a_write_stays():
    model = CloneBeforeWrite()
    x = torch.randn(2, 3, 4)
    deploy, report, ops, _ = reparam(model, 2, 3, 4, passes=["drop_noops"])
    assert ops.get("clone") == 1 and not any("clone" in r for p in report.passes for r in p.rewrites)
    assert all(torch.equal(a, b) for a, b in zip(model(x), deploy(x)))


class GhostV2Tail(nn.Module):
    """timm's GhostNetV2 module ending: ``out = torch.cat([x1, x2], 1)[:, :out_chs]`` (a full slice, which
    torch.export records as ``alias``), then the bottleneck adds its shortcut in place, ``out += shortcut``."""

    def __init__(self, c=4):
        super().__init__()
        self.primary = nn.Conv2d(2 * c, c, 1)
        self.cheap = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x):
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)[:, :x.shape[1]]
        out += x
        return out


def test_an_alias_written_in_place_goes_since_the_write_reaches_its_input_anyway():
    model = GhostV2Tail().eval()
    x = torch.randn(2, 8, 5, 5)
    deploy, report, ops, _ = reparam(model, 2, 8, 5, 5, passes=["drop_noops"])
    assert "alias" not in ops and report.count("drop_noops") == 1
    with torch.no_grad():
        assert torch.equal(model(x), deploy(x))
