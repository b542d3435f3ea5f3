"""ncnn (``model.ncnn.param`` + ``model.ncnn.bin``) converted from the ONNX file with pnnx.

Source: the ONNX file, the graph just verified on ONNX Runtime, so the ncnn stage's parent comparison
isolates pnnx's conversion and ncnn's kernels. (pnnx also takes TorchScript, which would mean tracing the
plain module again with ``torch.jit.trace``; that fails on the ``torch.export`` modules this tool makes.)

pnnx is run as its command-line program (``pnnx.EXEC_PATH``), not through ``pnnx.convert``: that function
imports and runs the Python file pnnx just wrote (``*_pnnx.py``), and it ignores pnnx's exit status. The
ONNX file is copied into a temporary folder beside the output, because pnnx writes several side files next
to its input (``.pnnx.param``, ``.pnnx.bin``, ``.pnnx.onnx``, ``.pnnxsim.onnx``, ``_pnnx.py``, ``_ncnn.py``);
only the two ncnn files are moved into place, after the net loaded and ran once, so a failed conversion
leaves nothing behind. ``fp16=0`` for fp32 keeps the weights in the ``.bin`` as fp32 (pnnx writes fp16
weights by default); fp16 writes fp16 weights and the runner turns ncnn's fp16 storage on.

pnnx converts with batch 1 and drops the batch dimension: an ncnn blob is one sample. The per-sample input
shape is written into each ``Input`` layer (``0=w 1=h 2=c``, ncnn's own parameters) so the file says what it
takes. An op with no ncnn layer is left by pnnx as a layer of its own type (``Det``, ``torch.where``,
``pnnx.Expression``), which ncnn cannot load: the export refuses it, naming the op.

INT8: neither the ``ncnn`` nor the ``pnnx`` wheel ships ncnn's quantization tools (``ncnn2table`` computes
the activation scales, ``ncnn2int8`` writes the int8 model; they are C++ programs of an ncnn source build;
the wheel's ``ncnn.quantize_to_int8`` only quantizes one Mat with given scales), so this target has no INT8
form.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from runtimes.core import Artifact, CorruptArtifact, ExportError, TensorSpec, check_precision, first_line, require
from runtimes.ncnn_runner import NcnnRunner, bin_path, read_param

from .targets import ExportJob, Product, Target

__all__ = ["export_ncnn", "unknown_layers", "EXTRA", "TARGET"]

log = logging.getLogger(__name__)
EXTRA = "ncnn"
PNNX_TIMEOUT_S = 3600
_SUFFIX = ".ncnn.param"


def unknown_layers(param) -> dict[str, list[str]]:
    """``{layer type: [layer names]}`` of the layers of a parsed ``.param`` that ncnn has no layer for."""
    ncnn = require("ncnn", EXTRA, "ncnn export")
    found: dict[str, list[str]] = {}
    for layer in param.layers:
        if ncnn.layer_to_index(layer.type) < 0:
            found.setdefault(layer.type, []).append(layer.name)
    return found


def hollow_reductions(param) -> list[str]:
    """The Reduction layers of a parsed ``.param`` that reduce nothing: reduce-all off (``1=0``) and an empty axis
    list (``-23303=0``). pnnx writes one for every single-axis ReduceMean or ReduceSum of an ONNX graph (measured
    with pnnx 20261020: ``x.mean(1)``, ``x.sum(1)``, ``x - x.mean(1, keepdim=True)``); ncnn then passes the input
    through, of the wrong shape or with the wrong values."""
    return [layer.name for layer in param.layers
            if layer.type == "Reduction" and layer.get(1, 1) == 0 and layer.get(3, None) == ()]


def _pnnx_shape(spec: TensorSpec, src: str) -> list[int]:
    if spec.dtype != "float32":
        raise ExportError(f"ncnn takes float32 inputs, but input {spec.name} of {src} is {spec.dtype}.")
    if len(spec.shape) < 2 or len(spec.shape) > 5:
        raise ExportError(f"ncnn export takes inputs of 2 to 5 dimensions (a batch and at most c, d, h, w), but "
                          f"input {spec.name} of {src} has shape {spec.shape}.")
    rest = spec.shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ExportError(f"ncnn export needs static shapes except the batch, but input {spec.name} of {src} has "
                          f"shape {spec.shape}.")
    return [1, *rest]


def _run_pnnx(exe: str, folder: Path, shapes: list[list[int]], fp16: bool, src: str) -> None:
    shape_arg = ",".join("[" + ",".join(str(d) for d in s) + "]f32" for s in shapes)
    cmd = [exe, "model.onnx", f"inputshape={shape_arg}", f"fp16={int(fp16)}", "device=cpu", "optlevel=2",
           "ncnnparam=model.ncnn.param", "ncnnbin=model.ncnn.bin"]
    try:
        done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, errors="replace",
                              timeout=PNNX_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"pnnx did not convert {src} for ncnn within {PNNX_TIMEOUT_S} s.") from e
    for line in (done.stdout + done.stderr).splitlines():
        log.debug("pnnx: %s", line)
    made = all((folder / f).is_file() for f in ("model.ncnn.param", "model.ncnn.bin"))
    if done.returncode != 0 or not made:
        said = [ln.strip() for ln in done.stderr.splitlines() + done.stdout.splitlines() if ln.strip()]
        why = (f"it crashed (signal {-done.returncode})" if done.returncode < 0
               else f"it exited with status {done.returncode}" if done.returncode else "it wrote no ncnn files")
        reason = next((ln for ln in reversed(said) if "error" in ln.lower() or "not supported" in ln.lower()
                       or "failed" in ln.lower()), "")
        raise ExportError(f"pnnx could not convert {src} for ncnn: {why}" + (f" ({reason[:200]})" if reason else "")
                          + "; run with -v to see pnnx's log.")


def _declare_input_shapes(param_file: Path, shapes: list[list[int]]) -> None:
    """Write each input's per-sample shape into its ``Input`` layer (``0=w 1=h 11=d 2=c``)."""
    lines = param_file.read_text().split("\n")
    order = {f"in{i}": s[1:] for i, s in enumerate(shapes)}
    for i, line in enumerate(lines[2:], start=2):
        tokens = line.split()
        if len(tokens) == 5 and tokens[0] == "Input" and tokens[4] in order:
            dims = order[tokens[4]]
            keys = {1: ("0",), 2: ("1", "0"), 3: ("2", "1", "0"), 4: ("2", "11", "1", "0")}[len(dims)]
            lines[i] = line.rstrip() + "".join(f" {k}={d}" for k, d in zip(keys, dims))
    param_file.write_text("\n".join(lines))


