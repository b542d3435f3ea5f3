"""MNN export: ``model.mnn`` converted from the verified ONNX file by MNN's own converter (MNNConvert).

Source: the ONNX target's main artifact (the simplified ONNX file that was just verified on ONNX Runtime),
so the MNN stage's parent comparison isolates MNN's conversion. The converter is the compiled
``_tools.mnnconvert`` of the ``MNN`` wheel, called with its command line (``-f ONNX --modelFile ...
--MNNModel ...``) in a child Python process: MNN's tools print from C++, report failure only in what they
print (the call returns True either way), and can abort the process (its quantizer segfaults on some
inputs), so the child's exit status, its output and the written file are checked here. The Python
wrappers in ``MNN.tools`` are never imported: after a conversion they send the model's size, the
arguments and this machine's id to Alibaba's log service (``MNN/tools/utils/log.py``, which also runs
``pip install`` when its SDK is missing). The compiled converter and quantizer make no network call
(their only HTTP code is the LLM media downloader of the same library, which they never reach).

Precisions:

- **fp32**: the converter's default graph optimizations (level 1: only rewrites valid for every input);
  MNN fuses a following ReLU into its convolution and turns a MatMul with constant weights into a 1x1
  convolution.
- **fp16**: ``--fp16`` stores convolution weights and biases as half floats (about half the file). It is
  storage, not arithmetic, on x86: MNN computes fp16 only on ARMv8.2 CPUs (its Arm82 backend, runtime
  precision "low"); on x86 the weights are widened to fp32 at load (see ``runtimes.mnn_runner``).
- **int8**: ``exporters.mnn_int8`` (MNN's offline quantization tool on the fp32 ``.mnn``).

MNN's converter ignores the ``axes`` input of ReduceL1, ReduceL2, ReduceSumSquare and ReduceLogSum (ONNX opset
18 moved ``axes`` from an attribute to an input) and reduces over every axis: ``F.normalize`` (XCiT's attention)
came out 0.89 off, ``x.norm(dim=-1)`` 5.9 (measured with MNN 3.x; ReduceSum, ReduceMean, ReduceMax, ReduceMin
and ReduceProd read their axes input). The converter is given a copy of the ONNX file where each of those is
written with ReduceSum, which it reads correctly (:func:`mnn_readable`): ``sqrt(sum(x*x))``, ``sum(x*x)``,
``sum(|x|)``, ``log(sum(x))``, the same functions. (ReduceLogSumExp has the same fault and is left as it is: no
model here uses it, and the stage's verification would fail on it.)

The file is read back with MNN's runtime (run once on zeros) for its input and output specs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from runtimes.core import Artifact, CorruptArtifact, ExportError, TensorSpec, check_precision, require_installed

from .targets import ExportJob, Product, Target

__all__ = ["export_mnn", "describe_mnn", "run_tool", "dump_json", "parse_dump", "int8_summary", "last_message",
           "mnn_readable", "nonfinite_scales", "EXTRA", "TARGET", "MAX_JSON_BYTES"]

log = logging.getLogger(__name__)
EXTRA = "mnn"
BIZ_CODE = "reparam-deploy"  # the model flag MNN stores in the file
TOOL_TIMEOUT_S = 1800
MAX_JSON_BYTES = 128 * 2**20  # the largest .mnn file dump_json turns into JSON (its text is ~3x the file)


def run_tool(tool: str, argv: list[str], what: str, *, cwd: str | None = None) -> str:
    """Run MNN's compiled tool ``_tools.<tool>(argv)`` (``mnnconvert`` or ``mnnquant``) in a child Python process
    and return what it printed (also logged at debug level); :class:`ExportError` when it crashed or hung."""
    require_installed("_tools", EXTRA, what)
    code = f"import json, sys\nimport _tools\n_tools.{tool}(json.loads(sys.argv[1]))\n"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], cwd=cwd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"{what} did not finish in {TOOL_TIMEOUT_S} s; MNN's {tool} was stopped.") from e
    text = proc.stdout.decode(errors="replace").replace("\r", "\n")
    for line in text.splitlines():
        if line.strip():
            log.debug("MNN %s: %s", tool, line.rstrip())
    if proc.returncode:
        why = (f"crashed ({signal.Signals(-proc.returncode).name})" if proc.returncode < 0
               else f"exited with status {proc.returncode}")
        last = last_message(text)
        raise ExportError(f"{what} failed: MNN's {tool} {why}" + (f" after printing '{last}'" if last else "") + ".")
    return text


def last_message(text: str) -> str:
    lines = [re.sub(r"^\[[\d:]+\] [@:]?\s*\d+:\s*", "", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("The device supports") and not ln.endswith("%")]
    return lines[-1].rstrip(".") if lines else ""


def describe_mnn(path, *, precision: str = "fp32", parent: str | None = None,
                 template: Artifact | None = None) -> Artifact:
    """An artifact record for a ``.mnn`` file, read back (and run once on zeros) through MNN's runtime; names and
    symbolic dimensions come from ``template`` (the ONNX source) where it has as many tensors."""
    import numpy as np

    from runtimes.mnn_runner import MNNRunner

    with MNNRunner(path, precision=precision, artifact=template) as runner:  # the template's output order
        specs = runner.get_input_specs()
        outs = runner.infer({s.name: np.zeros(s.concrete_shape(1), s.dtype) for s in specs})
    inputs = list(specs)
    outputs = [TensorSpec(n, tuple(o.shape), o.dtype.name) for n, o in outs.items()]
    if template is not None:
        if len(template.inputs) == len(inputs):
            inputs = [TensorSpec(t.name, _symbolic(t.shape, s.shape), s.dtype) for t, s in zip(template.inputs, inputs)]
        if len(template.outputs) == len(outputs):
            outputs = [TensorSpec(t.name, _symbolic(t.shape, s.shape), s.dtype)
                       for t, s in zip(template.outputs, outputs)]
    return Artifact(path=os.fspath(path), format="mnn", inputs=inputs, outputs=outputs, precision=precision,
                    parent=parent)


def _symbolic(declared, found) -> tuple:
    """``found`` (the shape MNN reports at its default size) with the dimensions ``declared`` leaves open (a
    dynamic batch: MNN runs any batch when the model is loaded with mutable shapes)."""
    if len(declared) != len(found):
        return tuple(found)
    return tuple(d if not isinstance(d, int) else f for d, f in zip(declared, found))


def export_mnn(source, path, *, precision: str = "fp32") -> Artifact:
    """Convert ``source`` (an fp32 ONNX :class:`Artifact` or ``.onnx`` path) into an MNN model at ``path``; see the
    module docstring."""
    check_precision(precision, ("fp32", "fp16"), fmt="MNN (int8: exporters.mnn_int8.quantize_mnn)")
    require_installed("MNN", EXTRA, "MNN export")
    src_path = source.path if isinstance(source, Artifact) else os.fspath(source)
    if not src_path.endswith(".onnx"):
        raise ExportError(f"MNN export reads ONNX files, got {src_path}.")
    if isinstance(source, Artifact) and source.precision != "fp32":
        raise ExportError(f"MNN export expects an fp32 ONNX model, got {source.precision} {src_path}.")
    if not os.path.isfile(src_path):
        raise ExportError(f"MNN export cannot read {src_path}: it does not exist.")
    path = Path(path)
    if path.suffix != ".mnn":
        raise ExportError(f"MNN model paths end in .mnn, got {path}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    readable = path.with_name(path.name + ".in.onnx")
    try:
        given = mnn_readable(src_path, readable) or src_path
        argv = ["MNNConvert", "-f", "ONNX", "--modelFile", os.path.abspath(given), "--MNNModel",
                os.path.abspath(partial), "--bizCode", BIZ_CODE] + (["--fp16"] if precision == "fp16" else [])
        text = run_tool("mnnconvert", argv, f"MNN's conversion of {src_path}")
        if not partial.is_file() or partial.stat().st_size == 0 or "Converted Success" not in text:
            raise ExportError(_conversion_failure(src_path, text))
        os.replace(partial, path)
    finally:
        for leftover in (partial, readable, readable.with_name(readable.name + ".data")):
            leftover.unlink(missing_ok=True)
    try:
        art = describe_mnn(path, precision=precision, parent=src_path,
                           template=source if isinstance(source, Artifact) else None)
    except CorruptArtifact as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"MNN converted {src_path} but cannot load the result: {e}") from e
    art.metadata.update(source="onnx", exporter=f"MNNConvert {_version()}", fp16_weights=precision == "fp16")
    if precision == "fp16":
        art.note("fp16 weights (MNNConvert --fp16); MNN computes in fp16 only on ARMv8.2 CPUs, so on x86 the "
                 "weights are widened to fp32 at load and the arithmetic is fp32")
    log.info("exported %s (%s, from %s)", path, precision, src_path)
    return art


_AXES_IGNORED = {"ReduceL1": ("Abs", None), "ReduceL2": ("Mul", "Sqrt"), "ReduceSumSquare": ("Mul", None),
                 "ReduceLogSum": (None, "Log")}  # what comes before and after a ReduceSum of the same axes


def mnn_readable(src_path: str, out: Path) -> Path | None:
    """Write to ``out`` a copy of the ONNX file at ``src_path`` whose reductions MNN's converter reads right (see the
    module docstring), and return ``out``; None (nothing written) when the file has none to rewrite."""
    import onnx
    from onnx import helper

    def misread(n) -> bool:  # a reduction of those whose axes come as an input
        return n.op_type in _AXES_IGNORED and len(n.input) > 1 and bool(n.input[1])

    model = onnx.load(src_path, load_external_data=False)  # the graph first: most files need no rewrite
    if not any(misread(n) for n in model.graph.node):
        return None
    model = onnx.load(src_path)
    graph = model.graph
    nodes = []
    for n in graph.node:
        if not misread(n):
            nodes.append(n)
            continue
        before, after = _AXES_IGNORED[n.op_type]
        stem = f"{n.name or n.output[0]}.mnn"
        x = n.input[0]
        if before:
            inputs = [x, x] if before == "Mul" else [x]
            nodes.append(helper.make_node(before, inputs, [f"{stem}.in"], name=f"{stem}.pre"))
            x = f"{stem}.in"
        reduced = f"{stem}.sum" if after else n.output[0]
        nodes.append(helper.make_node("ReduceSum", [x, n.input[1]], [reduced], name=f"{stem}.sum",
                                      **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
        if after:
            nodes.append(helper.make_node(after, [reduced], [n.output[0]], name=f"{stem}.post"))
    del graph.node[:]
    graph.node.extend(nodes)
    if model.ByteSize() > 2**31 - 2**24:  # protobuf's 2 GB limit: the weights go beside it
        onnx.save_model(model, os.fspath(out), save_as_external_data=True, location=out.name + ".data")
    else:
        onnx.save_model(model, os.fspath(out))
    return out


def _conversion_failure(src_path: str, text: str) -> str:
    unsupported = re.search(r"These Op Not Support:\s*(.+)", text)
    if unsupported:
        ops = [op.split("::")[-1] for op in unsupported.group(1).split()]
        return (f"MNN cannot convert {src_path}: its converter does not support the ONNX op(s) "
                f"{', '.join(ops)}.")
    last = last_message(text)
    return f"MNN cannot convert {src_path}: " + (f"its converter said '{last}'." if last else "it wrote no model.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("MNN")
    except PackageNotFoundError:
        return "?"


_NONFINITE = re.compile(r"(?<=[\s:\[,])(-?)(nan|inf)(?=[\s,\]}])")  # C++'s spelling of NaN and infinity


def parse_dump(text: str, *, values: bool = False):
    """MNN's JSON dump as Python: C++'s ``nan``/``-nan``/``inf`` read as NaN and infinity (not valid JSON), which
    stay themselves; every finite float is one shared 0.0 unless ``values``."""
    text = _NONFINITE.sub(_json_constant, text)
    return json.loads(text) if values else json.loads(text, parse_float=lambda _: _ZERO)


def _json_constant(m: re.Match) -> str:
    return "NaN" if m.group(2) == "nan" else "-Infinity" if m.group(1) else "Infinity"


def nonfinite_scales(model: dict) -> list[str]:
    """The ops of an MNN model (from :func:`dump_json`) with a NaN or infinite quantization scale: in their own
    quantization parameters, or on a tensor they write (``extraTensorDescribe``)."""
    def bad(value) -> bool:
        if isinstance(value, dict):
            return any(bad(v) for k, v in value.items() if "scale" in k.lower() or isinstance(v, dict))
        return isinstance(value, float) and not math.isfinite(value)

    tensors = {d.get("index") for d in model.get("extraTensorDescribe") or [] if bad(d.get("quantInfo") or {})}
    return [str(op.get("name", "?")) for op in model["oplists"]
            if bad(op.get("main") or {}) or tensors & set(op.get("outputIndexes") or [])]


class _Zero(float):
    """What :func:`dump_json` keeps of a floating-point value: nothing but its place (one shared object)."""


_ZERO = _Zero(0.0)


def dump_json(path, *, values: bool = False) -> dict:
    """The model in the ``.mnn`` file ``path`` as MNN's JSON dump (``MNNConvert -f MNN --JsonFile``): ops
    (``oplists``: type, name, input/output tensor indexes, parameters), ``tensorName``, ``outputName``,
    ``extraTensorDescribe`` (quantization of tensors). Floating-point values are replaced by one shared 0.0
    unless ``values`` (only their count matters to the summaries). Refuses files over :data:`MAX_JSON_BYTES`."""
    path = os.fspath(path)
    from runtimes.base import check_file

    check_file(path, "MNN")
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ExportError(f"MNN file {path} is {size / 2**20:.0f} MiB; reading its structure goes through MNN's JSON "
                          f"dump, which is only done for files up to {MAX_JSON_BYTES // 2**20} MiB.")
    from runtimes.mnn_runner import load_mnn

    load_mnn(path)  # the runtime checks the flatbuffer; MNN's dump crashes on a corrupt file instead of saying so
    with tempfile.TemporaryDirectory(prefix="mnn-json-") as tmp:
        out = os.path.join(tmp, "model.json")
        text = run_tool("mnnconvert", ["MNNConvert", "-f", "MNN", "--modelFile", os.path.abspath(path),
                                       "--JsonFile", out], f"MNN's JSON dump of {path}")
        if not os.path.isfile(out) or os.path.getsize(out) == 0:
            raise CorruptArtifact(f"MNN file {path} is corrupt or not a valid MNN model "
                                  f"({last_message(text) or 'MNN could not read it'}).")
        with open(out, encoding="utf-8") as f:
            model = parse_dump(f.read(), values=values)
    if not isinstance(model, dict) or not isinstance(model.get("oplists"), list):
        raise CorruptArtifact(f"MNN file {path} is corrupt or not a valid MNN model (its dump holds no op list).")
    return model


CONV_TYPES = ("Convolution", "ConvolutionDepthwise", "Deconvolution", "DeconvolutionDepthwise", "ConvInt8",
              "DepthwiseConvInt8")


def _is_int8_conv(op: dict) -> bool:
    main = op.get("main") or {}
    sym = main.get("symmetricQuan") or {}
    return op.get("type") in ("ConvInt8", "DepthwiseConvInt8") or sym.get("outputDataType") == "DT_INT8"


def int8_summary(model: dict) -> dict:
    """What runs in int8 in an MNN model (from :func:`dump_json`): convolutions with int8 weights and int8
    inputs/outputs, tensors MNN stores as int8, and the conversions between float and int8."""
    convs = [op for op in model["oplists"] if op.get("type") in CONV_TYPES]
    int8 = [op for op in convs if _is_int8_conv(op)]
    int8_weights = [op for op in convs if ((op.get("main") or {}).get("quanParameter") or {}).get("aMaxOrBits") == 8]
    tensors = sum(1 for t in model.get("extraTensorDescribe") or []
                  if ((t or {}).get("quantInfo") or {}).get("type") == "DT_INT8")
    ops = Counter(op.get("type", "?") for op in model["oplists"])
    return {"convolutions": len(convs), "int8_convolutions": len(int8), "int8_weight_convolutions": len(int8_weights),
            "float_convolutions": [op.get("name", "?") for op in convs if not _is_int8_conv(op)],
            "int8_tensors": tensors, "float_to_int8": ops.get("FloatToInt8", 0),
            "int8_to_float": ops.get("Int8ToFloat", 0)}


def _export_target(job: ExportJob) -> list[Product]:
    return [Product("mnn", export_mnn(job.source, job.folder / "model.mnn", precision=job.precision))]


def _native(precision: str, cpu: dict) -> str:
    if precision == "fp16" and "asimdhp" not in set(cpu.get("simd", ())):
        return ("MNN computes fp16 only on ARMv8.2 CPUs (its Arm82 backend); here an fp16 .mnn holds fp16 weights "
                "and computes in fp32")
    return ""


def _runner_options(precision: str) -> dict:
    return {"precision": precision}


TARGET = Target(
    name="mnn", title="MNN", runtime="mnn", suffixes=(".mnn",), source="onnx",
    export=_export_target, function="exporters.mnn:export_mnn",
    runner="runtimes.mnn_runner:MNNRunner", runner_options=_runner_options,
    requires=(("MNN", EXTRA),), precisions=("fp32", "fp16", "int8"),
    quantize="exporters.mnn_int8:quantize_mnn", native=_native, inspect="deploy.inspect:read_mnn",
    mobile=True,
    bench_note={"backend": "MNN CPU (x86 here: AVX2/AVX-512 kernels; no claim about ARM speed)",
                "precision": "runtime precision 'high' (fp32, int8) or 'low' (fp16: fp32 arithmetic on x86)",
                "convolution": "fp32: Winograd 3x3 off (direct, as verified); fp16, int8: MNN's default"},
    description="MNN model converted from the ONNX file by MNNConvert, run on MNN's CPU runtime",
)
