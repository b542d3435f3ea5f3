"""The ``deploy`` command line: the default run, timm / torchvision / file models, verify, bad input.

End-to-end runs go through the real command line in a subprocess (one per model, ONNX only except
the default, which exercises every CPU format); the bad-input cases call ``deploy.cli.main`` in
process, which is the same code without the interpreter start-up.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import error_line, leftovers, main_in_process as _main, run_deploy

from deploy import cli, zoo
from deploy.record import sha256

onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.e2e  # the command line in subprocesses and full conversions

STAGES = ["training", "pt2", "onnx", "onnx-simplified", "openvino", "tflite"]

FACTORY = '''
import torch
from torch import nn


class Block(nn.Module):
    """relu(bn(conv3x3(x)) + bn(conv1x1(x))): a two-branch block."""

    def __init__(self, cin, cout):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.k1 = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.k3(x) + self.k1(x))


class Net(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.body = nn.Sequential(Block(3, 8), Block(8, 8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class CumMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cummax(self.conv(x), 1)[0]


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


INPUT_SHAPE = (1, 3, 16, 16)


def _stats(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def build():
    return _stats(Net()).eval()


def build_in_train_mode():
    return _stats(Net())


def cummax():
    return CumMax().eval()


def data_dependent():
    return DataDependent().eval()
'''


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(FACTORY)
    return path


# ------------------------------------------------------------------------------ the built-in default

def test_default_run_writes_every_artifact_and_all_stages_pass(digits_run):
    proc, out = digits_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("model.deploy.pt2", "model.onnx", "model.sim.onnx", "model.xml", "model.bin", "model.tflite",
                 "report.json", "report.md", "verify/inputs.npz", "verify/reference.npz", "verify/samples.npz",
                 "verify/samples_reference.npz"):
        assert (out / name).is_file(), name
    assert leftovers(out.parent) == []
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert [s["name"] for s in stages] == STAGES
    assert report["passed"] and report["failed"] == []
    assert report["model"]["spec"] == "repvgg_digits" and report["model"]["trained"]
    assert report["inputs"]["shape"] == [1, 1, 8, 8]
    assert report["inputs"]["samples"]["count"] == 360 and report["inputs"]["samples"]["labels"]
    # task-level check: every form classifies the held-out digits exactly like the training form
    accuracies = {s["name"]: s["verification"]["accuracy"] for s in stages}
    assert accuracies["training"] > 0.9 and len(set(accuracies.values())) == 1, accuracies
    assert all(s["verification"]["agreement"] == 1.0 for s in stages)
    for s in stages[1:]:
        v, files = s["verification"], s["files"]
        assert v["passed"] and v["max_rel"] <= 1e-5 and v["samples_max_rel"] <= 1e-5, s
        assert files["size"] == sum((out / f).stat().st_size for f in files["files"]) > 0
        assert all(sha256(out / f) == h for f, h in files["sha256"].items())
    assert stages[4]["files"]["files"] == ["model.xml", "model.bin"]
    assert stages[4]["export"]["parent"] == "onnx-simplified"
    assert stages[5]["export"]["parent"] == "pt2" and stages[3]["export"]["parent"] == "onnx"
    merged = report["reparameterize"]["merged"]
    assert (merged["branch_groups_merged"], merged["branches_merged"], merged["batchnorms_folded"]) == (6, 15, 15)
    assert (merged["convolutions_before"], merged["convolutions_after"]) == (12, 6)
    assert report["reparameterize"]["float64_error"] <= 1e-9
    assert {p["name"] for p in report["reparameterize"]["passes"]} == {"merge_linear"}
    for package in ("torch", "onnx", "onnxruntime", "openvino", "litert-torch", "ai-edge-litert"):
        assert report["versions"][package], package
    assert set(report["timings"]) >= {"load", "reparameterize", "export onnx", "export tflite", "verify", "total"}


def test_default_run_prints_progress_and_a_final_table(digits_run):
    proc, out = digits_run
    for step in ("loading repvgg_digits", "capturing", "merge_linear (round 1)",
                 "exporting onnx", "exporting openvino", "exporting tflite", "verifying tflite"):
        assert step in proc.stderr, step
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines() if ln.split() and ln.split()[0] in STAGES}
    assert list(rows) == STAGES
    assert rows["training"][-1] == "reference" and all(rows[s][-1] == "pass" for s in STAGES[1:])
    assert rows["tflite"][2] == "model.tflite" and rows["openvino"][2] == "model.xml"
    assert "all 5 stages pass" in proc.stdout
    md = (out / "report.md").read_text()
    assert "**Result: all stages pass.**" in md
    assert "| tflite | tflite | model.tflite |" in md and "| openvino | onnx-simplified |" in md


def test_verify_passes_then_fails_naming_the_altered_artifact(digits_run, tmp_path, capsys):
    _, out = digits_run
    rc, stdout, err = _main(capsys, "verify", str(out))
    assert rc == 0, stdout + err
    assert "all 5 stages pass" in stdout and "verifying tflite (model.tflite)" in err

    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    from onnx import numpy_helper

    model = onnx.load(altered / "model.sim.onnx")
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(init) * np.float32(1.01)
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, altered / "model.sim.onnx")

    proc = run_deploy("verify", str(altered), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED onnx-simplified (model.sim.onnx)" in proc.stdout
    assert "changed since convert (sha256 differs): onnx-simplified" in proc.stdout
    rows = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.split() and ln.split()[0] in STAGES}
    assert "FAIL (changed)" in rows["onnx-simplified"]
    assert all(rows[s].rstrip().endswith("pass") for s in ("pt2", "onnx", "openvino", "tflite"))
    assert "1 of 5 stage(s) FAILED" in proc.stdout


# ----------------------------------------------------------------- timm, torchvision, a user's file

@pytest.mark.parametrize("model,groups,branches,bns", [
    ("timm:repvgg_a0", 22, 61, 61),
    ("torchvision:resnet18", 0, 0, 20),
    ("FILE:build", 2, 4, 4),
])
def test_convert_timm_torchvision_and_file_models_end_to_end(model, groups, branches, bns, factory, tmp_path):
    if model.startswith(("timm", "torchvision")):
        pytest.importorskip(model.split(":")[0])
    model = model.replace("FILE", str(factory))
    hub = tmp_path / "hub"
    hub.mkdir()
    args = ["convert", model, "--targets", "onnx", "--out", str(tmp_path / "out"), "-q"]
    if not model.endswith(":build"):
        args += ["--input-shape", "1,3,64,64"]
    proc = run_deploy(*args, cwd=tmp_path, env={"TORCH_HOME": str(hub), "HF_HOME": str(hub)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert not any(hub.rglob("*")), "nothing may be downloaded"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["training", "pt2", "onnx", "onnx-simplified"]
    assert report["passed"] and all(s["verification"]["max_rel"] <= 1e-5 for s in report["stages"][1:])
    merged = report["reparameterize"]["merged"]
    assert (merged["branch_groups_merged"], merged["branches_merged"], merged["batchnorms_folded"]) == \
        (groups, branches, bns)
    if model.endswith(":build"):
        assert report["inputs"]["shape"] == [1, 3, 16, 16]  # the file's INPUT_SHAPE
        assert report["model"]["kind"] == "file" and report["model"]["trained"]
    else:
        assert report["inputs"]["shape"] == [1, 3, 64, 64]
        assert report["model"]["weights"].startswith("random (no network")
        assert any("--checkpoint" in n for n in report["notes"])


# --------------------------------------------------------------------------------------- bad input

def test_no_arguments_replaces_the_previous_default_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the default output directory is replaced, not refused
        rc, out, err = _main(capsys, "--targets", "none", "-q")
        assert rc == 0, err
    report = json.loads((tmp_path / "runs" / "repvgg_digits" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["training", "pt2"] and report["passed"]
    assert leftovers(tmp_path / "runs") == []


def test_existing_output_directory_needs_force(capsys, tmp_path, factory):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = _main(capsys, "convert", f"{factory}:build", "--targets", "none", "--out", str(out))
    assert rc == 2 and "not written by deploy" in error_line(err)
    rc, _, err = _main(capsys, "convert", f"{factory}:build", "--targets", "none", "--out", str(out), "--force")
    assert rc == 2 and "refusing to replace it, even with --force" in error_line(err)
    assert (out / "keep.txt").read_text() == "mine"

    run = tmp_path / "run"
    assert _main(capsys, "convert", f"{factory}:build", "--targets", "none", "--out", str(run), "-q")[0] == 0
    before = (run / "report.json").read_text()
    rc, _, err = _main(capsys, "convert", f"{factory}:build", "--targets", "none", "--out", str(run))
    assert rc == 2 and "already exists; pass --force" in error_line(err)
    assert (run / "report.json").read_text() == before
    assert _main(capsys, "convert", f"{factory}:build", "--targets", "none", "--out", str(run), "--force",
                 "-q")[0] == 0
    assert leftovers(tmp_path) == []


def test_missing_files_are_named(capsys, tmp_path, factory):
    out = tmp_path / "out"
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out))
    assert rc == 2 and f"checkpoint {tmp_path / 'nope.pt'} does not exist" in error_line(err)
    rc, _, err = _main(capsys, "convert", str(tmp_path / "nope.py:build"), "--out", str(out))
    assert rc == 2 and "model file" in error_line(err) and "does not exist" in err
    rc, _, err = _main(capsys, "convert", f"{factory}:missing", "--out", str(out))
    assert rc == 2 and "defines no function 'missing'" in error_line(err) and "build" in err
    rc, _, err = _main(capsys, "verify", str(tmp_path))
    assert rc == 2 and "holds no report.json" in error_line(err)
    assert not out.exists()


def test_wrong_checkpoint_keys_stop_with_the_keys(capsys, tmp_path):
    state = zoo.create("repvgg_digits").state_dict()
    state.pop("head.fc.weight")
    state["extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "bad.pt")
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--checkpoint", str(tmp_path / "bad.pt"),
                       "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 2 and "1 missing key(s): head.fc.weight" in line and "1 unexpected key(s): extra.weight" in line
    assert not (tmp_path / "out").exists()

    other = zoo.create("repvgg_a0", width=0.25).state_dict()  # another architecture: many keys
    torch.save(other, tmp_path / "other.pt")
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--checkpoint", str(tmp_path / "other.pt"),
                       "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 2 and "more)" in line and "missing key(s)" in line and "unexpected key(s)" in line


def test_model_in_train_mode_is_refused_unless_eval_is_given(capsys, tmp_path, factory):
    args = ["convert", f"{factory}:build_in_train_mode", "--targets", "none", "--out", str(tmp_path / "out")]
    rc, _, err = _main(capsys, *args)
    line = error_line(err)
    assert rc == 2 and "in train mode" in line and "model.eval()" in line and "--eval" in line
    assert not (tmp_path / "out").exists()
    rc, _, err = _main(capsys, *args, "--eval", "-q")
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("switched to eval mode" in n for n in report["notes"])


def test_unsupported_ops(capsys, tmp_path, factory):
    # torch.export cannot capture data-dependent control flow: nothing is written
    rc, _, err = _main(capsys, "convert", f"{factory}:data_dependent", "--input-shape", "1,3,8,8",
                       "--out", str(tmp_path / "dd"))
    line = error_line(err)
    assert rc == 2 and "torch.export cannot capture" in line and "mynet.py" in line
    assert not (tmp_path / "dd").exists()
    assert leftovers(tmp_path) == []
    # ONNX cannot express cummax: the stage fails, the rest of the run and its report are kept
    rc, out, err = _main(capsys, "convert", f"{factory}:cummax", "--input-shape", "1,3,8,8", "--targets",
                         "onnx,openvino", "--out", str(tmp_path / "cm"))
    assert rc == 1, err
    assert "FAILED onnx (not written): ONNX (opset 18) cannot express op aten.cummax.default" in out
    assert "drop onnx from --targets" in out
    assert "FAILED openvino (not written): not exported: its source, the ONNX export, failed" in out
    report = json.loads((tmp_path / "cm" / "report.json").read_text())
    assert report["failed"] == ["onnx", "openvino"] and report["stages"][1]["verification"]["passed"]
    assert sorted(p.name for p in (tmp_path / "cm").iterdir()) == ["model.deploy.pt2", "report.json", "report.md",
                                                                   "verify"]


def test_missing_optional_runtime_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails
    rc, _, err = _main(capsys, "convert", "--targets", "onnx,openvino", "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 2 and "'openvino'" in line and "pip install 'reparam-deploy[openvino]'" in line
    assert "drop openvino from --targets" in line
    assert not (tmp_path / "out").exists()


def test_passes_option(capsys, tmp_path):
    import fusers

    assert cli._passes("default,rm") == (*fusers.DEFAULT_PASSES, "rm")
    assert cli._passes("fold_bn") == ("fold_bn",)
    rc, _, err = _main(capsys, "convert", "--passes", "default,no_such_pass", "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 2 and "unknown pass 'no_such_pass'" in line and "known passes:" in line and "fold_bn" in line
    rc, _, err = _main(capsys, "convert", "--passes", "fold_bn", "--targets", "none", "--out", str(tmp_path / "o"),
                       "-q")
    assert rc == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["options"]["passes"] == ["fold_bn"]
    assert report["reparameterize"]["merged"]["branch_groups_merged"] == 0  # merge_linear did not run
    assert report["passed"]


def test_zoo_and_help(capsys):
    rc, out, _ = _main(capsys, "zoo")
    assert rc == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    assert set(zoo.names()) <= set(rows)
    assert rows["repvgg_digits"].split()[1:3] == ["1x8x8", "trained"] and "random" in rows["repvgg_a0"]
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--help"])
    assert e.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out
