"""Shared check: one model through the compiler and every CPU format, verified on each runtime."""

from __future__ import annotations

import onnx
import torch

import fusers
from exporters import ExportError, export
from runtimes import Stage, open_runner, verify_chain

CPU_TARGETS = ("onnx", "openvino", "tflite")


def no_batchnorm(onnx_path) -> bool:
    return all(n.op_type != "BatchNormalization" for n in onnx.load(str(onnx_path)).graph.node)


def convert_everywhere(model: torch.nn.Module, x: torch.Tensor, folder, unsupported: dict[str, str] | None = None):
    """Reparameterize ``model``, export to ONNX / OpenVINO / TFLite (fp32) and verify every stage.

    ``unsupported`` maps a target to a fragment of the documented error it must raise instead
    (e.g. ``{"tflite": "aten.grid_sampler"}``); the other targets are still produced and checked.
    Returns ``(plain module, ChainResult)``; asserts that every produced stage passed (≤ 1e-5
    relative to each output's scale) and that the ONNX file has no BatchNormalization.
    """
    unsupported = unsupported or {}
    plain = fusers.reparameterize(model, (x,))
    assert plain.reparam_report.float64_error <= 1e-9
    stages = [Stage("training", model), Stage("plain", plain)]
    onnx_art = export("onnx", plain, folder / "model.onnx", args=(x,))
    assert no_batchnorm(onnx_art.path)
    stages.append(Stage("onnx", open_runner(onnx_art)))
    for target, make in (("openvino", lambda: export("openvino", onnx_art, folder / "model.xml")),
                         ("tflite", lambda: export("tflite", plain, folder / "model.tflite", args=(x,)))):
        if target in unsupported:
            try:
                make()
            except ExportError as e:
                assert unsupported[target] in str(e), str(e)
                continue
            raise AssertionError(f"{target} export was expected to fail with {unsupported[target]!r}")
        stages.append(Stage(target, open_runner(make()), "plain" if target == "tflite" else "onnx"))
    result = verify_chain(stages, {"input0": x.numpy()})
    assert result.passed, result.summary()
    for s in result.stages[1:]:
        assert s.vs_reference.max_rel <= 1e-5, (s.name, s.vs_reference.summary())
    return plain, result
