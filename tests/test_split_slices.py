"""split_slices: slices that tile a dim become one split; slices that leave a gap stay."""

import torch
from torch import nn

import fusers
from fusers.graph import op_counts


class Tiles(nn.Module):
    def __init__(self, bounds):
        super().__init__()
        self.bounds = bounds

    def forward(self, x):
        return torch.cat([x[:, a:b] * (i + 2) for i, (a, b) in enumerate(self.bounds)], 1)


def test_tiling_slices_become_one_split_and_gapped_ones_stay():
    x = torch.randn(2, 7, 3)
    for bounds, split in (([(0, 2), (2, 5), (5, 7)], True), ([(0, 2), (3, 7)], False), ([(0, 3), (2, 7)], False)):
        model = Tiles(bounds).eval()
        deploy = fusers.reparameterize(model, (x,), passes=["split_slices"])
        ops = op_counts(deploy)
        assert ("split_with_sizes" in ops) == split and ("slice" not in ops) == split, (bounds, ops)
        assert torch.equal(deploy(x), model(x))
