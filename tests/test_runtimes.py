import os
import sys

import numpy as np
import pytest
import torch
from export_models import capture, example, make

from exporters import CorruptArtifact, MissingDependency, export
from runtimes import (
    InputMismatch,
    LiteRTRunner,
    OnnxRuntimeRunner,
    OpenVINORunner,
    Runner,
    TorchRunner,
    compare,
    make_inputs,
    open_runner,
)

# ------------------------------------------------------------------------------------- base template

class EchoRunner(Runner):
    runtime = "echo"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def activate_impl(self):
        self.calls.append("activate")
        from exporters import TensorSpec

        self.input_specs = [TensorSpec("a", ("batch", 3), "float32"), TensorSpec("b", (2,), "int64")]
        self.output_names = ["sum"]

    def infer_impl(self, feed):
        self.calls.append("infer")
        return [feed["a"].sum(axis=1) + feed["b"].sum()]

    def deactivate_impl(self):
        self.calls.append("deactivate")


def test_runner_template_and_context_manager():
    r = EchoRunner(threads=2)
    with pytest.raises(RuntimeError, match="not active"):
        r.infer({})
    with r as active:
        assert active is r and r.is_active and r.threads == 2
        out = r.infer({"a": np.ones((4, 3), np.float32), "b": np.array([1, 2])})
        assert list(out) == ["sum"] and out["sum"].tolist() == [6.0] * 4
        out = r.infer([np.ones((1, 3), np.float32), np.array([0, 0])])  # positional feed, other batch
        assert out["sum"].tolist() == [3.0]
    assert not r.is_active and r.calls == ["activate", "infer", "infer", "deactivate"]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        EchoRunner(threads=0)


@pytest.mark.parametrize("feed,match", [
    ({"a": np.ones((1, 3), np.float32)}, r"missing \['b'\]"),
    ({"a": np.ones((1, 3), np.float32), "b": np.zeros(2, np.int64), "c": 1}, r"unexpected \['c'\]"),
    ({"a": np.ones((1, 3), np.float64), "b": np.zeros(2, np.int64)}, "has dtype float64 but the model expects float32"),
    ({"a": np.ones((1, 4), np.float32), "b": np.zeros(2, np.int64)}, r"has shape \(1, 4\) but the model expects"),
    ({"a": np.ones((3,), np.float32), "b": np.zeros(2, np.int64)}, r"has shape \(3,\)"),
])
def test_feed_checked_against_input_specs(feed, match):
    with EchoRunner() as r:
        with pytest.raises(InputMismatch, match=match):
            r.infer(feed)


# ------------------------------------------------------------------------------------------- torch

def test_torch_runner_eval_mode_threads_and_nested_outputs():
    model = make("nested").train()
    x = example()
    before = torch.get_num_threads()
    with TorchRunner(model, example_inputs=(x,), threads=1) as r:
        assert not model.training and torch.get_num_threads() == 1
        out = r.infer({"input0": x.numpy()})
        assert list(out) == ["output0", "output1", "output2", "output3"]
        assert out["output1"].shape == (2, 16, 16, 16)
        with pytest.raises(InputMismatch, match="dtype float64"):
            r.infer([x.double().numpy()])
    assert model.training and torch.get_num_threads() == before  # flags and threads restored
    model.eval()
    with torch.no_grad():
        ref = model(x)
    assert compare(ref, out).max_rel == 0.0


def test_torch_runner_cuda_request_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
        TorchRunner(make("conv"), device="cuda").activate()
    with TorchRunner(make("conv"), device="auto") as r:
        assert r.device.type == "cpu"


# ------------------------------------------------------------------------------------ artifacts

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxsim")
    folder = tmp_path_factory.mktemp("rt")
    model, x = make("convnet"), example()
    gm = capture(model, x)
    arts = {"onnx": export("onnx", gm, folder / "m.onnx", args=(x,))}
    try:
        arts["openvino"] = export("openvino", arts["onnx"], folder / "m.xml")
    except MissingDependency:
        pass
    try:
        arts["tflite"] = export("tflite", gm, folder / "m.tflite", args=(x,))
    except MissingDependency:
        pass
    return model, x, arts, folder


@pytest.mark.parametrize("fmt,cls", [("onnx", OnnxRuntimeRunner), ("openvino", OpenVINORunner),
                                     ("tflite", LiteRTRunner)])
