"""Capture by recording one forward: the graph torch.export would give, on timm's own blocks, and torch.export
instead wherever a recording cannot stand for the model's function."""

from __future__ import annotations

import collections
import logging

import pytest
import timm
import torch
from torch import nn

import fusers
from fusers.capture import capture
from fusers.graph import module_path
from fusers.recording import NotRecordable, record
from helpers import randomize_bn


def _ops(gm) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _attrs(gm) -> set[str]:
    """The tensors the graph reads by name, but BatchNorm's step counter (torch.export reads it for nothing)."""
    return {n.target for n in gm.graph.nodes if n.op == "get_attr" and not n.target.endswith("num_batches_tracked")}


@pytest.mark.parametrize("name", ["mobileone_s0", "fastvit_t8"])
def test_a_recording_is_the_graph_torch_export_captures(name):
    """Same aten ops (in-place adds and ReLUs included), same tensors read under the same names, same module
    paths, and the same outputs, on timm's multi-branch blocks with randomized BatchNorm statistics."""
    model = randomize_bn(timm.create_model(name, pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    recorded, exported = capture(model, (x,)), capture(model, (x,), recorded=False)
    assert "_guards_fn" not in dict(recorded.named_modules()) and "_guards_fn" in dict(exported.named_modules())
    assert _ops(recorded) == _ops(exported) and _ops(recorded)["aten.add_.Tensor"] > 0
    assert _attrs(recorded) == _attrs(exported)
    paths = [[module_path(n) for n in gm.graph.nodes if n.op == "call_function"] for gm in (recorded, exported)]
    assert paths[0] == paths[1] and paths[0][0].startswith("stem")
    assert dict(recorded.state_dict()).keys() >= set(model.state_dict())  # the whole state, as ep.module()
    with torch.no_grad():
        torch.testing.assert_close(recorded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(recorded(x), exported(x), rtol=0, atol=0)


class Encoder(nn.Module):
    """torch's own attention layers (torchvision's ViT uses nn.MultiheadAttention): without gradients they run
    fused kernels that torch.export, tracing with gradients, does not take."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        y = self.enc(x)
        return self.mha(y, y, y)[0]


def test_attention_layers_are_recorded_without_their_fused_fast_path():
    model, x = Encoder().eval(), torch.randn(1, 5, 16)
    recorded, exported = capture(model, (x,)), capture(model, (x,), recorded=False)
    assert recorded.meta["captured_by"] == "recorded" and _ops(recorded) == _ops(exported)
    assert not any("_native_multi_head_attention" in op or "_transformer_encoder" in op for op in _ops(recorded))
    assert torch.backends.mha.get_fastpath_enabled()  # turned on again after the recording
    with torch.no_grad():
        torch.testing.assert_close(recorded(x), exported(x), rtol=0, atol=0)


def test_a_recorded_capture_reparameterizes_like_an_exported_one():
    model = randomize_bn(timm.create_model("repvgg_a0", pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    plain = fusers.reparameterize(model, (x,))
    report = plain.reparam_report
    assert report.capture == "recorded" and report.float64_error <= 1e-9
    assert report.ops_after.get("batch_norm", 0) == 0 and report.ops_after["conv2d"] == 22


class ValueBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x * 3  # a Python branch on a value: another input may take the other


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1  # a write into the model's state
        return x + 1


class ScalesItsGrid(nn.Module):
    def __init__(self):
        super().__init__()
        self.grid = [torch.ones(3)]  # a plain attribute, not a buffer: a constant of the graph

    def forward(self, x):
        self.grid[0].mul_(2)  # ...written in place: each run would see another value
        return x + self.grid[0]


class ThroughNumpy(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.numpy() * 2)  # computed where the recorder does not see: a constant would be wrong


class ThroughList(nn.Module):
    def forward(self, x):
        return x * 2 if x.tolist()[0][0] > 0 else x * 3


OFFSET = torch.ones(3)


class Global(nn.Module):
    def forward(self, x):
        return x + OFFSET  # a tensor the model does not hold: the recorder cannot tell where it came from


class Named(nn.Module):
    def forward(self, x):
        return collections.namedtuple("Out", "a b")(x + 1, x + 2)


@pytest.mark.parametrize("model, words", [
    (ValueBranch(), "reads a tensor's value in Python"),
    (CountsCalls(), "writes into a model input, parameter, buffer or constant"),
    (ScalesItsGrid(), "writes into a model input, parameter, buffer or constant"),
    (ThroughNumpy(), "reads a tensor's value in Python"),
    (ThroughList(), "reads a tensor's value in Python"),
    (Global(), "no recorded op made and the model does not hold"),
    (Named(), "something other than tensors"),
])
def test_what_a_recording_cannot_stand_for_is_refused(model, words):
    with pytest.raises(NotRecordable, match=words):
        record(model.eval(), (torch.randn(2, 3),))


def test_a_refused_recording_falls_back_to_torch_export_and_says_why(caplog):
    model = CountsCalls().eval()
    with caplog.at_level(logging.INFO, logger="fusers.capture"):
        gm = capture(model, (torch.randn(2, 3),))
    assert "_guards_fn" in dict(gm.named_modules())  # torch.export's module
    assert any("capturing CountsCalls with torch.export: aten.add_.Tensor writes into" in r.getMessage()
               for r in caplog.records)


class Constants(nn.Module):
    """Tensors the model holds as plain attributes (YOLO's anchor grids) and one made in the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.grid = [torch.arange(4.0).view(1, 4, 1, 1)]

    def forward(self, x):
        y = self.conv(x) + self.grid[0]
        return y * torch.tensor([2.0, 3.0, 4.0, 5.0]).view(1, 4, 1, 1), [y.mean(), None]


def test_held_and_lifted_constants_are_recorded_and_the_output_structure_kept():
    model = Constants().eval()
    x = torch.randn(1, 3, 5, 5)
    gm = record(model, (x,))
    constants = {n.target for n in gm.graph.nodes if n.op == "get_attr"} - {"conv.weight", "conv.bias"}
    assert len(constants) == 2 and all(name not in dict(gm.named_buffers()) for name in constants)  # not state
    out, ref = gm(x), model(x)
    assert isinstance(out, tuple) and isinstance(out[1], list) and out[1][1] is None
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1][0], ref[1][0], rtol=0, atol=0)


def test_nan_outputs_are_recorded_when_the_graph_gives_them_too():
    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x)  # NaN for the negative inputs

    x = torch.tensor([[-1.0, 1.0, 2.0]])
    gm = record(Log().eval(), (x,))
    assert _ops(gm) == {"aten.log.default": 1} and torch.isnan(gm(x)[0, 0])


def test_the_model_runs_forward_once_its_recorded_outputs_are_what_the_verification_compares_with():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].clone()))
    deploy = fusers.reparameterize(model, (torch.randn(1, 3, 16, 16),), seed=5)
    report = deploy.reparam_report
    assert report.capture == "recorded" and len(calls) == 1  # recorded once; the verification ran no other forward
    verify_inputs = fusers.numerics.seeded_like((torch.empty(1, 3, 16, 16),), 6)[0]
    assert torch.equal(calls[0], verify_inputs)  # recorded on the verification's seeded inputs (seed + 1)
    with torch.no_grad():
        assert report.float32_error == fusers.numerics.max_rel_error(model(verify_inputs), deploy(verify_inputs))
