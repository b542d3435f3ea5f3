"""slice_writes: in-place writes into slices of an intermediate become cats, exactly; unsafe ones are kept."""

import torch
from torch import nn

import fusers
from fusers import RefusalCode
from fusers.graph import op_counts


def run(model, x, passes=("slice_writes",)):
    deploy = fusers.reparameterize(model.eval(), (x,), passes=list(passes))
    report = deploy.reparam_report
    with torch.no_grad():
        ref, out = model(x.clone()), deploy(x.clone())
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
        assert torch.equal(a, b)  # data movement only: bit for bit
    return op_counts(deploy), report


class Decode(nn.Module):
    """YOLOv7's training-form decode: the box columns rewritten in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("grid", torch.randn(1, 1, 4, 4, 2))
        self.register_buffer("anchor", torch.rand(1, 3, 1, 1, 2) * 10)
        self.stride = 8.0

    def forward(self, x):
        y = x.sigmoid()
        y[..., 0:2] = (y[..., 0:2] * 2.0 - 0.5 + self.grid) * self.stride
        y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor
        return y.view(x.shape[0], -1, x.shape[-1])


def test_writes_covering_the_last_dim_leave_one_cat_of_the_computed_pieces():
    ops, report = run(Decode(), torch.randn(2, 3, 4, 4, 7))
    assert "copy_" not in ops and ops["cat"] == 1
    assert ops["slice"] == 3  # y[..., 0:2], y[..., 2:4] read from y itself, and the untouched y[..., 4:]
    assert report.count("slice_writes") == 1


class BorderWrites(nn.Module):
    """DBB's BN-and-pad as its authors write it: pad, then the four borders assigned in place."""

    def __init__(self, c=3):
        super().__init__()
        self.register_buffer("v", torch.randn(c))

    def forward(self, x):
        out = nn.functional.pad(x, [1, 1, 1, 1])
        v = self.v.view(1, -1, 1, 1)
        out[:, :, 0:1, :] = v
        out[:, :, -1:, :] = v
        out[:, :, :, 0:1] = v
        out[:, :, :, -1:] = v
        return out


def test_border_writes_on_two_dims_become_two_cats():
    ops, _ = run(BorderWrites(), torch.randn(2, 3, 5, 5))
    assert "copy_" not in ops and ops["cat"] == 2


class SelectAndBox(nn.Module):
    def forward(self, x):
        y = x * 2
        y[:, 0] = y[:, 1] + 1          # a select: a box one wide
        y[:, 1:3, 2:4] = 0.5           # fill_ into a box of two dims
        return y


def test_select_and_multi_dim_box_writes():
    ops, report = run(SelectAndBox(), torch.randn(2, 4, 5, 5))
    assert not {"copy_", "fill_"} & set(ops) and report.count("slice_writes") == 1


class ReadAcrossWrite(nn.Module):
    def forward(self, x):
        y = x * 3
        a = y[:, 0:2]      # a view made before the write ...
        y[:, 0:2] = 0
        return a + 1, y    # ... and read after it: it sees the zeros


class WriteIntoInput(nn.Module):
    def forward(self, x):
        x[:, 0] = 0
        return x * 2


def test_writes_that_are_seen_elsewhere_are_kept_with_the_reason():
    ops, report = run(ReadAcrossWrite(), torch.randn(2, 4, 3, 3))
    assert ops["fill_"] == 1 and [r.code for r in report.refusals()] == [RefusalCode.UNSUPPORTED_WRITE]
    assert "made before a write and read after it" in report.refusals()[0].reason
    ops, report = run(WriteIntoInput(), torch.randn(2, 4, 3, 3))
    assert ops["fill_"] == 1 and [r.code for r in report.refusals()] == [RefusalCode.WRITES_VISIBLE]
    left = report.leftovers
    assert [x.kind for x in left] == ["in_place_write"] and "graph input" in left[0].reason


class Scatter(nn.Module):
    def forward(self, x):
        return torch.slice_scatter(x, torch.zeros(2, 4, 2), dim=2, start=1, end=3)


def test_functional_slice_scatter_becomes_a_cat():
    ops, report = run(Scatter(), torch.randn(2, 4, 5))
    assert "slice_scatter" not in ops and ops["cat"] == 1 and report.count("slice_writes") == 1


class ListIndexThenSelect(nn.Module):
    """``y[..., [0, 1]] = ...`` is an index_put_ whose result aliases ``y``; a later write through that result
    must not be treated as a write into a fresh tensor."""

    def forward(self, x):
        y = x.sigmoid()
        y[..., [0, 1]] = y[..., [0, 1]] * 2
        y[:, 2] = 0.5
        return y


def test_writes_through_an_index_put_result_are_kept_and_listed():
    ops, report = run(ListIndexThenSelect(), torch.randn(2, 3, 4), passes=fusers.DEFAULT_PASSES)
    assert ops["index_put_"] == 1 and ops["fill_"] == 1
    assert [r.code for r in report.refusals()] == [RefusalCode.WRITES_VISIBLE]
    assert sorted(x.kind for x in report.leftovers) == ["in_place_write", "in_place_write"]
