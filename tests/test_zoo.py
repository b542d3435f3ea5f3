"""Tests for the built-in zoo: every entry builds, runs, captures with torch.export, and has the published shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploy import zoo
from deploy.zoo.acnet import ACBlock
from deploy.zoo.dbb import BNAndPad, DiverseBranchBlock
from deploy.zoo.mobileone import MobileOneBlock
from deploy.zoo.repvgg import RepVGGBlock

DETECTORS = {"yolov7_tiny_rep", "yolo_shapes", "panet", "giraffedet", "sa_fpn", "small_object_det", "eresfd"}
CLASSIFIERS = [n for n in zoo.names() if n not in DETECTORS]
TINY = {"width": 0.25, "num_classes": 10}
SMALL_INPUT = (2, 3, 64, 64)


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"width": 0.125, "num_classes": 80} if name == "yolov7_tiny_rep" else TINY
    return zoo.randomize_batchnorm(zoo.create(name, **kwargs), seed=1).eval()


def _fold(branch: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of an eval conv-BN branch, in float64."""
    conv, bn = branch.conv, branch.bn
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return conv.weight.double() * s.view(-1, 1, 1, 1), bn.bias.double() - bn.running_mean.double() * s


def test_names_and_metadata():
    assert zoo.names() == sorted(zoo.names())
    assert {"acnet_resnet", "dbb_resnet", "mobileone_s0", "repvgg_a0", "repvgg_a0_se", "repvgg_a1", "repvgg_b0",
            "repvgg_b1g2", "resnet_small", "yolov7_tiny_rep"} <= set(zoo.names())
    for name in zoo.names():
        assert isinstance(zoo.describe(name), str) and "\n" not in zoo.describe(name)
    assert zoo.input_shape("repvgg_a0") == (1, 3, 224, 224)
    assert zoo.input_shape("yolov7_tiny_rep") == (1, 3, 320, 320)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="repvgg_a0.*yolov7_tiny_rep"):
        zoo.create("resnet9000")


def test_randomize_batchnorm_is_deterministic_and_in_range():
    a = zoo.randomize_batchnorm(zoo.create("repvgg_a0", **TINY), seed=3)
    b = zoo.randomize_batchnorm(zoo.create("repvgg_a0", **TINY), seed=3)
    c = zoo.randomize_batchnorm(zoo.create("repvgg_a0", **TINY), seed=4)
    bns = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 22 * 2 + 17  # two conv branches per block, identity BN in 17 stride-1 blocks
    var = torch.cat([m.running_var for m in bns])
    weight = torch.cat([m.weight for m in bns])
    assert var.min() >= 0.5 and var.max() <= 2.0 and weight.min() >= 0.5 and weight.max() <= 1.5
    assert 0.3 < torch.cat([m.running_mean for m in bns]).std() < 0.7
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    key = "stage1.0.dense.bn.running_mean"
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], sc[key])


@pytest.mark.e2e  # every zoo classifier through torch.export: the sweep, not needed while changing a pass
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_forward_export_and_float64(name):
    model = _tiny(name)
    x = torch.randn(SMALL_INPUT[0], zoo.input_shape(name)[1], *SMALL_INPUT[2:])  # repvgg_digits is grey
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert y.std() > 1e-3  # BN statistics are non-trivial, the output is not constant

    ep = torch.export.export(model, (x,), strict=False)
    convs = [n for n in ep.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), y, rtol=1e-5, atol=1e-5)

    model64 = model.double()
    with torch.no_grad():
        y64 = model64(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y, rtol=1e-3, atol=1e-3)


def test_repvgg_a0_published_structure():
    model = zoo.create("repvgg_a0")
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 22
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules()) == 22
    assert [b.dense.conv.out_channels for b in blocks[:1] + blocks[-1:]] == [48, 1280]
    # Deploy form: one 3x3 conv with bias per block, plus the Linear head.
    deploy = sum(b.dense.conv.weight.numel() + b.dense.conv.out_channels for b in blocks)
    deploy += sum(p.numel() for p in model.head.fc.parameters())
    assert deploy == 8_309_384
    assert abs(deploy - 8.30e6) / 8.30e6 < 0.01
    # Training form: the paper's 9.11M.
    assert abs(sum(p.numel() for p in model.parameters()) - 9.11e6) / 9.11e6 < 0.01


