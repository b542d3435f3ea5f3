"""Core ML export: ``model.mlpackage``, an ML Program for Apple's Core ML, written here and run only on macOS.

The plain module is captured with ``torch.export`` (static shapes), lowered to the ATen dialect coremltools
takes (``run_decompositions({})``; coremltools refuses the training dialect ``torch.export`` gives) and
converted with ``coremltools.convert(..., convert_to="mlprogram", skip_model_load=True)``: Core ML itself
does not exist off macOS, so the model is written without being compiled or loaded.

- ``precision``: ``"fp32"`` computes in float32, ``"fp16"`` in float16 (weights and activations, coremltools'
  ``compute_precision``); inputs and outputs stay float32 either way (coremltools makes the outputs of an
  fp16 program float16 from iOS 16 on; they are cast back, as the fp16 ONNX model keeps fp32 at its edges).
- ``deployment_target``: the oldest OS the model loads on (``iOS16`` by default, a ``coremltools.target``
  name); it sets the opset of the program.
- Names: ``input0 ..`` and ``output0 ..`` (or the names given), as in the other formats.

The package is written to a temporary folder beside ``path`` and moved into place once its model description
is read back and checked against the plain model: input and output names, shapes and dtypes (the outputs of
one forward of the plain module). A mismatch is an :class:`ExportError`, and nothing is left at ``path``. The
record's metadata holds the program's operations by type, the deployment target, the compute precision and the
check. On Linux the artifact is "written, not run" (``TARGET.not_run_here``); ``runtimes.coreml_runner`` runs
it on a Mac. coremltools makes no network call (checked: its only subprocess, ``xcrun devicectl`` for remote
devices, is in an experimental module this exporter does not import); its log and progress bars go to the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from runtimes.coreml_runner import (feature_specs, load_spec, not_run_here, operations, package_files,
                                    quiet_coremltools)
from runtimes.core import Artifact, ExportError, TensorSpec, check_precision, dtype_name, first_line, require

from ._torch import as_args, io_names, output_leaves, source_line, to_graph_module
from .targets import ExportJob, Product, Target

__all__ = ["export_coreml", "describe_coreml", "coreml_files", "check_spec", "EXTRA", "DEPLOYMENT_TARGET", "TARGET"]

log = logging.getLogger(__name__)
EXTRA = "coreml"
DEPLOYMENT_TARGET = "iOS16"
_PRECISIONS = {"fp32": "FLOAT32", "fp16": "FLOAT16"}


def coreml_files(art: Artifact) -> list[str]:
    """The regular files of the package (manifest, model description, weights): what a run hashes."""
    return package_files(art.path)


def describe_coreml(path, *, precision: str = "fp32", parent: str | None = None) -> Artifact:
    """An artifact record for an ``.mlpackage``, read from its model description (no Core ML needed)."""
    spec = load_spec(path)
    inputs, outputs = feature_specs(spec)
    ops = Counter(op.type for op in operations(spec))
    consts = ops.pop("const", 0)
    return Artifact(path=os.fspath(path), format="coreml", inputs=inputs, outputs=outputs, precision=precision,
                    parent=parent, metadata={"ops": dict(ops), "constants": consts,
                                             "specification_version": int(spec.specificationVersion)})


def check_spec(art: Artifact, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> dict:
    """Compare the package's declared inputs and outputs with the expected ones (name, shape, dtype): a dict with
    ``passed`` and, when it failed, the ``mismatches`` in words."""
    problems = []
    for kind, got, want in (("input", art.inputs, inputs), ("output", art.outputs, outputs)):
        if len(got) != len(want):
            problems.append(f"{len(got)} {kind}(s) where the plain model has {len(want)}")
            continue
        for g, w in zip(got, want):
            if (g.name, tuple(g.shape), g.dtype) != (w.name, tuple(w.shape), w.dtype):
                problems.append(f"{kind} {g.name} {_text(g)} where the plain model's {w.name} is {_text(w)}")
    return {"passed": not problems, "inputs": len(inputs), "outputs": len(outputs), "mismatches": problems}


def _text(s: TensorSpec) -> str:
    return f"{'x'.join('?' if d is None else str(d) for d in s.shape)} {s.dtype}"


def export_coreml(model, args, path, *, precision: str = "fp32", deployment_target: str = DEPLOYMENT_TARGET,
                  input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                  metadata: dict | None = None) -> Artifact:
    """Convert ``model`` (traced on ``args``) to a Core ML ML Program at ``path`` (an ``.mlpackage`` folder); see the
    module docstring. ``metadata`` is stored in the package's user-defined metadata as ``deploy.json``."""
    check_precision(precision, tuple(_PRECISIONS), fmt="Core ML")
    with quiet_coremltools():
        ct = require("coremltools", EXTRA, "Core ML export")
    import torch

    target = getattr(ct.target, deployment_target, None)
    if target is None:
        known = [n for n in dir(ct.target) if n.startswith(("iOS", "macOS"))]
        raise ExportError(f"Core ML deployment target {deployment_target!r} is not known to coremltools "
                          f"{ct.__version__}; choose one of {', '.join(known)}.")
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ExportError(f"a Core ML ML Program is a folder named *.mlpackage, got {path}; rename it.")
    args = as_args(args)
    module = to_graph_module(model, args)
    expected = output_leaves(module, args)
    in_names, out_names = io_names(input_names, len(args), "input"), io_names(output_names, len(expected), "output")
    want_in = [TensorSpec(n, tuple(a.shape), dtype_name(a.dtype)) for n, a in zip(in_names, args)]
    want_out = [TensorSpec(n, tuple(o.shape), dtype_name(o.dtype)) for n, o in zip(out_names, expected)]
    try:
        ep = torch.export.export(module, args, strict=False).run_decompositions({})
    except Exception as e:
        raise ExportError(f"torch.export cannot capture the plain model for Core ML: {first_line(e)}") from e

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", suffix=".partial", dir=path.parent))
    try:
        staged = tmp / path.name
        _convert(ct, ep, staged, target, precision, in_names, out_names, metadata)
        art = describe_coreml(staged, precision=precision)
        check = check_spec(art, want_in, want_out)
        if not check["passed"]:
            raise ExportError(f"the Core ML model's description does not match the plain model: "
                              f"{'; '.join(check['mismatches'])}.")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(staged, path)
        _share_like_manifest(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    art.path = os.fspath(path)
    art.metadata.update(exporter=f"coremltools {ct.__version__} (torch.export, ML Program)",
                        deployment_target=deployment_target, compute_precision=_PRECISIONS[precision],
                        spec_check=check)
    if precision == "fp16":
        art.note("fp16 weights and activations, fp32 inputs/outputs (Core ML compute precision FLOAT16)")
    reason = not_run_here()
    if reason:
        art.note(reason)
    log.info("exported %s (%s, %d ops)", path, deployment_target, sum(art.metadata["ops"].values()))
    return art


def _share_like_manifest(package: Path) -> None:
    """coremltools writes the model description through a private temporary file (mode 0600): give the package's
    files the mode its ``Manifest.json`` got from the umask, as every other artifact of a run has."""
    mode = (package / "Manifest.json").stat().st_mode & 0o777
    for f in package.rglob("*"):
        if f.is_file() and not f.is_symlink() and f.stat().st_mode & 0o777 != mode:
            f.chmod(mode)


def _convert(ct, ep, path: Path, target, precision: str, in_names: list[str], out_names: list[str],
             metadata: dict | None) -> None:
    """Convert the ATen program ``ep`` to an ML Program saved at ``path``: inputs and outputs renamed, fp32 at the
    edges."""
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    with quiet_coremltools() as messages:
        try:
            ml = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=target,
                            compute_precision=getattr(ct.precision, _PRECISIONS[precision]), skip_model_load=True)
        except Exception as e:
            raise _convert_error(e, ep, messages, ct.__version__) from e
        try:
            outputs = ml.get_spec().description.output
            if any(o.type.multiArrayType.dataType == ArrayFeatureType.FLOAT16 for o in outputs):
                ml = ct.utils.change_input_output_tensor_type(ml, ArrayFeatureType.FLOAT16, ArrayFeatureType.FLOAT32)
            spec = ml.get_spec()
            native_in = [f.name for f in spec.description.input]
            native_out = [f.name for f in spec.description.output]
            if len(native_in) != len(in_names) or len(native_out) != len(out_names):
                raise ExportError(f"coremltools made a model with {len(native_in)} input(s) and {len(native_out)} "
                                  f"output(s) where the plain model has {len(in_names)} and {len(out_names)}.")
            for old, new in [*zip(native_in, in_names), *zip(native_out, out_names)]:
                if old != new:
                    ct.utils.rename_feature(spec, old, new)
            if metadata:
                spec.description.metadata.userDefined["deploy.json"] = json.dumps(metadata, default=str)
            ct.models.MLModel(spec, weights_dir=ml.weights_dir, skip_model_load=True).save(os.fspath(path))
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"coremltools could not write the Core ML package: {first_line(e)}") from e


