"""ncnn: the target record, the strict ``.param`` reader, the runner on a hand-written net, the refusals, and the
default model through pnnx.

The record and the reader need no package. With ``ncnn`` installed a two-layer net written by hand (a 1x1
convolution and a fully connected layer, weights in a hand-packed ``.bin``) runs a batch one sample at a time
and matches numpy; a broken ``.param`` or ``.bin`` is one sentence naming the file. With ``pnnx`` too, an ONNX
op ncnn has no layer for (``Det``) fails the export naming the op and leaves nothing behind, and the shipped
RepVGG-Digits converts and verifies like every other stage.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from exporters import targets
from runtimes.core import CorruptArtifact, ExportError, MissingDependency
from runtimes.ncnn_runner import NcnnRunner, read_param

# in0 (c=2, h=1, w=3) -> 1x1 convolution 2->2 with bias -> flatten to 6 -> fully connected 6->1 with bias
NET = """7767517
4 4
Input            in0   0 1 in0 0=3 1=1 2=2
Convolution      conv  1 1 in0 c 0=2 1=1 5=1 6=4
Reshape          flat  1 1 c f 0=6
InnerProduct     fc    1 1 f out0 0=1 1=1 2=6
"""
CONV_W = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)  # (out, in)
CONV_B = np.array([0.1, -0.2], np.float32)
FC_W = np.arange(1, 7, dtype=np.float32) / 10
FC_B = np.array([0.3], np.float32)


def _write_net(folder, text=NET, weights=True):
    param = folder / "net.ncnn.param"
    param.write_text(text)
    blob = b""
    if weights:  # a weight blob starts with a 4-byte tag (0: fp32); a bias is raw floats
        blob = (struct.pack("<i", 0) + CONV_W.tobytes() + CONV_B.tobytes()
                + struct.pack("<i", 0) + FC_W.tobytes() + FC_B.tobytes())
    (folder / "net.ncnn.bin").write_bytes(blob)
    return param


def _reference(x):
    conv = np.einsum("oi,nihw->nohw", CONV_W, x) + CONV_B[None, :, None, None]
    return conv.reshape(len(x), -1) @ FC_W[:, None] + FC_B


def test_target_record_is_registered_and_not_in_the_default_targets():
    t = targets.get("ncnn")
    assert (t.runtime, t.suffixes, t.source, t.precisions) == ("ncnn", (".ncnn.param",), "onnx", ("fp32", "fp16"))
    assert not t.default and t.mobile and t.quantize is None and "no INT8" in t.description
    assert set(t.requires) == {("pnnx", "ncnn"), ("ncnn", "ncnn")}
    assert targets.by_suffix("run/model.ncnn.param") is t and targets.by_suffix("model.param") is None
    from runtimes.core import Artifact

    assert t.files(Artifact("run/model.ncnn.param", "ncnn", [], [])) == ["run/model.ncnn.param", "run/model.ncnn.bin"]
    assert "ARM" in t.bench_note["backend"]


@pytest.mark.parametrize("module", ["pnnx", "ncnn"])
def test_missing_package_names_the_extra(monkeypatch, module):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # an import known to fail
    with pytest.raises(MissingDependency, match=rf"'{module}' .*pip install 'reparam-deploy\[ncnn\]'"):
        targets.check_available(targets.get("ncnn"))


def test_runner_without_ncnn_names_the_extra(monkeypatch, tmp_path):
    param = _write_net(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "ncnn", None)
    with pytest.raises(MissingDependency, match=r"'ncnn' \(needed for the ncnn runner\)"):
        NcnnRunner(param).activate()


def test_hand_written_net_runs_a_batch_one_sample_at_a_time(tmp_path):
    pytest.importorskip("ncnn", reason="ncnn not installed")
    param = _write_net(tmp_path)
    x = np.random.default_rng(0).standard_normal((3, 2, 1, 3)).astype(np.float32)
    with NcnnRunner(param, threads=1) as runner:
        spec = runner.get_input_specs()[0]
        assert (spec.name, spec.shape) == ("in0", ("batch", 2, 1, 3))  # the shape the Input layer declares
        out = runner.infer([x])["out0"]
    assert out.shape == (3, 1)
    np.testing.assert_allclose(out, _reference(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("text, fragment", [
    ("7767518\n1 1\nInput in0 0 1 in0\n", "its first line is not the magic number 7767517"),
    ("7767517\n999999999 1\n", "it declares 999,999,999 layers"),
    ("7767517\n2 2\nInput in0 0 1 in0\n", "it declares 2 layers but holds 1 layer lines"),
    ("7767517\n1 1\nInput in0 0 1 in0 40=1\n", "line 3 has parameter id 40"),
    ("7767517\n1 1\nInput in0 0 1 in0 -23303=3,1,2\n", "array parameter -23303 declares '3' values but holds 2"),
    ("7767517\n1 1\nInput in0 0 1 in0 0=abc\n", "line 3 parameter 0 has the value 'abc', which is not a number"),
    ("7767517\n1 1\nReLU relu 1 1 nowhere out0\n", "layers read blob(s) nowhere that no layer writes"),
    ("7767517\n2 2\nInput in0 0 1 in0\nReLU relu 1 1 in0 0=0\n", "line 4 (ReLU relu) declares 1 bottom and 1 top"),
])
def test_malformed_param_is_refused_in_one_sentence(tmp_path, text, fragment):
    bad = tmp_path / "bad.ncnn.param"
    bad.write_text(text)
    with pytest.raises(CorruptArtifact, match=rf"^ncnn file {bad} is corrupt or not an ncnn \.param file \(") as e:
        read_param(bad)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_corrupt_or_empty_files_are_one_sentence_naming_the_file(tmp_path):
    pytest.importorskip("ncnn", reason="ncnn not installed")
    empty = tmp_path / "empty.ncnn.param"
    empty.write_bytes(b"")
    with pytest.raises(CorruptArtifact, match=rf"ncnn file {empty} is corrupt: it is empty"):
        NcnnRunner(empty).activate()
    garbage = tmp_path / "garbage.ncnn.param"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" * 8)
    with pytest.raises(CorruptArtifact, match=rf"ncnn file {garbage} is corrupt"):
        NcnnRunner(garbage).activate()
    unknown = _write_net(tmp_path, NET.replace("Reshape ", "FooBar  "))  # well formed, but no such ncnn layer
    with pytest.raises(CorruptArtifact, match=rf"ncnn file {unknown} is corrupt or not a valid ncnn model "
                                              r"\(layer FooBar not exists or registered\)"):
        NcnnRunner(unknown).activate()
    param = _write_net(tmp_path)
    weights = tmp_path / "net.ncnn.bin"
    weights.write_bytes(weights.read_bytes()[:20])  # truncated in the first convolution's weights
    with pytest.raises(CorruptArtifact, match=rf"ncnn file {weights} is corrupt or not a valid ncnn model"):
        NcnnRunner(param).activate()
    weights.write_bytes(b"")
    with pytest.raises(CorruptArtifact, match=rf"ncnn file {weights} is corrupt: it is empty"):
        NcnnRunner(param).activate()


_WRONG_SHAPE = """
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
from test_exporters_ncnn import _write_net
from runtimes.core import Artifact, TensorSpec
from runtimes.ncnn_runner import NcnnRunner
param = _write_net(Path({folder!r}))
record = Artifact(str(param), "ncnn", [TensorSpec("in0", (1, 2, 1, 3))], [TensorSpec("out0", (1, 2))])
try:
    with NcnnRunner(param, threads=1, artifact=record) as runner:
        runner.infer([np.zeros((1, 2, 1, 3), np.float32)])
