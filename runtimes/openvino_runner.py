"""OpenVINO: an IR (``.xml`` + ``.bin``) or ``.onnx`` file compiled for a device, CPU by default.

The inference precision is always set explicitly (``INFERENCE_PRECISION_HINT``: "f32" for fp32,
"f16" for fp16): the CPU plugin otherwise picks bf16 or f16 by itself on CPUs that support them.
On a CPU without native fp16 the plugin answers an "f16" hint with bf16; the precision it really
uses is read back into ``effective_precision`` and logged when it differs from the request.

INT8 (an IR with FakeQuantize ops and int8 weights, ``exporters.openvino_int8``) runs with the "f32"
hint: the plugin fuses each FakeQuantize into the next op's u8/i8 kernel whatever the hint, and the
hint sets what the layers left in float compute in (this CPU's default would be bf16). Its
``effective_precision`` is "int8" when at least one Convolution/FullyConnected/MatMul of the compiled
graph runs in u8/i8 (``runtimePrecision`` of the runtime model), else what the float layers run in;
``int8_layers`` is ``(layers in int8, layers)``.
"""

from __future__ import annotations

import logging
import os
from xml.etree import ElementTree

import numpy as np

from .core import Artifact, CorruptArtifact, TensorSpec, require

from .base import Runner, error_reason, check_file

__all__ = ["OpenVINORunner", "read_ir"]

log = logging.getLogger(__name__)

_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
_COMPUTE = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
_PRECISION_OF = {"float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16", "bfloat16": "bf16",
                 "bf16": "bf16"}


class OpenVINORunner(Runner):
    """Runs an OpenVINO IR; ``precision`` "fp32", "fp16", "bf16" or "int8" (default: the artifact record's, else
    fp32); ``threads`` -> INFERENCE_NUM_THREADS."""

    runtime = "openvino"
    suffixes = (".xml",)

    def __init__(self, path, *, device: str = "CPU", precision: str | None = None, threads: int | None = None,
                 config: dict | None = None, name: str | None = None, artifact: Artifact | None = None):
        super().__init__(name, threads=threads, artifact=artifact)
        precision = precision or (artifact.precision if artifact is not None else "fp32")
        if precision not in _HINTS:
            raise ValueError(f"precision must be one of {', '.join(_HINTS)}, got {precision!r}")
        self.path = str(path)
        self.device = device
        self.precision = precision
        self.config = dict(config or {})
        self.effective_precision: str | None = None
        self.int8_layers: tuple[int, int] | None = None
        self.compiled = None
        self.request = None

    def activate_impl(self) -> None:
        path = check_file(self.path, "OpenVINO IR" if self.path.endswith(".xml") else "OpenVINO input")
        if path.endswith(".xml"):
            check_file(os.path.splitext(path)[0] + ".bin", "OpenVINO IR weights (.bin)")
        ov = require("openvino", "openvino", "the OpenVINO runner")
        core = ov.Core()
        model = read_ir(core, path)
        config = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision]}
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        config.update(self.config)
        self.compiled = core.compile_model(model, self.device, config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.effective_precision = _PRECISION_OF.get(hint, hint)
        if self.precision == "int8":
            self.int8_layers = _int8_layers(self.compiled)
            if self.int8_layers[0]:
                self.effective_precision = "int8"
            else:
                log.warning("OpenVINO %s runs none of the %d layers of %s in int8: the IR has no FakeQuantize or "
                            "the device has no INT8 kernels", self.device, self.int8_layers[1], path)
        elif self.effective_precision != self.precision:
            log.warning("OpenVINO %s runs %s as %s (requested %s): the device has no native %s support",
                        self.device, path, self.effective_precision, self.precision, self.precision)
        self.request = self.compiled.create_infer_request()
        self.input_specs = []
        for i, port in enumerate(self.compiled.inputs):
            shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            self.input_specs.append(TensorSpec(_port_name(port, f"input{i}"), shape,
                                               np.dtype(port.get_element_type().to_dtype()).name))
        self.output_names = [_port_name(p, f"output{i}") for i, p in enumerate(self.compiled.outputs)]
        self.native_inputs = [s.name for s in self.input_specs]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(feed[s.name]) for s in self.input_specs]
        result = self.request.infer(arrays)
        return [np.array(result[port]) for port in self.compiled.outputs]

    def deactivate_impl(self) -> None:
        self.request = None
        self.compiled = None


def _int8_layers(compiled) -> tuple[int, int]:
    """``(compute layers running in u8/i8, compute layers)`` of a compiled model's runtime graph."""
    total = int8 = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in _COMPUTE:
            total += 1
            int8 += info["runtimePrecision"].astype(str) in ("u8", "i8")
    return int8, total


def read_ir(core, path: str):
    """``core.read_model(path)``; a file OpenVINO cannot read is a :class:`CorruptArtifact` naming the file and
    what is wrong with it (OpenVINO's own message starts with source locations such as
    ``Exception from src/inference/src/cpp/core.cpp:84``)."""
    try:
        return core.read_model(path)
    except Exception as e:
        raise CorruptArtifact(f"OpenVINO IR file {path} is corrupt or not a valid OpenVINO IR model "
                              f"({_ir_problem(path, e)}).") from e


def _ir_problem(path: str, exc: BaseException) -> str:
    """What is wrong with an IR that OpenVINO refused, in words."""
    if path.endswith(".xml"):
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as e:
            return f"its XML is malformed: {e}"
        if root.tag != "net":
            return f"its XML root element is <{root.tag}>, not the <net> of an OpenVINO IR"
        weights = os.path.splitext(path)[0] + ".bin"
        if "weights" in str(exc).lower() and os.path.isfile(weights):
            return (f"its weights file {weights} ({os.path.getsize(weights)} bytes) does not hold the weights the "
                    "XML refers to: it is truncated or belongs to another export")
    return error_reason(exc).split(" Available frontends")[0].strip()


def _port_name(port, default: str) -> str:
    try:
        return port.get_any_name()
    except RuntimeError:
        return default
