"""Blocks written the way their original authors write them (``tests/authors/``), reparameterized by the
generic passes and compared with the authors' own conversion (house style item 12).

For each block: ``fusers.reparameterize`` must compute the block's function (float32 max rel error
``<= 1e-5``), with no BatchNorm left and no more convolutions than the authors' converted form, which
must agree with the block too. DBB is held to the authors' result exactly: one conv2d, and nothing
but the block's own nonlinearity after it (no pad, no border writes, no pooling, no add). Each family
also has a negative case, a variant a merge must *not* swallow: the result stays exact and keeps the
structure the variant needs.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch
from torch import nn

import fusers
from fusers.graph import op_counts
from fusers.numerics import max_rel_error

from authors.acnet_style import ACBlock
from authors.dbb_style import BNAndPadLayer, DiverseBranchBlock, IdentityBasedConv1x1
from authors.mobileone_style import MobileOneBlock, reparameterize_model
from authors.repvgg_style import RepVGGBlock
from helpers import randomize_bn, reasons

TOL = 1e-5
# what a fully merged DBB must not keep: its BNs, the BN-and-pad's pad and in-place border writes
# (as captured, or functionalized), its average pools, the branch sum
DBB_LEFTOVERS = ("batch_norm", "pad", "slice", "copy_", "slice_scatter", "avg_pool2d", "add", "add_")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add overhead, and on a loaded machine they make this
    file three times slower (measured: 85 s against 29 s). Restored after the module."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class Converted(NamedTuple):
    ours: torch.nn.Module
    ops: dict  # op counts of ours
    theirs: torch.nn.Module  # the authors' conversion of a copy of the block
    theirs_convs: int  # conv2d calls in their converted block (each Conv2d module runs once)
    err: float  # ours vs the block
    theirs_err: float  # theirs vs the block
    ours_vs_theirs: float


def prepared(block: nn.Module, seed: int = 0) -> nn.Module:
    """``block`` in eval mode with weights far from any identity: BatchNorm statistics and affine parameters
    (``helpers.randomize_bn``), and the identity-based 1x1 convs' weights, which DBB starts at zero."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, IdentityBasedConv1x1):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
    return randomize_bn(block, seed)


def example(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def describe(ops: dict) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(ops.items()))


def convert_both(block: nn.Module, x: torch.Tensor, convert=None) -> Converted:
    """Ours (``fusers.reparameterize``) and theirs (``convert`` applied to a deep copy, in place), both checked
    against ``block`` on ``x``."""
    ours = fusers.reparameterize(block, (x,))
    theirs = None
    if convert is not None:
        theirs = copy.deepcopy(block)
        convert(theirs)
        theirs.eval()
    with torch.no_grad():
        ref, out = block(x), ours(x)
        theirs_out = theirs(x) if theirs is not None else None
    theirs_convs = sum(isinstance(m, nn.Conv2d) for m in theirs.modules()) if theirs is not None else -1
    return Converted(ours, op_counts(ours), theirs, theirs_convs, max_rel_error(ref, out),
                     max_rel_error(ref, theirs_out) if theirs is not None else float("nan"),
                     max_rel_error(theirs_out, out) if theirs is not None else float("nan"))


def switch_to_deploy(block):
    block.switch_to_deploy()


def structure_message(c: Converted) -> str:
    return f"ours leaves {describe(c.ops)}; refusals: {reasons(c.ours.reparam_report) or 'none'}"


def assert_as_plain_as_the_authors(c: Converted) -> None:
    """Ours, the authors' conversion and the block agree; ours keeps no BatchNorm and no more convs."""
    assert c.err <= TOL, c.ours.reparam_report.summary()
    assert c.theirs_err <= TOL and c.ours_vs_theirs <= TOL
    assert "batch_norm" not in c.ops, structure_message(c)
    assert c.ops.get("conv2d", 0) <= c.theirs_convs, structure_message(c)


# ---- DiverseBranchBlock (DingXiaoH/DiverseBranchBlock) -------------------------------------------------