def test_each_runtime_agrees_with_torch_fp32(artifacts, fmt, cls):
    model, x, arts, _ = artifacts
    if fmt not in arts:
        pytest.skip(f"{fmt} packages not installed")
    art = arts[fmt]
    for runner in (open_runner(art, threads=1), open_runner(art.path, threads=1)):
        assert isinstance(runner, cls)
        with runner:
            assert [(s.name, s.shape, s.dtype) for s in runner.get_input_specs()] == \
                [("input0", (2, 3, 32, 32), "float32")]
            out = runner.infer(make_inputs(runner, seed=3))
            assert list(out) == ["output0"]
            ref = model(torch.from_numpy(make_inputs(runner, seed=3)["input0"]))
            result = compare(ref, out)
            assert result.passed and result.max_rel <= 1e-5, result.summary()
            with pytest.raises(InputMismatch, match=r"has shape \(1, 3, 32, 32\)"):
                runner.infer([np.zeros((1, 3, 32, 32), np.float32)])


def test_onnxruntime_options(artifacts):
    _, x, arts, _ = artifacts
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxRuntimeRunner(arts["onnx"].path, optimization="max")
    with pytest.raises(RuntimeError, match="available providers are: .*CPUExecutionProvider"):
        OnnxRuntimeRunner(arts["onnx"].path, providers=["tensorrt"]).activate()
    outs = []
    for opt, spin in (("disable", False), ("basic", None), ("all", True)):
        with OnnxRuntimeRunner(arts["onnx"].path, optimization=opt, threads=1, allow_spinning=spin) as r:
            assert r.session.get_session_options().intra_op_num_threads == 1
            outs.append(r.infer([x.numpy()])["output0"])
    assert compare(outs[0], outs[1]).max_rel <= 1e-6 and compare(outs[0], outs[2]).max_rel <= 1e-5
    with OnnxRuntimeRunner(arts["onnx"].path, providers="auto") as r:
        assert "CPUExecutionProvider" in r.session.get_providers()


@pytest.mark.parametrize("fmt,what", [("onnx", "ONNX"), ("openvino", "OpenVINO IR"), ("tflite", "TFLite")])
def test_truncated_artifact_is_reported_corrupt(artifacts, fmt, what, tmp_path):
    _, _, arts, _ = artifacts
    if fmt not in arts:
        pytest.skip(f"{fmt} packages not installed")
    src = arts[fmt].path
    bad = tmp_path / ("bad" + os.path.splitext(src)[1])
    data = open(src, "rb").read()
    bad.write_bytes(data[: len(data) // 3])
    if fmt == "openvino":
        (tmp_path / "bad.bin").write_bytes(open(arts[fmt].metadata["bin"], "rb").read())
    with pytest.raises(CorruptArtifact) as err:
        open_runner(str(bad)).activate()
    msg = str(err.value)
    assert str(bad) in msg and "corrupt" in msg and what in msg and "\n" not in msg


def test_truncated_openvino_weights_are_reported_corrupt(artifacts, tmp_path):
    _, _, arts, _ = artifacts
    if "openvino" not in arts:
        pytest.skip("openvino not installed")
    (tmp_path / "w.xml").write_bytes(open(arts["openvino"].path, "rb").read())
    (tmp_path / "w.bin").write_bytes(open(arts["openvino"].metadata["bin"], "rb").read()[:100])
    with pytest.raises(CorruptArtifact, match=r"OpenVINO IR file .*w\.xml is corrupt .*weights"):
        open_runner(str(tmp_path / "w.xml")).activate()


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_runner(tmp_path / "nothing.onnx").activate()
    with pytest.raises(ValueError, match="cannot tell the runtime of .*model.caffemodel"):
        open_runner(tmp_path / "model.caffemodel")


@pytest.mark.parametrize("module,cls,extra", [("onnxruntime", OnnxRuntimeRunner, "onnx"),
                                              ("openvino", OpenVINORunner, "openvino"),
                                              ("ai_edge_litert.interpreter", LiteRTRunner, "tflite")])
def test_missing_runtime_names_the_extra(module, cls, extra, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)
    (tmp_path / "m.xml").write_text("<net/>")
    (tmp_path / "m.bin").write_bytes(b"0")
    with pytest.raises(MissingDependency, match=rf"pip install 'reparam-deploy\[{extra}\]'"):
        cls(tmp_path / "m.xml").activate()


def test_open_runner_on_torch_module_and_pt2(tmp_path):
    model, x = make("convnet"), example()
    assert isinstance(open_runner(model), TorchRunner)
    ep = torch.export.export(model, (x,), strict=False)
    torch.export.save(ep, tmp_path / "m.pt2")
    with open_runner(str(tmp_path / "m.pt2"), example_inputs=(x,)) as r:
        out = r.infer([x.numpy()])
    assert compare(model(x), out).max_rel == 0.0
