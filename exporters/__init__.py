"""Exporters: one module per artifact format, each returning an :class:`Artifact` record.

    >>> from exporters import export
    >>> onnx_art = export("onnx", plain_model, "out/model.onnx", args=(x,))
    >>> ov_art = export("openvino", onnx_art, "out/model.xml")
    >>> tfl_art = export("tflite", plain_model, "out/model.tflite", args=(x,), precision="fp16")

Formats that read a torch module take ``args`` (example inputs); OpenVINO and TensorRT read the
ONNX artifact. An op a format cannot express raises :class:`ExportError` naming op and format;
a missing optional package raises :class:`MissingDependency` naming the pip extra. Heavy packages
are imported only when a format is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .base import Artifact, CorruptArtifact, DeployError, ExportError, MissingDependency, TensorSpec

__all__ = [
    "Artifact",
    "TensorSpec",
    "DeployError",
    "ExportError",
    "MissingDependency",
    "CorruptArtifact",
    "FORMATS",
    "export",
    "exporter",
]

# format -> (module, function, reads a torch module)
FORMATS: dict[str, tuple[str, str, bool]] = {
    "onnx": ("exporters.onnx", "export_onnx", True),
    "openvino": ("exporters.openvino", "export_openvino", False),
    "tflite": ("exporters.tflite", "export_tflite", True),
    "tensorrt": ("exporters.tensorrt", "export_tensorrt", False),
}


def exporter(fmt: str) -> Callable[..., Artifact]:
    """The export function of ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known formats: {', '.join(FORMATS)}")
    module, func, _ = FORMATS[fmt]
    return getattr(importlib.import_module(module), func)


def export(fmt: str, model_or_artifact: Any, path, *, args=None, **options) -> Artifact:
    """Export ``model_or_artifact`` to ``path`` in format ``fmt`` ("onnx", "openvino", "tflite", "tensorrt").

    ``args`` are the example inputs for formats that trace a torch module (and for OpenVINO when
    given a module); ``options`` go to the format's function (``precision=``, ``dynamic=``, ...).
    """
    func = exporter(fmt)
    _, _, traces = FORMATS[fmt]
    if traces:
        if isinstance(model_or_artifact, Artifact):
            raise ExportError(f"{fmt} export needs the torch module, not the {model_or_artifact.format} artifact "
                              f"{model_or_artifact.path}.")
        if args is None:
            raise ExportError(f"{fmt} export of a torch module needs example inputs (args=).")
        return func(model_or_artifact, args, path, **options)
    if args is not None and fmt == "openvino":  # OpenVINO can also convert a torch module
        options["args"] = args
    return func(model_or_artifact, path, **options)
