"""The "left unfused" list: every BatchNorm, unmerged parallel branch sum and in-place write that stays, with
its reason; ``deploy convert --strict-plain`` fails on it."""

import json

import torch
from torch import nn

import fusers

from conftest import main_in_process
from helpers import reparam
from test_merge_linear import BNAfterResidual as Residual  # bn(x + conv(relu(x))): the BN stays


class Mergeable(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


def test_a_batchnorm_that_stays_is_listed_with_its_reason():
    _, report, ops, _ = reparam(Residual(), 2, 4, 6, 6)
    left = report.leftovers
    assert ops["batch_norm"] == 1 and [x.kind for x in left] == ["batchnorm"]
    assert left[0].path == "bn" and "fold_bn" in left[0].reason
    assert report.to_dict()["left_unfused"][0]["kind"] == "batchnorm" and "left unfused: 1" in report.summary()


def test_a_fully_merged_block_leaves_nothing():
    _, report, ops, _ = reparam(Mergeable(), 2, 4, 6, 6)
    assert ops["conv2d"] == 1 and report.leftovers == [] and "left unfused" not in report.summary()


def test_parallel_branches_summed_but_not_merged_are_listed():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1, dilation=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2)

        def forward(self, x):
            return self.a(x) + self.b(x)  # merge_linear would merge them on the gcd grid; it is left out here

    _, report, ops, _ = reparam(Pair(), 2, 4, 8, 8, passes=[p for p in fusers.DEFAULT_PASSES if p != "merge_linear"])
    left = report.leftovers
    assert ops["conv2d"] == 2 and [x.kind for x in left] == ["branch_sum"]
    assert left[0].reason == "2 linear branches of x (conv2d, conv2d) are summed, not merged: no pass applies"
    assert len(left[0].nodes) == 3
    _, report, ops, _ = reparam(Pair(), 2, 4, 8, 8)
    assert ops == {"conv2d": 1} and report.leftovers == []


MODEL_FILE = '''
import torch
from torch import nn

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x + self.conv(torch.relu(x)))

def build():
    return Residual().eval()
'''


def test_strict_plain_fails_a_graph_that_keeps_a_batchnorm_and_passes_a_plain_one(tmp_path, capsys):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    common = ["--targets", "none", "--input-shape", "1,3,8,8", "-q"]
    rc, out, _ = main_in_process(capsys, "convert", f"{tmp_path / 'net.py'}:build", "--out", str(tmp_path / "a"),
                                 "--strict-plain", *common)
    assert rc == 1 and "left unfused: 1" in out and "--strict-plain" in out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [x["kind"] for x in report["reparameterize"]["left_unfused"]] == ["batchnorm"]
    assert "Left unfused: 1" in (tmp_path / "a" / "report.md").read_text()
    rc, out, _ = main_in_process(capsys, "convert", f"{tmp_path / 'net.py'}:build", "--out", str(tmp_path / "b"),
                                 *common)
    assert rc == 0 and "left unfused: 1" in out  # listed, but only --strict-plain fails on it
    rc, out, _ = main_in_process(capsys, "convert", "repvgg_digits", "--out", str(tmp_path / "c"), "--strict-plain",
                                 "--targets", "none", "-q")
    assert rc == 0 and "left unfused" not in out
