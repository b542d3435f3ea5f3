import sys

import numpy as np
import pytest
import torch
from export_models import capture, example, make

from exporters import ExportError, MissingDependency, export
from exporters.legalize import legalize_for_tflite
from runtimes import compare, flatten


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


POW = torch.ops.aten.pow.Tensor_Scalar
MUL = torch.ops.aten.mul.Tensor


# ---------------------------------------------------------------------- legalization (no litert needed)

@pytest.mark.parametrize("exponent,muls", [(2, 1), (3, 2), (4, 2), (5, 3), (2.0, 1), (1, 0)])
def test_integer_pow_becomes_multiplications(exponent, muls):
    model, x = make("pow"), example(1, size=8)
    model.exponent = exponent
    gm = capture(model, x)
    if _count(gm, POW) == 0:
        pytest.skip("torch.export already removed x ** 1")
    legal, rewrites = legalize_for_tflite(gm, (x,))
    assert _count(legal, POW) == 0 and _count(gm, POW) == 1  # the input graph is untouched
    assert _count(legal, MUL) == _count(gm, MUL) + muls
    assert len(rewrites) == 1 and f"-> {muls} mul" in rewrites[0]
    with torch.no_grad():
        ref, out = gm(x), legal(x)
    assert (out - ref).abs().max() / ref.abs().max() <= 1e-6


def test_fractional_pow_is_refused_with_op_source_line_and_target():
    model, x = make("pow"), example(1, size=8)
    model.exponent = 2.5
    with pytest.raises(ExportError) as err:
        legalize_for_tflite(capture(model, x), (x,))
    msg = str(err.value)
    assert "TFLite" in msg and "aten.pow.Tensor_Scalar" in msg and "2.5" in msg
    assert "export_models.py" in msg and "** self.exponent" in msg
    legal, rewrites = legalize_for_tflite(capture(model, x), (x,), allow_unsupported_pow=True)
    assert rewrites == [] and _count(legal, POW) == 1


# -------------------------------------------------------------------------------- export (litert)

def _run(art, *arrays):
    from runtimes import open_runner

    with open_runner(art, threads=1) as r:
        return list(r.infer(list(arrays)).values())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Output folder of the export tests; skips them when litert-torch or ai-edge-litert is missing."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    return tmp_path_factory.mktemp("tflite")


def test_fp32_nested_model_matches_torch(folder):
    model, x = make("nested"), example()
    art = export("tflite", capture(model, x), folder / "nested.tflite", args=(x,))
    assert art.format == "tflite" and art.precision == "fp32"
    assert art.input_names == ["input0"] and art.output_names == [f"output{i}" for i in range(4)]
    assert [s.shape for s in art.outputs] == [(2, 5), (2, 16, 16, 16), (2, 16), (2, 16)]
    result = compare(flatten(model(x)), _run(art, x.numpy()))
    assert result.passed and result.max_rel <= 1e-5, result.summary()


@pytest.mark.e2e
def test_fp16_has_half_weights_and_agrees_within_1e_2(folder):
    from ai_edge_litert.interpreter import Interpreter

    model, x = make("convnet"), example()
    gm = capture(model, x)
    fp32 = export("tflite", gm, folder / "c32.tflite", args=(x,))
    fp16 = export("tflite", gm, folder / "c16.tflite", args=(x,), precision="fp16")
    dtypes = {d["dtype"] for d in Interpreter(model_path=fp16.path).get_tensor_details()}
    assert np.float16 in dtypes
    assert np.float16 not in {d["dtype"] for d in Interpreter(model_path=fp32.path).get_tensor_details()}
    assert fp16.inputs[0].dtype == "float32" and fp16.outputs[0].dtype == "float32"
    ref = model(x).detach().numpy()
    err = np.abs(_run(fp16, x.numpy())[0] - ref).max() / np.abs(ref).max()
    assert 0 < err <= 1e-2
    err32 = np.abs(_run(fp32, x.numpy())[0] - ref).max() / np.abs(ref).max()
    assert err32 <= 1e-5


class _PastHalfRange(torch.nn.Module):
    """An intermediate of 90,000 (past fp16's 65,504) between two 1x1 convolutions; the output is 300."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 3, 1)
        with torch.no_grad():
            self.up.weight.fill_(300.0), self.up.bias.zero_(), self.down.weight.fill_(1 / 2400), self.down.bias.zero_()

    def forward(self, x):
        return self.down(self.up(x))


@pytest.mark.e2e
def test_fp16_pruning_says_what_litert_does_on_this_cpu(folder):
    """``deploy tune`` prunes tflite fp16 as "computed in fp32": true where an intermediate past fp16's range
    comes out finite and right, and the reason must not blame a CPU that has fp16 arithmetic (avx512_fp16)."""
    from exporters import targets
    from runtimes.hardware import cpu_facts

    model, x = _PastHalfRange().eval(), torch.full((1, 3, 4, 4), 100.0)
    art = export("tflite", model, folder / "range16.tflite", args=(x,), precision="fp16")
    out = _run(art, x.numpy())[0]
    computes_fp32 = bool(np.isfinite(out).all() and np.allclose(out, 300.0, rtol=1e-2))
    cpu = cpu_facts()
    reason = targets.get("tflite").native("fp16", cpu)
    assert bool(reason) == computes_fp32, (reason, out.ravel()[:4])
    if reason:
        assert "without fp16" not in reason and "in fp32" in reason
        if "avx512_fp16" in cpu.get("simd", ()):
            assert "avx512_fp16 included" in reason


def test_nhwc_inputs(folder):
    model, x = make("convnet"), example()
    art = export("tflite", capture(model, x), folder / "nhwc.tflite", args=(x,), nhwc=True)
    assert art.inputs[0].shape == (2, 32, 32, 3) and art.metadata["layout"]["inputs"] == ["NHWC"]
    out = _run(art, x.permute(0, 2, 3, 1).numpy())[0]
    ref = model(x).detach().numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_pow_on_5d_tensor_is_legalized_and_exact(folder):
    model, x = make("pow"), example(1, size=8)
    gm = capture(model, x)
    art = export("tflite", gm, folder / "pow.tflite", args=(x,))
    assert len(art.metadata["rewrites"]) == 1 and "legalized 1 pow" in art.notes[0]
    out = _run(art, x.numpy())[0]
    ref = model(x).detach().numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_litert_without_legalization_fails_on_pow(folder):
    model, x = make("pow"), example(1, size=8)
    try:
        export("tflite", capture(model, x), folder / "raw_pow.tflite", args=(x,), legalize=False)
    except ExportError as e:
        assert "tfl.pow" in str(e) and "TFLite" in str(e) and "export_models.py" in str(e)
    else:
        import litert_torch

        pytest.skip(f"litert-torch {litert_torch.__version__} now lowers 5-D pow; the legalization stays (it is exact)")


def test_op_tflite_cannot_express_leaves_other_formats_writable(folder):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxsim")
    model, x = make("pow"), example(1, size=8)
    model.exponent = 2.5
    gm = capture(model, x)
    with pytest.raises(ExportError, match="TFLite cannot express aten.pow.Tensor_Scalar"):
        export("tflite", gm, folder / "frac.tflite", args=(x,))
    art = export("onnx", gm, folder / "frac.onnx", args=(x,))
    from runtimes import open_runner

    with open_runner(art) as r:
        result = compare(model(x), r.infer([x.numpy()]))
    assert result.passed, result.summary()


def test_missing_litert_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(MissingDependency, match=r"pip install 'reparam-deploy\[tflite\]'"):
        export("tflite", make("conv"), folder / "m.tflite", args=(example(1),))
