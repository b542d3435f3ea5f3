"""Float64 checks at a smaller spatial size.

A graph that no rewrite can tell apart at a quarter or half of its size (every op pointwise, per channel, a
global mean or the head after it; every conv and pool meeting the same borders) is proven there, and the result
is checked against the model at the captured size in float32 (ops x eps), else proven again at the captured
size. Any other graph is checked at the captured size; only when a round must be redone a pass at a time (many
checks) do those checks go to a smaller size where every tap still meets real data, and the result is then
checked once more at the captured size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusers
from fusers.graph import add_tensor, as_conv, replace_conv
from fusers.reparam import _same_borders
from fusers.rules import Pass, RefusalCode
from helpers import randomize_bn


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, 2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.b(self.a(x)).mean((2, 3))


class Flattening(ConvNet):
    """A head that flattens the feature map into a Linear: its weight is sized by the captured input."""

    def __init__(self, size=64):
        super().__init__()
        self.fc = nn.Linear(8 * (size // 2) ** 2, 4)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).flatten(1))


class DropPadding(Pass):
    """A deliberately broken rewrite that changes only the border: the first conv loses its padding and the
    lost ring is put back as zeros."""

    name = "drop_padding"

    def match(self, gm, node):
        c = as_conv(gm, node)
        return self.found([node]) if c is not None and c.padding == (1, 1) and c.stride == (1, 1) else None

    def rewrite(self, gm, match):
        (node,) = [n for n in gm.graph.nodes if n.name == match.nodes[0]]
        c = as_conv(gm, node)
        new = replace_conv(gm, node, c.x, "conv", c.weight, c.bias, c.stride, (0, 0), c.dilation, c.groups)
        with gm.graph.inserting_after(new):
            padded = gm.graph.call_function(torch.ops.aten.constant_pad_nd.default, (new, [1, 1, 1, 1], 0.0))
        new.replace_all_uses_with(padded)
        padded.args = (new, [1, 1, 1, 1], 0.0)
        gm.graph.erase_node(node)
        return "padding dropped"


class Reweigh(Pass):
    """An exact rewrite with large new weights: each conv is built again from a copy of its weights, and 2 MiB
    of scratch weights are registered beside it, more than a round may add (1 MiB for a model this small): the
    round is redone a pass and a rewrite at a time."""

    name = "reweigh"

    def match(self, gm, node):
        c = as_conv(gm, node)
        return self.found([node]) if c is not None and not node.meta.get("reweighed") else None

    def rewrite(self, gm, match):
        (node,) = [n for n in gm.graph.nodes if n.name == match.nodes[0]]
        c = as_conv(gm, node)
        new = replace_conv(gm, node, c.x, "conv", c.weight.clone(), c.bias, c.stride, c.padding, c.dilation, c.groups)
        new.meta["reweighed"] = True
        gm.graph.erase_node(node)
        add_tensor(gm, "scratch", torch.zeros(1 << 18, dtype=torch.float64))
        return "weights copied"


class Cropping(ConvNet):
    """ACNet's crop: a slice of the spatial dims, whose ends are the captured size's (not alike at any other)."""

    def forward(self, x):
        y = self.a(x)
        return self.b(y[:, :, 1:-1, 1:-1]).mean((2, 3))


class PaddedSame(ConvNet):
    """TensorFlow's "same" for a stride-2 conv: one pad column and row on the right and bottom, then no padding.
    Whether the last window reads the pad depends on the size's parity, which the conv's own (zero) padding
    does not show."""

    def forward(self, x):
        y = torch.nn.functional.pad(self.a(x), [0, 1, 0, 1])
        return torch.nn.functional.conv2d(y, self.b[0].weight, None, 2).mean((2, 3))


class FourStrides(nn.Module):
    """At 120 the fourth stride-2 conv reads 15 (odd: its last window overhangs the end); at 60 it reads 8 and at
    30 it reads 4 (no overhang): no smaller size meets the same borders."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, 2, padding=1, bias=False),
                                                  nn.BatchNorm2d(8)) for i in range(4)])

    def forward(self, x):
        return self.body(x).mean((2, 3))


