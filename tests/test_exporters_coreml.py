"""Core ML: the target record, its refusals, and a plain model through ``model.mlpackage`` (written, not run off macOS).

The record is read from the registry (no package needed). With ``coremltools`` installed a small plain network
(convolutions, one of them grouped, ReLU, a residual add, a mean and a linear layer: the form the compiler
hands the exporters) is converted once in fp32 and once in fp16 (module fixtures); the tests read the packages
back from their model description: names, shapes and dtypes, the program's ops by type, the precision of its
tensors, and ``deploy inspect``'s numbers. Core ML cannot run here, so no output is compared.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from torch import nn

from exporters import targets
from runtimes.core import CorruptArtifact, ExportError, MissingDependency, TensorSpec

LINUX_REASON = "coremltools runs Core ML models on macOS only; its spec was checked against the plain model"


class Plain(nn.Module):
    """conv 1->8 3x3, conv 8->8 3x3 (2 groups) + residual, mean over H, W, linear 8->10; two outputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y)) + y
        return self.fc(y.mean((2, 3))), y


PARAMS = (8 * 9 + 8) + (8 * 4 * 9 + 8) + (10 * 8 + 10)
MACS = 8 * 8 * 8 * 9 + 8 * 8 * 8 * 4 * 9 + 10 * 8


def _ops(path) -> list:
    from runtimes.coreml_runner import load_spec, operations

    return list(operations(load_spec(path)))


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """{precision: artifact} of ``Plain`` exported to Core ML in fp32 and fp16."""
    pytest.importorskip("coremltools", reason="coremltools not installed")
    from exporters.coreml import export_coreml

    folder = tmp_path_factory.mktemp("coreml")
    torch.manual_seed(0)
    model, x = Plain().eval(), torch.randn(1, 1, 8, 8)
    return {p: export_coreml(model, (x,), folder / f"{p}.mlpackage", precision=p, metadata={"merged": {"n": 1}})
            for p in ("fp32", "fp16")}


# ------------------------------------------------------------------------------------------ the record

def test_target_record_is_registered_and_not_in_the_default_targets():
    t = targets.get("coreml")
    assert (t.runtime, t.suffixes, t.source, t.precisions) == ("coreml", (".mlpackage",), "torch", ("fp32", "fp16"))
    assert not t.default and t.requires == (("coremltools", "coreml"),) and t.label == "Core ML"
    assert t.inspect == "deploy.inspect:read_coreml" and t.quantize is None
    assert targets.by_suffix("run/model.mlpackage") is t
    assert targets.resolve(t.runner).__name__ == "CoreMLRunner"


def test_not_run_here_says_why_off_macos_and_nothing_on_macos(monkeypatch):
    t = targets.get("coreml")
    monkeypatch.setattr(sys, "platform", "linux")
    assert t.not_run_here() == LINUX_REASON
    monkeypatch.setattr(sys, "platform", "darwin")
    assert t.not_run_here() == ""


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # an import known to fail
    with pytest.raises(MissingDependency, match=r"'coremltools' .*pip install 'reparam-deploy\[coreml\]'"):
        targets.check_available(targets.get("coreml"))
    from exporters.coreml import export_coreml

    with pytest.raises(MissingDependency, match=r"'coremltools' \(needed for Core ML export\) is not installed"):
        export_coreml(Plain(), (torch.zeros(1, 1, 8, 8),), tmp_path / "m.mlpackage")
    assert not list(tmp_path.iterdir())


def test_files_are_the_regular_files_inside_the_package(packages):
    from runtimes.core import Artifact

    art = packages["fp32"]
    files = targets.get("coreml").files(Artifact(art.path, "coreml", [], []))
    names = [f[len(art.path) + 1:] for f in files]
    assert names[0] == "Manifest.json"
    assert sorted(names[1:]) == ["Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin"]


# ------------------------------------------------------------------------------------------ the export

def test_spec_has_the_plain_models_names_shapes_and_dtypes(packages):
    from runtimes.coreml_runner import feature_specs, load_spec

    for precision, art in packages.items():
        inputs, outputs = feature_specs(load_spec(art.path))
        assert [s.to_dict() for s in inputs] == [{"name": "input0", "shape": [1, 1, 8, 8], "dtype": "float32"}]
        assert [s.to_dict() for s in outputs] == [{"name": "output0", "shape": [1, 10], "dtype": "float32"},
                                                   {"name": "output1", "shape": [1, 8, 8, 8], "dtype": "float32"}]
        assert art.inputs == inputs and art.outputs == outputs
        assert art.metadata["spec_check"] == {"passed": True, "inputs": 1, "outputs": 2, "mismatches": []}
        assert art.metadata["deployment_target"] == "iOS16" and art.precision == precision
        assert LINUX_REASON in art.notes or sys.platform == "darwin"


