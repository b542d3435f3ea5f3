"""MNN: the target record, the runner's refusals, the converter's failure message, ``deploy inspect`` numbers on
a small ONNX model, INT8 through MNN's quantization tool, and the default model through ``model.mnn`` and
``model.int8.mnn``.

The record is read from the registry (no package needed). With ``MNN`` installed the shipped RepVGG-Digits
converts to a ``.mnn`` and is verified against the training model on the seeded inputs and the 360 held-out
digits like every other stage; its INT8 form is judged by the accuracy guard.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from exporters import targets
from runtimes.core import CorruptArtifact, ExportError, MissingDependency


def _need_mnn():
    """Skip without MNN (found, not imported: its import prints the CPU's features on stdout)."""
    import importlib.util

    if importlib.util.find_spec("MNN") is None:
        pytest.skip("MNN not installed")


def test_target_record_is_registered_and_not_in_the_default_targets():
    t = targets.get("mnn")
    assert (t.runtime, t.suffixes, t.source, t.precisions) == ("mnn", (".mnn",), "onnx", ("fp32", "fp16", "int8"))
    assert not t.default and ("MNN", "mnn") in t.requires
    assert t.quantize == "exporters.mnn_int8:quantize_mnn" and t.inspect == "deploy.inspect:read_mnn"
    assert targets.by_suffix("model.int8.mnn") is t
    assert t.native("fp16", {"simd": ["avx2"]}).startswith("MNN computes fp16 only on ARMv8.2")
    assert t.native("fp16", {"simd": ["asimd", "asimdhp"]}) == "" and t.native("fp32", {}) == ""


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "MNN", None)  # an import known to fail
    with pytest.raises(MissingDependency, match=r"'MNN' .*pip install 'reparam-deploy\[mnn\]'"):
        targets.check_available(targets.get("mnn"))


def test_corrupt_or_empty_mnn_is_one_sentence_naming_the_file(tmp_path):
    _need_mnn()
    from deploy.inspect import inspect_path
    from runtimes.mnn_runner import MNNRunner

    bad = tmp_path / "model.mnn"
    bad.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(CorruptArtifact, match=rf"^MNN file {bad} is corrupt or not a valid MNN model \(Invalidate "
                                              r"buffer to create MNN Module\)\.$"):
        MNNRunner(bad).activate()
    empty = tmp_path / "empty.mnn"
    empty.write_bytes(b"")
    with pytest.raises(CorruptArtifact, match=rf"^MNN file {empty} is corrupt: it is empty\.$"):
        MNNRunner(empty).activate()
    with pytest.raises(CorruptArtifact, match=rf"MNN file {bad} is corrupt or not a valid MNN model"):
        inspect_path(bad)


