"""equalize: cross-layer range equalization is exact, narrows the per-channel ranges of merged kernels, and is
refused across activations that are not positively homogeneous."""

import torch
from torch import nn

import fusers
from fusers import RefusalCode
from fusers.passes.equalize import channel_ranges


class RepVGGLike(nn.Module):
    """A merged-kernel conv with a few outlier output channels (a large identity-BN scale merged into a 3x3),
    an activation, and a grouped 3x3 after it."""

    def __init__(self, act=nn.ReLU, c=8):
        super().__init__()
        self.first = nn.Conv2d(4, c, 3, padding=1)
        self.act = act()
        self.second = nn.Conv2d(c, c, 3, padding=1, groups=2)
        with torch.no_grad():
            self.first.weight[:2] *= 60.0  # the outliers
            self.first.bias[:2] *= 60.0

    def forward(self, x):
        return self.second(self.act(self.first(x)))


def ratio(kernel):
    r = channel_ranges(kernel, 0)
    return float(r.max() / r.median())


def first_kernel(deploy):
    return next(getattr(deploy, n.args[1].target) for n in deploy.graph.nodes
                if n.op == "call_function" and "conv2d" in str(n.target))


def test_equalize_is_exact_in_float64_and_narrows_the_range_ratio():
    for act in (nn.ReLU, lambda: nn.LeakyReLU(0.1)):
        model = RepVGGLike(act).eval()
        before = ratio(model.first.weight.detach())
        deploy = fusers.reparameterize(model, (torch.randn(2, 4, 8, 8),), passes=["equalize"])
        report = deploy.reparam_report
        after = ratio(first_kernel(deploy))
        assert report.count("equalize") == 1 and report.float64_error <= 1e-9
        assert before > 20 and after < before / 5, (before, after)


def test_equalize_is_refused_across_silu_with_the_reason():
    model = RepVGGLike(nn.SiLU).eval()
    deploy = fusers.reparameterize(model, (torch.randn(2, 4, 8, 8),), passes=["equalize"])
    report = deploy.reparam_report
    assert report.count("equalize") == 0 and [r.code for r in report.refusals()] == [RefusalCode.NOT_HOMOGENEOUS]
    assert "silu" in report.refusals()[0].reason