except RuntimeError as e:
    print(e)
"""


def test_an_output_of_the_wrong_shape_fails_the_stage_without_crashing_the_process(tmp_path):
    """pnnx can make a net whose output is not the model's (timm's gMLP: (196, 1000) for (1000,)); the runner's
    error then travels with a traceback while the runner closes, and an extractor held by it past the net's end
    made ncnn free its allocator early and the process die of SIGSEGV, taking every later stage with it."""
    pytest.importorskip("ncnn", reason="ncnn not installed")
    import subprocess
    import sys
    from pathlib import Path

    script = _WRONG_SHAPE.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "has shape (1,) per sample, but the model's output is (2,) per sample" in done.stdout
    assert "FATAL ERROR" not in done.stderr


def test_inspect_counts_ops_weights_and_kernels_of_a_param_file(tmp_path):
    from deploy.inspect import inspect_path

    s = inspect_path(_write_net(tmp_path))
    assert s.ops == {"Convolution": 1, "Reshape": 1, "InnerProduct": 1}
    assert s.params == 4 + 2 + 6 + 1  # weights and biases the layers read from the .bin
    assert (s.convolutions, s.conv_kernels, s.linears, s.batchnorms) == (1, {"1x1": 1}, 1, 0)
    assert s.inputs == ["in0 2x1x3 float32"] and s.outputs == ["out0 ? float32"]
    bad = tmp_path / "bad.ncnn.param"
    bad.write_text("7767517\n1 1\nInput in0 0 1 in0 99999=1\n")
    with pytest.raises(CorruptArtifact, match="parameter id 99999"):
        inspect_path(bad)


def _det_onnx(path):
    onnx = pytest.importorskip("onnx", reason="onnx not installed")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Det", ["r"], ["y"])], "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    return path


def test_a_reduction_pnnx_writes_without_axes_fails_the_export_naming_it(tmp_path):
    """pnnx turns a single-axis ReduceMean (gMLP's and MLP-Mixer's token pooling, a hand-written channel LayerNorm)
    into a Reduction over no axes; the export says so instead of a wrong shape or wrong numbers later."""
    pytest.importorskip("pnnx", reason="pnnx not installed")
    pytest.importorskip("ncnn", reason="ncnn not installed")
    onnx = pytest.importorskip("onnx", reason="onnx not installed")
    from onnx import TensorProto, helper

    from exporters.ncnn import export_ncnn

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)], "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"^pnnx \S+ wrote Reduction layer \S+ with no axes and reduce-all off"):
        export_ncnn(tmp_path / "m.onnx", tmp_path / "one" / "model.ncnn.param")
    assert not list((tmp_path / "one").iterdir())  # nothing left behind


def test_only_reductions_over_nothing_are_hollow(tmp_path):
    from exporters.ncnn import hollow_reductions

    text = NET.replace("4 4\n", "7 7\n") + (
        "Reduction        axes  1 1 out0 r1 0=3 1=0 -23303=2,1,2 4=1 5=1\n"
        "Reduction        all   1 1 r1 r2 0=3 1=1 -23303=0 4=0 5=1\n"
        "Reduction        none  1 1 r2 r3 0=3 1=0 -23303=0 4=0 5=1\n")
    assert hollow_reductions(read_param(_write_net(tmp_path, text))) == ["none"]


def test_an_op_ncnn_cannot_express_fails_the_export_naming_it(tmp_path):
    pytest.importorskip("pnnx", reason="pnnx not installed")
    pytest.importorskip("ncnn", reason="ncnn not installed")
    from exporters.ncnn import export_ncnn

    src = _det_onnx(tmp_path / "det.onnx")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"^ncnn cannot express op Det \(layer Det_1\): pnnx \S+ found no ncnn "
                                          r"layer for it\.$"):
        export_ncnn(src, out / "model.ncnn.param")
    assert list(out.iterdir()) == []  # pnnx's side files and the half-made ncnn files are gone


@pytest.mark.e2e
def test_default_model_converts_and_verifies_on_ncnn(tmp_path):
    pytest.importorskip("pnnx", reason="pnnx not installed")
    pytest.importorskip("ncnn", reason="ncnn not installed")
    from deploy.pipeline import ConvertOptions, convert
    from runtimes.ncnn_runner import input_dims

    out = tmp_path / "run"
    result = convert(ConvertOptions(model="repvgg_digits", targets=("ncnn",), out=str(out)))
    assert result.passed
    stage = {s.name: s for s in result.stages}["ncnn"]
    art, v = stage.export.artifact, stage.verification
    assert art.path.endswith("model.ncnn.param") and (out / "model.ncnn.bin").is_file()
    assert v.max_rel <= 1e-4 and v.samples_max_rel <= 1e-4 and v.accuracy == 1.0
    param = read_param(out / "model.ncnn.param")
    types = [layer.type for layer in param.layers]
    assert "BatchNorm" not in types and types.count("Convolution") == 6 and types.count("InnerProduct") == 1
    assert input_dims(param.inputs()[0]) == (1, 8, 8)
    assert sorted(p.name for p in out.iterdir() if "ncnn" in p.name or "pnnx" in p.name) == \
        ["model.ncnn.bin", "model.ncnn.param"]


@pytest.mark.e2e
def test_fp16_stage_holds_fp16_weights_and_is_judged_at_fp16_tolerance(tmp_path):
    pytest.importorskip("pnnx", reason="pnnx not installed")
    pytest.importorskip("ncnn", reason="ncnn not installed")
    from deploy.pipeline import ConvertOptions, convert

    out = tmp_path / "run"
    result = convert(ConvertOptions(model="repvgg_digits", targets=("ncnn",), precision="fp16", out=str(out)))
    stage = {s.name: s for s in result.stages}["ncnn"]
    v = stage.verification
    assert stage.precision == "fp16" and stage.export.artifact.metadata["fp16_weights"]
    assert v.passed and 1e-5 < v.max_rel <= 1e-2 and v.accuracy == 1.0  # rounded like fp16, within its tolerance
    assert (out / "model.ncnn.bin").stat().st_size < 0.55 * 289_796  # the fp32 .bin of this model: 289,796 bytes