def _onnx(path, ops: str = "conv"):
    """A small ONNX model: Conv 3x3 (3->8, bias) -> Relu -> Conv 1x1 (8->4, bias), output ``conv_b`` (and ``relu``
    with ``"two outputs"``); or one Hardmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    if ops == "hardmax":
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
        graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"])], "g", [x], [y])
    else:
        init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
                (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (4, 8, 1, 1)), ("b2", (4,)))]
        # named like the ONNX exporter names layers: node "node_conv_a", output "conv_a" (MNN's op name)
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["conv_a"], name="node_conv_a", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["conv_a"], ["relu"], name="node_relu"),
                 helper.make_node("Conv", ["relu", "w2", "b2"], ["conv_b"], name="node_conv_b")]
        ys = [helper.make_tensor_value_info("conv_b", TensorProto.FLOAT, [1, 4, 8, 8])]
        if ops == "two outputs":
            ys.append(helper.make_tensor_value_info("relu", TensorProto.FLOAT, [1, 8, 8, 8]))
        graph = helper.make_graph(nodes, "g", [x], ys, initializer=init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


def test_converter_failure_names_the_unsupported_op(tmp_path):
    _need_mnn()
    from exporters.mnn import export_mnn

    src = _onnx(tmp_path / "hardmax.onnx", "hardmax")
    with pytest.raises(ExportError, match=rf"^MNN cannot convert {src}: its converter does not support the ONNX "
                                          r"op\(s\) Hardmax\.$"):
        export_mnn(src, tmp_path / "model.mnn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardmax.onnx"]  # nothing half-written


def test_small_model_converts_exactly_and_inspect_counts_its_ops_and_parameters(tmp_path):
    _need_mnn()
    import onnxruntime as ort

    from deploy.inspect import inspect_path
    from exporters.mnn import export_mnn
    from runtimes.mnn_runner import MNNRunner

    src = _onnx(tmp_path / "small.onnx")
    art = export_mnn(src, tmp_path / "model.mnn")
    assert [(s.name, s.shape) for s in art.inputs + art.outputs] == [("x", (1, 3, 8, 8)), ("conv_b", (1, 4, 8, 8))]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(src).run(None, {"x": x})[0]
    with MNNRunner(art.path, artifact=art) as r:
        got = r.infer({"x": x})["conv_b"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    s = inspect_path(art.path)
    # MNN fuses the ReLU into the first convolution, and packs NCHW into its NC4HW4 layout and back
    assert s.ops == {"Convolution": 2, "ConvertTensor": 2}
    assert s.params == 8 * 3 * 9 + 8 + 4 * 8 + 4
    assert s.macs == 8 * 64 * 27 + 4 * 64 * 8
    assert s.conv_kernels == {"3x3": 1, "1x1": 1}
    assert s.inputs == ["x 1x3x8x8 float32"] and s.outputs == ["conv_b 1x4x8x8 float32"]
    half = export_mnn(src, tmp_path / "model.fp16.mnn", precision="fp16")
    assert half.metadata["fp16_weights"] and inspect_path(half.path).params == s.params


@pytest.mark.parametrize("op", ["ReduceL2", "ReduceL1", "ReduceSumSquare", "ReduceLogSum"])
def test_reductions_whose_axes_the_converter_ignores_reduce_over_those_axes(tmp_path, op):
    """MNN's converter reduces these over every axis when ``axes`` is an input (opset 18): ``F.normalize`` in
    XCiT's attention came out 0.89 off. The converter is handed them as ReduceSum of the same axes instead."""
    _need_mnn()
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporters.mnn import export_mnn, mnn_readable
    from runtimes.mnn_runner import MNNRunner

    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 5])
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node(op, ["a", "axes"], ["y"], keepdims=0)]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, -1])
    graph = helper.make_graph(nodes, "g", [x_in], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
                              [axes])
    src = str(tmp_path / "reduce.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    art = export_mnn(src, tmp_path / "model.mnn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mnn", "reduce.onnx"]  # the copy is gone
    x = np.random.default_rng(2).standard_normal((1, 4, 6, 5)).astype(np.float32) * 3
    want = ort.InferenceSession(src).run(None, {"x": x})[0]
    with MNNRunner(art.path, artifact=art) as r:
        got = r.infer({"x": x})["y"]
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # reducing over every axis (no axes input) is what the converter does anyway: nothing to rewrite
    del graph.node[1].input[1:]
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    assert mnn_readable(src, tmp_path / "copy.onnx") is None and not (tmp_path / "copy.onnx").exists()


def test_a_nan_scale_in_the_dump_is_read_and_names_its_layer():
    """MNN's quantizer writes ``-nan`` for the scale of a layer whose calibration outputs never vary (RegNetY's
    squeeze-excitation fc1 on random data): the dump is not valid JSON there, and the int8 export must name the
    layer instead of failing on a JSONDecodeError."""
    from exporters.mnn import nonfinite_scales, parse_dump

    text = ('{ "oplists": [ { "name": "conv_ok", "outputIndexes": [ 1 ], "main": { "scaleOut": 0.02 } }, '
            '{ "name": "conv_se", "outputIndexes": [ 2 ], "main": { "scaleIn": 0.1, "scaleOut": -nan } }, '
            '{ "name": "conv_t", "outputIndexes": [ 3 ], "main": { } } ], "extraTensorDescribe": '
            '[ { "index": 3, "quantInfo": { "scale": inf, "zero": 0.0 } }, { "index": 1, "quantInfo": '
            '{ "scale": 0.5 } } ], "tensorName": [ "informal", "nano" ] }')
    model = parse_dump(text)
    assert nonfinite_scales(model) == ["conv_se", "conv_t"]
    assert model["tensorName"] == ["informal", "nano"]  # words are not numbers
    assert nonfinite_scales(parse_dump(text.replace("-nan", "0.3").replace("inf", "2.0"))) == []


def test_int8_refusals_are_one_sentence(tmp_path):
    _need_mnn()
    from exporters.int8 import Int8Options
    from exporters.mnn import export_mnn
    from exporters.mnn_int8 import quantize_mnn

    fp32 = export_mnn(_onnx(tmp_path / "small.onnx"), tmp_path / "model.mnn")
    calibration = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ExportError, match=r"^MNN's quantization tool has no percentile calibration \(it offers EMA, "
                                          r"KL and ADMM\); use --int8-method minmax"):
        quantize_mnn(fp32, tmp_path / "q.mnn", Int8Options(calibration, method="percentile"))
    with pytest.raises(ExportError, match=r"^MNN's quantization tool always gives each output channel its own "
                                          r"weight scale; drop --per-tensor for the mnn target\.$"):
        quantize_mnn(fp32, tmp_path / "q.mnn", Int8Options(calibration, per_channel=False))
    with pytest.raises(ValueError, match=r"cannot keep 'conv9' in float: .* its quantizable layers are conv_a, "
                                         r"conv_b"):
        quantize_mnn(fp32, tmp_path / "q.mnn", Int8Options(calibration, exclude=("conv9",)))
    assert not (tmp_path / "q.mnn").exists()


