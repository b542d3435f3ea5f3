"""Op summaries: the same numbers from a model, a .pt2, ONNX, OpenVINO IR and TFLite, checked independently."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fusers
from deploy import cli, zoo
from deploy.inspect import inspect_module, inspect_path, inspect_source
from exporters import export

pytest.importorskip("onnxruntime")


def hooked_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(MACs, convolutions, linears) counted by forward hooks on the eager modules: an independent count."""
    total, counts = [0], [0, 0]

    def hook(module, inputs, output):
        total[0] += output.numel() * module.weight[0].numel()
        counts[isinstance(module, nn.Linear)] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0], counts[0], counts[1]


def test_training_form_of_the_default_model():
    model = zoo.create("repvgg_digits", pretrained=True)
    x = torch.zeros(1, 1, 8, 8)
    summary = inspect_module(model, (x,), "digits")
    macs, convs, linears = hooked_macs(model, x)
    assert (summary.macs, summary.convolutions, summary.linears) == (macs, convs, linears) == (666_240, 12, 1)
    assert summary.flops == 2 * macs and summary.conv_kernels == {"3x3": 6, "1x1": 6}
    assert (summary.branch_groups, summary.branches, summary.batchnorms) == (6, 15, 15)
    bn_buffers = sum(m.running_mean.numel() + m.running_var.numel() + m.num_batches_tracked.numel()
                     for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert (summary.params, summary.buffers) == (sum(p.numel() for p in model.parameters()), bn_buffers)
    assert summary.ops["conv2d"] == 12 and summary.ops["batch_norm"] == 15 and summary.ops["add"] == 9
    assert summary.inputs == ["x 1x1x8x8 float32"] and summary.outputs == ["output0 1x10 float32"]
    text = summary.summary()
    assert "mergeable:     6 branch group(s) (15 branches), 15 BatchNorm(s) to fold" in text
    assert "MACs:          666.240 K" in text


@pytest.mark.parametrize("name", ["acnet_resnet", "dbb_resnet", "mobileone_s0", "repvgg_b1g2"])
def test_mergeable_groups_match_the_blocks_and_vanish_after_the_passes(name):
    block_types = {"acnet_resnet": "ACBlock", "dbb_resnet": "DiverseBranchBlock", "mobileone_s0": "MobileOneBlock",
                   "repvgg_b1g2": "RepVGGBlock"}
    depths = {"acnet_resnet": (1, 1, 1), "dbb_resnet": (1, 1, 1), "mobileone_s0": (1, 1, 1, 1),
              "repvgg_b1g2": (1, 2, 2, 1, 1)}[name]  # small, but with every kind of block and groups=2
    model = zoo.randomize_batchnorm(zoo.create(name, width=0.25, depths=depths), seed=1).eval()
    x = torch.randn(1, 3, 32, 32)
    blocks = sum(type(m).__name__ == block_types[name] for m in model.modules())
    before = inspect_module(model, (x,))
    assert before.branch_groups == blocks > 0 and before.branches >= 2 * blocks
    plain = fusers.reparameterize(model, (x,))
    after = inspect_module(plain, (x,))
    assert (after.branch_groups, after.batchnorms) == (0, 0)
    assert after.macs == hooked_macs_plain(plain, x) < before.macs
    if name == "repvgg_b1g2":
        assert any(k.endswith("g2") for k in after.conv_kernels)


def hooked_macs_plain(gm, x) -> int:
    """MACs of a plain GraphModule from its convolution / linear weights and output shapes (shape propagation)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from fusers.graph import fetch_attr

    ShapeProp(gm).propagate(x)
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in ("conv2d", "linear"):
            weight = fetch_attr(gm, node.args[1].target)
            total += node.meta["tensor_meta"].shape.numel() * weight[0].numel()
    return total


def test_residual_through_a_nonlinearity_is_not_mergeable():
    class Basic(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)

    summary = inspect_module(Basic().eval(), (torch.randn(1, 4, 8, 8),))
    assert (summary.branch_groups, summary.branches, summary.batchnorms) == (0, 0, 2)


@pytest.mark.e2e
def test_every_artifact_of_the_default_run_reports_the_same_numbers(digits_run):
    proc, out = digits_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    plain_params = report["reparameterize"]["params_after"]
    program = torch.export.load(out / "model.deploy.pt2").module()
    expected_macs = hooked_macs_plain(program, torch.zeros(1, 1, 8, 8))
    assert expected_macs == report["reparameterize"]["merged"]["macs_after"] == 599_680
    for name, fmt in [("model.deploy.pt2", "pt2"), ("model.onnx", "onnx, opset 18"),
                      ("model.sim.onnx", "onnx, opset 18"), ("model.xml", "openvino"), ("model.tflite", "tflite")]:
        s = inspect_path(out / name)
        assert s.format == fmt, name
        assert (s.params, s.macs, s.convolutions, s.linears) == (plain_params, expected_macs, 6, 1), name
        assert (s.branch_groups, s.batchnorms) == (0, 0), name
        assert (s.merged["branch_groups_merged"], s.merged["branches_merged"], s.merged["batchnorms_folded"]) == \
            (6, 15, 15), name
        assert len(s.inputs) == 1 and "1x1x8x8" in s.inputs[0] and "1x10" in s.outputs[0], name
    assert inspect_path(out / "model.sim.onnx").ops == {"Conv": 6, "Relu": 6, "ReduceMean": 1, "Reshape": 1,
                                                        "Gemm": 1}
    assert "model.deploy.pt2 metadata" in inspect_path(out / "model.deploy.pt2").merged["from"]


@pytest.mark.e2e
def test_every_format_and_precision_counts_the_plain_models_parameters(tmp_path):
    """fp32, fp16 and INT8 files count what ``plain.parameters()`` counts (quantized weights and int32 biases,
    not scales, zero points or ranges) and the plain model's MACs, through quantized convolutions too."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("litert_torch")
    pytest.importorskip("torchao")
    pytest.importorskip("onnxsim")

    from exporters.int8 import Int8Options
    from exporters.onnx_int8 import quantize_onnx
    from exporters.openvino_int8 import quantize_openvino
    from exporters.tflite_int8 import quantize_tflite

    model = zoo.randomize_batchnorm(zoo.create("repvgg_a0", width=0.125, num_classes=10,
                                               depths=(1, 1, 1, 1, 1)), seed=0).eval()
    x = torch.randn(1, 3, 32, 32)
    plain = fusers.reparameterize(model, (x,))
    params = sum(p.numel() for p in plain.parameters())
    macs = hooked_macs_plain(plain, x)
    calibration = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    onnx_art = export("onnx", plain, tmp_path / "m.onnx", args=(x,))
    ov_art = export("openvino", onnx_art, tmp_path / "m.xml")
    tfl_art = export("tflite", plain, tmp_path / "m.tflite", args=(x,))
    int8 = {"onnx": quantize_onnx(onnx_art, tmp_path / "q.onnx", Int8Options(calibration)),
            "openvino": quantize_openvino(ov_art, tmp_path / "q.xml", Int8Options(calibration)),
            "tflite": quantize_tflite(tfl_art, tmp_path / "q.tflite", Int8Options(calibration), module=plain,
                                      args=(x,))}
    arts = [export("pt2", plain, tmp_path / "m.pt2", args=(x,)), onnx_art, ov_art, tfl_art,
            export("openvino", onnx_art, tmp_path / "m16.xml", precision="fp16"),
            export("tflite", plain, tmp_path / "m16.tflite", args=(x,), precision="fp16"), *int8.values()]
    for art in arts:
        s = inspect_path(art.path)
        assert (s.params, s.macs, s.convolutions, s.linears, s.branch_groups) == (params, macs, 5, 1, 0), art.path
        assert s.merged is None or art.format == "pt2"  # not written by a deploy run (a .pt2 carries its own)
    quantizer = {"onnx": "DequantizeLinear", "openvino": "FakeQuantize", "tflite": "QUANTIZE"}
    for fmt, art in int8.items():  # really quantized files
        assert inspect_path(art.path).ops[quantizer[fmt]] >= 1, fmt
    fp32_ov, int8_ov = inspect_path(ov_art.path), inspect_path(int8["openvino"].path)
    assert int8_ov.elementwise == fp32_ov.elementwise  # weight decompression runs on constants, not per input


def onnx_layers(form: str, batch=1):
    """A conv (2 -> 3 channels, 3x3, on 5x5: 3x3x3 outputs) and a matmul (27 -> 4) as ONNX ``form``: float,
    qdq (DequantizeLinear -> Conv / MatMul), qlinear (QLinearConv, QLinearMatMul) or integer (ConvInteger,
    MatMulInteger, no bias): 54 + 3 + 108 parameters (no bias: 162), 27 x 18 + 4 x 27 = 594 MACs."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, value, dtype):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    w, b, w2 = rng.integers(-127, 127, (3, 2, 3, 3)), rng.integers(-99, 99, 3), rng.integers(-127, 127, (27, 4))
    scalar = {"s": (0.1, np.float32), "zp": (0, np.uint8)}
    for name, (v, dtype) in scalar.items():
        const(name, v, dtype)
    const("shape", [1, 27], np.int64)  # an integer constant that is no parameter
    const("wzp", np.zeros(3), np.int8), const("ws", np.full(3, 0.01), np.float32)
    const("w2zp", 0, np.int8), const("w2s", 0.01, np.float32)
    if form == "float":
        nodes += [helper.make_node("Conv", ["x", const("w", w, np.float32), const("b", b, np.float32)], ["y"]),
                  helper.make_node("Reshape", ["y", "shape"], ["f"]),
                  helper.make_node("MatMul", ["f", const("w2", w2, np.float32)], ["out"])]
    elif form == "qdq":
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
                  helper.make_node("DequantizeLinear", [const("w", w, np.int8), "ws", "wzp"], ["wd"], axis=0),
                  helper.make_node("DequantizeLinear", [const("b", b, np.int32), const("bs", np.full(3, 1e-3),
                                                                                     np.float32)], ["bd"]),
                  helper.make_node("Conv", ["xd", "wd", "bd"], ["y"]),
                  helper.make_node("Reshape", ["y", "shape"], ["f"]),
                  helper.make_node("DequantizeLinear", [const("w2", w2, np.int8), "w2s", "w2zp"], ["w2d"]),
                  helper.make_node("MatMul", ["f", "w2d"], ["out"])]
    elif form == "qlinear":
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                  helper.make_node("QLinearConv", ["xq", "s", "zp", const("w", w, np.int8), "ws", "wzp", "s", "zp",
                                                   const("b", b, np.int32)], ["yq"]),
                  helper.make_node("Reshape", ["yq", "shape"], ["fq"]),
                  helper.make_node("QLinearMatMul", ["fq", "s", "zp", const("w2", w2, np.int8), "w2s", "w2zp", "s",
                                                     "zp"], ["oq"]),
                  helper.make_node("DequantizeLinear", ["oq", "s", "zp"], ["out"])]
    else:
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                  helper.make_node("ConvInteger", ["xq", const("w", w, np.int8), "zp", "wzp"], ["y"]),
                  helper.make_node("Cast", ["y"], ["yf"], to=T.FLOAT),
                  helper.make_node("Reshape", ["yf", "shape"], ["f"]),
                  helper.make_node("QuantizeLinear", ["f", "s", "zp"], ["fq"]),
                  helper.make_node("MatMulInteger", ["fq", const("w2", w2, np.int8), "zp", "w2zp"], ["out"])]
    out_type = T.INT32 if form == "integer" else T.FLOAT
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", T.FLOAT, [batch, 2, 5, 5])],
                              [helper.make_tensor_value_info("out", out_type, [batch, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("form, params", [("float", 165), ("qdq", 165), ("qlinear", 165), ("integer", 162)])
def test_onnx_quantized_layers_count_their_weights_and_macs(tmp_path, form, params):
    onnx = pytest.importorskip("onnx")
    model = onnx_layers(form)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "m.onnx")
    s = inspect_path(tmp_path / "m.onnx")
    assert (s.params, s.macs, s.convolutions, s.linears, s.conv_kernels) == (params, 594, 1, 1, {"3x3": 1})
    assert not s.notes


def test_dynamic_batch_counts_macs_per_sample(tmp_path):
    onnx = pytest.importorskip("onnx")
    onnx.save(onnx_layers("qdq", batch="batch"), tmp_path / "m.onnx")
    s = inspect_path(tmp_path / "m.onnx")
    assert (s.params, s.macs) == (165, 594) and "per sample" in s.notes[0]
    x = torch.randn(2, 2, 5, 5)
    program = torch.export.export(nn.Conv2d(2, 3, 3).eval(), (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    s = inspect_module(program, (x,))
    assert (s.params, s.macs) == (57, 27 * 18) and "per sample" in s.notes[0]
    assert "MACs:          486" in s.summary()  # a symbolic batch no longer reaches the text


def openvino_layers(quantized: bool):
    """The layers of :func:`onnx_layers` in OpenVINO: float, or NNCF's INT8 form (FakeQuantize on the input,
    weights as i8 Constant -> Convert -> Subtract u8 zero point -> Multiply f16 scale, an fp32 bias Add)."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    w, w2 = rng.integers(-127, 127, (3, 2, 3, 3)), rng.integers(-127, 127, (4, 27))

    def weight(value):
        if not quantized:
            return ops.constant(value.astype(np.float32))
        channels = (len(value),) + (1,) * (value.ndim - 1)
        data = ops.subtract(ops.convert(ops.constant(value.astype(np.int8)), "f32"),
                            ops.convert(ops.constant(np.zeros(channels, np.uint8)), "f32"))
        return ops.multiply(data, ops.convert(ops.constant(np.full(channels, 0.01, np.float16)), "f32"))

    x = ops.parameter([1, 2, 5, 5], np.float32, name="x")
    data = x
    if quantized:
        lo, hi = ops.constant(np.float32(-3)), ops.constant(np.float32(3))
        data = ops.fake_quantize(x, lo, hi, lo, hi, 256)
    y = ops.add(ops.convolution(data, weight(w), [1, 1], [0, 0], [0, 0], [1, 1]),
                ops.constant(np.ones((1, 3, 1, 1), np.float32)))
    f = ops.reshape(y, ops.constant(np.array([1, 27], np.int64)), special_zero=False)
    return ov.Model([ops.matmul(f, weight(w2), transpose_a=False, transpose_b=True)], [x], "layers")