def test_repvgg_b1g2_groups_and_se():
    model = zoo.create("repvgg_b1g2", **TINY)
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    grouped = [i for i, b in enumerate(blocks) if b.dense.conv.groups == 2]
    assert grouped == list(range(2, 27, 2))
    assert all(b.one_by_one.conv.groups == b.dense.conv.groups for b in blocks)
    se = zoo.create("repvgg_a0_se", **TINY)
    assert all(b.se is not None for b in se.modules() if isinstance(b, RepVGGBlock))


def test_mobileone_s0_published_structure():
    model = zoo.create("mobileone_s0")
    blocks = [m for m in model.modules() if isinstance(m, MobileOneBlock)]
    assert len(blocks) == 1 + 2 * (2 + 8 + 10 + 1)
    assert all(len(b.branches) == 4 for b in blocks[1:])
    depthwise = blocks[1::2]
    assert all(b.branches[0].conv.groups == b.branches[0].conv.in_channels for b in depthwise)
    assert blocks[-1].branches[0].conv.out_channels == 1024
    deploy = sum(b.branches[0].conv.weight.numel() + b.branches[0].conv.out_channels for b in blocks)
    deploy += sum(p.numel() for p in model.head.fc.parameters())
    assert abs(deploy - 2.1e6) / 2.1e6 < 0.03


def test_acblock_equals_one_3x3_conv():
    torch.manual_seed(0)
    block = zoo.randomize_batchnorm(ACBlock(4, 6, stride=2)).eval().double()
    k, b = _fold(block.square)
    kh, bh = _fold(block.horizontal)
    kv, bv = _fold(block.vertical)
    k = k.clone()
    k[:, :, 1:2, :] += kh
    k[:, :, :, 1:2] += kv
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.conv2d(x, k, b + bh + bv, stride=2, padding=1), rtol=1e-12, atol=1e-12)


