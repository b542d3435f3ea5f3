"""Acceptance of ``--precision int8`` on merged-weight outliers: trained RepVGGs whose merged 3x3 kernel has two
output channels 80-320x the median range fail the accuracy guard with per-tensor weight scales; the report blames
that layer, and ``equalize`` (tried by default) or ``--int8-fallback auto`` bring them back within the bound.

The network is the authors' ``RepVGGBlock`` (``tests/authors/repvgg_style.py``) stacked the way ``repvgg.py``
builds ``RepVGG`` (``stage0``, stages of blocks, ``gap``, ``linear``), trained for 200 steps on a synthetic 4-class
task (class templates under unit noise, 3x16x16). ``deploy`` converts it from this file (``test_int8_outliers.py:
build``, the trained state dict as ``checkpoint``), judges it on 256 labelled held-out samples and calibrates it on
128 others. The outliers are not weights written in by hand: two stem channels (``OUTLIERS``) have their
BatchNorm affine pinned while the rest trains, and the next block's identity branch (a bare BatchNorm of its
input) learns the rest from the data:

- **quiet** stem channels (BN ``gamma = 0.02``): a tiny signal that the identity BN normalizes back to unit scale;
  its running variance is ~2e-4, so ``gamma / sqrt(var + eps)`` is 61-84 at ``[c, c, 1, 1]`` of the merged kernel.
  The layer computes ordinary values, but its input's quiet channels are the part a shared uint8 activation scale
  resolves worst. ``equalize`` (scale the stem's channel up, the block's input column down; exact through the
  ReLU) removes both problems.
- **dead** stem channels (BN ``beta = -8``, dying ReLU units): they output exactly 0, the identity BN's running
  variance decays to ~7e-10, and the merged centre tap is ``1 / sqrt(eps)`` = 316. Zero is exact in int8, so
  keeping that one layer in float (``--int8-fallback auto``) removes the whole error; its input is rewired past
  the Q/DQ pair in the file, or ONNX Runtime's ``WeightBiasQuantization`` would quantize its float weight again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxsim")
pytest.importorskip("onnxscript")

import fusers  # noqa: E402
from authors.repvgg_style import RepVGGBlock  # noqa: E402
from deploy.pipeline import ConvertOptions, convert  # noqa: E402

INPUT_SHAPE = (1, 3, 16, 16)
CLASSES = 4
STEPS = 200
OUTLIERS = [2, 5]  # stem output channels whose BatchNorm affine is pinned while the network trains
OUTLIER_LAYER = "conv2d_1"  # stage1's merged block: the plain model's second conv, as its ONNX layer is named
LAYERS = {"conv2d", "conv2d_1", "conv2d_2", "conv2d_3", "linear"}

pytestmark = pytest.mark.e2e  # trains two networks and converts each of them several times


class TinyRepVGG(nn.Module):
    """``RepVGG`` of DingXiaoH/RepVGG at toy size: a stride-2 stem, one block that keeps its shape (so it has the
    identity branch), a stride-2 stage of two blocks, global pooling and a linear classifier."""

    def __init__(self, num_classes=CLASSES):
        super().__init__()
        self.stage0 = RepVGGBlock(3, 8, kernel_size=3, stride=2, padding=1)
        self.stage1 = nn.Sequential(RepVGGBlock(8, 8, kernel_size=3, stride=1, padding=1))
        self.stage2 = nn.Sequential(RepVGGBlock(8, 16, kernel_size=3, stride=2, padding=1),
                                    RepVGGBlock(16, 16, kernel_size=3, stride=1, padding=1))
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.stage0(x)
        for stage in (self.stage1, self.stage2):
            for block in stage:
                out = block(out)
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def build():
    """The factory ``deploy convert`` loads from this file; the weights come from the checkpoint."""
    return TinyRepVGG()


def samples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` inputs of the synthetic task: a class template at half the scale of unit-variance noise."""
    templates = np.random.default_rng(0).standard_normal((CLASSES, *INPUT_SHAPE[1:])).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    x = 0.5 * templates[labels] + rng.standard_normal((n, *INPUT_SHAPE[1:])).astype(np.float32)
    return x.astype(np.float32), labels


