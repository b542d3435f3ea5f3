"""Full-integer TFLite (``exporters.tflite_int8.quantize_tflite``) on a reparameterized ResNet-style net.

The net is written the way torchvision writes a BasicBlock (``out += identity`` in place), with
BatchNorm statistics far from the identity so the folded kernels' channels differ in range. It is
reparameterized with ``fusers.reparameterize``, exported to fp32 TFLite, and quantized with 32
calibration inputs; the numbers are measured on 64 other inputs (a different seed).

Measured (litert-torch 0.10.0, torchao 0.18.0, ai-edge-litert 2.3.0; calibration seeds 1, 3, 4):
output SQNR against the torch model 41.2-43.0 dB (seed 1: minmax 41.8 dB per-channel, 41.3 dB
per-tensor, entropy 42.8 dB, percentile 42.0 dB); top-1 agreement 58-64 of 64. The random net's
top-2 logits are close (median margin 0.02, logit std 0.37): every sample that changed class had a
fp32 margin of at most 0.009 (largest logit error 0.018), so the test asks for agreement >= 0.85
overall and 100% on the samples whose margin is at least 0.02 (31 of 64). SQNR bound: 35 dB.
"""

import functools
import sys

import numpy as np
import pytest
import torch
from torch import nn

MIN_SQNR_DB = 35.0
MIN_AGREEMENT = 0.85
CLEAR_MARGIN = 0.02  # fp32 top-2 logit margin above which no sample may change class
CALIBRATION, EVALUATION = 32, 64


def _sqnr(ref, test):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref.astype(np.float64) - test) ** 2))


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (no downsample)."""

    def __init__(self, planes):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out += identity
        out = self.relu(out)
        return out


class TinyResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.block = BasicBlock(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.down(self.block(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _tiny_resnet():
    torch.manual_seed(0)
    model = TinyResNet()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
            m.running_var.copy_(0.2 + 4 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.2 + 2.3 * torch.rand(n, generator=g))
            m.bias.data.copy_(0.3 * torch.randn(n, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, its plain form, the fp32 TFLite artifact, calibration and evaluation inputs, the reference."""
    pytest.importorskip("litert_torch", reason="TFLite int8 needs litert-torch (pip install 'reparam-deploy[tflite]')")
    pytest.importorskip("ai_edge_litert", reason="reading TFLite files needs ai-edge-litert")
    pytest.importorskip("torchao", reason="PT2E quantization needs torchao (installed with litert-torch)")
    import fusers
    from exporters.tflite import export_tflite

    folder = tmp_path_factory.mktemp("tflite_int8")
    model, x = _tiny_resnet(), torch.randn(1, 3, 16, 16)
    plain = fusers.reparameterize(model, (x,))
    fp32 = export_tflite(plain, (x,), folder / "fp32.tflite")
    calibration = np.random.RandomState(1).randn(CALIBRATION, 3, 16, 16).astype(np.float32)
    evaluation = np.random.RandomState(2).randn(EVALUATION, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(evaluation)).numpy()
    return {"model": model, "plain": plain, "x": x, "fp32": fp32, "folder": folder, "calibration": calibration,
            "evaluation": evaluation, "reference": reference, "made": {}}


def _quantized(setup, name="default", **options):
    """The int8 artifact for ``options`` (made once per module)."""
    from exporters.int8 import Int8Options
    from exporters.tflite_int8 import quantize_tflite

    if name not in setup["made"]:
        opts = Int8Options(setup["calibration"], **options)
        setup["made"][name] = quantize_tflite(setup["fp32"], setup["folder"] / f"{name}.tflite", opts,
                                              module=setup["plain"], args=(setup["x"],))
    return setup["made"][name]


def _outputs(art, inputs, **runner_options):
    from runtimes.litert_runner import LiteRTRunner

    with LiteRTRunner(art.path, artifact=art, threads=1, **runner_options) as r:
        return np.concatenate([list(r.infer([inputs[i:i + 1]]).values())[0] for i in range(len(inputs))])


