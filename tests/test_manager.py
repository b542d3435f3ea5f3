"""The pass manager keeps exact rewrites and rolls back inexact ones, with the reason."""

import torch
from torch import nn

import fusers
from fusers.graph import CONV_OPS, as_conv, replace_conv
from fusers.manager import Pass, Site
from helpers import randomize_bn


class ScaleWeights(Pass):
    """A deliberately broken pass: rescales every conv's weights by ``factors[i]``."""

    name = "scale_weights"

    def __init__(self, factors):
        self.factors = factors

    def find(self, gm):
        convs = [n for n in gm.graph.nodes if n.target in CONV_OPS]
        return [Site(n.name, self._rewrite(n, f)) for n, f in zip(convs, self.factors)], []

    @staticmethod
    def _rewrite(node, factor):
        def apply(gm):
            c = as_conv(gm, node)
            replace_conv(gm, node, c.x, "conv", c.weight * factor, c.bias, c.stride, c.padding, c.dilation, c.groups)
            gm.graph.erase_node(node)
            return f"x{factor}"
        return apply


def test_inexact_rewrite_is_rolled_back_and_exact_one_kept():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 10, 10)
    deploy = fusers.reparameterize(model, (x,), passes=[ScaleWeights([1.0, 1.001])])
    report = deploy.reparam_report
    (record,) = [p for p in report.passes if p.name == "scale_weights" and p.round == 1]
    assert len(record.rewrites) == 1 and record.rewrites[0].endswith("x1.0")
    assert len(record.rolled_back) == 1 and "rolled back: float64 error" in record.rolled_back[0].reason
    assert report.float64_error == 0.0
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=0, atol=0)


def test_unknown_pass_name_is_a_clear_error():
    try:
        fusers.reparameterize(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 2, 2),), passes=["fold_bnn"])
    except ValueError as e:
        assert "unknown pass 'fold_bnn'" in str(e) and "fold_bn" in str(e)
    else:
        raise AssertionError("no error")
