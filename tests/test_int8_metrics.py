"""INT8 error analysis (``runtimes.int8``): SQNR on noise of known power, weight statistics of constructed
kernels, and the per-layer errors of a QDQ model, where a layer with a giant weight outlier under a per-tensor
scale must be the one that loses the most dB."""

import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxsim")
pytest.importorskip("onnxscript")

from test_onnx_int8 import CALIBRATION, EVALUATION, SHAPE, export_plain, small_net  # noqa: E402

import fusers  # noqa: E402
from exporters.int8 import Int8Options  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.onnx_int8 import quantizable_layers, quantize_onnx  # noqa: E402
from runtimes.int8 import LayerError, layer_errors, sqnr_db, weight_stats  # noqa: E402

# ------------------------------------------------------------------------------------------------- SQNR


def test_sqnr_of_noise_with_known_power_is_exact():
    rng = np.random.default_rng(0)
    signal = rng.choice([-1.0, 1.0], size=(64, 10))  # power 1
    noise = 0.1 * rng.choice([-1.0, 1.0], size=signal.shape)  # power 0.01
    assert sqnr_db(signal, signal + noise) == pytest.approx(20.0, abs=1e-9)
    assert sqnr_db(3 * signal, 3 * (signal + noise)) == pytest.approx(20.0, abs=1e-9)  # scale-free
    assert sqnr_db(signal, signal + 0.01 * noise / 0.1) == pytest.approx(40.0, abs=1e-9)
    assert sqnr_db(signal.astype(np.float32), signal.astype(np.float32)) == math.inf
    assert sqnr_db(np.zeros(4), np.ones(4)) == -math.inf


def test_sqnr_of_a_b_bit_quantizer_is_six_db_per_bit():
    """A full-scale uniform signal on [-1, 1) rounded to 2**b levels: SQNR = 20·log10(2**b) = 6.02·b dB."""
    x = np.random.default_rng(1).uniform(-1, 1, size=1_000_000)
    for bits in (4, 8):
        step = 2.0 / 2 ** bits
        q = (np.floor(x / step) + 0.5) * step
        assert sqnr_db(x, q) == pytest.approx(20 * math.log10(2 ** bits), abs=0.05)


def test_sqnr_needs_one_shape():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        sqnr_db(np.ones((2, 3)), np.ones((3, 2)))


# ------------------------------------------------------------------------------------------------ weights


def test_weight_stats_of_a_kernel_with_known_channel_ranges():
    """Channel c holds only +-a_c (half each, mean 0): kurtosis = mean(a⁴) / mean(a²)²."""
    a = np.array([1.0, 1.0, 2.0, 8.0])
    signs = np.where(np.arange(2 * 3 * 3) % 2 == 0, 1.0, -1.0).reshape(2, 3, 3)
    kernel = a[:, None, None, None] * signs  # (out=4, in=2, 3, 3)
    stats = weight_stats(kernel.astype(np.float32))
    assert stats == pytest.approx({
        "channels": 4, "abs_max": 8.0, "channel_absmax_min": 1.0, "channel_absmax_median": 1.5,
        "channel_absmax_max": 8.0, "max_median_ratio": 8.0 / 1.5,
        "kurtosis": np.mean(a ** 4) / np.mean(a ** 2) ** 2})  # 3.358
    assert stats["kurtosis"] == pytest.approx(1028.5 / 306.25)


def test_kurtosis_is_three_for_a_gaussian_and_1_8_for_a_uniform():
    rng = np.random.default_rng(2)
    assert weight_stats(rng.standard_normal((100, 10_000)))["kurtosis"] == pytest.approx(3.0, abs=0.02)
    assert weight_stats(rng.uniform(-1, 1, (100, 10_000)))["kurtosis"] == pytest.approx(1.8, abs=0.01)


def test_weight_stats_of_degenerate_kernels():
    zero = weight_stats(np.zeros((3, 4)))
    assert zero["max_median_ratio"] == 1.0 and math.isnan(zero["kurtosis"])
    assert weight_stats(np.array([0.0, 0.0, 5.0]))["max_median_ratio"] == math.inf  # a 1-D kernel: one per channel
    with pytest.raises(ValueError, match="output channels on axis 0"):
        weight_stats(np.float32(1.0))


def test_layer_error_loses_input_minus_output_db():
    e = LayerError("conv2d", "Conv", 40.0, 31.5, {"channels": 8})
    assert e.lost_db == 8.5
    assert e.to_dict() == {"name": "conv2d", "op": "Conv", "sqnr_in_db": 40.0, "sqnr_out_db": 31.5,
                           "weights": {"channels": 8}, "quantized": True, "lost_db": 8.5}
    assert LayerError("conv2d", "Conv", math.inf, math.inf).lost_db == 0.0  # exact in, exact out


# ------------------------------------------------------------------------------------------- per layer

OUTLIER_LAYER = "conv2d_1"