def test_int8_model_holds_int8_convolutions_and_keeps_excluded_layers_in_float(tmp_path):
    _need_mnn()
    from exporters.int8 import Int8Options
    from exporters.mnn import export_mnn
    from exporters.mnn_int8 import quantize_mnn
    from runtimes.mnn_runner import MNNRunner

    fp32 = export_mnn(_onnx(tmp_path / "small.onnx"), tmp_path / "model.mnn")
    calibration = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    q = quantize_mnn(fp32, tmp_path / "model.int8.mnn", Int8Options(calibration))
    info = q.metadata["int8"]
    assert (info["mnn_method"], info["convolutions"], info["int8_convolutions"], info["float_convolutions"]) == \
        ("EMA", 2, 2, [])
    assert info["int8_weight_convolutions"] == 2 and info["int8_tensors"] >= 2
    x = calibration[:1]
    with MNNRunner(fp32.path) as r:
        want = r.infer([x])["conv_b"]
    with MNNRunner(q.path, precision="int8") as r:
        got = r.infer([x])["conv_b"]
    assert 0 < np.abs(got - want).max() <= 0.1 * np.abs(want).max()  # int8 rounding: close, not exact
    # EMA does not read MNN's skip list: refused rather than claiming a float layer
    with pytest.raises(ExportError, match=r"^MNN's EMA quantization ran conv_b in int8 although it was asked to "
                                          r"keep it in float"):
        quantize_mnn(fp32, tmp_path / "skip.mnn", Int8Options(calibration, exclude=("conv_b",)))
    kept = quantize_mnn(fp32, tmp_path / "admm.mnn",
                        Int8Options(calibration, exclude=("conv_b",), extra={"mnn_method": "ADMM"}))
    assert kept.metadata["int8"]["float_convolutions"] == ["conv_b"]
    assert kept.metadata["int8"]["int8_convolutions"] == 1