@pytest.mark.parametrize("quantized", [False, True])
def test_openvino_decompressed_weights_count_once(tmp_path, quantized):
    ov = pytest.importorskip("openvino")
    ov.save_model(openvino_layers(quantized), tmp_path / "m.xml", compress_to_fp16=False)
    s = inspect_path(tmp_path / "m.xml")
    assert (s.params, s.macs, s.convolutions, s.linears, s.conv_kernels) == (165, 594, 1, 1, {"3x3": 1})
    assert s.elementwise == 1  # the bias Add; the decompression runs on constants
    assert s.ops.get("FakeQuantize", 0) == quantized


def test_a_file_holding_fewer_parameters_than_its_run_says_why(tmp_path, monkeypatch):
    """torch.onnx and the TFLite converter leave out an all-zero bias: the file stores fewer values than the run's
    plain model, and inspect says so beside the count it read."""
    import types

    import deploy.inspect as inspect_module_

    onnx = pytest.importorskip("onnx")
    onnx.save(onnx_layers("float"), tmp_path / "m.onnx")
    run = types.SimpleNamespace(stages=[], reparameterize={"params_after": 165 + 4})
    monkeypatch.setattr(inspect_module_, "_run_beside", lambda path: run)
    s = inspect_path(tmp_path / "m.onnx")
    assert s.params == 165 and "stores 165 parameters, 4 fewer than the run's plain model (169" in s.notes[-1]
    assert "all-zero bias" in s.notes[-1]
    run.reparameterize["params_after"] = 165
    assert not inspect_path(tmp_path / "m.onnx").notes