class Trained:
    """A model trained with the stem's ``OUTLIERS`` BatchNorms pinned to ``gamma`` / ``beta``, its files (checkpoint,
    held-out samples with labels, calibration samples), and its conversions, each made once."""

    def __init__(self, folder: Path, gamma: float, beta: float):
        self.folder, self.gamma, self.beta, self.runs = folder, gamma, beta, {}
        x_train, y_train = samples(512, seed=1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # seeded init and batches on one thread: the same weights on every run
        try:
            torch.manual_seed(0)
            model = TinyRepVGG()
            self.pin(model)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            x, y, batches = torch.from_numpy(x_train), torch.from_numpy(y_train), torch.Generator().manual_seed(0)
            for _ in range(STEPS):
                i = torch.randint(0, len(x), (64,), generator=batches)
                loss = F.cross_entropy(model(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.pin(model)
        finally:
            torch.set_num_threads(threads)
        self.model = model.eval()
        torch.save(model.state_dict(), folder / "trained.pt")
        self.x_held, self.y_held = samples(256, seed=2)
        np.savez(folder / "held_out.npz", input0=self.x_held, labels=self.y_held)
        np.savez(folder / "calibration.npz", input0=samples(128, seed=3)[0])

    def pin(self, model: TinyRepVGG) -> None:
        with torch.no_grad():
            for bn in (model.stage0.rbr_dense.bn, model.stage0.rbr_1x1.bn):
                bn.weight[OUTLIERS] = self.gamma
                bn.bias[OUTLIERS] = self.beta

    def convert(self, name: str, **options):
        """``deploy convert test_int8_outliers.py:build --checkpoint trained.pt --precision int8 --targets onnx
        --inputs held_out.npz --calibration calibration.npz [options]``: the result and its ``onnx-int8`` stage."""
        if name not in self.runs:
            result = convert(ConvertOptions(
                model=f"{__file__}:build", checkpoint=str(self.folder / "trained.pt"), input_shape=INPUT_SHAPE,
                targets=["onnx"], precision="int8", inputs=str(self.folder / "held_out.npz"),
                calibration=str(self.folder / "calibration.npz"), out=str(self.folder / name), **options))
            self.runs[name] = result, next(s for s in result.stages if s.name == "onnx-int8")
        return self.runs[name]

    def merged_ranges(self) -> torch.Tensor:
        """``max |W_c|`` per output channel of stage1's kernel merged by the authors' own conversion."""
        kernel, _ = self.model.stage1[0].get_equivalent_kernel_bias()
        return kernel.detach().abs().flatten(1).amax(1)


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    return Trained(tmp_path_factory.mktemp("int8_quiet"), gamma=0.02, beta=0.0)


@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    return Trained(tmp_path_factory.mktemp("int8_dead"), gamma=1.0, beta=-8.0)


def default_passes() -> list[str]:
    """The default passes named explicitly: no ``equalize`` trial."""
    return list(fusers.DEFAULT_PASSES)


# naive PTQ: one weight scale per tensor, no equalize trial, no bias correction, no layer kept in float
NAIVE = {"per_tensor": True, "passes": list(fusers.DEFAULT_PASSES), "bias_correction": "off", "int8_fallback": "off"}


def accuracy(trained: Trained) -> float:
    with torch.no_grad():
        return float((trained.model(torch.from_numpy(trained.x_held)).argmax(1).numpy() == trained.y_held).mean())


def assert_outlier_layer_is_blamed(layers: list[dict], min_ratio: float) -> None:
    """The per-layer table: the merged block first, with its range ratio; the other layers even and cheap."""
    assert {r["name"] for r in layers} == LAYERS
    worst, rest = layers[0], layers[1:]
    assert worst["name"] == OUTLIER_LAYER and worst["op"] == "Conv" and worst["weights"]["channels"] == 8
    assert worst["weights"]["max_median_ratio"] > min_ratio
    assert worst["lost_db"] > 30 and worst["sqnr_in_db"] > 30  # a clean input, and the layer loses it
    assert all(r["weights"]["max_median_ratio"] < 2 and r["lost_db"] < 5 for r in rest)


# ------------------------------------------------------------------------------------- the two fixtures

def test_quiet_stem_channels_merge_into_an_outlier(quiet):
    assert accuracy(quiet) >= 0.98  # 99.22 % (254 of 256)
    identity = quiet.model.stage1[0].rbr_identity
    assert (identity.running_var[OUTLIERS] < 1e-3).all()  # 1.6e-4, 2.4e-4: against 0.70-1.11 elsewhere
    gain = identity.weight / (identity.running_var + identity.eps).sqrt()
    assert (gain[OUTLIERS] > 50).all()  # 84.1 and 60.9

    ranges = quiet.merged_ranges()
    assert sorted(ranges.topk(2).indices.tolist()) == OUTLIERS
    others = [c for c in range(8) if c not in OUTLIERS]
    assert float(ranges[others].max()) < 2  # 1.36
    assert float(ranges.max() / ranges[others].median()) > 50  # 84.0 / 0.77 = 109
    kernel, _ = quiet.model.stage1[0].get_equivalent_kernel_bias()
    for c in OUTLIERS:  # each outlier row's maximum is the identity's centre tap
        assert kernel[c].abs().argmax().item() == np.ravel_multi_index((c, 1, 1), kernel.shape[1:])


def test_dead_stem_channels_merge_into_one_over_sqrt_eps(dead):
    assert accuracy(dead) >= 0.98  # 99.61 %
    with torch.no_grad():
        stem = dead.model.stage0(torch.from_numpy(dead.x_held))
    assert (stem[:, OUTLIERS] == 0).all() and (stem.amax((0, 2, 3)) > 1).sum() == 6  # dead; the rest fire
    identity = dead.model.stage1[0].rbr_identity
    assert (identity.running_var[OUTLIERS] < 1e-9).all()  # 0.9 ** 200 = 7.1e-10 after 200 momentum updates
    gain = identity.weight / (identity.running_var + identity.eps).sqrt()
    assert torch.allclose(gain[OUTLIERS], torch.tensor(1 / np.sqrt(identity.eps)).float(), rtol=1e-4)  # 316.2
    ranges = dead.merged_ranges()  # the centre tap, give or take the 3x3 and 1x1 branches' own
    assert torch.allclose(ranges[OUTLIERS], gain[OUTLIERS], rtol=0.01)  # 315.5, 316.9
    others = [c for c in range(8) if c not in OUTLIERS]
    assert float(ranges[others].max()) < 2  # 1.25


# ----------------------------------------------------- per-tensor scales: the guard fails, the report blames

def test_per_tensor_scales_fail_the_guard_and_the_report_blames_the_merged_block(quiet):
    result, stage = quiet.convert("per_tensor", **NAIVE)
    assert not result.passed and not stage.passed
    m = stage.verification.int8
    assert m["reference_accuracy"] >= 0.98 and m["drop"] > 20  # 99.22 % -> 69.14 %: 30.08 points
    assert m["sqnr_db"] < 6  # 1.8 dB
    assert "points below the fp32 model" in stage.reason and f"worst layers: {OUTLIER_LAYER}" in stage.reason
    report = result.report["int8"]
    assert report["per_channel"] is False and report["equalize"] == {} and report["fallbacks"] == []
    assert_outlier_layer_is_blamed(report["layers"], min_ratio=50)  # 83.0; loses 37.3 dB (38.0 in, 0.7 out)


def test_per_channel_scales_alone_help_but_leave_the_quiet_input(quiet):
    """A per-channel scale evens the six ordinary rows, but not the two outlier rows: their 71 ordinary taps share
    the centre tap's scale (a step of 84 / 127 = 0.66), and the quiet input channels they amplify 61-84x get a
    few uint8 levels (they peak at 0.09 and 0.11, the activation's one scale has a step of 0.025)."""
    _, per_tensor = quiet.convert("per_tensor", **NAIVE)
    result, stage = quiet.convert("per_channel", **{**NAIVE, "per_tensor": False})
    m = stage.verification.int8
    assert m["sqnr_db"] > per_tensor.verification.int8["sqnr_db"] + 6  # 12.1 dB against 1.8 dB
    assert m["drop"] < per_tensor.verification.int8["drop"] / 4  # 1.95 points (5 of 256) against 30.08
    layer = next(r for r in result.report["int8"]["layers"] if r["name"] == OUTLIER_LAYER)
    assert layer["lost_db"] > 20 and layer["sqnr_out_db"] < 15  # loses 31.0 dB: 8.1 dB out


# ---------------------------------------------------------------------------- equalize brings it back

def test_default_options_pass_by_choosing_equalize(quiet):
    result, stage = quiet.convert("default")  # per-channel scales, equalize tried
    equalize = result.report["int8"]["equalize"]
    assert equalize["chosen"] is True and equalize["pairs"] > 0
    assert equalize["sqnr_db"]["equalize"] > equalize["sqnr_db"]["default"] + 10  # 29.3 dB against 11.8 dB
    assert result.passed and stage.passed, stage.reason
    assert stage.verification.int8["drop"] <= 1.0  # 0.39 points
    assert stage.verification.int8["sqnr_db"] > 25  # 37.3 dB


def test_equalize_is_chosen_under_per_tensor_scales_and_passes(quiet):
    result, stage = quiet.convert("per_tensor_equalize", per_tensor=True)  # passes=None: equalize is tried
    equalize = result.report["int8"]["equalize"]
    assert equalize["chosen"] is True
    sqnr = equalize["sqnr_db"]
    assert sqnr["default"] < 6 and sqnr["equalize"] > 25  # 2.3 dB -> 28.9 dB
    assert sqnr["equalize"] - sqnr["default"] > 20  # +26.7 dB
    assert result.passed and stage.passed, stage.reason
    m = stage.verification.int8
    assert m["drop"] <= 1.0 and m["sqnr_db"] > 25  # 0.0 points, 34.3 dB
    layers = result.report["int8"]["layers"]
    assert {r["name"] for r in layers} == LAYERS
    assert all(r["weights"]["max_median_ratio"] < 2 for r in layers)  # the merged block's 83.0 is now 1.19


# ------------------------------------------------------------------------------- fallback brings it back

def test_fallback_ranks_the_merged_block_first_and_keeps_it_in_float_first(dead):
    result, stage = dead.convert("fallback", per_tensor=True, passes=default_passes(), int8_fallback="auto")
    report = result.report["int8"]
    assert_outlier_layer_is_blamed(report["layers"], min_ratio=300)  # 322.6; loses 40.0 dB (38.7 in, -1.3 out)
    fallback, = report["fallbacks"]
    assert fallback["stage"] == "onnx-int8"
    assert fallback["tried"][0]["kept"] == 0 and not fallback["tried"][0]["passed"]  # the stage as first quantized
    assert fallback["tried"][1]["kept"] == 1 and fallback["kept_in_float"][0] == OUTLIER_LAYER
    assert fallback["latency_ms"]["int8"] is not None


def test_fallback_keeps_the_merged_block_in_float_and_passes(dead):
    import onnx

    result, stage = dead.convert("fallback", per_tensor=True, passes=default_passes(), int8_fallback="auto")
    fallback, = result.report["int8"]["fallbacks"]
    assert fallback["passed"] is True and fallback["kept_in_float"] == [OUTLIER_LAYER]
    assert [t["kept"] for t in fallback["tried"]] == [0, 1]
    assert fallback["drop"] <= fallback["aim_points"] == 0.5  # within half the bound, or it would try 2
    assert result.passed and stage.passed, stage.reason
    assert stage.verification.int8["sqnr_db"] > 30  # 37.3 dB
    assert stage.verification.int8["drop"] <= 1.0  # 76.56 points with the layer quantized
    assert any(OUTLIER_LAYER in note for note in stage.verification.notes)

    q = onnx.load(stage.export.artifact_in(Path(result.out_dir)).path)
    dequantized = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    weight_quantized = {n.name[len("node_"):]: n.input[1] in dequantized for n in q.graph.node
                        if n.op_type in ("Conv", "Gemm")}
    assert weight_quantized == {name: name != OUTLIER_LAYER for name in LAYERS}  # 4 of 5 layers stay int8
    (kept,) = [n for n in q.graph.node if n.name == f"node_{OUTLIER_LAYER}"]
    assert kept.input[0] not in dequantized  # its input skips the Q/DQ pair: ONNX Runtime runs it in float
