"""Bias correction: per output channel, the mean error that rounding a layer's weights to int8 adds on the
calibration data, subtracted from its bias, in the plain graph (TFLite, ExecuTorch) and in the ONNX file
(ONNX Runtime) alike, never in the module the fp32 forms come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporters._torch import recaptured
from exporters.bias_correction import apply_to_graph, apply_to_onnx, corrections, round_weight


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 5)).eval()
    with torch.no_grad():
        net[0].weight[0] *= 40  # one wide channel: a coarse per-tensor grid for the others
    return net, (torch.rand(1, 3, 8, 8),)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(4, 3, 8, 8, generator=g) + 0.5 for _ in range(4)]  # a mean far from 0: a real bias shift


def test_round_weight_is_symmetric_int8_per_channel_or_per_tensor():
    w = torch.tensor([[1.0, -0.5, 0.26], [127.0, 1.0, -3.0]])
    per_channel = round_weight(w)
    assert torch.allclose(per_channel[0], (w[0] * 127).round() / 127)  # channel 0: step 1/127
    assert torch.equal(per_channel[1], w[1])  # channel 1: step 1, its values on the grid
    assert torch.equal(round_weight(w, per_channel=False)[0], torch.tensor([1.0, 0.0, 0.0]))  # the wide grid


@pytest.mark.parametrize("per_channel", [True, False])
def test_corrections_are_the_mean_output_error_of_the_rounded_weights(per_channel):
    net, args = _net()
    fixes = corrections(recaptured(net, args), _batches(), per_channel)
    assert sorted(fixes) == ["conv2d", "conv2d_1", "linear"] and fixes["conv2d"].shape == (8,)
    x = torch.cat(_batches())
    w = net[0].weight.detach()
    want = F.conv2d(x, round_weight(w, per_channel) - w, None, 1, 1).mean((0, 2, 3)).numpy()
    assert np.abs(fixes["conv2d"] - want).max() <= 1e-6 * np.abs(want).max()
    assert np.abs(want).max() > 1e-4  # not a vacuous zero


def test_the_corrected_int8_layer_adds_no_mean_error_and_the_fp32_module_is_untouched():
    net, args = _net()
    gm = recaptured(net, args)
    fixes = corrections(gm, _batches(), per_channel=False)
    bias = net[0].bias.detach().clone()
    assert apply_to_graph(gm, fixes) == 3
    assert torch.equal(net[0].bias, bias)  # the plain module keeps its bias: only the int8 form is corrected
    x = torch.cat(_batches())
    w = net[0].weight.detach()
    exact = F.conv2d(x, w, bias, 1, 1)
    rounded = F.conv2d(x, round_weight(w, False), bias, 1, 1)
    fixed = F.conv2d(x, round_weight(w, False), gm.get_parameter(_bias_of(gm, "conv2d")), 1, 1)
    assert (rounded - exact).mean((0, 2, 3)).abs().max() > 1e-3
    assert (fixed - exact).mean((0, 2, 3)).abs().max() <= 1e-5


def _bias_of(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name).args[2].target


def test_onnx_biases_are_corrected_by_layer_name_and_the_quantizer_applies_them(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from exporters import export
    from exporters.int8 import Int8Options
    from exporters.onnx_int8 import quantize_onnx

    net, args = _net()
    fixes = corrections(recaptured(net, args), _batches())
    art = export("onnx", net, tmp_path / "model.onnx", args=args)
    model = onnx.load(art.path)
    assert apply_to_onnx(model, fixes) == 3
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.name == "node_conv2d")
    assert np.allclose(inits[conv.input[2]], net[0].bias.detach().numpy() - fixes["conv2d"], atol=1e-7)
    calibration = torch.cat(_batches()).numpy()
    q = quantize_onnx(art, tmp_path / "model.int8.onnx", Int8Options(calibration, bias_correction=fixes))
    assert q.metadata["int8"]["bias_corrected"] == 3
    plain_q = quantize_onnx(art, tmp_path / "plain.int8.onnx", Int8Options(calibration))
    assert plain_q.metadata["int8"]["bias_corrected"] == 0
    kept = Int8Options(calibration, bias_correction=fixes, exclude=("conv2d",))  # its weights are not rounded
    assert sorted(kept.bias_fixes()) == ["conv2d_1", "linear"]
    assert quantize_onnx(art, tmp_path / "kept.int8.onnx", kept).metadata["int8"]["bias_corrected"] == 2


@pytest.mark.e2e
def test_the_run_keeps_bias_correction_only_when_it_raises_the_int8_sqnr_and_reports_both(tmp_path):
    pytest.importorskip("onnxruntime")
    from deploy.pipeline import ConvertOptions, convert

    result = convert(ConvertOptions(model="repvgg_digits", targets=("onnx",), precision="int8",
                                    out=str(tmp_path / "run")))
    decision = result.report["int8"]["bias_correction"]
    scores = decision["sqnr_db"]
    assert decision["layers"] == 7 and decision["chosen"] == (scores["with"] > scores["without"] + 0.1)
    q = {s.name: s for s in result.stages}["onnx-int8"].export.artifact
    assert q.metadata["int8"]["bias_corrected"] == (7 if decision["chosen"] else 0)
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"{scores['without']:.2f} dB without, {scores['with']:.2f} dB with (7 layers)" in md
