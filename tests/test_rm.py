"""The RM operation: residual networks become plain, exactly, or the residual is kept with a reason."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusers
from deploy import zoo
from fusers.graph import op_counts
from fusers import RefusalCode
from helpers import randomize_bn, reparam

RM = (*fusers.DEFAULT_PASSES, "rm")


def _rm_widths(report) -> list[str]:
    return [r for p in report.passes if p.name == "rm" for r in p.rewrites]


@pytest.mark.parametrize("name,blocks,convs", [("resnet18", 8, 17), ("resnet34", 16, 33),
                                               pytest.param("resnet50", 16, 49, marks=pytest.mark.e2e)])
def test_torchvision_resnet_becomes_plain(name, blocks, convs, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    onnx = pytest.importorskip("onnx")
    model = randomize_bn(getattr(torchvision.models, name)(weights=None))
    x = torch.randn(1, 3, 32, 32)
    deploy = fusers.reparameterize(model, (x,), passes=RM)
    report = deploy.reparam_report
    assert report.float64_error <= 1e-9 and report.float32_error <= 1e-5
    assert len(_rm_widths(report)) == blocks and all("conv widths" in r for r in _rm_widths(report))
    assert op_counts(deploy)["conv2d"] == convs
    path = tmp_path / "m.onnx"
    torch.onnx.export(deploy, (x,), str(path), dynamo=True, external_data=False)
    types = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert types.count("Add") == 0 and types.count("BatchNormalization") == 0 and types.count("Conv") == convs


@pytest.mark.parametrize("name", ["resnet_small", "acnet_resnet", "dbb_resnet"])
def test_zoo_resnets_become_single_branch(name):
    model = zoo.create(name, width=0.25)
    deploy, report, ops, err = reparam(model, 1, 3, 32, 32, passes=RM)
    assert "add" not in ops and "batch_norm" not in ops and ops["conv2d"] == 13  # stem + 6 blocks x 2
    assert err <= 1e-5


def test_identity_residual_widths_and_numbers():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.c1, self.b1 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
            self.c2, self.b2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            x = F.relu(self.stem(x))
            return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)

    deploy, report, ops, err = reparam(Block(), 2, 3, 8, 8, passes=RM)
    assert ops == {"conv2d": 3, "relu": 3} and err <= 1e-5
    assert _rm_widths(report) == ["add: identity residual removed; conv widths 6->10"]
    w = [p for p in deploy.parameters() if p.dim() == 4]
    assert sorted(tuple(p.shape[:2]) for p in w) == [(4, 3), (4, 10), (10, 4)]


class Clipped(nn.Module):
    """A residual block whose input comes from ``act_in`` and whose middle activation is ``act_mid``."""

    def __init__(self, act_in, act_mid):
        super().__init__()
        self.stem, self.act_in, self.act_mid = nn.Conv2d(3, 4, 1), act_in, act_mid
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.act_in(self.stem(x))
        return self.c2(self.act_mid(self.c1(x))) + x


def test_relu6_block_is_exact():
    deploy, report, ops, err = reparam(Clipped(nn.ReLU6(), nn.ReLU6()), 1, 3, 6, 6, passes=RM)
    assert "add" not in ops and err <= 1e-5


@pytest.mark.parametrize("act_in,act_mid,code", [
    (nn.Identity(), nn.ReLU(), RefusalCode.NOT_NONNEGATIVE),  # linear bottleneck input
    (nn.ReLU(), nn.ReLU6(), RefusalCode.OUT_OF_RANGE),         # ReLU output (may exceed 6) through a ReLU6
])
def test_residual_without_a_proof_is_kept(act_in, act_mid, code):
    deploy, report, ops, err = reparam(Clipped(act_in, act_mid), 1, 3, 6, 6, passes=RM)
    assert ops["add"] == 1 and err <= 1e-5
    assert [r.code for r in report.refusals() if r.pass_name == "rm"] == [code]


def test_mobilenet_v2_linear_bottlenecks_are_refused():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=0.25)
    deploy, report, ops, err = reparam(model, 1, 3, 32, 32, passes=RM)
    assert ops["add"] == 11 and err <= 1e-5  # every residual kept
    refused = [r.code for r in report.refusals() if r.pass_name == "rm"]
    assert len(refused) == 11
    assert refused.count(RefusalCode.NOT_NONNEGATIVE) == 10  # linear bottlenecks
    assert refused.count(RefusalCode.GROUPED_CONV) == 1  # the first block: a depthwise conv after a ReLU6


def test_rm_is_not_a_default_pass():
    assert "rm" not in fusers.DEFAULT_PASSES
    deploy, report, ops, err = reparam(zoo.create("resnet_small", width=0.25), 1, 3, 32, 32)
    assert ops["add"] == 6