def test_int8_model_returns_its_outputs_in_the_fp32_models_order(tmp_path):
    """MNN's quantization tool writes a model's outputs in reverse order; the record and the runner keep the fp32
    model's."""
    _need_mnn()
    from exporters.int8 import Int8Options
    from exporters.mnn import export_mnn
    from exporters.mnn_int8 import quantize_mnn
    from runtimes.mnn_runner import MNNRunner, load_mnn

    fp32 = export_mnn(_onnx(tmp_path / "two.onnx", "two outputs"), tmp_path / "model.mnn")
    calibration = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    q = quantize_mnn(fp32, tmp_path / "model.int8.mnn", Int8Options(calibration))
    order = [(o.name, o.shape) for o in fp32.outputs]
    assert order == [("conv_b", (1, 4, 8, 8)), ("relu", (1, 8, 8, 8))]
    assert [(o.name, o.shape) for o in q.outputs] == order
    with MNNRunner(q.path, precision="int8", artifact=q) as r:
        got = r.infer([calibration[:1]])
    assert [(k, v.shape) for k, v in got.items()] == order
    assert load_mnn(q.path)[0].get_info()["outputNames"] == ["relu", "conv_b"]  # the file's own order


@pytest.mark.e2e
def test_default_model_converts_and_verifies_on_mnn(tmp_path):
    _need_mnn()
    from deploy.inspect import inspect_path
    from deploy.pipeline import ConvertOptions, convert

    result = convert(ConvertOptions(model="repvgg_digits", targets=("onnx", "mnn"), precision="int8",
                                    out=str(tmp_path / "run")))
    assert result.passed
    stages = {s.name: s for s in result.stages}
    art, v = stages["mnn"].export.artifact, stages["mnn"].verification
    assert art.path.endswith("model.mnn") and art.parent.endswith("model.sim.onnx")
    assert v.max_rel <= 1e-4 and v.samples_max_rel <= 1e-4 and v.accuracy == 1.0
    summary = inspect_path(tmp_path / "run" / "model.mnn")
    assert summary.ops["Convolution"] == 7 and summary.conv_kernels == {"3x3": 6, "1x1": 1}  # 6 convs + the head
    q, qv = stages["mnn-int8"].export.artifact, stages["mnn-int8"].verification
    assert q.path.endswith("model.int8.mnn") and q.precision == "int8"
    assert q.metadata["int8"]["int8_convolutions"] == 7 and not q.metadata["int8"]["float_convolutions"]
    assert stages["mnn-int8"].files.size < 0.4 * stages["mnn"].files.size  # int8 weights stored
    assert qv.passed and qv.accuracy >= v.accuracy - 0.01


def test_fp32_stage_runs_without_winograd_and_keeps_the_fp32_tolerance(tmp_path):
    """Three 32-channel 3x3 convolutions at 24x24: MNN's default picks Winograd for them, which moves the output
    by ~7e-4 of its scale; the fp32 runner turns it off and agrees with float64 to the fp32 tolerance."""
    _need_mnn()
    import torch

    from exporters.mnn import export_mnn
    from runtimes.mnn_runner import MNNRunner, load_mnn

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(3)]).eval()
    x = torch.randn(1, 32, 24, 24)
    src = str(tmp_path / "convs.onnx")
    torch.onnx.export(model, (x,), src, input_names=["x"], output_names=["y"], dynamo=False)
    art = export_mnn(src, tmp_path / "model.mnn")
    with torch.no_grad():
        want = model.double()(x.double()).numpy()
    scale = np.abs(want).max()

    def error(module) -> float:
        from MNN import expr as F
        out = module.forward([F.const(x.numpy(), list(x.shape), F.NCHW)])[0]
        out = F.convert(out, F.NCHW) if out.data_format == F.NC4HW4 else out
        return float(np.abs(np.array(out.read()) - want).max() / scale)

    assert error(load_mnn(art.path)[0]) > 1e-4  # Winograd, MNN's default: the case is one that needs the switch
    assert error(load_mnn(art.path, winograd=False)[0]) < 1e-5
    with MNNRunner(art.path, artifact=art) as r:
        got = r.infer({"x": x.numpy()})["y"]
    assert np.abs(got - want).max() / scale < 1e-5
