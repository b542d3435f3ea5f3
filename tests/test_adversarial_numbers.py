"""Issue 12, "Wrong answers that pass": NaN never passes (item 3), dict outputs are matched by name (item 5).

Each test fails on the code before the fix: all-NaN stages passed, NaN in ``--inputs`` passed, a
NaN or negative BatchNorm variance ended in a format crash of report.py, and a model returning
``{"zeta", "alpha", "mid"}`` failed TFLite because the runner sorted the signature outputs by name.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fusers
from deploy import cli
from deploy.pipeline import ConvertOptions, PipelineError, convert, verify
from deploy.report import jsonable, stage_table, text_table, to_markdown, write_reports
from deploy.verification import read_samples
from runtimes import Stage, compare, verify_chain
from runtimes.litert_runner import _output_order

MODELS = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class AllNaN(Small):
    def forward(self, x):
        return super().forward(x) * float("nan")


class Overflow(Small):
    """Finite in float64 (the passes' check), infinite in float32 (the training model's outputs)."""

    def forward(self, x):
        return super().forward(x) * 1e30 * 1e30


class Heads(nn.Module):
    """Three outputs in a dict whose keys are in reverse alphabetical order (and of three shapes)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.cls = nn.Linear(8, 5)
        self.box = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return {"zeta": self.box(y), "alpha": self.cls(y.mean((2, 3))), "mid": y[:, :2] * 2}


