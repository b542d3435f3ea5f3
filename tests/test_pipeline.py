"""The pipeline as a library: output directories, batching, reports, verification, failures, fp16, dynamic batch."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from deploy import pipeline
from deploy.pipeline import ConvertOptions, PipelineError, convert, plan_out_dir, verify
from deploy.stages import run_batched
from deploy.report import jsonable, stage_table, text_table

pytest.importorskip("onnxruntime")

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """Two RepVGG-style blocks (3x3 + 1x1 + identity BN) and a 4-class head, input (N, 3, 12, 12)."""

    def __init__(self):
        super().__init__()
        self.a3 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.a1 = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.b3 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.b1 = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.bid = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.a3(x) + self.a1(x))
        y = torch.relu(self.b3(y) + self.b1(y) + self.bid(y))
        return self.head(y.mean((2, 3)))


INPUT_SHAPE = (1, 3, 12, 12)


def build():
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(6, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(6, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(6, generator=g) + 0.5)
    return model.eval()
'''


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "net.py"
    path.write_text(NET)
    return f"{path}:build"


@pytest.fixture(scope="module")
def samples(tmp_path_factory, net):
    """20 inputs with the labels the training model predicts for them (so accuracy is 100 %)."""
    from deploy.sources import load_model

    x = np.random.default_rng(0).standard_normal((20, 3, 12, 12)).astype(np.float32)
    with torch.no_grad():
        labels = load_model(net).model(torch.from_numpy(x)).argmax(1).numpy()
    labels[:5] = (labels[:5] + 1) % 4  # five wrong labels: accuracy 75 %
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, images=x, labels=labels)
    return str(path)


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory, net, samples):
    out = tmp_path_factory.mktemp("runs") / "net"
    lines: list[str] = []
    result = convert(ConvertOptions(model=net, targets=("onnx",), inputs=samples, out=str(out)), progress=lines.append)
    return result, out, lines


def test_plan_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert plan_out_dir(None, "m", False) == (pipeline.Path("runs/m"), False)
    explicit = tmp_path / "x"
    assert plan_out_dir(str(explicit), "m", False) == (explicit, False)
    explicit.mkdir()
    assert plan_out_dir(str(explicit), "m", False) == (explicit, True)  # empty: nothing to lose
    (explicit / "report.json").write_text(json.dumps({"tool": "reparam-deploy"}))
    with pytest.raises(PipelineError, match="already exists; pass --force"):
        plan_out_dir(str(explicit), "m", False)
    assert plan_out_dir(str(explicit), "m", True) == (explicit, True)
    (tmp_path / "runs" / "m").mkdir(parents=True)
    (tmp_path / "runs" / "m" / "report.json").write_text(json.dumps({"tool": "reparam-deploy"}))
    assert plan_out_dir(None, "m", False) == (pipeline.Path("runs/m"), True)  # the default run is replaced
    (tmp_path / "runs" / "m" / "report.json").write_text("{}")
    with pytest.raises(PipelineError, match="not written by deploy"):
        plan_out_dir(None, "m", True)
    (tmp_path / "file").write_text("")
    with pytest.raises(PipelineError, match="not a directory"):
        plan_out_dir(str(tmp_path / "file"), "m", True)


class _Doubler:
    """A runner stand-in with a static batch of 4 that records the batches it is fed."""

    def __init__(self):
        self.calls = []

    def infer(self, feed):
        (x,) = feed
        assert x.shape[0] == 4
        self.calls.append(x.shape[0])
        return {"y": x * 2, "count": np.array([x.shape[0]])}


def test_run_batched_pads_the_last_batch_and_trims_outputs():
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    runner = _Doubler()
    y, count = run_batched(runner, x, 4)
    assert runner.calls == [4, 4, 4] and np.array_equal(y, 2 * x)
    assert count.tolist() == [4, 4, 4]  # an output without a batch dimension is concatenated as is


def test_convert_report_structure(onnx_run, net, samples):
    result, out, lines = onnx_run
    assert result.passed and result.out_dir == str(out)
    stages = {s.name: s for s in result.stages}
    assert list(stages) == ["training", "pt2", "onnx", "onnx-simplified"]
    v = {name: s.verification for name, s in stages.items()}
    assert v["training"].accuracy == 0.75 and all(r.agreement == 1.0 for r in v.values())
    assert all(r.accuracy == 0.75 for r in v.values())
    for s in result.stages[1:]:
        r = s.verification
        assert s.passed and r.max_rel <= 1e-6 and r.samples_max_rel <= 1e-6 and r.cosine > 0.999999
        assert s.export.artifact.path == s.path and not s.path.startswith("/")
    assert v["onnx-simplified"].parent_max_rel is not None and v["pt2"].parent_max_rel is None
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert report["tool"] == "reparam-deploy" and report["passed"]
    assert report["inputs"]["samples"] == {"path": samples, "count": 20, "labels": True, "shipped_with_model": False}
    assert report["inputs"]["seeded"]["seed"] == 0 and report["options"]["targets"] == ["onnx"]
    assert report["model"]["kind"] == "file" and report["model"]["input_shape"] == [1, 3, 12, 12]
    rep = report["reparameterize"]
    assert rep["merged"]["branch_groups_merged"] == 2 and rep["merged"]["branches_merged"] == 5
    assert rep["merged"]["batchnorms_folded"] == 5 and rep["ops_after"].get("batch_norm", 0) == 0
    assert rep["params_after"] < rep["params_before"] and rep["float64_error"] <= 1e-9
    assert report["report_version"] == 3
    reference = report["reference"]  # the recorded inputs and training outputs are hashed like the artifacts
    assert {"verify/inputs.npz", "verify/reference.npz"} <= set(reference["sha256"]) == set(reference["files"])
    assert report["stages"][2]["verification"]["checks"]["seeded"]["vs_reference"]["outputs"][0]["rtol"] == 1e-5
    # progress went to the callback, one line per long step
    assert any("merge_linear (round 1)" in ln for ln in lines) and any("exported onnx" in ln for ln in lines)
    assert not any(": 0 rewrites, 0 refused, 0 rolled back" in ln for ln in lines)
    md = (out / "report.md").read_text()
    assert "| onnx-simplified | onnx | model.sim.onnx |" in md and "75.00%" in md
    assert "2 branch groups (5 branches) merged" in md
    headers, rows = stage_table(result.stages)
    assert headers[-1] == "result" and [r[-1] for r in rows] == ["reference", "pass", "pass", "pass"]
    assert text_table(headers, rows).splitlines()[0].startswith("stage")
    assert jsonable({"a": float("inf"), "b": (1, float("nan"))}) == {"a": "inf", "b": [1, "nan"]}


def test_verify_detects_missing_and_corrupt_files(onnx_run, tmp_path):
    import shutil

    _, out, _ = onnx_run
    fresh = verify(out)
    assert fresh.passed and [s.name for s in fresh.stages] == ["training", "pt2", "onnx", "onnx-simplified"]
    assert not any(s.verification.changed for s in fresh.stages) and fresh.stages[2].verification.accuracy == 0.75
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "model.onnx").unlink()
    data = (copy / "model.deploy.pt2").read_bytes()
    (copy / "model.deploy.pt2").write_bytes(data[: len(data) // 2])
    refused = {s.name: s.reason for s in verify(copy).failed}  # a changed .pt2 is not even loaded
    assert set(refused) == {"pt2", "onnx"}, refused
    assert "changed since convert (sha256 differs) and was not loaded" in refused["pt2"]
    assert "--trust-pickle" in refused["pt2"]
    result = verify(copy, trust_pickle=True)
    failed = {s.name: s.reason for s in result.failed}
    assert set(failed) == {"pt2", "onnx"}, failed
    assert "missing file(s): model.onnx" in failed["onnx"] and "corrupt" in failed["pt2"]
    assert next(s for s in result.stages if s.name == "pt2").verification.changed
    assert next(s for s in result.stages if s.name == "onnx-simplified").passed  # its parent is gone, it is not
    assert verify(out, rtol=1e-12).failed  # a tighter tolerance than the run's
    with pytest.raises(PipelineError, match="holds no report.json"):
        verify(tmp_path)


def test_fp16_and_dynamic_batch(tmp_path, net):
    pytest.importorskip("openvino")
    result = convert(ConvertOptions(model=net, targets=("openvino",), precision="fp16", dynamic=True,
                                    out=str(tmp_path / "o")))
    assert result.passed, [(s.name, s.reason) for s in result.failed]
    stages = {s.name: s for s in result.stages}
    assert list(stages) == ["training", "pt2", "onnx", "onnx-simplified", "onnx-fp16", "openvino"]
    assert (stages["onnx"].precision, stages["onnx-fp16"].precision, stages["openvino"].precision) == \
        ("fp32", "fp16", "fp16")
    assert stages["openvino"].parent == "onnx-simplified" and stages["onnx-fp16"].parent == "onnx-simplified"
    assert 1e-6 < stages["openvino"].verification.max_rel <= 3e-2 and stages["pt2"].verification.max_rel <= 1e-5
    import onnx

    fp16 = onnx.load(tmp_path / "o" / "model.fp16.onnx")
    conv_weights = {n.input[1] for n in fp16.graph.node if n.op_type == "Conv"}
    assert conv_weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer
                                if i.name in conv_weights)
    assert result.report["inputs"]["verified_shape"] == [2, 3, 12, 12]
    assert any("batch 2" in n for n in result.report["notes"])
    assert stages["onnx"].export.artifact.inputs[0].shape == ("batch", 3, 12, 12)
    program = torch.export.load(tmp_path / "o" / "model.deploy.pt2").module()
    from deploy.sources import load_model

    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(program(x), load_model(net).model(x), rtol=1e-4, atol=1e-5)


def test_failures_leave_nothing_behind(tmp_path, net, samples, monkeypatch):
    out = tmp_path / "o"
    with pytest.raises(PipelineError, match=r"unknown target\(s\) caffe; known targets: onnx"):
        convert(ConvertOptions(model=net, targets=("caffe",), out=str(out)))
    with pytest.raises(PipelineError, match=r"array 'images' has shape \(20, 3, 12, 12\) but the model input is "
                                            r"1,3,16,16"):
        convert(ConvertOptions(model=net, input_shape=(1, 3, 16, 16), inputs=samples, targets=(), out=str(out)))
    with pytest.raises(PipelineError, match="--inputs file .* does not exist"):
        convert(ConvertOptions(model=net, inputs=str(tmp_path / "none.npz"), targets=(), out=str(out)))
    (tmp_path / "noshape.py").write_text("from torch import nn\n\n\ndef f():\n    return nn.Conv2d(1, 1, 1).eval()\n")
    with pytest.raises(PipelineError, match="has no default input shape; pass --input-shape"):
        convert(ConvertOptions(model=f"{tmp_path / 'noshape.py'}:f", targets=(), out=str(out)))

    def crash(*args, **kwargs):  # an error in the middle of a run: the partial directory goes away
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "record_reference", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertOptions(model=net, targets=(), out=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noshape.py"]


def test_tensorrt_target_without_tensorrt_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(PipelineError, match=r"'tensorrt'.*reparam-deploy\[tensorrt\].*drop tensorrt"):
        convert(ConvertOptions(targets=("tensorrt",), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


REFUSED = '''
import torch
from torch import nn


def build():
    """conv -> ReLU -> BN -> zero-padded 3x3 conv: the BN can fold neither backwards (ReLU) nor forwards
    (the padded border would see its shift); a RepVGG-style identity BN that merge_linear absorbs later."""
    torch.manual_seed(0)
    net = nn.Module()
    net.c1, net.bn, net.c2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
    net.c3, net.bn3, net.idbn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    for bn in (net.bn, net.bn3, net.idbn):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)

    def forward(x):
        y = net.c2(net.bn(torch.relu(net.c1(x))))
        return net.bn3(net.c3(y)) + net.idbn(y)

    net.forward = forward
    return net.eval()
'''


def test_refusal_counts_agree_everywhere(tmp_path):
    """The refused count on the console, the per-pass counts and the reasons in report.json and report.md are
    one number; an identity BN that fold_bn leaves and merge_linear merges is not a refusal."""
    (tmp_path / "refused.py").write_text(REFUSED)
    lines: list[str] = []
    result = convert(ConvertOptions(model=f"{tmp_path / 'refused.py'}:build", input_shape=(1, 3, 8, 8), targets=(),
                                    out=str(tmp_path / "o")), progress=lines.append)
    assert result.passed
    rep = result.report["reparameterize"]
    standing = rep["refusals"]
    assert standing and all(r["reason"] and r["code"] for r in standing)
    assert sorted((r["pass"], r["code"]) for r in standing) == [("fold_bn", "no_producer"),
                                                                ("fold_into_next", "padded_conv")], standing
    assert not any("idbn" in r["site"] for r in standing)  # merged by merge_linear: not a refusal
    console = next(ln for ln in lines if ln.startswith("reparameterized in"))
    assert f"{len(standing)} refused" in console, console
    assert sum(p["refused"] for p in rep["passes"]) == len(standing) == rep["refused"]
    md = (tmp_path / "o" / "report.md").read_text()
    listed = md[md.index("Refused rewrites"):].split("\n\n")[1].splitlines()
    assert len(listed) == len(standing) and all(ln.startswith("- `") for ln in listed)


def test_shipped_samples_are_recorded_by_name_not_by_install_path(tmp_path):
    from deploy import zoo

    result = convert(ConvertOptions(targets=(), out=str(tmp_path / "d")))
    samples = result.report["inputs"]["samples"]
    assert samples == {"path": "digits_test.npz", "count": 360, "labels": True, "shipped_with_model": True}
    md = (tmp_path / "d" / "report.md").read_text()
    package_dir = str(__import__("pathlib").Path(zoo.__file__).parent)
    assert "- samples: 360 from `digits_test.npz` (shipped with the model)" in md and package_dir not in md
