"""OpenVINO IR (``.xml`` + ``.bin``) with ``openvino.convert_model`` and ``openvino.save_model``.

Source: the ONNX file, by default. It is the graph that was just verified on ONNX Runtime, so the
OpenVINO stage's parent comparison isolates OpenVINO's own conversion; it keeps the ONNX names and
static shapes. Converting the torch GraphModule directly is less robust: OpenVINO's PyTorch frontend
re-traces it with TorchScript, which fails on ``torch.export`` modules ("Calling eval() is not
supported"), and from an ExportedProgram it makes every dimension dynamic and renames the outputs.
A torch module is still accepted (captured with torch.export, shapes pinned, names restored).

``save_model`` compresses weights to fp16 unless told not to: fp32 passes
``compress_to_fp16=False``; fp16 passes True (fp16 weights; the runtime's inference precision is
chosen by the runner's ``INFERENCE_PRECISION_HINT``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtimes.core import Artifact, ExportError, TensorSpec, check_precision, first_line, require

from ._torch import as_args, io_names, output_leaves, to_graph_module
from .targets import ExportJob, Product, Target

__all__ = ["export_openvino", "describe_openvino", "TARGET"]

log = logging.getLogger(__name__)
_EXTRA = "openvino"


def _ov():
    return require("openvino", _EXTRA, "OpenVINO export")


def _specs(ports, names: Sequence[str], template: Sequence[TensorSpec] = ()) -> list[TensorSpec]:
    specs = []
    for i, (port, name) in enumerate(zip(ports, names)):
        dims = []
        for j, d in enumerate(port.get_partial_shape()):
            if d.is_static:
                dims.append(d.get_length())
            else:  # keep the symbol of the source (e.g. "batch") where there is one
                src = template[i].shape[j] if i < len(template) and j < len(template[i].shape) else None
                dims.append(src if isinstance(src, str) else None)
        specs.append(TensorSpec(name, tuple(dims), np.dtype(port.get_element_type().to_dtype()).name))
    return specs


def describe_openvino(path, *, precision: str = "fp32", parent: str | None = None,
                      template: Artifact | None = None) -> Artifact:
    """An artifact record for an existing IR ``.xml`` (names, shapes, dtypes read from the model)."""
    ov = _ov()
    model = ov.Core().read_model(os.fspath(path))
    in_names = [p.get_any_name() for p in model.inputs]
    out_names = [p.get_any_name() for p in model.outputs]
    return Artifact(
        path=os.fspath(path), format="openvino",
        inputs=_specs(model.inputs, in_names, template.inputs if template else ()),
        outputs=_specs(model.outputs, out_names, template.outputs if template else ()),
        precision=precision, parent=parent,
        metadata={"bin": os.fspath(Path(path).with_suffix(".bin"))},
    )


def _rename(ports, names: Sequence[str]) -> None:
    for port, name in zip(ports, names):
        port.get_tensor().set_names({name})


def export_openvino(source, path, *, precision: str = "fp32", args=None, input_names: Sequence[str] | None = None,
                    output_names: Sequence[str] | None = None) -> Artifact:
    """Convert ``source`` (an ONNX :class:`Artifact` or ``.onnx`` path; or a torch module with ``args``)
    into an OpenVINO IR at ``path`` (``.xml``; the weights go to the ``.bin`` beside it)."""
    check_precision(precision, fmt="OpenVINO")
    ov = _ov()
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"OpenVINO IR paths end in .xml, got {path}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    parent = None
    template: Sequence[TensorSpec] = ()
    if isinstance(source, Artifact) or isinstance(source, (str, os.PathLike)):
        src_path = source.path if isinstance(source, Artifact) else os.fspath(source)
        if not src_path.endswith(".onnx"):
            raise ExportError(f"OpenVINO export reads ONNX files (or torch modules), got {src_path}.")
        if isinstance(source, Artifact):
            template = source.inputs + source.outputs
            if source.precision != "fp32":
                raise ExportError(f"OpenVINO export expects an fp32 ONNX model, got {source.precision} {src_path}.")
        try:
            model = ov.convert_model(src_path)
        except Exception as e:
            raise ExportError(f"OpenVINO cannot convert {src_path}: {first_line(e)}") from e
        parent, kind = src_path, "onnx"
        if input_names is not None:
            _rename(model.inputs, io_names(input_names, len(model.inputs), "input"))
        if output_names is not None:
            _rename(model.outputs, io_names(output_names, len(model.outputs), "output"))
    else:
        if args is None:
            raise ExportError("OpenVINO export from a torch module needs example args.")
        import torch

        args = as_args(args)
        module = to_graph_module(source, args)
        leaves = output_leaves(module, args)
        ep = torch.export.export(module, args, strict=False)
        try:
            model = ov.convert_model(ep, input=[tuple(a.shape) for a in args])
        except Exception as e:
            raise ExportError(f"OpenVINO cannot convert the torch module: {first_line(e)}") from e
        _rename(model.inputs, io_names(input_names, len(args), "input"))
        _rename(model.outputs, io_names(output_names, len(leaves), "output"))
        kind = "torch"
    for stale in (path, path.with_suffix(".bin")):
        if stale.exists():
            stale.unlink()
    ov.save_model(model, os.fspath(path), compress_to_fp16=(precision == "fp16"))
    art = describe_openvino(path, precision=precision, parent=parent)
    if template:
        n_in = len(art.inputs)
        art.inputs = _specs(model.inputs, art.input_names, template[:n_in])
        art.outputs = _specs(model.outputs, art.output_names, template[n_in:])
    art.metadata.update(source=kind, compress_to_fp16=(precision == "fp16"),
                        inference_precision_hint={"fp32": "f32", "fp16": "f16"}[precision],
                        exporter=f"openvino {ov.__version__}")
    if precision == "fp16":
        art.note("fp16 weights (save_model compress_to_fp16=True); run with INFERENCE_PRECISION_HINT=f16")
    log.info("exported %s (%s, from %s)", path, precision, kind)
    return art


def _export_target(job: ExportJob) -> list[Product]:
    return [Product("openvino", export_openvino(job.source, job.folder / "model.xml", precision=job.precision))]


def _files(art: Artifact) -> list[str]:
    return [art.path, str(Path(art.path).with_suffix(".bin"))]


def _native(precision: str, cpu: dict) -> str:
    simd = set(cpu.get("simd", ()))
    if precision == "fp16" and not simd & {"avx512_fp16", "amx_fp16", "asimdhp"}:
        return "this CPU has no fp16 arithmetic: OpenVINO runs an f16 hint in bf16 (or fp32), not fp16"
    if precision == "bf16" and not (cpu.get("low_precision") or {}).get("bf16"):
        return "this CPU has no bf16 instructions: OpenVINO would run the bf16 hint in fp32"
    return ""


TARGET = Target(
    name="openvino", title="OpenVINO", runtime="openvino", suffixes=(".xml",), source="onnx",
    export=_export_target, function="exporters.openvino:export_openvino",
    runner="runtimes.openvino_runner:OpenVINORunner", runner_options=lambda precision: {"precision": precision},
    precisions=("fp32", "fp16", "int8"), quantize="exporters.openvino_int8:quantize_openvino", hints=("bf16",),
    native=_native, requires=(("openvino", "openvino"),), files=_files, inspect="deploy.inspect:read_openvino",
    default=True,
    bench_options={"config": {"PERFORMANCE_HINT": "LATENCY"}},
    bench_note={"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "the run's precision"},
    description="OpenVINO IR (.xml + .bin) converted from the ONNX file, explicit inference precision",
)