@pytest.fixture(scope="module")
def outlier_net(tmp_path_factory):
    """The small net with a giant weight in one output channel of its second conv, on an input channel that the
    first block's ReLU kills (its BatchNorm bias -100): the fp32 outputs do not see it, an int8 scale does."""
    model = small_net()
    with torch.no_grad():
        model[1].bias[5] = -100.0
        model[3].weight[3, 5] = 50.0
    folder = tmp_path_factory.mktemp("int8-metrics")
    art = export_plain(model, torch.zeros(1, *SHAPE), folder / "outlier.onnx")

    def errors(**kw):
        q = quantize_onnx(art, folder / "outlier.int8.onnx", Int8Options(CALIBRATION, **kw))
        return {e.name: e for e in layer_errors(art.path, q.path, EVALUATION, 1)}, q
    return art, errors


def test_layer_errors_name_every_layer_in_graph_order(outlier_net):
    art, errors = outlier_net
    layers, _ = errors()
    assert list(layers) == quantizable_layers(art.path) == ["conv2d", "conv2d_1", "conv2d_2", "linear"]
    assert [e.op for e in layers.values()] == ["Conv", "Conv", "Conv", "Gemm"]
    assert all(e.quantized for e in layers.values())
    assert [e.weights["channels"] for e in layers.values()] == [8, 16, 16, 10]  # Gemm: output features first


def test_first_layer_input_error_is_the_uint8_step(outlier_net):
    """The graph input is rounded to steps s of its uint8 scale: noise s²/12 against a unit-variance signal."""
    _, errors = outlier_net
    layers, q = errors()
    model = onnx.load(q.path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    scale = next(float(inits[n.input[1]]) for n in model.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] == "input0")
    expected = 10 * math.log10(np.mean(EVALUATION.astype(np.float64) ** 2) / (scale ** 2 / 12))
    assert layers["conv2d"].sqnr_in_db == pytest.approx(expected, abs=0.5)  # measured 40.7 dB


def test_giant_outlier_under_a_per_tensor_scale_loses_the_most(outlier_net):
    _, errors = outlier_net
    per_tensor, _ = errors(per_channel=False)
    per_channel, _ = errors(per_channel=True)
    worst = per_tensor[OUTLIER_LAYER]
    others = [e.lost_db for name, e in per_tensor.items() if name != OUTLIER_LAYER]
    # measured: conv2d_1 loses 30.7 dB per tensor (21.7 per channel: only its outlier channel is lost); the
    # other layers gain (-34.9, -10.1, -1.9 dB: their biases add exact signal)
    assert worst.lost_db > 20 and worst.lost_db > max(others) + 20
    assert worst.weights["max_median_ratio"] > 100 and worst.weights["kurtosis"] > 50
    assert all(e.weights["max_median_ratio"] < 3 for name, e in per_tensor.items() if name != OUTLIER_LAYER)
    assert per_channel[OUTLIER_LAYER].lost_db < worst.lost_db - 5


def test_a_layer_kept_in_float_is_listed_and_loses_nothing(outlier_net):
    _, errors = outlier_net
    layers, q = errors(per_channel=False, exclude=(OUTLIER_LAYER,))
    assert q.metadata["int8"]["quantized_layers"] == 3
    kept = layers[OUTLIER_LAYER]
    assert not kept.quantized and kept.weights["max_median_ratio"] > 100
    assert kept.lost_db <= 0  # measured -8.1 dB: float weights, and its bias adds exact signal
    assert layers["conv2d_2"].sqnr_in_db > 40  # measured 46.1 dB, against 11.8 dB with conv2d_1 quantized


def test_layer_errors_want_the_models_batch(outlier_net):
    art, errors = outlier_net
    _, q = errors()
    with pytest.raises(ValueError, match="takes batches of 1 on input input0; pass batch=1, not 4"):
        layer_errors(art.path, q.path, EVALUATION, 4)


def test_the_fp32_model_against_itself_loses_nothing(outlier_net):
    art, _ = outlier_net
    for e in layer_errors(art.path, art.path, EVALUATION[:4], 1):
        assert (e.sqnr_in_db, e.sqnr_out_db, e.lost_db, e.quantized) == (math.inf, math.inf, 0.0, False)


def test_padding_of_the_last_chunk_does_not_count(tmp_path):
    """A dynamic-batch model fed 6 samples in chunks of 4 (the last one padded) gives the numbers of batch 1."""
    x = torch.zeros(2, *SHAPE)
    art = export_onnx(fusers.reparameterize(small_net(), (x,)), (x,), tmp_path / "dynamic.onnx", dynamic=True)
    assert art.inputs[0].shape[0] == "batch"
    q = quantize_onnx(art, tmp_path / "dynamic.int8.onnx", Int8Options(CALIBRATION))
    chunked = layer_errors(art.path, q.path, EVALUATION[:6], 4)
    single = layer_errors(art.path, q.path, EVALUATION[:6], 1)
    for a, b in zip(chunked, single):
        assert (a.sqnr_in_db, a.sqnr_out_db) == pytest.approx((b.sqnr_in_db, b.sqnr_out_db), abs=1e-4)
