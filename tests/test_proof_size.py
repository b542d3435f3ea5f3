"""Per-pass checks at a smaller spatial size, one final check at the captured size.

The float64 checks of an image model run at a quarter or half of its size when every conv and pool still
meets each of its taps on real data there; the result must still agree at the captured size, or the run is
done again with every check at the captured size.
"""

from __future__ import annotations

import torch
from torch import nn

import fusers
from fusers.graph import as_conv, replace_conv
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


def _run(model, size, passes=None):
    model = randomize_bn(model)
    return fusers.reparameterize(model, (torch.randn(1, 3, size, size),), passes=passes).reparam_report


def test_checks_run_at_a_quarter_size_and_the_result_holds_at_the_captured_size():
    report = _run(ConvNet(), 128)
    assert report.proof_shape == [[1, 3, 32, 32]]
    assert "batch_norm" not in report.ops_after and report.float64_error <= 1e-12


def test_a_small_input_is_not_used_below_64_or_where_the_graph_bakes_the_size():
    assert _run(ConvNet(), 48).proof_shape is None
    assert _run(Flattening(64), 64).proof_shape is None


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
    report = _run(WideLast(), 128)
    assert report.proof_shape == [[1, 3, 64, 64]] and "batch_norm" not in report.ops_after
    assert runs == [torch.Size([1, 3, 64, 64])]  # the quarter size was judged from the captured shapes alone


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

    _ = fusers.reparameterize(randomize_bn(ConvNet()), (torch.randn(1, 3, 128, 128),), instruments=[Recorder()])
    assert events == []