def dbb(k: int, stride: int, groups, **kw) -> tuple[DiverseBranchBlock, int]:
    """A DBB as the authors' ``conv_bn_relu`` builds it (ReLU after the sum); ``groups="depthwise"``: groups ==
    channels, where the authors drop ``dbb_1x1`` and widen ``dbb_1x1_kxk`` to twice the input channels."""
    if groups == "depthwise":
        cin = cout = groups = 8
    else:
        cin, cout = 6, 8
    block = DiverseBranchBlock(cin, cout, k, stride=stride, padding=k // 2, groups=groups, nonlinear=nn.ReLU(), **kw)
    return prepared(block), cin


@pytest.mark.parametrize("groups", [1, 2, "depthwise"])
def test_dbb_fixture_follows_the_authors_branch_rules(groups):
    block, cin = dbb(3, 1, groups)
    depthwise = groups == "depthwise"
    assert hasattr(block, "dbb_1x1") != depthwise
    assert hasattr(block.dbb_avg, "conv") != depthwise
    assert isinstance(getattr(block.dbb_avg, "bn", None), BNAndPadLayer) != depthwise
    assert hasattr(block.dbb_1x1_kxk, "idconv1") != depthwise
    assert block.dbb_1x1_kxk.conv2.in_channels == (2 * cin if depthwise else cin)
    assert block.dbb_1x1_kxk.bn1.pad_pixels == 1 and block.dbb_1x1_kxk.conv2.padding == (0, 0)


@pytest.mark.parametrize("groups", [1, 2, "depthwise"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_dbb_authors_style_becomes_one_conv(k, stride, groups):
    block, cin = dbb(k, stride, groups)
    c = convert_both(block, example(2, cin, 11, 11), switch_to_deploy)
    assert c.err <= TOL, c.ours.reparam_report.summary()
    assert c.theirs_err <= TOL and c.ours_vs_theirs <= TOL
    assert c.theirs_convs == 1
    left = {op: c.ops[op] for op in DBB_LEFTOVERS if op in c.ops}
    assert not left, structure_message(c)
    assert c.ops == {"conv2d": 1, "relu": 1}, structure_message(c)
    assert c.ops["conv2d"] == c.theirs_convs


def test_dbb_explicit_internal_channels_use_a_widening_first_conv():
    """``internal_channels_1x1_3x3 != in_channels``: ``conv1`` (6 -> 12) instead of the identity-based 1x1."""
    block, cin = dbb(3, 1, 1, internal_channels_1x1_3x3=12)
    assert hasattr(block.dbb_1x1_kxk, "conv1") and not hasattr(block.dbb_1x1_kxk, "idconv1")
    c = convert_both(block, example(2, cin, 10, 10), switch_to_deploy)
    assert c.err <= TOL and c.theirs_err <= TOL
    assert c.ops == {"conv2d": 1, "relu": 1}, structure_message(c)


class MeanlessBNAndPad(BNAndPadLayer):
    """A BN-and-pad that writes ``beta`` into the border, forgetting the ``- mean * gamma / std`` term: the
    border no longer holds the 1x1 conv's folded bias, so the 1x1 -> kxk sequence is not one conv."""

    def forward(self, input):
        output = self.bn(input)
        p = self.pad_pixels
        output = torch.nn.functional.pad(output, [p] * 4)
        fill = self.bn.bias.detach().view(1, -1, 1, 1)
        output[:, :, 0:p, :] = fill
        output[:, :, -p:, :] = fill
        output[:, :, :, 0:p] = fill
        output[:, :, :, -p:] = fill
        return output


def test_dbb_with_a_wrong_border_value_is_not_merged():
    block, cin = dbb(3, 1, 1)
    wrong = MeanlessBNAndPad(1, cin)
    wrong.bn.load_state_dict(block.dbb_1x1_kxk.bn1.bn.state_dict())
    block.dbb_1x1_kxk.bn1 = wrong.eval()
    c = convert_both(block, example(2, cin, 10, 10), switch_to_deploy)
    assert c.theirs_err > 1e-3  # the authors' formula no longer describes this block: nothing exact to merge into
    assert c.err <= TOL, c.ours.reparam_report.summary()
    assert c.ops.get("conv2d", 0) >= 2, structure_message(c)  # the sequence's two convs stay apart


# ---- ACBlock (DingXiaoH/ACNet) -------------------------------------------------------------------------


@pytest.mark.parametrize("k, padding, stride, groups", [
    (3, 1, 1, 1),
    (5, 2, 2, 2),  # grouped, stride 2
    (3, 0, 1, 1),  # padding < k // 2: the authors crop the asymmetric branches' input
    (5, 1, 2, 1),  # cropping, with a stride
    (3, 2, 1, 1),  # padding > k // 2: the output grows
])
def test_acnet_authors_style(k, padding, stride, groups):
    block = prepared(ACBlock(6, 8, k, stride=stride, padding=padding, groups=groups))
    c = convert_both(block, example(2, 6, 11, 11), switch_to_deploy)
    assert_as_plain_as_the_authors(c)


def test_acnet_branch_through_a_nonlinearity_is_not_merged():
    block = prepared(ACBlock(6, 8, 3, padding=1))
    block.hor_bn = nn.Sequential(block.hor_bn, nn.ReLU())
    c = convert_both(block, example(2, 6, 10, 10))
    assert c.err <= TOL, c.ours.reparam_report.summary()
    assert c.ops.get("relu") == 1 and c.ops.get("conv2d") == 2, structure_message(c)


# ---- RepVGGBlock (DingXiaoH/RepVGG) --------------------------------------------------------------------


@pytest.mark.parametrize("cin, cout, stride, groups", [
    (8, 8, 1, 1),  # with rbr_identity
    (8, 8, 1, 2),  # grouped, with rbr_identity
    (6, 8, 1, 1),  # channels change: no identity, ``id_out = 0``
    (8, 8, 2, 4),  # stride 2: no identity; grouped
])
def test_repvgg_authors_style(cin, cout, stride, groups):
    block = prepared(RepVGGBlock(cin, cout, 3, stride=stride, padding=1, groups=groups))
    assert (block.rbr_identity is not None) == (cin == cout and stride == 1)
    c = convert_both(block, example(2, cin, 10, 10), switch_to_deploy)
    assert_as_plain_as_the_authors(c)


def test_repvgg_identity_through_a_nonlinearity_is_not_merged():
    block = prepared(RepVGGBlock(8, 8, 3, padding=1))
    block.rbr_identity = nn.Sequential(block.rbr_identity, nn.ReLU())
    c = convert_both(block, example(2, 8, 10, 10))
    assert c.err <= TOL, c.ours.reparam_report.summary()
    assert c.ops.get("relu") == 2, structure_message(c)  # the identity path's ReLU, and the block's


# ---- MobileOneBlock (apple/ml-mobileone) ---------------------------------------------------------------


@pytest.mark.parametrize("cin, cout, k, stride, groups, branches, use_se", [
    (8, 8, 3, 1, 1, 4, False),  # k branches + scale + skip
    (6, 8, 3, 2, 1, 3, False),  # no skip: channels change, stride 2
    (8, 8, 3, 1, 8, 4, False),  # depthwise, with skip
    (8, 8, 3, 2, 8, 4, False),  # depthwise, stride 2
    (8, 8, 1, 1, 1, 4, False),  # pointwise: no scale branch
    (16, 16, 3, 1, 1, 2, True),  # squeeze-excite after the sum
])
def test_mobileone_authors_style(cin, cout, k, stride, groups, branches, use_se):
    block = prepared(MobileOneBlock(cin, cout, k, stride=stride, padding=k // 2, groups=groups, use_se=use_se,
                                    num_conv_branches=branches))
    assert (block.rbr_skip is not None) == (cin == cout and stride == 1)
    c = convert_both(block, example(2, cin, 10, 10), lambda b: b.reparameterize())
    assert_as_plain_as_the_authors(c)


def test_mobileone_reparameterize_model_converts_a_copy():
    model = prepared(nn.Sequential(MobileOneBlock(8, 8, 3, padding=1, num_conv_branches=2),
                                   MobileOneBlock(8, 8, 1, num_conv_branches=2)))
    deployed = reparameterize_model(model)
    assert all(not blk.inference_mode for blk in model) and all(blk.inference_mode for blk in deployed)
    x = example(2, 8, 9, 9)
    with torch.no_grad():
        assert max_rel_error(model(x), deployed(x)) <= TOL


def test_mobileone_branch_normalised_by_batch_statistics_is_not_folded():
    """A conv branch whose BN keeps no running statistics normalises by the batch's even in eval mode: a
    function of the whole batch, not a per-channel affine map."""
    block = prepared(MobileOneBlock(8, 8, 3, padding=1, num_conv_branches=2))
    block.rbr_conv[1].bn = nn.BatchNorm2d(8, track_running_stats=False).eval()
    c = convert_both(block, example(2, 8, 10, 10))
    assert c.err <= TOL, c.ours.reparam_report.summary()
    assert c.ops.get("batch_norm", 0) + c.ops.get("_native_batch_norm_legit", 0) >= 1, structure_message(c)
    assert c.ops.get("conv2d", 0) >= 2, structure_message(c)
