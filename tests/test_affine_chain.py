"""affine_chain: elementwise ops with constants collapse to one multiply and one add (a power first)."""

import torch
from torch import nn

import fusers
from fusers.graph import op_counts
from test_slice_writes import Decode


def run(model, x, passes):
    deploy = fusers.reparameterize(model.eval(), (x,), passes=passes)
    with torch.no_grad():
        assert torch.allclose(deploy(x), model(x), rtol=1e-6, atol=1e-6)
    return op_counts(deploy), deploy.reparam_report


def test_yolo_decode_chains_become_the_fuse_forms_mul_add_and_pow_mul():
    ops, report = run(Decode(), torch.randn(2, 3, 4, 4, 7), ["slice_writes", "affine_chain"])
    assert ops["mul"] == 2 and ops["add"] == 1 and ops["pow"] == 1 and "sub" not in ops
    assert report.count("affine_chain") == 2 and report.float64_error <= 1e-12


class Normalize(nn.Module):
    """Two ops already: nothing to gain, nothing rewritten."""

    def forward(self, x):
        return (x - 0.5) / 0.25


class ShiftedPower(nn.Module):
    """(x + 1) ** 2 * 3: a power after a shift has no mul-add form."""

    def forward(self, x):
        return (x + 1) ** 2 * 3


def test_short_chains_and_powers_of_shifted_values_are_left_alone():
    for model in (Normalize(), ShiftedPower()):
        ops, report = run(model, torch.randn(2, 3), ["affine_chain"])
        assert report.count("affine_chain") == 0, ops