def _weights(plain):
    """The plain module's conv and linear kernels in TFLite's layout (OHWI for conv)."""
    out = []
    for node in plain.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            w = functools.reduce(getattr, node.args[1].target.split("."), plain).detach().numpy()
            out.append(w.transpose(0, 2, 3, 1) if w.ndim == 4 else w)
    return out


def _tensors(path):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it, it.get_tensor_details()


def _check_kernels(art, plain, per_channel):
    """Every conv/linear kernel is an int8 tensor, zero point 0, scale max(max|W_c| / 127, 2**-12) (per channel)
    or max(max|W| / 127, 2**-12) (litert-torch's observer eps), and dequantizes to the float kernel within half a
    step. (Per tensor, the converter writes a FULLY_CONNECTED kernel's one scale once per output channel.)"""
    it, details = _tensors(art.path)
    int8 = [d for d in details if d["dtype"] == np.int8 and len(d["shape"]) in (2, 4) and
            d["quantization_parameters"]["scales"].size in (1, int(d["shape"][0])) and d["shape"][0] > 1]
    for w in _weights(plain):
        candidates = [d for d in int8 if tuple(d["shape"]) == w.shape]
        assert candidates, f"no int8 tensor of shape {w.shape}"
        axes = tuple(range(1, w.ndim))
        peak = np.abs(w).max(axis=axes) if per_channel else np.array([np.abs(w).max()])
        want = np.maximum(peak / 127, 2.0 ** -12)
        matched = False
        for d in candidates:
            q = d["quantization_parameters"]
            if (per_channel and q["scales"].shape != want.shape) or not np.allclose(q["scales"], want, rtol=1e-5):
                continue
            assert not np.any(q["zero_points"]) and q["quantized_dimension"] == 0
            scale = q["scales"].reshape((-1,) + (1,) * (w.ndim - 1))
            assert np.abs(it.get_tensor(d["index"]).astype(np.float32) * scale - w).max() <= 0.5001 * scale.max()
            matched = True
        assert matched, f"no int8 kernel of shape {w.shape} has the scales {want}"


# ------------------------------------------------------------------------------------------- structure

def test_per_channel_kernels_are_int8_with_one_scale_per_output_channel(setup):
    art = _quantized(setup)
    assert art.precision == "int8" and art.parent == setup["fp32"].path
    _check_kernels(art, setup["plain"], per_channel=True)
    ops = art.metadata["int8"]["ops"]
    assert ops["float"] == {} and ops["convert"] == {"QUANTIZE": 1, "DEQUANTIZE": 1}
    assert ops["int8"]["CONV_2D"] == 4 and ops["int8"]["FULLY_CONNECTED"] == 1 and ops["int8"]["ADD"] == 1
    meta = art.metadata["int8"]
    assert meta["per_channel"] and meta["calibration_samples"] == CALIBRATION and meta["io"] == "float32"
    assert meta["observer"] == {"activations": "MinMaxObserver", "weights": "PerChannelMinMaxObserver"}
    assert art.inputs[0].dtype == "float32" and art.outputs[0].dtype == "float32"
    assert art.inputs[0].shape == (1, 3, 16, 16) and art.outputs[0].shape == (1, 10)
    with torch.no_grad():  # prepare_pt2e worked on a copy: the plain module (weights shared) is untouched
        assert torch.allclose(setup["plain"](setup["x"]), setup["model"](setup["x"]), atol=1e-5)


@pytest.mark.e2e  # a TFLite conversion and quantization each: the fast lane keeps the per-channel one
def test_per_tensor_kernels_have_one_scale(setup):
    art = _quantized(setup, "per_tensor", per_channel=False)
    _check_kernels(art, setup["plain"], per_channel=False)
    _, details = _tensors(art.path)
    assert all(np.unique(d["quantization_parameters"]["scales"]).size == 1 for d in details if d["dtype"] == np.int8)
    assert art.metadata["int8"]["observer"]["weights"] == "MinMaxObserver"


