"""``--weight-rounding mse``: each output channel's int8 weight grid from an MSE search over clipping ranges,
applied to the INT8 forms only (the weights clamped before the quantizer reads their range), and kept by a run
only where it raises the held-out INT8 SQNR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporters._torch import recaptured
from exporters.bias_correction import corrections, round_weight
from exporters.weight_rounding import apply_to_graph, apply_to_onnx, clamp_weight, mse_clip, mse_clips


def _error(w, clip=None, per_channel=True):
    dims = tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))
    return (w - round_weight(w, per_channel, clip)).double().pow(2).sum(dims)


def _merged_kernel() -> torch.Tensor:
    """A merged RepVGG 3x3 kernel, 16 -> 16: the identity branch adds about 1 at every centre tap."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, 3, 3, generator=g) * 0.2
    for c in range(16):
        w[c, c, 1, 1] += 1.0 + 0.1 * float(torch.randn(1, generator=g))
    return w


def test_the_search_never_rounds_worse_than_nearest_and_clips_a_merged_kernels_identity_taps():
    w = _merged_kernel()
    per_tensor = mse_clip(w, per_channel=False)
    assert per_tensor.shape == (1,) and per_tensor[0] <= 0.99 * w.abs().max()  # 0.98: the top taps are clipped
    assert _error(w, per_tensor, False) < 0.99 * _error(w, None, False)  # 4 % less squared error
    per_channel = mse_clip(w)
    assert per_channel.shape == (16,) and bool((per_channel <= w.abs().flatten(1).amax(1)).all())
    assert bool((_error(w, per_channel) <= _error(w) * (1 + 1e-9)).all())  # never worse than nearest, per channel


def test_a_channel_already_on_its_grid_is_left_alone():
    w = torch.tensor([[127.0, -64.0, 3.0, 0.0], [0.5, -0.25, 0.125, 1.0]])  # channel 0 on the grid of step 1
    clip = mse_clip(w)
    assert clip[0] == 127.0  # zero error at alpha = 1: clipping could only add error
    assert mse_clip(w, per_channel=False).shape == (1,)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    with torch.no_grad():
        net[2].weight.copy_(_merged_kernel())
    return net, (torch.rand(1, 3, 8, 8),)


def test_clips_are_named_as_the_onnx_export_names_layers_and_clamp_only_the_int8_graph():
    net, args = _net()
    gm = recaptured(net, args)
    clips = mse_clips(gm, per_channel=False)
    top = float(net[2].weight.abs().max())
    assert "conv2d_1" in clips and clips["conv2d_1"].shape == (1,) and clips["conv2d_1"][0] <= 0.991 * top
    weight = net[2].weight.detach().clone()
    assert apply_to_graph(gm, clips) == len(clips)
    assert torch.equal(net[2].weight, weight)  # the plain module keeps its weights: only the int8 form is clamped
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d_1")
    clamped = gm.get_parameter(conv.args[1].target)
    assert float(clamped.abs().max()) == pytest.approx(float(clips["conv2d_1"][0]))
    assert torch.equal(clamped, clamp_weight(weight, clips["conv2d_1"]))


def test_bias_correction_measures_the_error_of_the_clipped_weights():
    net, args = _net()
    gm = recaptured(net, args)
    clips = mse_clips(gm, per_channel=False)
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(4, 3, 8, 8, generator=g) + 0.5 for _ in range(2)]
    fixes = corrections(gm, batches, per_channel=False, clips=clips)
    w = net[2].weight.detach()
    x = torch.relu(net[0](torch.cat(batches))).detach()
    want = F.conv2d(x, round_weight(w, False, clips["conv2d_1"]) - w, None, 1, 1).mean((0, 2, 3)).numpy()
    assert np.abs(fixes["conv2d_1"] - want).max() <= 1e-5 * np.abs(want).max()
    plain = corrections(gm, batches, per_channel=False)["conv2d_1"]  # nearest rounding's error is another one
    assert np.abs(plain - want).max() > 1e-3 * np.abs(want).max()


def test_onnx_runtime_quantizes_the_clamped_weights_on_the_chosen_grid(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from exporters import export
    from exporters.int8 import Int8Options
    from exporters.onnx_int8 import quantize_onnx

    net, args = _net()
    clips = mse_clips(recaptured(net, args), per_channel=False)
    art = export("onnx", net, tmp_path / "model.onnx", args=args)
    model = onnx.load(art.path)
    assert apply_to_onnx(model, clips) == len(clips)
    calibration = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)).numpy()
    q = quantize_onnx(art, tmp_path / "model.int8.onnx", Int8Options(calibration, per_channel=False,
                                                                      weight_clips=clips))
    assert q.metadata["int8"]["weights_clipped"] == len(clips)
    qm = onnx.load(q.path)
    inits = {t.name: numpy_helper.to_array(t) for t in qm.graph.initializer}
    producer = {o: n for n in qm.graph.node for o in n.output}
    conv = next(n for n in qm.graph.node if n.name == "node_conv2d_1")
    dq = producer[conv.input[1]]
    assert dq.op_type == "DequantizeLinear"
    assert np.allclose(inits[dq.input[1]], clips["conv2d_1"] / 127, rtol=1e-6)  # the grid the search chose
    kept = Int8Options(calibration, weight_clips=clips, exclude=("conv2d_1",))  # a layer in float stays exact
    assert "conv2d_1" not in kept.clip_fixes()
    plain = quantize_onnx(art, tmp_path / "plain.int8.onnx", Int8Options(calibration, per_channel=False))
    assert plain.metadata["int8"]["weights_clipped"] == 0


@pytest.mark.e2e
def test_the_run_keeps_mse_rounding_only_where_it_raises_the_int8_sqnr_and_reports_both(tmp_path):
    """repvgg_digits32 under per-tensor scales: measured 24.17 dB nearest, 29.06 dB MSE (applied); bias correction
    then measures the clipped weights' error (30.88 dB)."""
    pytest.importorskip("onnxruntime")
    import fusers
    from deploy.pipeline import ConvertOptions, convert

    result = convert(ConvertOptions(model="repvgg_digits32", targets=("onnx",), precision="int8", per_tensor=True,
                                    passes=list(fusers.DEFAULT_PASSES), weight_rounding="mse",
                                    out=str(tmp_path / "run")))
    decision = result.report["int8"]["weight_rounding"]
    scores = decision["sqnr_db"]
    assert decision["method"] == "mse" and decision["chosen"] == (scores["mse"] > scores["nearest"] + 0.1)
    assert decision["chosen"] and scores["mse"] > scores["nearest"] + 2  # per-tensor grids gain most
    bias = result.report["int8"]["bias_correction"]
    assert bias["sqnr_db"]["without"] == pytest.approx(scores["mse"], abs=1e-6)  # measured on the clipped weights
    q = {s.name: s for s in result.stages}["onnx-int8"]
    assert q.export.artifact.metadata["int8"]["weights_clipped"] == decision["layers"] > 0
    assert q.passed
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"{scores['nearest']:.2f} dB nearest, {scores['mse']:.2f} dB MSE ({decision['layers']} layers" in md
