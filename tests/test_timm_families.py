"""timm's reparameterizable families through ``fusers.reparameterize``, against timm's own deploy form.

Every timm 1.0 family with a ``fuse`` / ``reparameterize`` / ``switch_to_deploy`` method that
``timm.utils.reparameterize_model`` calls, at its smallest variant (``pretrained=False``, 10 classes,
a 64x64 input), with non-trivial BatchNorm statistics. For each: no BatchNorm op is left; there are
no more conv / Linear / matmul nodes than in timm's hand-written deploy form captured the same way;
the float32 output is within ``1e-4`` relative of the model's (measured: 1e-7 to 8e-7), and the
compiler's own float64 check within ``1e-9``.

In one process the whole file takes about two minutes on two CPU cores (2-18 s a family): the
cheapest families (unmarked below) stay in the fast lane, the others are ``e2e``.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import fusers
from fusers.capture import capture
from fusers.graph import op_counts
from helpers import randomize_bn
from runtimes.core import max_rel_error

timm = pytest.importorskip("timm")

SIZE = 64
# aten ops that multiply by a weight matrix: the count that a reparameterization should not increase
WEIGHTED_OPS = ("conv1d", "conv2d", "convolution", "linear", "matmul", "bmm", "addmm", "mm")

e2e = pytest.mark.e2e
FAMILIES = [  # (timm model, create_model keywords); the family is the test id
    pytest.param("repvgg_a0", {}, id="byobnet-repvgg"),
    pytest.param("mobileone_s0", {}, id="byobnet-mobileone", marks=e2e),
    pytest.param("fastvit_t8", {}, id="fastvit", marks=e2e),
    pytest.param("fastvit_mci0", {}, id="fastvit-mci", marks=e2e),
    pytest.param("repvit_m0_9", {}, id="repvit", marks=e2e),
    pytest.param("repghostnet_050", {}, id="repghost", marks=e2e),
    pytest.param("ghostnetv3_050", {}, id="ghostnetv3", marks=e2e),
    pytest.param("efficientvit_m0", {"img_size": SIZE}, id="efficientvit_msra", marks=e2e),
    pytest.param("shvit_s1", {}, id="shvit", marks=e2e),
    pytest.param("levit_128s", {"img_size": SIZE}, id="levit", marks=e2e),
    pytest.param("levit_conv_128s", {"img_size": SIZE}, id="levit_conv", marks=e2e),
    pytest.param("efficientvim_m1", {}, id="efficientvim", marks=e2e),
    pytest.param("iformer_t", {}, id="iformer", marks=e2e),
    pytest.param("lcnetv2_small", {}, id="lcnetv2"),
    pytest.param("nextvit_small", {}, id="nextvit", marks=e2e),
    pytest.param("tiny_vit_5m_224", {}, id="tiny_vit", marks=e2e),
]


def weighted(ops: dict[str, int]) -> int:
    return sum(ops.get(k, 0) for k in WEIGHTED_OPS)


def batchnorms(ops: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in ops.items() if "batch_norm" in k}


def why(report) -> str:
    """The standing refusals, one line per distinct reason with its count and first site."""
    refusals = report.refusals()
    counts = Counter(r.message for r in refusals)
    first = {}
    for r in refusals:
        first.setdefault(r.message, r.site)
    return "\n".join(f"  {n}x [{first[m]}, ...] {m}" for m, n in counts.most_common())


@pytest.mark.parametrize("name,kwargs", FAMILIES)
def test_timm_family_matches_or_beats_timm_reparameterize(name, kwargs):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), seed=0)
    x = torch.randn(1, 3, SIZE, SIZE)

    deploy = fusers.reparameterize(model, (x,))
    report = deploy.reparam_report
    ours = op_counts(deploy)
    theirs = op_counts(capture(timm.utils.reparameterize_model(copy.deepcopy(model)).eval(), (x,)))

    assert not batchnorms(ours), f"{name}: BatchNorm left {batchnorms(ours)}:\n{why(report)}"
    assert weighted(ours) <= weighted(theirs), (
        f"{name}: {weighted(ours)} conv/linear/matmul nodes, timm's reparameterize_model has {weighted(theirs)}: "
        f"ours {ours}, theirs {theirs}\n{why(report)}")
    with torch.no_grad():
        err = max_rel_error(model(x), deploy(x))
    assert err <= 1e-4, f"{name}: float32 max rel error {err:.2e}"
    assert report.float64_error <= 1e-9, report.summary()