def export_ncnn(source, path, *, precision: str = "fp32") -> Artifact:
    """Convert ``source`` (an fp32 ONNX :class:`Artifact` or ``.onnx`` path) with pnnx into ``path``
    (``*.ncnn.param``; the weights go to the ``.ncnn.bin`` beside it); see the module docstring."""
    check_precision(precision, ("fp32", "fp16"), fmt="ncnn")
    pnnx = require("pnnx", EXTRA, "ncnn export")
    require("ncnn", EXTRA, "ncnn export")
    path = Path(path)
    if not path.name.endswith(_SUFFIX):
        raise ExportError(f"ncnn paths end in {_SUFFIX}, got {path}.")
    if isinstance(source, Artifact):
        onnx_art = source
        if onnx_art.precision != "fp32":
            raise ExportError(f"ncnn export expects an fp32 ONNX model, got {onnx_art.precision} {onnx_art.path}.")
    elif isinstance(source, (str, os.PathLike)):
        from .onnx import describe_onnx

        onnx_art = describe_onnx(source)
    else:
        raise ExportError(f"ncnn export reads ONNX files, got {type(source).__name__}; export to ONNX first.")
    src = onnx_art.path
    if not src.endswith(".onnx") or not os.path.isfile(src):
        raise ExportError(f"ncnn export reads an existing .onnx file, got {src}.")
    shapes = [_pnnx_shape(s, src) for s in onnx_art.inputs]
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = Path(bin_path(path))
    work = Path(tempfile.mkdtemp(prefix=".ncnn-", dir=path.parent))
    try:
        shutil.copyfile(src, work / "model.onnx")
        _run_pnnx(pnnx.EXEC_PATH, work, shapes, precision == "fp16", src)
        param = read_param(work / "model.ncnn.param")
        unknown = unknown_layers(param)
        if unknown:
            ops = ", ".join(f"{t} (layer {', '.join(names[:3])})" for t, names in unknown.items())
            raise ExportError(f"ncnn cannot express op {ops}: pnnx {getattr(pnnx, '__version__', '?')} found no "
                              "ncnn layer for it.")
        hollow = hollow_reductions(param)
        if hollow:
            raise ExportError(f"pnnx {getattr(pnnx, '__version__', '?')} wrote Reduction layer {', '.join(hollow[:3])} "
                              "with no axes and reduce-all off (its conversion of a reduction over a single axis, "
                              "such as x.mean(1)), which ncnn computes as no reduction at all.")
        _declare_input_shapes(work / "model.ncnn.param", shapes)
        art = Artifact(path=os.fspath(path), format="ncnn", inputs=list(onnx_art.inputs),
                       outputs=list(onnx_art.outputs), precision=precision, parent=src)
        outputs = _run_once(work / "model.ncnn.param", art, precision, shapes)
        for stale in (path, weights):
            stale.unlink(missing_ok=True)
        try:
            os.replace(work / "model.ncnn.bin", weights)
            os.replace(work / "model.ncnn.param", path)
        except OSError as e:
            weights.unlink(missing_ok=True)
            raise ExportError(f"cannot move the ncnn files into {path.parent}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    layers: dict[str, int] = {}
    for layer in param.layers:
        layers[layer.type] = layers.get(layer.type, 0) + 1
    art.metadata.update(bin=os.fspath(weights), exporter=f"pnnx {getattr(pnnx, '__version__', '?')}",
                        runtime=f"ncnn {getattr(require('ncnn', EXTRA), '__version__', '?')}", source="onnx",
                        fp16_weights=precision == "fp16", layers=layers,
                        blobs={"inputs": [f"in{i}" for i in range(len(shapes))],
                               "outputs": [f"out{i}" for i in range(len(outputs))]})
    art.note("ncnn has no batch dimension: the runner runs one sample at a time")
    if precision == "fp16":
        art.note("fp16 weights (pnnx fp16=1) and ncnn's fp16 storage; fp16 arithmetic only on ARM CPUs with asimdhp")
    log.info("exported %s (%s, %d layers, from %s)", path, precision, len(param.layers), src)
    return art


def _run_once(param_file: Path, art: Artifact, precision: str, shapes: list[list[int]]) -> list[np.ndarray]:
    """Load the converted files and run them on zeros: a file ncnn cannot load or run is refused here."""
    try:
        with NcnnRunner(param_file, artifact=art, precision=precision, threads=1) as runner:
            outputs = runner.infer([np.zeros(s, np.float32) for s in shapes], check=False)
    except (CorruptArtifact, RuntimeError) as e:
        raise ExportError(f"ncnn cannot run what pnnx made of {art.parent}: {first_line(e)}") from e
    return list(outputs.values())


def _export_target(job: ExportJob) -> list[Product]:
    return [Product("ncnn", export_ncnn(job.source, job.folder / "model.ncnn.param", precision=job.precision))]


def _files(art: Artifact) -> list[str]:
    return [art.path, bin_path(art.path)]


def _native(precision: str, cpu: dict) -> str:
    if precision == "fp16" and "asimdhp" not in set(cpu.get("simd", ())):  # its x86 kernels have no fp16 math
        return "ncnn computes in fp16 only on ARM CPUs with asimdhp: here it stores fp16 and computes in fp32"
    return ""


TARGET = Target(
    name="ncnn", title="ncnn", runtime="ncnn", suffixes=(_SUFFIX,), source="onnx",
    export=_export_target, function="exporters.ncnn:export_ncnn",
    runner="runtimes.ncnn_runner:NcnnRunner", runner_options=lambda precision: {"precision": precision},
    requires=(("pnnx", EXTRA), ("ncnn", EXTRA)), files=_files, inspect="deploy.inspect:read_ncnn",
    precisions=("fp32", "fp16"), native=_native, mobile=True,
    bench_note={"backend": "ncnn CPU kernels, Vulkan off (x86 CPU here: no claim about ARM speed)",
                "batch": "one net call per sample of a batch: ncnn has no batch dimension"},
    description="ncnn (.ncnn.param + .ncnn.bin) converted from the ONNX file with pnnx, run on ncnn's CPU "
                "kernels; no INT8: ncnn's quantization tools (ncnn2table, ncnn2int8) are not in the PyPI wheels",
)