def test_cli_inspect(capsys, tmp_path):
    filters, root = warnings.filters[:], logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert cli.main(["inspect", "repvgg_digits", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert (data["branch_groups"], data["branches"], data["macs"], data["flops"]) == (6, 15, 666_240, 1_332_480)
        assert cli.main(["inspect", "repvgg_a0", "--width", "0.25", "--input-shape", "1,3,32,32"]) == 0
        text = capsys.readouterr().out
        assert "mergeable:     22 branch group(s) (61 branches)" in text and "input 1x3x32x32" in text
        (tmp_path / "model.bin").write_bytes(b"")
        assert cli.main(["inspect", str(tmp_path / "model.bin")]) == 2
        assert "error:" in capsys.readouterr().err
        assert cli.main(["inspect", str(tmp_path / "absent.onnx")]) == 2
        assert "does not exist" in capsys.readouterr().err
        (tmp_path / "bad.onnx").write_bytes(b"garbage")
        assert cli.main(["inspect", str(tmp_path / "bad.onnx")]) == 2
        assert "cannot read" in capsys.readouterr().err
    finally:
        warnings.filters[:] = filters
        root.handlers[:], root.level = handlers, level
        logging.captureWarnings(False)


def test_inspect_source_needs_a_shape_for_user_code(tmp_path):
    (tmp_path / "f.py").write_text("from torch import nn\n\n\ndef f():\n    return nn.Conv2d(1, 2, 3).eval()\n")
    with pytest.raises(ValueError, match="pass --input-shape"):
        inspect_source(f"{tmp_path / 'f.py'}:f")
    s = inspect_source(f"{tmp_path / 'f.py'}:f", (2, 1, 5, 5))
    assert (s.macs, s.params, s.conv_kernels) == (2 * 2 * 3 * 3 * 9, 2 * 9 + 2, {"3x3": 1})


def test_guideline_metrics_are_counted_exactly():
    """ShuffleNet V2's guidelines: memory access (bytes read + written), element-wise ops, fragmentation."""
    import torch
    from torch import nn

    from deploy.inspect import inspect_module

    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(1, 2, 1, bias=False)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))

    s = inspect_module(Fork(), (torch.randn(1, 1, 2, 2),))
    # conv: x 16 B + weight 8 B + out 32 B (x2); add: 32 + 32 + 32 B; relu: 32 + 32 B
    assert s.memory_access == 2 * (16 + 8 + 32) + 96 + 64
    assert s.elementwise == 2 and (s.forks, s.fork_branches) == (1, 2)
    assert "guidelines:" in s.summary() and "2 parallel paths" in s.summary()


def test_guideline_metrics_for_shufflenet_v2_and_ghostnet():
    import torch

    from deploy import zoo
    from deploy.inspect import inspect_module

    for name in ("shufflenet_v2", "ghostnet"):
        model = zoo.create(name, width=0.5).eval()
        s = inspect_module(model, (torch.randn(1, 3, 32, 32),))
        relus = s.ops.get("relu", 0) + s.ops.get("relu_", 0)
        assert s.elementwise >= relus > 0 and s.memory_access > 0 and s.forks >= 1
