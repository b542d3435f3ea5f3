import os
import re
import sys

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxsim")
pytest.importorskip("onnxscript")
pytest.importorskip("openvino")

from export_models import capture, example, make  # noqa: E402

from exporters import ExportError, MissingDependency, export  # noqa: E402
from runtimes import compare, flatten, open_runner  # noqa: E402


@pytest.fixture(scope="module")
def nested_onnx(tmp_path_factory):
    model, x = make("nested"), example()
    folder = tmp_path_factory.mktemp("ov")
    art = export("onnx", capture(model, x), folder / "nested.onnx", args=(x,))
    return model, x, art, folder


def _element_types(xml_path) -> set[str]:
    with open(xml_path) as f:
        text = f.read()
    consts = re.findall(r'<layer[^>]*type="Const"[^>]*>\s*<data[^>]*element_type="(\w+)"', text)
    return set(consts)


def test_fp32_ir_from_onnx_matches_torch(nested_onnx):
    model, x, onnx_art, folder = nested_onnx
    art = export("openvino", onnx_art, folder / "nested32.xml")
    assert art.format == "openvino" and art.precision == "fp32" and art.parent == onnx_art.path
    assert os.path.isfile(art.path) and os.path.isfile(art.metadata["bin"])
    assert art.metadata["compress_to_fp16"] is False and art.metadata["source"] == "onnx"
    types = _element_types(art.path)
    assert "f32" in types and "f16" not in types  # compress_to_fp16=False was honoured
    assert art.input_names == ["input0"] and art.output_names == ["output0", "output1", "output2", "output3"]
    with open_runner(art, threads=1) as r:
        assert r.effective_precision == "fp32"
        result = compare(flatten(model(x)), r.infer([x.numpy()]))
    assert result.passed and result.max_rel <= 1e-5, result.summary()


def test_fp16_ir_has_half_weights_and_agrees_within_1e_2(nested_onnx):
    model, x, onnx_art, folder = nested_onnx
    fp32 = export("openvino", onnx_art, folder / "a32.xml")
    fp16 = export("openvino", onnx_art, folder / "a16.xml", precision="fp16")
    assert "f16" in _element_types(fp16.path)
    assert os.path.getsize(fp16.metadata["bin"]) < 0.6 * os.path.getsize(fp32.metadata["bin"])
    import openvino

    caps = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    runs_as = "fp16" if "FP16" in caps else "bf16" if "BF16" in caps else "fp32"  # what this CPU can do
    with open_runner(fp16) as r:  # the record's precision selects INFERENCE_PRECISION_HINT=f16
        assert r.precision == "fp16" and r.effective_precision == runs_as, caps
        result = compare(flatten(model(x)), r.infer([x.numpy()]), precision="fp16")
    assert result.passed and result.max_rel > 1e-6, result.summary()


def test_ir_from_torch_module_keeps_static_shapes_and_names(tmp_path):
    model, x = make("nested"), example()
    art = export("openvino", capture(model, x), tmp_path / "t.xml", args=(x,))
    assert art.metadata["source"] == "torch"
    assert art.inputs[0].shape == (2, 3, 32, 32)
    assert art.output_names == ["output0", "output1", "output2", "output3"]
    with open_runner(art) as r:
        result = compare(flatten(model(x)), r.infer([x.numpy()]))
    assert result.passed, result.summary()


def test_openvino_refuses_non_onnx_files_and_bad_suffix(nested_onnx, tmp_path):
    _, _, onnx_art, _ = nested_onnx
    with pytest.raises(ExportError, match="end in .xml"):
        export("openvino", onnx_art, tmp_path / "m.bin")
    with pytest.raises(ExportError, match="reads ONNX files"):
        export("openvino", str(tmp_path / "m.tflite"), tmp_path / "m.xml")


def test_missing_openvino_names_the_extra(nested_onnx, tmp_path, monkeypatch):
    _, _, onnx_art, _ = nested_onnx
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependency, match=r"'openvino'.*pip install 'reparam-deploy\[openvino\]'"):
        export("openvino", onnx_art, tmp_path / "m.xml")
    assert not os.path.exists(tmp_path / "m.xml")