@pytest.mark.e2e  # a TFLite conversion and quantization each: the fast lane keeps the per-channel one
def test_excluded_conv_stays_float(setup):
    from exporters._torch import recaptured

    plain = setup["plain"]
    graph = recaptured(plain, (setup["x"],)).graph  # layers are named as the ONNX export names them
    convs = [n.name for n in graph.nodes if n.target == torch.ops.aten.conv2d.default]
    art = _quantized(setup, "exclude", exclude=(convs[1],))
    ops = art.metadata["int8"]["ops"]
    assert ops["float"] == {"CONV_2D": 1} and ops["int8"]["CONV_2D"] == 3
    w = _weights(plain)[1]
    _, details = _tensors(art.path)
    assert [d["dtype"] for d in details if tuple(d["shape"]) == w.shape and d["dtype"] != np.int8] == [np.float32]
    assert art.metadata["int8"]["exclude"] == [convs[1]] and convs[1] in art.notes[-1]
    out = _outputs(art, setup["evaluation"])
    assert _sqnr(setup["reference"], out) >= MIN_SQNR_DB


def test_unknown_layer_name_is_refused_with_the_layers(setup):
    from exporters.int8 import Int8Options
    from exporters.tflite_int8 import quantize_tflite

    opts = Int8Options(setup["calibration"][:2], exclude=("conv2d_99",))
    with pytest.raises(ValueError, match=r"conv2d_99.*no such node.*conv2d"):
        quantize_tflite(setup["fp32"], setup["folder"] / "bad.tflite", opts, module=setup["plain"], args=(setup["x"],))


def test_without_module_is_refused(setup):
    from exporters.int8 import Int8Options
    from exporters.tflite_int8 import quantize_tflite

    with pytest.raises(ValueError, match="plain torch module"):
        quantize_tflite(setup["fp32"], setup["folder"] / "bad.tflite", Int8Options(setup["calibration"][:2]))


# --------------------------------------------------------------------------------------------- numbers

@pytest.mark.e2e  # a TFLite conversion and quantization each: the fast lane keeps the per-channel one
@pytest.mark.parametrize("name,options", [("default", {}), ("per_tensor", {"per_channel": False}),
                                          ("entropy", {"method": "entropy"})])