class MeanAsSum(Pass):
    """A deliberately wrong rewrite that is exact at 32x32 only: the spatial mean of a 16x16 map as its sum
    over 256."""

    name = "mean_as_sum"

    def match(self, gm, node):
        return self.found([node]) if node.target == torch.ops.aten.mean.dim else None

    def rewrite(self, gm, match):
        (node,) = [n for n in gm.graph.nodes if n.name == match.nodes[0]]
        with gm.graph.inserting_after(node):
            total = gm.graph.call_function(torch.ops.aten.sum.dim_IntList, node.args)
        with gm.graph.inserting_after(total):
            mean = gm.graph.call_function(torch.ops.aten.div.Tensor, (total, 256.0))
        node.replace_all_uses_with(mean)
        gm.graph.erase_node(node)
        return "mean as sum / 256"


def _run(model, size, passes=None):
    model = randomize_bn(model)
    return fusers.reparameterize(model, (torch.randn(1, 3, size, size),), passes=passes).reparam_report


def _proofs(monkeypatch) -> list:
    """The input shapes of the float64 proofs at the captured size (``_proof_reference`` calls)."""
    calls = []
    real = fusers.reparam._proof_reference
    monkeypatch.setattr(fusers.reparam, "_proof_reference",
                        lambda gm, args, *a: calls.append(args[0].shape) or real(gm, args, *a))
    return calls


def test_a_graph_alike_at_a_quarter_size_is_proven_there_alone(monkeypatch):
    calls = _proofs(monkeypatch)
    report = _run(ConvNet(), 128)
    assert report.proof_shape == [[1, 3, 32, 32]] and calls == []  # no float64 run at 128x128
    assert "batch_norm" not in report.ops_after and report.float64_error <= 1e-12
    assert report.float32_error <= 1e-5  # checked against the model at the captured size


def test_a_graph_with_other_borders_at_every_smaller_size_is_proven_at_the_captured_size(monkeypatch):
    calls = _proofs(monkeypatch)
    report = _run(FourStrides(), 120)
    assert report.proof_shape is None and calls == [torch.Size([1, 3, 120, 120])]
    assert "batch_norm" not in report.ops_after and report.float64_error <= 1e-12


@pytest.mark.parametrize("full,small,extent,stride,pad,alike", [
    (14, 7, 3, 2, 1, True),    # no overhang at the captured size: any at the smaller one is an extra kind
    (13, 7, 3, 2, 1, True),    # an overhang of one at both
    (15, 8, 3, 2, 1, False),   # an overhang of one at 15, none at 8
    (14, 7, 1, 2, 0, True),    # unpadded: no border at all
    (32, 4, 7, 1, 3, False),   # at 4 every position of a 7-wide window touches a border: no interior
])
def test_same_borders(full, small, extent, stride, pad, alike):
    assert _same_borders(full, small, extent, stride, pad) is alike


@pytest.mark.parametrize("model", [Cropping, PaddedSame])
def test_a_round_that_holds_is_checked_at_the_captured_size_only(monkeypatch, model):
    runs = []
    real = fusers.reparam._Windows.run
    monkeypatch.setattr(fusers.reparam._Windows, "run", lambda self, *a: runs.append(a[0].shape) or real(self, *a))
    report = _run(model(), 128)
    assert report.proof_shape is None and runs == []  # no small input was even tried
    assert "batch_norm" not in report.ops_after and report.float64_error <= 1e-12


def test_a_round_redone_a_pass_at_a_time_is_checked_at_a_quarter_size():
    report = _run(Cropping(), 128, passes=[Reweigh(), "fold_bn"])
    assert report.proof_shape == [[1, 3, 32, 32]]
    assert [len(p.rewrites) for p in report.passes if p.name == "reweigh"][0] == 2
    assert "batch_norm" not in report.ops_after and report.float64_error <= 1e-12


def test_a_small_input_is_not_used_below_64_or_where_the_graph_bakes_the_size():
    assert _run(ConvNet(), 48, passes=[Reweigh(), "fold_bn"]).proof_shape is None
    assert _run(Flattening(64), 64, passes=[Reweigh(), "fold_bn"]).proof_shape is None