def test_fp32_program_has_exactly_the_plain_models_ops(packages):
    art = packages["fp32"]
    assert art.metadata["ops"] == {"conv": 2, "relu": 2, "add": 1, "reduce_mean": 1, "linear": 1}
    assert art.metadata["compute_precision"] == "FLOAT32"
    convs = [op for op in _ops(art.path) if op.type == "conv"]
    assert len(convs) == 2 and all(op.outputs[0].type.tensorType.dataType == 11 for op in convs)  # FLOAT32


def test_fp16_computes_in_float16_between_fp32_casts(packages):
    art = packages["fp16"]
    assert art.metadata["compute_precision"] == "FLOAT16"
    assert art.metadata["ops"] == {"cast": 3, "conv": 2, "relu": 2, "add": 1, "reduce_mean": 1, "linear": 1}
    ops = _ops(art.path)
    casts = [op for op in ops if op.type == "cast"]
    assert sorted(op.outputs[0].type.tensorType.dataType for op in casts) == [10, 11, 11]  # in: fp16; outs: fp32
    compute = [op for op in ops if op.type in ("conv", "relu", "add", "linear", "reduce_mean")]
    assert compute and all(op.outputs[0].type.tensorType.dataType == 10 for op in compute)  # FLOAT16
    weights = [op for op in ops if op.type == "const" and "weight" in op.outputs[0].name]
    assert len(weights) == 3 and all(op.outputs[0].type.tensorType.dataType == 10 for op in weights)


def test_the_export_keeps_coremltools_off_the_terminal(packages, tmp_path, capfd, caplog):
    from exporters.coreml import export_coreml

    caplog.set_level(logging.DEBUG, logger="runtimes.coreml_runner")
    export_coreml(Plain().eval(), (torch.zeros(1, 1, 8, 8),), tmp_path / "q.mlpackage")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert "Running MIL default pipeline" in caplog.text  # its progress bars went to the debug log


def test_an_op_core_ml_cannot_express_is_one_sentence_naming_it(packages, tmp_path):
    from exporters.coreml import export_coreml

    class Erfinv(nn.Module):
        def forward(self, x):
            return torch.erfinv(torch.tanh(x))

    with pytest.raises(ExportError) as info:
        export_coreml(Erfinv(), (torch.zeros(1, 1, 8, 8),), tmp_path / "m.mlpackage")
    msg = str(info.value)
    assert msg.startswith("Core ML cannot express op aten.erfinv (from ") and "torch.erfinv(torch.tanh(x))" in msg
    assert msg.endswith("has no conversion for it.") and "\n" not in msg
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_an_output_core_ml_changes_is_refused_and_nothing_is_left(packages, tmp_path):
    """Core ML has no int64 arrays: an argmax output would come back int32; the spec check refuses it."""
    from exporters.coreml import export_coreml

    class Argmax(nn.Module):
        def forward(self, x):
            return x.flatten(1).argmax(1)

    with pytest.raises(ExportError, match=r"does not match the plain model: output output0 1 int32 where the plain "
                                          r"model's output0 is 1 int64\.$"):
        export_coreml(Argmax(), (torch.randn(1, 1, 8, 8),), tmp_path / "m.mlpackage")
    assert not list(tmp_path.iterdir())


def test_check_spec_names_every_mismatch():
    from exporters.coreml import check_spec
    from runtimes.core import Artifact

    art = Artifact("m.mlpackage", "coreml", [TensorSpec("input0", (1, 3), "float32")],
                   [TensorSpec("out", (1, 10), "float16")])
    result = check_spec(art, [TensorSpec("input0", (1, 3), "float32")], [TensorSpec("output0", (1, 10), "float32")])
    assert result == {"passed": False, "inputs": 1, "outputs": 1,
                      "mismatches": ["output out 1x10 float16 where the plain model's output0 is 1x10 float32"]}
    assert check_spec(art, art.inputs, [])["mismatches"] == ["1 output(s) where the plain model has 0"]


