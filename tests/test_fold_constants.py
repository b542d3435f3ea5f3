"""fold_constants: weights-only subgraphs become constants, but never a tensor written in place afterwards."""

import torch
from torch import nn

import fusers
from fusers.graph import op_counts


class WrittenConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.ones(3))

    def forward(self, x):
        g = self.b * 2
        g[[0]] = 5.0  # index_put_ into a weights-only tensor: folding g alone would drop the write
        return x + g


def test_a_weights_only_tensor_written_in_place_is_not_folded_and_nothing_crashes():
    model = WrittenConstant().eval()
    x = torch.randn(2, 3)
    deploy = fusers.reparameterize(model, (x,))
    report = deploy.reparam_report
    assert torch.equal(deploy(x), model(x)) and op_counts(deploy)["index_put_"] == 1
    assert not [r for p in report.passes for r in p.rolled_back]  # no pass crashed or was undone
