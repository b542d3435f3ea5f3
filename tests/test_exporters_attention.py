"""ONNX export of attention the exporter only partly translates: ``exporters.legalize`` decomposes the rest.

torch.onnx's function for ``aten.scaled_dot_product_attention`` takes 4-D query/key/value only; timm's Twins
calls it on 5-D windows. The fixtures below are written the way timm writes its blocks (``fused_attn``, one
``qkv`` Linear, ``unbind(0)``, ``dropout_p=self.attn_drop.p if self.training else 0.``), behind a conv/BN stem
so that the compiler folds something first. The export of the plain graph must run on ONNX Runtime within
1e-4 of the torch model, with standard ONNX ops only, the windowed (5-D) calls decomposed and the 4-D ones
left to the exporter; a model the exporter takes as it is must come out exactly as before.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxsim")

import fusers  # noqa: E402
from conftest import main_in_process  # noqa: E402
from export_models import example, make  # noqa: E402
from exporters import ExportError  # noqa: E402
from exporters.legalize import Decomposition, call_kind, decomposition_of  # noqa: E402
from exporters.onnx import export_onnx, export_onnx_raw, op_counts, simplify_onnx  # noqa: E402
from fusers.graph import op_counts as graph_ops  # noqa: E402
from helpers import randomize_bn  # noqa: E402

SDPA = torch.ops.aten.scaled_dot_product_attention.default
WS = 2  # window side: 4 tokens a window
DIM = 16


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each WS x WS window, one fused call over all windows: q, k, v are
    (B, windows, heads, tokens, head_dim), as in Twins' locally grouped attention."""

    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim, num_heads=2, ws=WS, attn_drop=0., attn_mask=None, is_causal=False, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.ws = ws
        self.scale = scale
        self.is_causal = is_causal
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x, size):
        B, N, C = x.shape
        H, W = size
        _h, _w = H // self.ws, W // self.ws
        x = x.view(B, _h, self.ws, _w, self.ws, C).transpose(2, 3)
        qkv = self.qkv(x).reshape(B, _h * _w, self.ws * self.ws, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=self.attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.,
                is_causal=self.is_causal,
                scale=self.scale,
            )
        else:
            attn = (q * (self.scale or q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(2, 3).reshape(B, _h, _w, self.ws, self.ws, C)
        x = x.transpose(2, 3).reshape(B, N, C)
        return self.proj(x)


class GlobalAttention(nn.Module):
    """ViT-style multi-head self-attention over all tokens: q, k, v are (B, heads, tokens, head_dim)."""

    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim, num_heads=2, attn_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.,
            is_causal=is_causal,
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TinyTwins(nn.Module):
    """conv/BN/ReLU stem, then a windowed and a global attention block (pre-norm, residual), mean-pooled head."""

    def __init__(self, window=None, global_causal=False, windowed=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, DIM, 3, 2, 1, bias=False), nn.BatchNorm2d(DIM), nn.ReLU())
        self.norm1 = nn.LayerNorm(DIM)
        self.local = WindowAttention(DIM, **(window or {})) if windowed else None
        self.norm2 = nn.LayerNorm(DIM)
        self.glob = GlobalAttention(DIM)
        self.global_causal = global_causal
        self.head = nn.Linear(DIM, 10)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.local is not None:
            x = x + self.local(self.norm1(x), (H, W))
        x = x + self.glob(self.norm2(x), is_causal=self.global_causal)
        return self.head(x.mean(1))


def _masks():
    g = torch.Generator().manual_seed(3)
    tokens = WS * WS
    bias = torch.randn(tokens, tokens, generator=g)
    keep = (torch.rand(tokens, tokens, generator=g) > 0.5) | torch.eye(tokens, dtype=torch.bool)  # no empty row
    return bias, keep


WINDOW_CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "float_mask": {"attn_mask": _masks()[0]},
    "bool_mask_and_scale": {"attn_mask": _masks()[1], "scale": 0.3},
}


