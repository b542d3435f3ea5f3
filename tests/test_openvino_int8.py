"""NNCF INT8 quantization of an OpenVINO IR (``exporters.openvino_int8``) and the runner's int8 precision.

A small conv net (conv, depthwise conv, pointwise conv, linear; BatchNorm with non-trivial statistics,
folded by the reparameterization) is exported to ONNX, converted to an fp32 IR (batch 2), and quantized
with 16-32 calibration inputs (seed 1); it is evaluated on 63 other inputs (seed 2; odd, so the last
batch is padded).
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

pytest.importorskip("nncf", reason="NNCF is not installed (pip install 'reparam-deploy[openvino]')")
pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'reparam-deploy[openvino]')")
pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (pip install 'reparam-deploy[onnx]')")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fusers  # noqa: E402
from exporters import ExportError, MissingDependency  # noqa: E402
from exporters.int8 import Int8Options  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.openvino import export_openvino  # noqa: E402
from exporters.openvino_int8 import (  # noqa: E402
    int8_weights,
    layer_names,
    quantize_openvino,
    quantize_openvino_with_accuracy_control,
)
from exporters.targets import get  # noqa: E402
from runtimes.openvino_runner import OpenVINORunner  # noqa: E402

SHAPE = (2, 3, 8, 8)
LAYERS = ["conv2d", "conv2d_1", "conv2d_2", "linear"]
MIN_SQNR = 20.0  # dB of the logits vs the fp32 IR; measured 28 (conv2d_2 excluded), 25.5-26 (every layer int8),
# 24 (per-tensor weights), 24-25 (entropy -> HISTOGRAM), 19-19.5 (percentile 99.999) with two calibration seeds


def _block(cin, cout, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class SmallNet(nn.Module):
    """conv -> depthwise conv -> pointwise conv (stride 2), each with BatchNorm and ReLU; 512 features -> 10
    logits."""

    def __init__(self):
        super().__init__()
        self.stem = _block(3, 16, kernel_size=3, padding=1)
        self.dw = _block(16, 16, kernel_size=3, padding=1, groups=16)
        self.pw = _block(16, 32, kernel_size=1, stride=2)
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).flatten(1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def _model(outlier: float = 1.0) -> nn.Module:
    """SmallNet with random BatchNorm statistics; the head's bias centres the logits (mean over other inputs) so
    the top-1 class depends on the input. ``outlier`` scales channel 0 of the depthwise block, which the pointwise
    conv ignores: the per-tensor range of its input grows, the resolution of the other channels shrinks."""
    torch.manual_seed(0)
    model = _randomize_bn(SmallNet())
    with torch.no_grad():
        model.dw[1].weight[0] *= outlier
        model.pw[0].weight[:, 0] = 0
        model.head.bias.sub_(model(torch.from_numpy(_data(256, 9))).mean(0))
    return model


def _data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE[1:]), dtype=np.float32)


def _run(path, x: np.ndarray, precision: str) -> np.ndarray:
    """The logits of ``x`` in batches of 2 (the last one padded, its extra row dropped)."""
    padded = np.concatenate([x, x[-1:]]) if len(x) % 2 else x
    with OpenVINORunner(path, precision=precision, threads=1) as r:
        out = np.concatenate([next(iter(r.infer([padded[i:i + 2]]).values())) for i in range(0, len(padded), 2)])
    return out[:len(x)]


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - test) ** 2)))


def _const_types(xml_path) -> list[str]:
    with open(xml_path) as f:
        return re.findall(r'<layer[^>]*type="Const"[^>]*>\s*<data[^>]*element_type="(\w+)"', f.read())


def _fake_quantize(xml_path) -> int:
    with open(xml_path) as f:
        return len(re.findall(r'type="FakeQuantize"', f.read()))


def _ir(folder, outlier: float = 1.0):
    """(fp32 IR artifact, 63 evaluation inputs (seed 2), their fp32 IR logits); calibration uses seed 1."""
    x = torch.from_numpy(_data(2, 0))
    plain = fusers.reparameterize(_model(outlier), (x,))
    onnx_art = export_onnx(plain, (x,), folder / "m.onnx", simplify=False)
    art = export_openvino(onnx_art, folder / "m.xml")
    x_eval = _data(63, 2)
    return art, x_eval, _run(art.path, x_eval, "fp32")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov_int8")
    art, x_eval, ref = _ir(folder)
    return art, folder, x_eval, ref


@pytest.fixture(scope="module")
def int8(fp32):
    art, folder, _, _ = fp32
    return quantize_openvino(art, folder / "q.xml", Int8Options(_data(32, 1), batch=2, exclude=("conv2d_2",)))


def test_layer_names_map_fx_names_onto_friendly_names(fp32):
    names = layer_names(fp32[0].path)
    assert list(names) == LAYERS
    assert names["conv2d_1"] == "node_conv2d_1/WithoutBiases"  # the bias Add keeps "node_conv2d_1"
    assert names["linear"] == "node_linear/WithoutBiases"


def test_int8_ir_structure_and_record(fp32, int8):
    art, _, _, _ = fp32
    assert int8.precision == "int8" and int8.format == "openvino" and int8.parent == art.path
    assert int8.input_names == art.input_names and int8.output_names == art.output_names
    meta = int8.metadata["int8"]
    # the input; the stem's ReLU (per channel: a depthwise conv's input); not the depthwise block's ReLU (read
    # only by the excluded conv2d_2); the pointwise block's ReLU (-> flatten -> linear)
    assert meta["fake_quantize"] == _fake_quantize(int8.path) == 3, meta
    assert meta["int8_weight_layers"] == 3 and meta["float_layers"] == ["conv2d_2"]
    assert meta["excluded"] == ["conv2d_2"] and meta["ignored_scope"] == ["node_conv2d_2/WithoutBiases"]
    assert meta["calibration_samples"] == 32 and meta["range_estimator"] == "MINMAX" and meta["per_channel"]
    weights = int8_weights(int8.path)
    assert weights == {"conv2d": (16, 1, 1, 1), "conv2d_1": (16, 1, 1, 1, 1), "conv2d_2": None, "linear": (10, 1)}
    assert _const_types(int8.path).count("i8") == 3 and "i8" not in _const_types(art.path)  # int8 in the .bin


def test_runner_runs_int8_close_to_fp32(fp32, int8):
    _, _, x_eval, ref = fp32
    with OpenVINORunner(int8.path, artifact=int8, threads=1) as r:  # the record's precision: int8
        assert r.precision == "int8" and r.effective_precision == "int8"
        assert r.int8_layers == (3, 4)  # the excluded conv computes in float (fp32: hint f32)
        assert r.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    out = _run(int8.path, x_eval, "int8")
    assert _sqnr(ref, out) > MIN_SQNR, _sqnr(ref, out)
    assert 0 < np.abs(ref - out).max()  # quantized, not a copy
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.9


def test_target_record_declares_int8(fp32, int8):
    target = get("openvino")
    assert "int8" in target.precisions and target.quantize == "exporters.openvino_int8:quantize_openvino"
    with target.open(int8) as r:
        assert r.precision == "int8" and r.effective_precision == "int8"


def test_per_tensor_weights_have_scalar_scales(fp32, int8):
    art, folder, x_eval, ref = fp32
    q = quantize_openvino(art, folder / "pt.xml", Int8Options(_data(32, 1), batch=2, per_channel=False))
    per_tensor, per_channel = int8_weights(q.path), int8_weights(int8.path)
    assert per_tensor == {"conv2d": (), "conv2d_1": (), "conv2d_2": (), "linear": ()}
    assert per_channel["conv2d"] == (16, 1, 1, 1) and not q.metadata["int8"]["per_channel"]
    out = _run(q.path, x_eval, "int8")
    assert _sqnr(ref, out) > MIN_SQNR - 4


@pytest.mark.parametrize("method, estimator", [("percentile", "MEAN_QUANTILE"), ("entropy", "HISTOGRAM")])
def test_methods_map_onto_nncf_range_estimators(fp32, method, estimator):
    art, folder, x_eval, ref = fp32
    q = quantize_openvino(art, folder / f"{method}.xml", Int8Options(_data(32, 1), batch=2, method=method))
    assert q.metadata["int8"]["range_estimator"] == estimator
    assert any("no entropy" in n for n in q.notes) == (method == "entropy")
    out = _run(q.path, x_eval, "int8")
    assert _sqnr(ref, out) > MIN_SQNR - 4  # percentile clips the most here (19 dB)


def test_unknown_exclude_names_the_known_layers(fp32, tmp_path):
    with pytest.raises(ValueError, match=r"unknown layer\(s\) conv9.*conv2d, conv2d_1, conv2d_2, linear"):
        quantize_openvino(fp32[0], tmp_path / "x.xml", Int8Options(_data(4, 1), batch=2, exclude=("conv9",)))


def test_bad_inputs_are_export_errors(fp32, tmp_path):
    with pytest.raises(ExportError, match="do not fit"):
        quantize_openvino(fp32[0], tmp_path / "x.xml", Int8Options(np.zeros((4, 3, 16, 16), np.float32)))
    with pytest.raises(ExportError, match="reads an OpenVINO IR"):
        quantize_openvino(fp32[1] / "m.onnx", tmp_path / "x.xml", Int8Options(_data(4, 1)))


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """An IR whose plain INT8 form loses top-1 agreement (outlier channel x10): (fp32 artifact, x_eval, ref,
    plain int8 logits)."""
    folder = tmp_path_factory.mktemp("ov_int8_outlier")
    art, x_eval, ref = _ir(folder, outlier=10.0)
    q = quantize_openvino(art, folder / "q.xml", Int8Options(_data(16, 1), batch=2))
    return art, x_eval, ref, _run(q.path, x_eval, "int8")


def test_accuracy_control_meets_max_drop_on_labels(outlier, tmp_path):
    art, x_eval, ref, plain = outlier
    labels = ref.argmax(1)
    flip = np.random.default_rng(3).random(len(labels)) < 0.1  # a labelled problem the fp32 IR gets ~90% right
    labels = np.where(flip, (labels + 1) % 10, labels)
    fp32_acc, plain_acc = np.mean(ref.argmax(1) == labels), np.mean(plain.argmax(1) == labels)
    # a bound of 2 points lets one of the 63 samples change (1.6 points); with 1.0 a single changed prediction sent
    # every layer back to float on a CPU without VNNI
    assert 100 * (fp32_acc - plain_acc) > 2.0, (fp32_acc, plain_acc)  # plain INT8 would miss the bound
    q = quantize_openvino_with_accuracy_control(art, tmp_path / "ac.xml", Int8Options(_data(16, 1), batch=2),
                                                x_eval, labels, max_drop=2.0)
    ac = q.metadata["int8"]["accuracy_control"]
    assert ac["metric"] == "accuracy" and ac["validation_samples"] == 63 and ac["max_drop_points"] == 2.0
    assert ac["fp32"] == pytest.approx(fp32_acc)
    assert ac["drop_points"] <= 2.0 and ac["passed"], ac
    assert ac["reverted"] and set(ac["reverted"]) < set(LAYERS), ac  # some layers back in float, not all
    assert set(ac["reverted"]) == set(q.metadata["int8"]["float_layers"])
    out = _run(q.path, x_eval, "int8")  # the saved IR reaches what the record says
    assert np.mean(out.argmax(1) == labels) == pytest.approx(ac["int8"])


def test_accuracy_control_defaults_to_agreement_with_fp32(outlier, tmp_path):
    art, x_eval, ref, _ = outlier
    q = quantize_openvino_with_accuracy_control(art, tmp_path / "ag.xml", Int8Options(_data(16, 1), batch=2),
                                                x_eval, max_drop=0.0)
    ac = q.metadata["int8"]["accuracy_control"]
    assert ac["metric"] == "agreement" and ac["fp32"] == 1.0 and ac["int8"] == 1.0 and ac["reverted"], ac
    assert np.mean(_run(q.path, x_eval, "int8").argmax(1) == ref.argmax(1)) == 1.0


def test_missing_nncf_names_the_extra(fp32, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(MissingDependency, match=r"'nncf'.*pip install 'reparam-deploy\[openvino\]'"):
        quantize_openvino(fp32[0], tmp_path / "x.xml", Int8Options(_data(4, 1), batch=2))


def test_without_an_int8_dot_product_the_overflow_fix_is_measured(fp32, monkeypatch, tmp_path):
    """Without VNNI the CPU plugin sums u8 x s8 pairs in saturating int16: whether 8-bit weights overflow there
    depends on the network, so both of NNCF's settings are made and the closer one to fp32 kept."""
    import exporters.openvino_int8 as ov

    def facts(native):
        return lambda *a, **k: {"low_precision": {"int8_native": native}}

    monkeypatch.setattr("runtimes.hardware.cpu_facts", facts(True))
    assert ov.overflow_fixes(Int8Options(_data(2, 1))) == ("first_layer_only",)
    assert ov.overflow_fixes(Int8Options(_data(2, 1), extra={"overflow_fix": "enable"})) == ("enable",)
    monkeypatch.setattr("runtimes.hardware.cpu_facts", facts(False))
    assert ov.overflow_fixes(Int8Options(_data(2, 1))) == ("first_layer_only", "enable")
    art, _, x_eval, ref = fp32
    q = quantize_openvino(art, tmp_path / "q.xml", Int8Options(_data(16, 1), batch=2))
    fix = q.metadata["int8"]["overflow_fix"]
    assert set(fix["sqnr_db"]) == {"first_layer_only", "enable"}
    assert fix["sqnr_db"][fix["chosen"]] == max(fix["sqnr_db"].values())
    assert any("overflow fix" in n for n in q.notes)
