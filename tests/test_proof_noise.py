"""The float64 check's noise floor: a graph whose own float64 rounding is far above 1e-9.

timm's FBNetV3-G with random BatchNorm statistics drives activations to ~1e4 before its squeeze-excite
hard-sigmoid gates, so a BatchNorm fold (exact in real arithmetic; it only rounds differently) moves the
outputs by ~1e-8 in float64. Held to a fixed 1e-9, 88 of its 107 BatchNorms were rolled back. The pass
manager now measures the graph's own rounding noise the first time a chunk misses (every weight and op
result moved by one unit of rounding) and holds rewrites to ``NOISE_FACTOR`` times it, saying so; an
inexact rewrite is still refused, and a well-conditioned graph keeps 1e-9.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ScaleWeights

import fusers
from deploy import zoo
from fusers.manager import NOISE_FACTOR


@pytest.fixture(scope="module")
def fbnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(timm.create_model("fbnetv3_g", pretrained=False, num_classes=10), seed=0)
    return model.eval(), torch.randn(1, 3, 96, 96)


@pytest.mark.e2e
def test_ill_conditioned_graph_folds_every_batchnorm_against_its_noise_floor(fbnet):
    model, x = fbnet
    report = fusers.reparameterize(model, (x,), passes=["fold_bn"]).reparam_report
    assert report.count("fold_bn") == 107 and "batch_norm" not in report.ops_after
    assert not [r for p in report.passes for r in p.rolled_back]
    noise = float(report.tolerance_note.split("rounding noise ")[1].split()[0])
    assert 1e-9 / NOISE_FACTOR < noise < 1e-7  # above the fixed tolerance's reach, far below any real mistake
    assert report.float64_error <= NOISE_FACTOR * noise


@pytest.mark.e2e
def test_raised_floor_still_refuses_an_inexact_rewrite(fbnet):
    model, x = fbnet
    report = fusers.reparameterize(model, (x,), passes=[ScaleWeights({"conv2d_3": 1 + 1e-6})]).reparam_report
    (undone,) = [r for p in report.passes for r in p.rolled_back]
    assert "rolled back: float64 error" in undone.reason
    assert report.tolerance_note and report.float64_error == 0.0


def test_well_conditioned_graph_keeps_the_fixed_tolerance():
    model = zoo.randomize_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), seed=1)
    deploy = fusers.reparameterize(model.eval(), (torch.randn(1, 3, 8, 8),),
                                   passes=[ScaleWeights({"conv2d": 1 + 1e-6})])
    report = deploy.reparam_report
    assert [p.rolled_back[0].reason.startswith("rolled back") for p in report.passes if p.rolled_back] == [True]
    assert report.tolerance_note == ""  # the noise was measured (the chunk missed) and is far below 1e-9
