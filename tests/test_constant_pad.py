"""constant_pad: any data-movement region that pads with a per-channel constant becomes pad(x - v) + v."""

import torch
import torch.nn.functional as F
from torch import nn

import fusers
from fusers.graph import op_counts
from helpers import reparam


class AuthorsBNAndPad(nn.Module):
    """1x1 conv -> BN -> pad whose border holds what the BN gives a zero input, written into the border slices
    in place as DBB's authors do -> kxk conv."""

    def __init__(self, c=4, k=3, value_offset=0.0):
        super().__init__()
        self.first = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.second = nn.Conv2d(c, c, k)
        self.p, self.offset = k // 2, value_offset

    def forward(self, x):
        out = self.bn(self.first(x))
        bn = self.bn
        v = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        v = (v + self.offset).view(1, -1, 1, 1)
        out = F.pad(out, [self.p] * 4)
        out[:, :, 0:self.p, :] = v
        out[:, :, -self.p:, :] = v
        out[:, :, :, 0:self.p] = v
        out[:, :, :, -self.p:] = v
        return self.second(out)


def test_border_writes_are_a_per_channel_pad_and_the_sequence_merges_into_one_conv():
    for k in (3, 5):
        _, report, ops, err = reparam(AuthorsBNAndPad(k=k), 2, 4, 7, 7)
        assert ops == {"conv2d": 1} and err <= 1e-5, report.summary()
        assert report.count("constant_pad") == 1 and report.count("merge_sequence") == 1


def test_a_border_value_other_than_the_bn_output_on_zero_still_pads_exactly_but_does_not_merge():
    _, report, ops, err = reparam(AuthorsBNAndPad(value_offset=0.25), 2, 4, 7, 7)
    assert report.count("constant_pad") == 1 and err <= 1e-5
    assert ops["conv2d"] == 2 and ops["constant_pad_nd"] == 1  # the merge would change the border: refused
    assert "merge_sequence" in {r.pass_name for r in report.refusals()}


class CatBorders(nn.Module):
    """The same pad written with cat: constant rows above and below, columns left and right."""

    def __init__(self, c=3):
        super().__init__()
        self.register_buffer("v", torch.randn(c))

    def forward(self, x):
        n, c, h, w = x.shape
        row = self.v.view(1, c, 1, 1).expand(n, c, 2, w)
        y = torch.cat([row, x, row], 2)
        col = self.v.view(1, c, 1, 1).expand(n, c, h + 4, 1)
        return torch.cat([col, y, col], 3)


def test_a_pad_written_with_cat_and_uneven_widths_is_recognised():
    model = CatBorders().eval()
    x = torch.randn(2, 3, 4, 5)
    deploy = fusers.reparameterize(model, (x,), passes=["fold_constants", "constant_pad"])
    ops = op_counts(deploy)
    assert "cat" not in ops and ops["constant_pad_nd"] == 1
    pad = next(n for n in deploy.graph.nodes if n.op == "call_function" and "constant_pad_nd" in str(n.target))
    assert list(pad.args[1]) == [1, 1, 2, 2]
    assert torch.allclose(deploy(x), model(x), rtol=0, atol=1e-6)


class NotAPad(nn.Module):
    """Constant rows that differ along the width: no per-channel pad."""

    def __init__(self):
        super().__init__()
        self.register_buffer("row", torch.randn(1, 3, 1, 5))

    def forward(self, x):
        return torch.cat([self.row.expand(x.shape[0], 3, 1, 5), x, self.row.expand(x.shape[0], 3, 1, 5)], 2)


def test_borders_that_vary_inside_a_channel_are_not_a_pad():
    deploy = fusers.reparameterize(NotAPad().eval(), (torch.randn(2, 3, 4, 5),), passes=["constant_pad"])
    ops = op_counts(deploy)
    assert ops["cat"] == 1 and "constant_pad_nd" not in ops and deploy.reparam_report.count("constant_pad") == 0