def _convert_error(exc: BaseException, ep, messages: list[str], version: str) -> ExportError:
    """coremltools' failure as one sentence: the op Core ML cannot express (and the user code it came from)."""
    text = "\n".join([str(exc), *messages])
    m = (re.search(r"Unsupported fx node (\S+), kind (\S+)", text)
         or re.search(r"convert function for op '([^']+)' not implemented", text)
         or re.search(r"converting '([^']+)' op", text))
    if m is None:
        return ExportError(f"coremltools {version} could not convert the model to Core ML: {first_line(exc)}")
    node = next((n for n in ep.graph.nodes if n.op == "call_function" and n.name == m.group(1)), None)
    op = str(node.target).removesuffix(".default") if node is not None else m.group(m.lastindex)
    where = source_line(node) if node is not None else ""
    how = "has no conversion for it" if "converting" not in m.group(0) else f"failed on it ({first_line(exc)})"
    return ExportError(f"Core ML cannot express op {op}{f' (from {where})' if where else ''}: coremltools {version} "
                       f"{how}.")


def _export_target(job: ExportJob) -> list[Product]:
    art = export_coreml(job.module, job.args, job.folder / "model.mlpackage", precision=job.precision,
                        metadata=job.metadata)
    if job.dynamic:
        art.note("Core ML model has the static shapes of the example inputs (dynamic batch not exported)")
    return [Product("coreml", art)]


TARGET = Target(
    name="coreml", title="Core ML", runtime="coreml", suffixes=(".mlpackage",), source="torch",
    export=_export_target, function="exporters.coreml:export_coreml", files=coreml_files,
    runner="runtimes.coreml_runner:CoreMLRunner", requires=(("coremltools", EXTRA),), precisions=("fp32", "fp16"),
    not_run_here=not_run_here, inspect="deploy.inspect:read_coreml", mobile=True,
    bench_note={"backend": "Core ML on macOS (not run on this machine: no claim about Apple hardware speed)"},
    description="Core ML ML Program (.mlpackage) for iOS/macOS, written and spec-checked; run on macOS only",
)