def tiny_twins(**kw) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyTwins(**kw))


def run_ort(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def rel_error(out: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def standard_ops_only(path) -> None:
    """Every node is a standard ONNX op of the default domain (no custom or unknown op, no local function)."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert not model.functions
    for node in model.graph.node:
        assert node.domain in ("", "ai.onnx") and onnx.defs.has(node.op_type), (node.domain, node.op_type)


def sdpa_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA)


# the plain window in the fast lane; the masked and causal ones (4 s each) end to end
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == "plain" else pytest.mark.e2e) for c in WINDOW_CASES])
def test_windowed_attention_exports_from_the_plain_graph_and_matches_torch(tmp_path, caplog, case):
    model, x = tiny_twins(window=WINDOW_CASES[case], global_causal=case == "causal"), example(2, size=16)
    plain = fusers.reparameterize(model, (x,))
    assert not any("batch_norm" in op for op in graph_ops(plain)) and sdpa_calls(plain) == 2

    with caplog.at_level("INFO", logger="exporters"):
        raw = export_onnx_raw(plain, (x,), tmp_path / "m.onnx")
    art, simplified = simplify_onnx(raw)
    assert simplified
    with torch.no_grad():
        ref = model(x)
    for path in (raw.path, art.path):
        standard_ops_only(path)
        assert rel_error(run_ort(path, x), ref) <= 1e-4
    # the 5-D window call was decomposed, the 4-D global one left to the exporter's own translation
    [step] = raw.metadata["decomposed"]
    assert art.metadata["decomposed"] == [step]
    assert step["op"] == str(SDPA) and step["total"] == 2 and len(step["nodes"]) == 1
    assert step["kinds"] == ["query 5-D float32, key 5-D float32, value 5-D float32" +
                             (", attn_mask 2-D float32" if case == "float_mask" else "") +
                             (", attn_mask 2-D bool" if case == "bool_mask_and_scale" else "")]
    assert step["float64_error"] <= 1e-9 and "only 4D" in step["reasons"][0]
    # said at INFO when planned, and in the record of the unsimplified file (its stage's notes in the report)
    [note] = raw.notes
    assert note.startswith(f"1 of 2 {SDPA} call(s) (query 5-D float32") and "only 4D" in note
    assert any("ONNX legalization, the export is retried: 1 of 2" in r.getMessage() for r in caplog.records)


@pytest.mark.e2e
def test_dynamic_batch_survives_the_decomposition(tmp_path):
    model, x = tiny_twins(window=WINDOW_CASES["causal"]), example(2, size=16)
    gm = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False).module()
    art = export_onnx_raw(gm, (x,), tmp_path / "m.onnx", dynamic=True)
    assert art.metadata["decomposed"] and art.inputs[0].shape[0] == "batch" and art.outputs[0].shape[0] == "batch"
    x3 = example(3, seed=1, size=16)
    with torch.no_grad():
        assert rel_error(run_ort(art.path, x3), model(x3)) <= 1e-4


@pytest.mark.e2e
def test_timms_own_twins_blocks_export(tmp_path):
    twins = pytest.importorskip("timm.models.twins")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, DIM, 3, 2, 1, bias=False), nn.BatchNorm2d(DIM))
            self.local = twins.LocallyGroupedAttn(DIM, num_heads=2, ws=WS)
            self.glob = twins.GlobalSubSampleAttn(DIM, num_heads=2, sr_ratio=2)

        def forward(self, x):
            x = self.stem(x)
            size = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
            x = x + self.local(x, size)
            return x + self.glob(x, size)

    model, x = randomize_bn(Net()), example(1, size=16)
    if not model.local.fused_attn:
        pytest.skip("timm's fused attention is off (TIMM_FUSED_ATTN)")
    art = export_onnx(fusers.reparameterize(model, (x,)), (x,), tmp_path / "m.onnx")
    standard_ops_only(art.path)
    with torch.no_grad():
        assert rel_error(run_ort(art.path, x), model(x)) <= 1e-4
    assert len(art.metadata["decomposed"][0]["nodes"]) == 1


# ------------------------------------------------------------------ where nothing may change

def _plain_torch_onnx(gm, x, path) -> dict[str, int]:
    """Op counts of the export without legalization: torch.onnx.export as export_onnx_raw calls it."""
    torch.onnx.export(gm, (x,), str(path), dynamo=True, opset_version=18, input_names=["input0"],
                      output_names=["output0"], external_data=False, optimize=True, verbose=False)
    return op_counts(path)


@pytest.mark.parametrize("name", ["convnet", "global_attention_only"])
def test_a_model_the_exporter_takes_is_exported_exactly_as_before(tmp_path, name):
    if name == "convnet":
        model, x = make("convnet"), example(2)
    else:  # 4-D attention with a causal mask: the exporter's own translation, no decomposition
        model, x = tiny_twins(windowed=False, global_causal=True), example(2, size=16)
    plain = fusers.reparameterize(model, (x,))
    art = export_onnx_raw(plain, (x,), tmp_path / "m.onnx")
    assert "decomposed" not in art.metadata and art.notes == []
    assert art.metadata["ops"] == _plain_torch_onnx(plain, x, tmp_path / "plain.onnx")


def test_an_op_without_translation_or_decomposition_still_fails_naming_it(tmp_path):
    class Cummax(nn.Module):
        def forward(self, x):
            return torch.cummax(x, 1)[0]

    with pytest.raises(ExportError, match=r"cannot express op aten\.cummax\.default: the torch.onnx exporter has "
                                          r"no translation for it, and torch has no decomposition of aten\.cummax"):
        export_onnx_raw(Cummax(), (torch.randn(2, 3),), tmp_path / "m.onnx")


def test_a_decomposition_that_does_not_reproduce_the_op_is_refused(tmp_path):
    model, x = tiny_twins(window={"attn_drop": 0.5}), example(1, size=16)
    model.local.training = True  # dropout inside the attention call: random, so no decomposition can match it
    gm = torch.export.export(model, (x,), strict=False).module()
    with pytest.raises(ExportError, match=r"translation of it fails \(AssertionError: only 4D.*"
                                          r"does not reproduce it \(query 5-D float32.*differs from it"):
        export_onnx_raw(gm, (x,), tmp_path / "m.onnx")


def test_the_table_entry_declines_the_calls_the_exporter_translates():
    q4, q5 = torch.randn(1, 2, 4, 8), torch.randn(1, 3, 2, 4, 8)
    assert call_kind(SDPA, (q5, q5, q5), {}) == call_kind(SDPA, (q5, q5, q5, None, 0.0), {"is_causal": False})
    assert call_kind(SDPA, (q5, q5, q5), {}) != call_kind(SDPA, (q5, q5, q5), {"is_causal": True})
    entry = Decomposition(SDPA, decomposition_of(SDPA), {call_kind(SDPA, (q5, q5, q5), {}): "5-D"})
    assert entry(q4, q4, q4) is NotImplemented
    assert torch.allclose(entry(q5, q5, q5), F.scaled_dot_product_attention(q5, q5, q5), atol=1e-6)


@pytest.mark.e2e
def test_timm_test_vit_converts_to_onnx_without_decomposition(capsys, tmp_path):
    pytest.importorskip("timm")
    rc, out, err = main_in_process(capsys, "convert", "timm:test_vit", "--targets", "onnx", "--out",
                                   str(tmp_path / "vit"))
    assert rc == 0, out + err
    report = json.loads((tmp_path / "vit" / "report.json").read_text())
    assert report["failed"] == []
    onnx_stages = [s for s in report["stages"] if s["name"].startswith("onnx")]
    assert onnx_stages and all(s["verification"]["passed"] for s in onnx_stages)
    assert all("decomposed" not in (s["export"]["artifact"] or {}).get("metadata", {}) for s in onnx_stages)
