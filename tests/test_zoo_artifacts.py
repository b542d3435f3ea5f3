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

def _settle_statistics(model: torch.nn.Module, shape: tuple) -> torch.nn.Module:
    """Running statistics as training leaves them, over the randomized affine parameters: measured on random
    batches, each variance then floored at 0.5 and scaled by U(0.5, 2) so they stay non-trivial. With the plain
    random statistics of :func:`zoo.randomize_batchnorm`, MobileOne's summed branches grow activations to 84k
    at width 0.25, past fp16's 65504, which an fp16 runtime computing in real fp16 rightly reports as overflow."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, *shape[1:]))
    g = torch.Generator().manual_seed(3)
    for bn in bns:
        scale = torch.rand(bn.num_features, generator=g) * 1.5 + 0.5
        bn.running_var.copy_(bn.running_var.clamp(min=0.5) * scale)
    return model.eval()


SHAPES = {"repvgg_a0": (1, 3, 64, 64), "mobileone_s0": (1, 3, 64, 64), "yolov7_tiny_rep": (1, 3, 128, 128)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_zoo_model_artifacts_agree_on_their_runtimes(name, tmp_path):
    torch.manual_seed(0)
    model = _settle_statistics(zoo.randomize_batchnorm(zoo.create(name, width=0.25), seed=2), SHAPES[name])
    x = torch.randn(*SHAPES[name])
    assert all(bn.running_var.std() > 0 for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm2d))
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