def test_a_result_the_smaller_size_cannot_tell_apart_is_caught_at_the_captured_size(monkeypatch):
    """Were the list of size-free ops to hold one that is not (here ``sum``), a rewrite exact only at the smaller
    size would pass its checks there: the float32 check against the model at the captured size catches it, and
    the run is proven again at the captured size, where the rewrite is rolled back."""
    monkeypatch.setattr(fusers.reparam, "_SIZE_FREE", fusers.reparam._SIZE_FREE | {torch.ops.aten.sum})
    reasons = []

    class Listener:
        def on_restart(self, reason):
            reasons.append(reason)

    model = randomize_bn(ConvNet())
    deploy = fusers.reparameterize(model, (torch.randn(1, 3, 128, 128),), passes=[MeanAsSum(), "fold_bn"],
                                   instruments=[Listener()])
    report = deploy.reparam_report
    assert len(reasons) == 1 and "from the model at the captured size" in reasons[0]
    assert report.proof_shape is None and [r.code for r in report.refusals()] == [RefusalCode.ROLLED_BACK]
    assert "mean" in report.ops_after and report.float32_error <= 1e-5


class WideLast(nn.Module):
    """Three stride-2 convs, then a 7x7 conv: at a quarter of 128 its input is 4, under the 8 its window needs."""

    def __init__(self):
        super().__init__()
        layers = [nn.Conv2d(3 if i == 0 else 8, 8, 3, 2, padding=1) for i in range(3)]
        self.body = nn.Sequential(*layers, nn.BatchNorm2d(8), nn.Conv2d(8, 8, 7, padding=3), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.body(x).mean((2, 3))


def test_a_size_the_captured_shapes_rule_out_is_not_run(monkeypatch):
    runs = []
    real = fusers.reparam._Windows.run
    monkeypatch.setattr(fusers.reparam._Windows, "run", lambda self, *a: runs.append(a[0].shape) or real(self, *a))
    report = _run(WideLast(), 128, passes=[Reweigh(), "fold_bn"])
    assert report.proof_shape == [[1, 3, 64, 64]] and "batch_norm" not in report.ops_after
    assert set(runs) == {torch.Size([1, 3, 64, 64])}  # the quarter size was judged from the captured shapes alone


def test_a_border_bug_is_still_rolled_back():
    report = _run(ConvNet(), 128, passes=[DropPadding()])
    codes = {r.code for r in report.refusals()}
    assert codes == {RefusalCode.ROLLED_BACK} and report.float64_error == 0.0
    assert report.proof_shape is None  # the small checks rolled something back: done again at the captured size


def test_instruments_are_told_when_the_passes_start_again_at_the_captured_size():
    """The progress lines of the small run are not the result: an instrument hears ``on_restart`` between the
    two runs, and the records after it are the captured-size run's (the report holds only those)."""
    events = []

    class Recorder:
        def on_pass_end(self, record):
            events.append(("pass", record.name, len(record.rolled_back)))

        def on_restart(self, reason):
            events.append(("restart", reason))

    model = randomize_bn(ConvNet())
    deploy = fusers.reparameterize(model, (torch.randn(1, 3, 128, 128),), passes=[DropPadding()],
                                   instruments=iter([Recorder()]))  # any iterable, read once
    restarts = [i for i, e in enumerate(events) if e[0] == "restart"]
    assert len(restarts) == 1 and events[restarts[0]] == ("restart", "the checks at 1x3x32x32 rolled back a rewrite")
    after = events[restarts[0] + 1:]
    assert after == [("pass", p.name, len(p.rolled_back)) for p in deploy.reparam_report.passes]
    assert after[0] == ("pass", "drop_padding", 1)


def test_no_restart_when_the_small_checks_hold():
    events = []

    class Recorder:
        def on_restart(self, reason):
            events.append(reason)

    deploy = fusers.reparameterize(randomize_bn(ConvNet()), (torch.randn(1, 3, 128, 128),),
                                   passes=[Reweigh(), "fold_bn"], instruments=[Recorder()])
    assert events == [] and deploy.reparam_report.proof_shape == [[1, 3, 32, 32]]