def _merge_1x1_kxk(conv1: nn.Conv2d, bn1: nn.Module, k2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``k2 * bn1(conv1(x))`` as one k×k conv, assuming bn1 pads with its zero response."""
    bn = bn1.bn if isinstance(bn1, BNAndPad) else bn1
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    k1 = conv1.weight.double()[:, :, 0, 0] * s[:, None]  # (mid, in)
    b1 = bn.bias.double() - bn.running_mean.double() * s
    k2 = k2.double()  # (out, mid, k, k)
    return torch.einsum("omhw,mi->oihw", k2, k1), torch.einsum("omhw,m->o", k2, b1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("zero_pad", [False, True])
def test_dbb_bn_and_pad_makes_1x1_kxk_exactly_mergeable(zero_pad, stride):
    torch.manual_seed(0)
    block = DiverseBranchBlock(4, 6, stride=stride, zero_pad=zero_pad)
    block = zoo.randomize_batchnorm(block).eval().double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    # Branch (c): 1x1 -> BN(-and-pad) -> kxk.
    seq = block.one_by_one_kxk
    k, b = _merge_1x1_kxk(seq.conv1, seq.bn1, seq.conv2.weight)
    # Branch (d): 1x1 -> BN(-and-pad) -> avg pool, the pool being a kxk conv with 1/k^2 on the diagonal.
    avg = block.one_by_one_avg
    pool = torch.eye(6, dtype=torch.float64)[:, :, None, None].expand(6, 6, 3, 3) / 9
    ka, ba = _merge_1x1_kxk(avg.conv, avg.bn1, pool)
    with torch.no_grad():
        err_c = (seq.conv2(seq.bn1(seq.conv1(x))) - F.conv2d(x, k, b, stride=stride, padding=1)).abs().max().item()
        err_d = (avg.avg(avg.bn1(avg.conv(x))) - F.conv2d(x, ka, ba, stride=stride, padding=1)).abs().max().item()
    if zero_pad:  # the border sees zero instead of the BN bias: not mergeable
        assert err_c > 1e-2 and err_d > 1e-2
    else:
        assert err_c < 1e-12 and err_d < 1e-12


def test_bn_and_pad_border_holds_bn_zero_response():
    pad = zoo.randomize_batchnorm(BNAndPad(3, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    bn = pad.bn
    zero_response = bn(torch.zeros(1, 3, 1, 1)).flatten()
    with torch.no_grad():
        y = pad(x)
        assert y.shape == (1, 3, 6, 6)
        torch.testing.assert_close(y[0, :, 0, 0], zero_response)
        torch.testing.assert_close(y[0, :, -1, 2], zero_response)
        torch.testing.assert_close(y[:, :, 1:-1, 1:-1], bn(x))


def test_dbb_zero_pad_option_changes_structure():
    exact = zoo.create("dbb_resnet", **TINY)
    naive = zoo.create("dbb_resnet", zero_pad=True, **TINY)
    assert sum(isinstance(m, BNAndPad) for m in exact.modules()) == 2 * 13  # 13 DBB units, two pads each
    assert not any(isinstance(m, BNAndPad) for m in naive.modules())
    x = torch.randn(*SMALL_INPUT)
    assert naive.eval()(x).shape == (2, 10)


def test_yolov7_tiny_rep_eval_and_train_outputs():
    model = _tiny("yolov7_tiny_rep")
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        boxes, maps = model(x)
    assert boxes.shape == (1, 3 * (16 * 16 + 8 * 8 + 4 * 4), 85)
    assert [tuple(m.shape) for m in maps] == [(1, 3, 16, 16, 85), (1, 3, 8, 8, 85), (1, 3, 4, 4, 85)]
    # Decoding: one cell of level 0 (stride 8), anchor 1 (16, 30), grid cell x=3, y=2.
    t = maps[0][0, 1, 2, 3].sigmoid()
    expected_xy = (t[0:2] * 2 - 0.5 + torch.tensor([3.0, 2.0])) * 8
    expected_wh = (t[2:4] * 2) ** 2 * torch.tensor([16.0, 30.0])
    row = boxes[0, 1 * 16 * 16 + 2 * 16 + 3]
    torch.testing.assert_close(row[:2], expected_xy)
    torch.testing.assert_close(row[2:4], expected_wh)
    torch.testing.assert_close(row[4:], t[4:])
    assert ((boxes[..., 4:] > 0) & (boxes[..., 4:] < 1)).all()
    # Implicit layers have the documented shapes and initialisation.
    detect = model.detect
    assert [tuple(m.implicit.shape) for m in detect.im] == [(1, 255, 1, 1)] * 3
    assert abs(torch.cat([m.implicit.flatten() for m in detect.im]).mean().item() - 1.0) < 0.01
    assert torch.equal(detect.anchor_grid[2].flatten(), torch.tensor([116.0, 90, 156, 198, 373, 326]))

    model.train()
    raw = model(x)
    assert isinstance(raw, list) and [tuple(m.shape) for m in raw] == [tuple(m.shape) for m in maps]
    assert zoo.create("yolov7_tiny_rep", width=0.125, num_classes=3).eval()(x)[0].shape[-1] == 8


def test_yolov7_tiny_rep_export_and_float64():
    model = _tiny("yolov7_tiny_rep")
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        boxes, maps = model(x)
    ep = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        ep_boxes, ep_maps = ep.module()(x)
    torch.testing.assert_close(ep_boxes, boxes)
    for a, b in zip(ep_maps, maps):
        torch.testing.assert_close(a, b)
    rep3x3 = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert rep3x3 == 2 + 2 * 8 + 2 + 3  # stem, two per ELAN (8 of them), two downsampling convs, RepConv heads

    model.double()
    with torch.no_grad():
        boxes64, _ = model(x.double())
    assert boxes64.dtype == torch.float64
    torch.testing.assert_close(boxes64.float(), boxes, rtol=1e-3, atol=1e-3)
