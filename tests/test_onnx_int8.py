"""Static QDQ INT8 with ONNX Runtime (``exporters.onnx_int8``): the quantized file's structure (QDQ pairs,
per-channel and per-tensor weight scales, layers kept in float), the errors it raises, and its accuracy against
fp32 on inputs disjoint from the calibration ones (a random small net with non-trivial BatchNorm statistics,
and the trained ``repvgg_digits`` on its held-out split)."""

import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxsim")
pytest.importorskip("onnxscript")

import fusers  # noqa: E402
from deploy import zoo  # noqa: E402
from exporters import targets  # noqa: E402
from exporters.int8 import Int8Options  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.onnx_int8 import quantizable_layers, quantize_onnx  # noqa: E402
from runtimes import open_runner  # noqa: E402
from runtimes.core import ExportError  # noqa: E402
from runtimes.int8 import sqnr_db  # noqa: E402

SHAPE = (3, 16, 16)
CALIBRATION = np.random.default_rng(1).standard_normal((32, *SHAPE)).astype(np.float32)
EVALUATION = np.random.default_rng(2).standard_normal((32, *SHAPE)).astype(np.float32)


def block(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def small_net() -> nn.Module:
    """Three conv+BN+ReLU blocks and a linear classifier on the flattened features: (N, 3, 16, 16) -> (N, 10)."""
    torch.manual_seed(0)
    model = nn.Sequential(*block(3, 8), *block(8, 16, 2), *block(16, 16, 2), nn.Flatten(), nn.Linear(16 * 16, 10))
    return zoo.randomize_batchnorm(model).eval()


def export_plain(model, x, path):
    """What the pipeline quantizes: the reparameterized (BatchNorm folded) model exported and simplified."""
    return export_onnx(fusers.reparameterize(model, (x,)), (x,), path)


def run(path, x):
    with open_runner(path) as r:
        return np.concatenate([next(iter(r.infer([x[i:i + 1]]).values())) for i in range(len(x))])


def producers(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def layer_nodes(model) -> dict:
    return {n.name[len("node_"):]: n for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    model = small_net()
    art = export_plain(model, torch.zeros(1, *SHAPE), tmp_path_factory.mktemp("int8") / "net.onnx")
    with torch.no_grad():
        reference = model(torch.from_numpy(EVALUATION)).numpy()
    return art, reference


@pytest.fixture(scope="module")
def quantized(net, tmp_path_factory):
    """``quantize(**options)``: the net quantized with those Int8Options, made once per options."""
    folder, made = tmp_path_factory.mktemp("int8-q"), {}

    def quantize(**kw):
        key = repr(sorted(kw.items()))
        if key not in made:
            made[key] = quantize_onnx(net[0], folder / f"net{len(made)}.int8.onnx", Int8Options(CALIBRATION, **kw))
        return made[key]
    return quantize


def test_layers_are_the_plain_models_node_names(net):
    assert quantizable_layers(net[0].path) == ["conv2d", "conv2d_1", "conv2d_2", "linear"]


def test_qdq_model_quantizes_every_layer_and_keeps_float_io(net, quantized):
    art = quantized()
    model = onnx.load(art.path)
    ops = art.metadata["ops"]
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 8  # activations; weights and biases
    assert ops["Conv"] == 3 and ops["Gemm"] == 1 and "Relu" not in ops  # the uint8 clamp at zero is the ReLU
    made_by = producers(model)
    for name, node in layer_nodes(model).items():
        assert made_by[node.input[0]].op_type == "DequantizeLinear", name
        assert made_by[node.input[1]].op_type == "DequantizeLinear", name
    assert art.precision == "int8" and art.parent == net[0].path
    assert [(s.name, s.shape, s.dtype) for s in art.inputs] == [("input0", (1, *SHAPE), "float32")]
    assert [(s.dtype, s.shape) for s in art.outputs] == [("float32", (1, 10))]
    assert art.metadata["int8"] == {"format": "QDQ", "weights": "int8", "activations": "uint8", "per_channel": True,
                                    "method": "minmax", "calibration_samples": 32, "quantized_layers": 4,
                                    "layers": 4, "excluded": [], "float_scope": [], "bias_corrected": 0,
                                    "weights_clipped": 0}
    assert "4 of 4" in art.notes[-1]
    onnx.checker.check_model(art.path, full_check=True)
    with open_runner(art) as r:  # the ONNX Runtime runner takes the QDQ file with float inputs
        out = next(iter(r.infer([EVALUATION[:1]]).values()))
    assert out.dtype == np.float32 and out.shape == (1, 10)


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_scales_are_per_output_channel_or_per_tensor(quantized, per_channel):
    model = onnx.load(quantized(per_channel=per_channel).path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    made_by = producers(model)
    for name, node in layer_nodes(model).items():
        dq = made_by[node.input[1]]
        q_weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert q_weight.dtype == np.int8, name
        channels = q_weight.shape[0]  # Conv (out, in, kh, kw); Gemm (out, in) with transB
        if per_channel:
            assert scale.shape == (channels,) and channels in (8, 16, 10), name
            assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0, name
        else:
            assert scale.shape == (), name
        assert np.abs(q_weight).max() == 127  # symmetric: the largest weight of each scale's group maps to 127


def test_excluded_layer_keeps_its_float_weight(quantized):
    art = quantized(exclude=("conv2d_1",))
    model = onnx.load(art.path)
    made_by = producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = layer_nodes(model)
    kept = nodes["conv2d_1"]
    assert kept.input[1] in inits and inits[kept.input[1]].data_type == onnx.TensorProto.FLOAT
    assert kept.input[1] not in made_by  # no DequantizeLinear feeds its weight
    for name in ("conv2d", "conv2d_2", "linear"):
        assert made_by[nodes[name].input[1]].op_type == "DequantizeLinear", name
    assert art.metadata["int8"]["quantized_layers"] == 3 and art.metadata["int8"]["excluded"] == ["conv2d_1"]
    assert "kept in float: conv2d_1" in art.notes[-1]


def test_unknown_excluded_layer_names_the_known_ones(net, tmp_path):
    with pytest.raises(ValueError, match=r"'conv9'.*conv2d, conv2d_1, conv2d_2, linear"):
        quantize_onnx(net[0], tmp_path / "q.onnx", Int8Options(CALIBRATION, exclude=("conv2d", "conv9")))
    assert not (tmp_path / "q.onnx").exists()


def test_calibration_of_another_shape_is_an_export_error(net, tmp_path):
    with pytest.raises(ExportError, match=r"calibration batches of shape \(1, 3, 8, 8\) do not fit input input0"):
        quantize_onnx(net[0], tmp_path / "q.onnx", Int8Options(CALIBRATION[:, :, :8, :8]))


def test_int8_output_tracks_fp32_on_held_out_inputs(net, quantized):
    art, reference = net
    fp32 = run(art.path, EVALUATION)
    assert sqnr_db(reference, fp32) > 100  # the fp32 file is the torch model
    # measured: 44.0 dB per channel, 44.4 dB per tensor (minmax ranges, 32 calibration samples); the logits of
    # this random net are mostly one input-independent vector (every input is class 5), so the argmax is
    # checked on the trained digits net below
    for per_channel in (True, False):
        assert sqnr_db(reference, run(quantized(per_channel=per_channel).path, EVALUATION)) > 40


def activation_scales(art) -> dict:
    model = onnx.load(art.path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("method, options", [("entropy", {"extra": {"num_bins": 1024}}),
                                             ("percentile", {"percentile": 99.9})])
def test_clipping_methods_narrow_activation_ranges(quantized, method, options):
    """Entropy and percentile clip outliers: no activation scale grows, some shrink."""
    art = quantized(method=method, **options)
    base, clipped = activation_scales(quantized()), activation_scales(art)
    assert clipped.keys() == base.keys() and len(base) == 6  # input, 3 ReLUs, flatten, logits
    assert all(clipped[k] <= base[k] * (1 + 1e-6) for k in base)
    assert sum(clipped[k] < 0.97 * base[k] for k in base) >= 2  # measured: entropy 2, percentile 5 of 6
    assert art.metadata["int8"]["method"] == method
    assert {k: v for k, v in art.metadata["int8"].items() if k in ("histogram_bins", "percentile")} == \
        ({"histogram_bins": 1024} if method == "entropy" else {"percentile": 99.9})


def test_entropy_with_onnxruntimes_128_bins_is_minmax(quantized):
    """Why the entropy ranges are computed here: a 128-bin histogram leaves one candidate threshold, the full range."""
    assert activation_scales(quantized(method="entropy", extra={"num_bins": 128})) == activation_scales(quantized())


def test_quantizer_is_quiet_and_writes_only_its_file(net, tmp_path, capsys):
    root = logging.getLogger()
    handlers = root.handlers[:]
    folder = os.path.dirname(net[0].path)
    before = sorted(os.listdir(folder))
    quantize_onnx(net[0], tmp_path / "q.onnx", Int8Options(CALIBRATION[:4], method="entropy", extra={"num_bins": 256}))
    assert capsys.readouterr().out == ""  # ONNX Runtime's calibrators print progress
    assert root.handlers == handlers  # its logging.warning() would install a root handler
    assert sorted(os.listdir(folder)) == before and os.listdir(tmp_path) == ["q.onnx"]


def test_trained_digits_net_keeps_its_predictions(tmp_path):
    """A trained RepVGG, calibrated on its training split, judged on its held-out split."""
    model = zoo.create("repvgg_digits", pretrained=True).eval()
    train, test = np.load(zoo.calibration("repvgg_digits")), np.load(zoo.samples("repvgg_digits"))
    calibration, x, labels = train["input0"][:128].astype(np.float32), test["input0"].astype(np.float32), test["labels"]
    assert not {r.tobytes() for r in calibration} & {r.tobytes() for r in x}
    art = export_plain(model, torch.from_numpy(x[:1]), tmp_path / "digits.onnx")
    fp32 = run(art.path, x)
    int8 = run(quantize_onnx(art, tmp_path / "digits.int8.onnx", Int8Options(calibration)).path, x)
    assert (fp32.argmax(1) == labels).mean() > 0.97
    # measured: 34.3 dB, all 360 predictions kept (minmax, per channel)
    assert sqnr_db(fp32, int8) > 28
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.99


def test_onnx_target_declares_int8():
    target = targets.get("onnx")
    assert target.precisions == ("fp32", "fp16", "int8")
    assert targets.resolve(target.quantize) is quantize_onnx


def test_quantizer_failure_is_one_export_error_and_leaves_no_file(net, tmp_path, monkeypatch):
    import onnxruntime.quantization

    def broken(model, output, *args, **kwargs):
        open(output, "wb").close()
        raise RuntimeError("no kernel for op Foo\nstack ...")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", broken)
    with pytest.raises(ExportError, match=r"^ONNX Runtime could not quantize .*net.sim.onnx to INT8: no kernel for op "
                                          r"Foo$"):
        quantize_onnx(net[0], tmp_path / "q.onnx", Int8Options(CALIBRATION[:2]))
    assert not (tmp_path / "q.onnx").exists()
