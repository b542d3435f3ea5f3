"""ExecuTorch export: ``model.pte`` lowered to the XNNPACK backend, PyTorch's own on-device runtime.

The plain module is exported with ``torch.export`` (static shapes), lowered with
``executorch.exir.to_edge_transform_and_lower`` and the ``XnnpackPartitioner`` (the CPU backend
ExecuTorch ships on Android and iOS), turned into an ExecuTorch program and written as one ``.pte``
flatbuffer. Ops XNNPACK does not take run on ExecuTorch's portable kernels; the record notes how many
ops each side got. The file is read back with ExecuTorch's Python runtime for its input and output
specs. INT8: ``exporters.executorch_int8`` (XNNPACK's PT2E quantizer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from runtimes.base import native_stderr_to_log
from runtimes.core import Artifact, ExportError, TensorSpec, check_precision, first_line, require
from runtimes.executorch_runner import CPU_PROBE

from ._torch import as_args, io_names, to_graph_module
from .targets import ExportJob, Product, Target

__all__ = ["export_executorch", "describe_pte", "EXTRA", "TARGET"]

log = logging.getLogger(__name__)
EXTRA = "executorch"


def describe_pte(path, *, input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                 precision: str = "fp32", parent: str | None = None) -> Artifact:
    """An artifact record for a ``.pte`` file, read back (and run once on zeros) through ExecuTorch's runtime."""
    import numpy as np

    from runtimes.executorch_runner import ExecuTorchRunner

    with ExecuTorchRunner(path) as runner:
        specs = runner.get_input_specs()
        outs = list(runner.infer({s.name: np.zeros(s.concrete_shape(1), s.dtype) for s in specs}).values())
    in_names, out_names = io_names(input_names, len(specs), "input"), io_names(output_names, len(outs), "output")
    return Artifact(
        path=os.fspath(path), format="executorch",
        inputs=[TensorSpec(n, s.shape, s.dtype) for n, s in zip(in_names, specs)],
        outputs=[TensorSpec(n, tuple(o.shape), o.dtype.name) for n, o in zip(out_names, outs)],
        precision=precision, parent=parent)


def export_executorch(model, args, path, *, precision: str = "fp32", input_names: Sequence[str] | None = None,
                      output_names: Sequence[str] | None = None) -> Artifact:
    """Lower ``model`` (traced on ``args``) to an ExecuTorch program for XNNPACK at ``path``; see the module
    docstring."""
    check_precision(precision, ("fp32",), fmt="ExecuTorch")
    executorch = require("executorch", EXTRA, "ExecuTorch export")
    import torch

    args = as_args(args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = to_graph_module(model, args)
    try:
        ep = torch.export.export(module, args, strict=False)
    except Exception as e:
        raise ExportError(f"torch.export cannot capture the plain model for ExecuTorch: {first_line(e)}") from e
    delegated, backends, portable = write_program(ep, path)
    art = describe_pte(path, input_names=input_names, output_names=output_names, precision=precision)
    art.metadata.update(exporter=f"executorch {getattr(executorch, '__version__', '?')} (XnnpackPartitioner)",
                        delegated_calls=delegated, backends=backends, portable_ops=portable)
    if portable:
        art.note(f"{sum(portable.values())} op(s) outside XNNPACK run on ExecuTorch's portable kernels: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(portable.items())))
    log.info("exported %s (%d XNNPACK subgraph(s))", path, delegated)
    return art


def write_program(ep, path: Path) -> tuple[int, list[str], dict[str, int]]:
    """Lower the exported program ``ep`` for XNNPACK and write it as an ExecuTorch program at ``path``; returns
    how many delegate calls it has, their backends, and the ops left to the portable kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        with native_stderr_to_log(CPU_PROBE, "ExecuTorch"):
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        split = _split(edge.exported_program().graph_module)
        program = edge.to_executorch()
    except Exception as e:
        raise ExportError(f"ExecuTorch could not lower the model for XNNPACK: {first_line(e)}") from e
    path.write_bytes(program.buffer)
    return split


def _split(gm) -> tuple[int, list[str], dict[str, int]]:
    """How many calls of a lowered subgraph the edge program has, their backends, and the ops left outside."""
    delegated, backends, portable = 0, set(), {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            delegated += 1
            backends.add(getattr(gm.get_submodule(node.args[0].target), "backend_id", "?"))
        elif name != "getitem":
            key = name.split(".")[0]
            portable[key] = portable.get(key, 0) + 1
    return delegated, sorted(backends), portable


def _export_target(job: ExportJob) -> list[Product]:
    art = export_executorch(job.module, job.args, job.folder / "model.pte", precision=job.precision)
    if job.dynamic:
        art.note(f"static batch {art.inputs[0].shape[0]}: the program is planned for the example shape "
                 "(--dynamic applies to the formats that keep the batch open)")
    return [Product("executorch", art)]


TARGET = Target(
    name="executorch", title="ExecuTorch", runtime="executorch", suffixes=(".pte",), source="torch",
    export=_export_target, function="exporters.executorch:export_executorch",
    runner="runtimes.executorch_runner:ExecuTorchRunner", requires=(("executorch", EXTRA),),
    inspect="deploy.inspect:read_executorch", mobile=True,
    precisions=("fp32", "int8"), quantize="exporters.executorch_int8:quantize_executorch",
    bench_note={"backend": "XNNPACK (x86 CPU here: no claim about ARM speed)"},
    description="ExecuTorch program lowered to XNNPACK, run on ExecuTorch's runtime",
)
