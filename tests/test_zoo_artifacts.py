"""Issue 3 acceptance: zoo models through every CPU format, each verified on its own runtime.

One end-to-end conversion per model (small widths), training model -> plain model -> ONNX ->
simplified ONNX -> OpenVINO (fp32, fp16) / TFLite (fp32, fp16), all on the same seeded inputs.
"""

import pytest
import torch

import fusers
from deploy import zoo
from exporters import export
from runtimes import Stage, open_runner, verify_chain

pytestmark = pytest.mark.e2e  # zoo models through every CPU format

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("litert_torch")

SHAPES = {"repvgg_a0": (1, 3, 64, 64), "mobileone_s0": (1, 3, 64, 64), "yolov7_tiny_rep": (1, 3, 128, 128)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_zoo_model_artifacts_agree_on_their_runtimes(name, tmp_path):
    model = zoo.randomize_batchnorm(zoo.create(name, width=0.25), seed=2).eval()
    x = torch.randn(*SHAPES[name])
    plain = fusers.reparameterize(model, (x,))
    onnx_art = export("onnx", plain, tmp_path / "model.onnx", args=(x,))
    assert onnx_art.metadata["simplified"] and onnx_art.parent.endswith("model.onnx")
    stages = [Stage("training", model), Stage("plain", plain),
              Stage("onnx", open_runner(onnx_art.parent)), Stage("onnx-simplified", open_runner(onnx_art.path))]
    for precision in ("fp32", "fp16"):
        ov = export("openvino", onnx_art, tmp_path / f"model_{precision}.xml", precision=precision)
        tfl = export("tflite", plain, tmp_path / f"model_{precision}.tflite", args=(x,), precision=precision)
        stages += [Stage(f"openvino-{precision}", open_runner(ov, precision=precision), "onnx-simplified", precision),
                   Stage(f"tflite-{precision}", open_runner(tfl), "plain", precision)]
    result = verify_chain(stages, {"input0": x.numpy()})
    assert result.passed, result.summary()
    for s in result.stages[1:]:
        limit = 1e-5 if s.precision == "fp32" else 1e-2
        assert s.vs_reference.max_rel <= limit, (s.name, s.vs_reference.summary())