def _stats(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def small():
    torch.manual_seed(0)
    return _stats(Small())


def all_nan():
    torch.manual_seed(0)
    return _stats(AllNaN())


def overflow():
    torch.manual_seed(0)
    return _stats(Overflow())


def heads():
    torch.manual_seed(0)
    return _stats(Heads())


def nan_variance():
    model = small()
    model.body[1].running_var[2] = float("nan")
    return model


def negative_variance():
    model = small()
    model.body[1].running_var[1] = -0.5
    return model
'''

SHAPE = (1, 3, 8, 8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(MODELS)
    return str(path)


def _convert(models, factory, out, targets=(), **kwargs):
    return convert(ConvertOptions(model=f"{models}:{factory}", input_shape=SHAPE, targets=targets, out=str(out),
                                  **kwargs))


# ------------------------------------------------------------------------------------ item 3: NaN


def test_nan_or_inf_in_a_stage_fails_and_says_where():
    ref = {"logits": np.ones((2, 3), np.float32), "mask": np.zeros(4, np.float32)}
    stage = {"logits": np.full((2, 3), np.nan, np.float32), "mask": np.array([0, np.inf, -np.inf, 0], np.float32)}
    r = compare(ref, stage)
    assert not r.passed and r.failed_outputs == ["logits", "mask"] and r.max_rel == float("inf")
    text = r.summary()
    assert "logits: 6 NaN of 6 values where the reference is finite" in text
    assert "mask: 1 +Inf and 1 -Inf of 2 values where the reference is finite" in text
    # matching NaN positions are no pass: a reference with NaN or Inf proves nothing
    nan = np.array([1.0, np.nan, 2.0])
    assert not compare(nan, nan.copy()).passed and "reference holds 1 NaN of 3 values" in compare(nan, nan).summary()
    assert not compare(np.array([np.inf]), np.array([np.inf])).passed
    # a stage with the same NaN as its parent inherits the blame; the stage that made the NaN broke
    feed = {"input0": np.ones((2, 3), np.float32)}
    chain = verify_chain([Stage("training", lambda f: [f["input0"]]),
                          Stage("onnx", lambda f: [f["input0"] * np.nan]),
                          Stage("openvino", lambda f: [f["input0"] * np.nan])], feed)
    assert not chain.passed and chain.culprits == ["onnx"] and chain["openvino"].blame == "onnx"
    assert "6 NaN of 6 values" in chain["onnx"].vs_reference.summary()
    # a reference with NaN fails every stage, blamed on the reference
    chain = verify_chain([Stage("training", lambda f: [f["input0"] * np.nan]),
                          Stage("onnx", lambda f: [f["input0"] * np.nan])], feed)
    assert not chain.passed and chain.culprits == ["training"] and "6 NaN" in chain["training"].error


def test_convert_refuses_a_model_whose_outputs_are_not_finite(models, tmp_path, capsys):
    with pytest.raises(PipelineError, match=r"output0 holds 3 NaN of 3 values"):
        _convert(models, "all_nan", tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    # finite in float64 (the passes' check) but infinite in float32: the recorded reference is refused
    with pytest.raises(PipelineError, match=r"training model's output 'output0' holds \d+ [+-]Inf"):
        _convert(models, "overflow", tmp_path / "overflow")
    rc = cli.main(["convert", f"{models}:all_nan", "--input-shape", "1,3,8,8", "--targets", "onnx", "--out",
                   str(tmp_path / "cli"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "output0 holds 3 NaN" in err and "Traceback" not in err and "format code" not in err


def test_nan_in_inputs_samples_is_refused(models, tmp_path):
    x = np.random.default_rng(0).standard_normal((6, *SHAPE[1:])).astype(np.float32)
    x[2, 0, 1, 1] = np.nan
    x[4, 1, 0, 0] = np.inf
    path = tmp_path / "samples.npz"
    np.savez(path, images=x, labels=np.arange(6) % 3)
    with pytest.raises(PipelineError, match=r"array 'images' holds 1 NaN and 1 \+Inf of 1152 values; .* samples 2, 4"):
        read_samples(str(path), SHAPE)
    with pytest.raises(PipelineError, match=r"'images' holds 1 NaN"):
        _convert(models, "small", tmp_path / "run", inputs=str(path))
    # float64 samples that overflow float32 are refused too
    np.savez(path, images=np.full((1, *SHAPE[1:]), 1e300))
    with pytest.raises(PipelineError, match=r"\+Inf of 192 values"):
        read_samples(str(path), SHAPE)


@pytest.mark.parametrize("factory, problem", [
    ("nan_variance", "running_var holds 1 NaN of 4 values"),
    ("negative_variance", "running_var holds 1 negative value(s) of 4 (min -0.5)"),
])
def test_bad_batchnorm_variance_names_the_layer(models, tmp_path, capsys, factory, problem):
    import importlib.util

    spec = importlib.util.spec_from_file_location("adversarial_models", models)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = getattr(module, factory)()
    with pytest.raises(fusers.BatchNormStatisticsError) as info:
        fusers.reparameterize(model, torch.randn(SHAPE))
    message = str(info.value)
    assert isinstance(info.value, fusers.InputError)
    assert "BatchNorm body.1 (BatchNorm2d)" in message and problem in message and "re-estimate them" in message
    rc = cli.main(["convert", f"{models}:{factory}", "--input-shape", "1,3,8,8", "--targets", "onnx", "--out",
                   str(tmp_path / "cli"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "body.1" in err and problem in err and "format code" not in err


def test_bad_affine_parameters_and_nan_inputs_are_refused_before_capture():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].weight[0] = float("inf")
    with pytest.raises(fusers.BatchNormStatisticsError, match=r"BatchNorm 1 \(BatchNorm2d\): weight holds 1 \+Inf"):
        fusers.capture(model, torch.randn(SHAPE))
    x = torch.randn(SHAPE)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(fusers.InputError, match=r"example input 0 \(shape \(1, 3, 8, 8\)\) holds 1 NaN of 192"):
        fusers.capture(nn.Conv2d(3, 4, 1).eval(), x)


def test_a_report_with_non_finite_numbers_renders(models, tmp_path):
    result = _convert(models, "small", tmp_path / "run")
    report = copy.deepcopy(result.report)
    report["reparameterize"]["float64_error"] = float("inf")
    report["reparameterize"]["float32_error"] = float("nan")
    for p in report["reparameterize"]["passes"]:
        p["max_rel_error"] = float("inf")
    for s in report["stages"][1:]:
        s["verification"].update(passed=False, reason="seeded inputs: FAIL (output0: 3 NaN of 3 values ...)",
                                 max_abs=float("inf"), max_rel=float("inf"), cosine=float("nan"),
                                 parent_max_rel=float("nan"))
    for form in (report, jsonable(report)):  # in memory (floats) and as read back from report.json (strings)
        md = to_markdown(jsonable(form))
        assert "float64 max rel error inf" in md and "| inf |" in md and "nan" in md
        table = text_table(*stage_table(form["stages"]))
        assert "inf" in table and "FAIL" in table
    json_path, md_path = write_reports(report, tmp_path / "run")
    assert "inf" in open(md_path).read() and '"inf"' in open(json_path).read()
    # deploy verify refuses recorded training outputs that are not finite instead of passing them
    np.savez(tmp_path / "run" / "verify" / "reference.npz", output0=np.full((1, 3), np.nan, np.float32))
    with pytest.raises(PipelineError, match=r"reference.npz: output 'output0' holds 3 NaN of 3 values"):
        verify(str(tmp_path / "run"))


# -------------------------------------------------------------------------------- item 5: dict outputs


@pytest.mark.e2e  # through every format
def test_dict_outputs_in_reverse_alphabetical_order_pass_on_tflite(models, tmp_path):
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    result = _convert(models, "heads", tmp_path / "run", targets=("tflite",))
    stages = {s.name: s for s in result.stages}
    assert result.passed, [(s.name, s.reason) for s in result.stages]
    tflite = stages["tflite"]
    assert tflite.verification.max_rel is not None and tflite.verification.max_rel <= 1e-5
    art = tflite.export.artifact
    assert art.metadata["tflite_outputs"] == ["zeta", "alpha", "mid"]  # the torch order, not the signature's
    assert [o.shape for o in art.outputs] == [(1, 4, 8, 8), (1, 5), (1, 2, 8, 8)]


def test_litert_output_order_and_shape_mismatch_message():
    tensors = {"alpha": 12, "mid": 14, "zeta": 11}  # the signature lists its outputs by name
    assert _output_order(tensors, [11, 12, 14], None) == ["zeta", "alpha", "mid"]  # the graph's output order
    assert _output_order(tensors, None, ["zeta", "alpha", "mid"]) == ["zeta", "alpha", "mid"]  # the record's
    assert _output_order({f"output_{i}": 20 - i for i in (10, 2, 1)}, None, None) == ["output_1", "output_2",
                                                                                     "output_10"]
    # outputs named on both sides are matched by name; shapes that differ are named in the message
    ref = {"zeta": np.ones((1, 4, 8, 8)), "alpha": np.ones((1, 5)), "mid": np.ones((1, 2, 8, 8))}
    assert compare(ref, dict(reversed(list(ref.items())))).passed
    r = compare(ref, [ref["alpha"], ref["mid"], ref["zeta"]], names=list(ref))
    assert not r.passed and "zeta: shape (1, 5) differs from the reference (1, 4, 8, 8)" in r.summary()
