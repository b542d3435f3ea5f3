import json
import os
import sys
import types

import pytest
import torch

from exporters import Artifact, ExportError, MissingDependency, TensorSpec, export
from exporters.tensorrt import parse_version, precision_plan, profile_shapes, sidecar_metadata
from runtimes import TensorRTRunner

# ------------------------------------------------------------------ pure helpers (no tensorrt, no GPU)

def test_static_profile_is_the_export_shape():
    assert profile_shapes((4, 3, 32, 32)) == ((4, 3, 32, 32),) * 3


@pytest.mark.parametrize("shape,max_batch,expected", [
    ((4, 3, 32, 32), None, ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))),
    (("batch", 3, 32, 32), None, ((1, 3, 32, 32), (1, 3, 32, 32), (2, 3, 32, 32))),
    ((2, 3, 64, 64), 16, ((1, 3, 64, 64), (2, 3, 64, 64), (16, 3, 64, 64))),
])
def test_dynamic_profile_is_1_n_2n(shape, max_batch, expected):
    assert profile_shapes(shape, dynamic=True, max_batch=max_batch) == expected


@pytest.mark.parametrize("shape,dynamic,max_batch,match", [
    (("batch", 3, 32, 32), False, None, "has a dynamic batch"),
    ((1, 3, "h", 32), True, None, "dynamic non-batch dimension"),
    ((8, 3, 32, 32), True, 4, "smaller than the export batch"),
])
def test_profile_errors(shape, dynamic, max_batch, match):
    with pytest.raises(ExportError, match=match):
        profile_shapes(shape, dynamic=dynamic, max_batch=max_batch)


def test_parse_version():
    assert parse_version("10.13.0.35") == (10, 13) and parse_version("11.0") == (11, 0)
    assert parse_version((10, 4, 1)) == (10, 4)


def test_precision_plan_fp32_disables_tf32():
    for version, flag in (("10.9.0", True), ("11.1.0", False)):
        plan = precision_plan("fp32", version)
        assert plan.onnx_fp16 is False and plan.clear_flags == ["TF32"] and plan.set_flags == []
        assert plan.strongly_typed_flag is flag


def test_precision_plan_fp16_lives_in_the_onnx_file():
    trt10, trt11 = precision_plan("fp16", "10.13.2"), precision_plan("fp16", "11.0.0")
    assert trt10.onnx_fp16 and trt11.onnx_fp16
    assert "FP16" not in trt10.set_flags + trt11.set_flags  # no BuilderFlag.FP16: gone in TensorRT 11
    assert trt10.strongly_typed_flag and not trt11.strongly_typed_flag
    assert "TensorRT 11" in trt11.notes[0]
    assert json.loads(json.dumps(trt11.to_dict()))["trt_version"] == [11, 0]


def test_precision_plan_refuses_old_tensorrt_and_unknown_precision():
    with pytest.raises(ExportError, match="TensorRT 8.6 is not supported"):
        precision_plan("fp32", "8.6.1")
    with pytest.raises(ExportError, match="precision 'bf16' is not supported for TensorRT"):
        precision_plan("bf16", "10.0")


def test_precision_plan_int8_is_explicit_quantization_in_the_onnx_file():
    for version in ("10.13.0", "11.0.0"):
        plan = precision_plan("int8", version)
        assert not plan.onnx_fp16 and "INT8" not in plan.set_flags and "TF32" in plan.clear_flags
        assert plan.strongly_typed_flag == version.startswith("10") and "QuantizeLinear" in plan.notes[0]


def test_int8_engine_lists_its_qdq_onnx_file(tmp_path):
    from exporters.tensorrt import TARGET

    engine = tmp_path / "model.int8.engine"
    for f in (engine, tmp_path / "model.int8.engine.json", tmp_path / "model.int8.qdq.onnx"):
        f.write_bytes(b"x")
    art = Artifact(os.fspath(engine), "tensorrt", [], [], "int8")
    assert [os.path.basename(f) for f in TARGET.files(art)] == ["model.int8.engine", "model.int8.engine.json",
                                                               "model.int8.qdq.onnx"]
    assert "int8" in TARGET.precisions and TARGET.quantize == "exporters.tensorrt:quantize_tensorrt"


def test_sidecar_metadata_is_json_with_profiles_and_plan(tmp_path):
    plan = precision_plan("fp16", "10.13.0")
    inputs = [TensorSpec("input0", ("batch", 3, 32, 32))]
    outputs = [TensorSpec("output0", ("batch", 10))]
    shapes = profile_shapes(inputs[0].shape, dynamic=True, max_batch=8)
    meta = sidecar_metadata(engine_path=str(tmp_path / "m.engine"), onnx_path=str(tmp_path / "m.fp16.onnx"),
                            inputs=inputs, outputs=outputs, precision="fp16", profiles={"input0": shapes},
                            plan=plan, trt_version="10.13.0", workspace_bytes=1 << 30, device="H100",
                            dynamic=True)
    back = json.loads(json.dumps(meta))
    assert back["profiles"] == {"input0": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [8, 3, 32, 32]}}
    assert back["inputs"] == [{"name": "input0", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    assert back["precision"] == "fp16" and back["precision_plan"]["onnx_fp16"] is True
    assert back["engine"].endswith("m.engine") and back["workspace_bytes"] == 1 << 30


# ----------------------------------------------------------- missing package / GPU: clear one-sentence errors

def _onnx_artifact(tmp_path):
    return Artifact(str(tmp_path / "m.onnx"), "onnx", [TensorSpec("input0", (1, 3, 8, 8))],
                    [TensorSpec("output0", (1, 4, 8, 8))])


def test_missing_tensorrt_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependency) as err:
        export("tensorrt", _onnx_artifact(tmp_path), tmp_path / "m.engine")
    msg = str(err.value)
    assert "pip install 'reparam-deploy[tensorrt]'" in msg
    assert msg.endswith(".") and ". " not in msg and "\n" not in msg  # one sentence
    (tmp_path / "m.engine").write_bytes(b"not an engine")
    with pytest.raises(MissingDependency, match=r"reparam-deploy\[tensorrt\]"):
        TensorRTRunner(tmp_path / "m.engine").activate()


def test_tensorrt_without_gpu_says_no_cuda_gpu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependency, match="no CUDA GPU found"):
        export("tensorrt", _onnx_artifact(tmp_path), tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


# -------------------------------------------------------------------------- real build (GPU machines)

@pytest.fixture
def trt():
    try:
        import tensorrt
    except ImportError:
        pytest.skip("tensorrt not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return tensorrt


@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-5), ("fp16", 1e-2)])
def test_engine_matches_torch(trt, tmp_path, precision, rtol):
    pytest.importorskip("onnxscript")
    from export_models import capture, example, make

    from runtimes import compare, open_runner

    model, x = make("convnet"), example(2)
    onnx_art = export("onnx", capture(model, x), tmp_path / "m.onnx", args=(x,), dynamic=True)
    art = export("tensorrt", onnx_art, tmp_path / "m.engine", precision=precision)
    with open(art.path, "rb") as f:
        assert f.read(1) != b"{"  # a plain engine: no JSON header in front
    meta = json.load(open(art.path + ".json"))
    assert meta["profiles"]["input0"]["max"][0] == 4 and meta["precision"] == precision
    for batch in (1, 4):
        xb = example(batch, seed=batch)
        with open_runner(art.path) as r:
            result = compare(model(xb), r.infer([xb.numpy()]), rtol)
        assert result.passed, result.summary()
