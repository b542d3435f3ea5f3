"""fusers.free_batch: the captured batch baked into reshapes becomes the input's batch, proven row for row,
and refused where the literal was not the batch."""

from __future__ import annotations

import torch
from torch import nn

import fusers
from fusers.graph import op_counts

B = 2


class HeadLike(nn.Module):
    """YOLO's head shape games: ``view(bs, na, no, ny, nx)``, a permute, then ``view(bs, -1, no)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2 * 5, 1)

    def forward(self, x):
        bs, _, ny, nx = x.shape
        y = self.conv(x).view(bs, 2, 5, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
        return y.sigmoid().view(bs, -1, 5)


class MixesRows(nn.Module):
    """``transpose(0, 1)`` puts the 2 channels first: the leading 2 of the view is not the batch, and freeing it
    would compute something else at another batch."""

    def forward(self, x):
        t = x.transpose(0, 1).contiguous()  # (C=2, B, 4)
        return t.view(2, -1).sum(-1, keepdim=True) * x


def _captured(model: nn.Module, x: torch.Tensor):
    return fusers.reparameterize(model.eval(), (x,), passes=[])


def test_head_reshapes_take_the_inputs_batch():
    torch.manual_seed(0)
    model, x = HeadLike().eval(), torch.randn(B, 3, 4, 4)
    gm = _captured(model, x)
    freed, why = fusers.free_batch(gm, x)
    assert (freed, why) == (2, "")
    assert op_counts(gm)["sym_size"] == 1
    for b in (1, 3, 5):
        probe = torch.randn(b, 3, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(gm(probe), model(probe), rtol=1e-6, atol=1e-7)


def test_a_leading_size_that_is_not_the_batch_is_refused_and_restored():
    model, x = MixesRows(), torch.randn(B, 2, 4)  # channels 2 == batch 2: the view's 2 looks like the batch
    gm = _captured(model, x)
    before = gm.code
    freed, why = fusers.free_batch(gm, x)
    assert freed == 0 and why.startswith("at batch 1 the graph's rows differ from the captured batch's")
    assert gm.code == before
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_nothing_to_free_and_batch_one_captures():
    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten(1) * 2

    x = torch.randn(B, 3, 2)
    gm = _captured(Flat(), x)
    assert fusers.free_batch(gm, x) == (0, "")
    assert fusers.free_batch(_captured(HeadLike(), torch.randn(1, 3, 4, 4)), torch.randn(1, 3, 4, 4))[0] == 0