def test_bad_precision_and_deployment_target_are_refused(tmp_path):
    pytest.importorskip("coremltools", reason="coremltools not installed")
    from exporters.coreml import export_coreml

    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ExportError, match=r"precision 'int8' is not supported for Core ML; choose one of fp32, fp16"):
        export_coreml(Plain(), (x,), tmp_path / "m.mlpackage", precision="int8")
    with pytest.raises(ExportError, match=r"deployment target 'iOS9' is not known to coremltools .*; choose one of "
                                          r".*iOS16"):
        export_coreml(Plain(), (x,), tmp_path / "m.mlpackage", deployment_target="iOS9")
    with pytest.raises(ExportError, match=r"folder named \*\.mlpackage, got .*m\.mlmodel; rename it"):
        export_coreml(Plain(), (x,), tmp_path / "m.mlmodel")


# ------------------------------------------------------------------------------------------ reading it back

def test_inspect_counts_parameters_macs_and_kernels_from_the_description(packages):
    from deploy.inspect import OpSummary, read_coreml

    for precision, art in packages.items():
        s = read_coreml(art.path, OpSummary(art.path, "coreml"))
        assert (s.params, s.macs, s.convolutions, s.linears) == (PARAMS, MACS, 2, 1)
        assert s.conv_kernels == {"3x3": 1, "3x3 g2": 1}
        assert s.inputs == ["input0 1x1x8x8 float32"]
        assert s.outputs == ["output0 1x10 float32", "output1 1x8x8x8 float32"]
        assert s.ops["conv"] == 2 and s.ops.get("cast", 0) == (3 if precision == "fp16" else 0)
        assert s.merged == {"n": 1, "from": f"{precision}.mlpackage metadata"}


def test_a_corrupt_package_is_one_sentence_naming_it(packages, tmp_path):
    from runtimes.coreml_runner import load_spec

    empty = tmp_path / "empty.mlpackage"
    empty.mkdir()
    with pytest.raises(CorruptArtifact, match=rf"Core ML file {empty} is corrupt .*it has no Manifest.json\)\.$"):
        load_spec(empty)
    outside = tmp_path / "outside.mlpackage"
    (outside / "Data").mkdir(parents=True)
    (outside / "Manifest.json").write_text(json.dumps(
        {"itemInfoEntries": {"a": {"path": "../../secret"}}, "rootModelIdentifier": "a"}))
    with pytest.raises(CorruptArtifact, match=r"its Manifest.json points outside the package \(\.\./\.\./secret\)"):
        load_spec(outside)
    garbage = tmp_path / "garbage.mlpackage"
    (garbage / "Data" / "m").mkdir(parents=True)
    (garbage / "Data" / "m" / "model.mlmodel").write_bytes(b"\xff not a protobuf " * 8)
    (garbage / "Manifest.json").write_text(json.dumps(
        {"itemInfoEntries": {"a": {"path": "m/model.mlmodel"}}, "rootModelIdentifier": "a"}))
    with pytest.raises(CorruptArtifact, match=rf"Core ML file {garbage} is corrupt or not a valid Core ML model"):
        load_spec(garbage)


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_the_runner_refuses_off_macos_in_one_sentence(packages):
    from runtimes.coreml_runner import CoreMLRunner

    path = packages["fp32"].path
    with pytest.raises(MissingDependency, match=rf"^cannot run Core ML package {path} on {sys.platform}: Core ML is "
                                                r"part of macOS .*; run it on a Mac\.$"):
        CoreMLRunner(path).activate()


# ------------------------------------------------------------------------------------------ end to end

@pytest.mark.e2e
def test_default_model_converts_to_a_checked_package_written_not_run(tmp_path):
    pytest.importorskip("coremltools", reason="coremltools not installed")
    from deploy.pipeline import ConvertOptions, convert

    result = convert(ConvertOptions(model="repvgg_digits", targets=("coreml",), out=str(tmp_path / "run")))
    stage = {s.name: s for s in result.stages}["coreml"]
    art = stage.export.artifact
    assert not stage.export.error and art.path == "model.mlpackage"
    assert art.metadata["ops"] == {"conv": 6, "relu": 6, "reduce_mean": 1, "reshape": 1, "linear": 1}
    assert art.metadata["spec_check"]["passed"]
    assert sorted(stage.files.sha256) == ["model.mlpackage/Data/com.apple.CoreML/model.mlmodel",
                                          "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin",
                                          "model.mlpackage/Manifest.json"]
    if sys.platform != "darwin":
        assert not stage.passed and LINUX_REASON in stage.reason