def test_int8_agrees_with_torch_on_held_out_inputs(setup, name, options):
    art = _quantized(setup, name, **options)
    ref = setup["reference"]
    out = _outputs(art, setup["evaluation"])
    fp32 = _outputs(setup["fp32"], setup["evaluation"])
    assert _sqnr(ref, fp32) > 100  # the fp32 artifact is exact; the loss below is quantization
    sqnr = _sqnr(ref, out)
    agreement = np.mean(out.argmax(1) == ref.argmax(1))
    assert MIN_SQNR_DB <= sqnr < 60, sqnr  # < 60 dB: it did quantize
    assert agreement >= MIN_AGREEMENT, agreement
    top2 = np.sort(ref, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= CLEAR_MARGIN
    assert clear.sum() >= 16 and np.all(out[clear].argmax(1) == ref[clear].argmax(1))


@pytest.mark.e2e  # a TFLite conversion and quantization each: the fast lane keeps the per-channel one
def test_nhwc_artifact_is_calibrated_in_its_layout(setup):
    from exporters.int8 import Int8Options
    from exporters.tflite import export_tflite
    from exporters.tflite_int8 import quantize_tflite

    fp32 = export_tflite(setup["plain"], (setup["x"],), setup["folder"] / "nhwc.tflite", nhwc=True)
    nhwc = np.ascontiguousarray(setup["calibration"].transpose(0, 2, 3, 1))
    art = quantize_tflite(fp32, setup["folder"] / "nhwc.int8.tflite", Int8Options(nhwc), module=setup["plain"],
                          args=(setup["x"],))
    assert art.inputs[0].shape == (1, 16, 16, 3) and art.metadata["layout"]["inputs"] == ["NHWC"]
    ev = setup["evaluation"][:16]
    out = _outputs(art, np.ascontiguousarray(ev.transpose(0, 2, 3, 1)))
    assert _sqnr(setup["reference"][:16], out) >= MIN_SQNR_DB
    with pytest.raises(ValueError, match=r"shape \(3, 16, 16\); the TFLite model's input takes \(16, 16, 3\) \(NHWC\)"):
        quantize_tflite(fp32, setup["folder"] / "bad.tflite", Int8Options(setup["calibration"][:1]),
                        module=setup["plain"], args=(setup["x"],))


@pytest.mark.e2e  # a TFLite conversion and quantization each: the fast lane keeps the per-channel one
def test_int8_edges_are_quantized_by_the_runner(setup):
    """extra io=int8 (the converter's default mode) makes int8 input/output tensors; the runner feeds
    round(x / s) + z and returns s * (q - z), so it agrees with the float-edged model to one output step."""
    art = _quantized(setup, "int8_io", extra={"io": "int8"})
    it, _ = _tensors(art.path)
    runner = it.get_signature_runner()
    (inp,), (out,) = runner.get_input_details().values(), runner.get_output_details().values()
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8 and art.metadata["int8"]["io"] == "int8"
    assert art.inputs[0].dtype == "float32"  # presented as float by the runner
    ev = setup["evaluation"][:16]
    edged, floated = _outputs(art, ev), _outputs(_quantized(setup), ev)
    assert np.abs(edged - floated).max() <= 1.001 * out["quantization"][0]
    from runtimes.litert_runner import LiteRTRunner

    with LiteRTRunner(art.path, float_io=False) as r:
        assert r.get_input_specs()[0].dtype == "int8"


def test_int8_io_cannot_exclude(setup):
    from exporters.int8 import Int8Options
    from exporters.tflite_int8 import quantize_tflite

    opts = Int8Options(setup["calibration"][:2], exclude=("x",), extra={"io": "int8"})
    with pytest.raises(ValueError, match="cannot keep layers in float"):
        quantize_tflite(setup["fp32"], setup["folder"] / "bad.tflite", opts, module=setup["plain"], args=(setup["x"],))


# --------------------------------------------------------------------------------- observers, registry

def test_percentile_observer_clips_outliers():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.observer import MinMaxObserver

    from exporters.pt2e import percentile_observer

    x = torch.cat([torch.linspace(0, 1, 100_000), torch.tensor([100.0])])
    kw = {"dtype": torch.int8, "quant_min": -128, "quant_max": 127, "qscheme": torch.per_tensor_affine}
    clipped, full = percentile_observer()(percentile=99.9, **kw), MinMaxObserver(**kw)
    clipped(x), full(x)
    assert float(full.calculate_qparams()[0]) == pytest.approx(100 / 255, rel=1e-6)
    assert float(clipped.calculate_qparams()[0]) == pytest.approx(1 / 255, rel=0.06)  # 1 +- a 100/2048 bin


def test_tflite_target_declares_int8():
    from exporters import targets

    target = targets.get("tflite")
    assert "int8" in target.precisions
    assert targets.resolve(target.quantize).__name__ == "quantize_tflite"


def test_missing_torchao_names_the_extra(setup, monkeypatch):
    from exporters import MissingDependency
    from exporters.int8 import Int8Options
    from exporters.tflite_int8 import quantize_tflite

    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(MissingDependency, match=r"torchao.*pip install 'reparam-deploy\[tflite\]'"):
        quantize_tflite(setup["fp32"], setup["folder"] / "m.tflite", Int8Options(setup["calibration"][:1]),
                        module=setup["plain"], args=(setup["x"],))
