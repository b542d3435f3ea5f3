"""``deploy doctor RUN_DIR [--stage NAME]``: where a stage of a ``deploy convert`` run loses accuracy or fails.

The stage is ``--stage``, else every stage that failed or whose files changed since conversion. Each gets
one :class:`Diagnosis` (a table and one sentence of conclusion), by case:

1. **An fp32 (or fp16) stage that disagrees** (:func:`first_divergence`): every intermediate tensor of its
   ONNX file is made a graph output of an in-memory copy and run on ONNX Runtime; the plain graph
   (``model.deploy.pt2``, loaded by ``runtimes.safe_load.load_program``, which refuses pickles) runs in a
   ``torch.fx.Interpreter`` that records every node's output. The exporter names ONNX tensors after the fx
   nodes (node ``node_conv2d_3``, output ``conv2d_3``; weights ``features_3_weight``), so tensors are matched by
   name, and the graph outputs by position. Walking the ONNX nodes in topological order, the first node whose
   output fails ``max|a - b| <= rtol · max|a| + atol`` (the stage's tolerance, from ``report.json``) is the
   divergence; its inputs (activations and weights) are shown with their own errors. The inputs are the
   run's recorded ``verify/inputs.npz`` and the first held-out samples (``verify/samples.npz``). OpenVINO's
   tensors (each op's outputs added as results) keep their ONNX names and are matched the same way.
   A TFLite file is made from the plain program by litert-torch, not from ONNX (:func:`tflite_divergence`):
   it runs on LiteRT's builtin kernels with ``experimental_preserve_all_tensors`` (the XNNPACK delegate hides
   the tensors inside it), and its ops are walked in execution order. litert-torch names a tensor after the
   ``nn_module_stack`` of the fx nodes it was lowered from (``Class_name/Class_name;``, fused locations joined),
   not after the nodes, so an op's output is matched with the one plain node that has one of those locations,
   is an aten op the TFLite op computes (``CONV_2D``: a convolution; a fused ``RELU``: the relu using it) and
   takes the nodes the op's inputs carry (transposes, reshapes, pads carry their input's); the graph outputs
   (renamed after the signature) by position. An op with no such node, or several, is left unmatched and
   counted; nothing is matched by value. NHWC tensors are compared with the plain NCHW tensor permuted, a
   convolution's OHWI weights with its OIHW parameters permuted. A stage in another format is diagnosed
   through the ONNX file it was converted from; the intermediates of the other formats are not compared yet
   (the table says so).
2. **An INT8 stage** (:func:`int8_scope`): the per-layer table of ``runtimes.int8.layer_errors`` (dB each
   layer loses, output SQNR), measured again on the ONNX Runtime QDQ model of the run when there is one, else
   the table ``report.json`` recorded; the float scope is the fallback the run recorded (``--int8-fallback
   auto``), else the worst layers the ranking suggests.
3. **An export or runtime failure** (:func:`reduce_onnx`): the smallest failing subgraph, as Polygraphy's
   ``debug reduce``: the ONNX file's nodes in topological order are bisected (the shortest failing prefix,
   then the shortest failing suffix of it); each candidate's cut tensors become graph inputs, typed and shaped
   by ONNX shape inference, and the failing target converts and loads it in a forked process (a crash or a
   hang is a failure too, bounded by a timeout). A candidate "still fails" when its error's first line is the
   same once paths and numbers are blanked. The smallest one is written to ``doctor/reduced.onnx``.

A run directory is untrusted input: paths go through ``deploy.record.inside``, arrays through
``deploy.resources.read_npz`` (no pickles), the plain graph through ``load_program`` (refused when it would
unpickle, unless ``trust_pickle``), and an ONNX file that keeps its weights in external files is refused.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporters import targets as registry
from runtimes.core import CorruptArtifact, first_line, require

from .record import PipelineError, RunRecord, StageRecord, inside, load_record

__all__ = ["Diagnosis", "doctor", "first_divergence", "int8_scope", "reduce_onnx", "Reduction", "target_check"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

SAMPLES = 8  # held-out samples fed with the seeded inputs when comparing intermediates
MAX_CHECKS = 40  # runtime checks of one reduction
CHECK_TIMEOUT = 60.0  # seconds of one check
TABLE_ROWS = 12  # rows of a table before the rest is summed up in a note
_OV_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}  # OpenVINO's inference precision of a stage


def _noop(_: str) -> None:
    pass


@dataclass
class Diagnosis:
    """What doctor found about one stage: a table, one sentence of conclusion, notes and the numbers."""

    stage: str
    kind: str  # "divergence", "int8", "failure", "pass", "not diagnosed"
    headers: list[str]
    rows: list[list]
    conclusion: str
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON values: a non-finite number becomes the string "inf", "-inf" or "nan"."""
        return _plain(asdict(self))


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ the command

def doctor(run_dir: str | os.PathLike, *, stage: str | None = None, out: str | os.PathLike | None = None,
           trust_pickle: bool = False, samples: int = SAMPLES, max_checks: int = MAX_CHECKS,
           check_timeout: float = CHECK_TIMEOUT, progress: Progress | None = None) -> list[Diagnosis]:
    """One :class:`Diagnosis` per stage to look at (see the module docstring); ``out`` is where a reduced
    subgraph is written (default ``RUN_DIR/doctor``)."""
    progress = progress or _noop
    root = Path(run_dir)
    record = load_record(root)
    if stage is not None:
        chosen = record.stage(stage)
        if chosen is None:
            raise PipelineError(f"{root} has no stage {stage!r}; its stages are "
                                f"{', '.join(s.name for s in record.stages)}")
        if chosen.name == "training":
            raise PipelineError("the training stage is the reference every stage is compared with; name another "
                                "--stage")
        stages = [chosen]
    else:
        stages = [s for s in record.stages[1:] if s.failed or _changed(s, root)]
        if not stages:
            names = ", ".join(s.name for s in record.stages[1:])
            return [Diagnosis("-", "pass", ["stage", "result"], [[s.name, "pass"] for s in record.stages[1:]],
                              f"every stage of {root} passes ({names}) and no file changed since conversion: "
                              "nothing to diagnose (name one with --stage to look at it anyway)")]
    out_dir = Path(out) if out is not None else root / "doctor"
    result = []
    for s in stages:
        progress(f"diagnosing {s.name} ({s.path or 'not written'}) ...")
        result.append(_diagnose(record, root, s, out_dir, trust_pickle=trust_pickle, samples=samples,
                                max_checks=max_checks, check_timeout=check_timeout, progress=progress))
    return result


def _changed(stage: StageRecord, root: Path) -> list[str]:
    if stage.export.error:
        return []
    missing, changed = stage.files.check(root)
    return missing + changed


def _runtime_error(stage: StageRecord) -> str:
    """The error the stage's runtime raised when verification ran it ("" when it ran)."""
    for check in (stage.verification.checks or {}).values():
        if isinstance(check, dict) and check.get("error"):
            return str(check["error"])
    return ""


def _diagnose(record: RunRecord, root: Path, stage: StageRecord, out_dir: Path, **kw) -> Diagnosis:
    changed = _changed(stage, root)
    if stage.export.error or _runtime_error(stage):
        d = _failure(record, root, stage, out_dir, **{k: kw[k] for k in ("max_checks", "check_timeout",
                                                                          "progress")})
    elif stage.precision == "int8":
        d = int8_scope(record, root, stage, progress=kw["progress"])
    else:
        d = _divergence(record, root, stage, trust_pickle=kw["trust_pickle"], samples=kw["samples"],
                        progress=kw["progress"])
    if changed:
        d.notes.insert(0, f"{', '.join(changed)} changed since conversion (sha256 differs from report.json): "
                          "diagnosed as it is now")
        d.details["changed"] = changed
    return d


# ------------------------------------------------------------------------------------------ the inputs

def _inputs(record: RunRecord, root: Path, samples: int) -> np.ndarray:
    """The recorded seeded inputs and the first ``samples`` held-out samples, as one (N, ...) array."""
    from .resources import read_npz

    arrays = []
    files = [("verify/inputs.npz", None)] + ([("verify/samples.npz", samples)] if samples else [])
    for rel, limit in files:
        path = inside(root, rel, "a reference file")
        if not path.is_file():
            continue
        try:
            data = read_npz(path, "the recorded inputs")
        except (OSError, ValueError) as e:
            raise CorruptArtifact(f"{path} cannot be read ({first_line(e)}); rerun deploy convert") from e
        x = next((v for k, v in data.items() if k not in ("labels", "gt_boxes", "gt_classes")), None)
        if x is not None:
            arrays.append(np.asarray(x[:limit] if limit else x, dtype=np.float32))
    if not arrays:
        raise PipelineError(f"{root} holds no verify/inputs.npz; rerun deploy convert")
    shape = arrays[0].shape[1:]
    return np.concatenate([a for a in arrays if a.shape[1:] == shape])


def _onnx_model(path: Path):
    """The ONNX model at ``path``, refused when it keeps weights in external files (which could be anywhere)."""
    onnx = require("onnx", "onnx", "deploy doctor")
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own errors
        raise CorruptArtifact(f"{path} is not a readable ONNX file ({first_line(e)}); rerun deploy convert") from e
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise CorruptArtifact(f"{path} keeps weights in external files, which a run never writes: refused; rerun "
                              "deploy convert")
    return model


def _onnx_stage(record: RunRecord, stage: StageRecord) -> StageRecord | None:
    """``stage`` when it is an ONNX file, else the nearest ONNX stage it was converted from."""
    seen = set()
    s = stage
    while s is not None and s.name not in seen:
        if s.format == "onnx" and not s.export.error and s.export.artifact is not None:
            return s
        seen.add(s.name)
        s = record.stage(s.parent) if s.parent else None
    return None


def _tolerance(record: RunRecord, stage: StageRecord) -> tuple[float, float]:
    tol = record.tolerance or {}
    rtol = tol.get("rtol") or (tol.get("default_rtol") or {}).get(stage.precision)
    from runtimes.compare import DEFAULT_RTOL

    return float(rtol if rtol is not None else DEFAULT_RTOL.get(stage.precision, 1e-5)), float(tol.get("atol") or 0)


# ------------------------------------------------------------------------------- case 1: fp32 divergence

def _plain_graph(record: RunRecord, root: Path, trust_pickle: bool):
    from runtimes.safe_load import load_program

    pt2 = record.stage("pt2")
    if pt2 is None or pt2.export.artifact is None:
        raise PipelineError(f"{root} has no plain graph (model.deploy.pt2) to compare with; rerun deploy convert")
    return load_program(pt2.export.artifact_in(root).path, trust_pickle=trust_pickle)


def _record_plain(program, x: np.ndarray, batch: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every node's output of the plain graph on the rows of ``x`` (by fx node name, concatenated over
    chunks of ``batch``), and the names of its output leaves in order."""
    import torch

    gm = program.module()
    seen: dict[str, list[np.ndarray]] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and (n.op != "get_attr"
                                                                                  or n.name not in seen):
                seen.setdefault(n.name, []).append(value.detach().float().numpy().copy())
            return value

    for chunk, _ in _chunks(x, batch):
        with torch.no_grad():
            Recorder(gm).run(torch.from_numpy(chunk))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out_node.args[0])
    names = [n.name for n in leaves if isinstance(n, torch.fx.Node)]
    return {k: np.concatenate(v) if v[0].ndim and len(v) > 1 else v[0] for k, v in seen.items()}, names


def _chunks(x: np.ndarray, batch: int):
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        if len(part) < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
        yield np.ascontiguousarray(part, dtype=np.float32), i


def _run_onnx_all(model, x: np.ndarray, batch: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every float tensor of ``model`` (node outputs made graph outputs of a copy) on the rows of ``x``."""
    onnx = require("onnx", "onnx", "deploy doctor")
    ort = require("onnxruntime", "onnx", "deploy doctor")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(copy)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    have = {o.name for o in copy.graph.output}
    for node in copy.graph.node:
        for name in node.output:
            if name and name not in have and types.get(name) in floats:
                copy.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
                have.add(name)
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {}
    for chunk, _ in _chunks(x, batch):
        for name, value in zip(names, session.run(None, {feed: chunk})):
            chunks.setdefault(name, []).append(np.asarray(value))
    return ({k: np.concatenate(v) if v[0].ndim else v[0] for k, v in chunks.items()},
            [o.name for o in model.graph.output])


def _run_openvino_all(path: str, x: np.ndarray, batch: int, precision: str) -> dict[str, np.ndarray]:
    """Every named tensor of the OpenVINO IR at ``path`` (each op's outputs added as results) on the rows of
    ``x``, compiled for the CPU with the stage's inference precision. OpenVINO keeps the ONNX tensor names."""
    ov = require("openvino", "openvino", "deploy doctor on an OpenVINO stage")
    from runtimes.openvino_runner import read_ir

    core = ov.Core()
    model = read_ir(core, path)
    outs = [o for op in model.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Result", "Constant")
            for o in op.outputs() if o.get_names()]
    model.add_outputs(outs)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": _OV_HINTS.get(precision, "f32")})
    chunks: dict[str, list[np.ndarray]] = {}
    for chunk, _ in _chunks(x, batch):
        for port, value in compiled(chunk).items():
            for name in port.get_names():
                chunks.setdefault(name, []).append(np.asarray(value))
    return {k: np.concatenate(v) if v[0].ndim else v[0] for k, v in chunks.items()}


def _error(ref: np.ndarray, test: np.ndarray, rtol: float, atol: float) -> dict:
    """``max_rel = max|ref - test| / max|ref|`` (runtimes.compare's measure) and whether it passes."""
    a, b = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    if a.shape != b.shape:
        if a.size != b.size:
            return {"comparable": False, "reason": f"shape {list(b.shape)} vs {list(a.shape)}"}
        b = b.reshape(a.shape)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        bad = int(np.sum(~np.isfinite(b)))
        return {"comparable": True, "max_abs": math.inf, "max_rel": math.inf, "passed": False,
                "reason": f"{bad} non-finite value(s)"}
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return {"comparable": True, "max_abs": diff, "max_rel": rel, "passed": diff <= rtol * scale + atol}


def first_divergence(model, program_values: dict[str, np.ndarray], plain_outputs: list[str],
                     onnx_values: dict[str, np.ndarray], rtol: float, atol: float = 0.0, *,
                     weights: bool = True) -> dict:
    """The first node of the ONNX ``model`` (topological order) whose output differs from the plain graph's
    tensor of the same name beyond ``rtol``/``atol``: ``{"compared": [...], "first": row or None}``; each row
    ``{"tensor", "node", "op", "max_rel", "passed", "inputs": [{"tensor", "max_rel", "passed", "kind"}]}``.
    ``weights``: compare the model's initializers with the plain graph's parameters too."""
    from onnx import numpy_helper

    outputs = [o.name for o in model.graph.output]
    alias = dict(zip(outputs, plain_outputs)) if len(outputs) == len(plain_outputs) else {}
    inits = {i.name: i for i in model.graph.initializer}
    errors: dict[str, dict] = {}

    def plain(name):
        return program_values.get(alias.get(name, name))

    def error_of(name):
        if name in errors:
            return errors[name]
        ref = plain(name)
        if ref is None:
            return None
        if name in inits:
            if not weights:
                return None
            value = numpy_helper.to_array(inits[name])
        elif name in onnx_values:
            value = onnx_values[name]
        else:
            return None
        e = _error(ref, value, rtol, atol)
        errors[name] = e if e.get("comparable") else None
        return errors[name]

    compared = []
    for node in model.graph.node:
        for name in node.output:
            e = error_of(name) if name else None
            if e is None:
                continue
            inputs = []
            for i in node.input:
                ie = error_of(i) if i else None
                if ie is not None:
                    inputs.append({"tensor": i, "kind": "weight" if i in inits else "activation",
                                   "max_rel": ie["max_rel"], "passed": ie["passed"]})
            row = {"tensor": name, "node": node.name, "op": node.op_type, "max_rel": e["max_rel"],
                   "passed": e["passed"], "inputs": inputs, **({"reason": e["reason"]} if "reason" in e else {})}
            compared.append(row)
            if not e["passed"]:
                return {"compared": compared, "first": row}
    return {"compared": compared, "first": None}


# ------------------------------------------------------------------- case 1, TFLite: intermediates by location

_TFL_FLOATS = (0, 1, 10)  # TensorType FLOAT32, FLOAT16, FLOAT64
# ops that move or re-type values and compute no layer: their output carries their input's plain-graph node
_TFL_CARRY = frozenset({"RESHAPE", "TRANSPOSE", "PAD", "PADV2", "DEQUANTIZE", "SQUEEZE", "EXPAND_DIMS"})
_TFL_NHWC = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "MAX_POOL_2D", "AVERAGE_POOL_2D", "L2_POOL_2D",
                       "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"})  # TFLite kernels with NHWC outputs only
_TFL_COMPUTES = {  # the aten ops (by overload packet name) whose result a TFLite op computes
    "CONV_2D": {"conv2d", "convolution", "_convolution"},
    "DEPTHWISE_CONV_2D": {"conv2d", "convolution", "_convolution"},
    "TRANSPOSE_CONV": {"conv_transpose2d", "convolution", "_convolution"},
    "FULLY_CONNECTED": {"linear", "addmm", "mm", "matmul"},
    "BATCH_MATMUL": {"matmul", "bmm", "mm"},
    "ADD": {"add"}, "SUB": {"sub", "rsub"}, "MUL": {"mul"}, "DIV": {"div"},
    "MAXIMUM": {"maximum", "clamp_min"}, "MINIMUM": {"minimum", "clamp_max"},
    "MEAN": {"mean", "adaptive_avg_pool2d", "avg_pool2d"}, "SUM": {"sum"},
    "AVERAGE_POOL_2D": {"avg_pool2d", "adaptive_avg_pool2d"}, "MAX_POOL_2D": {"max_pool2d", "max_pool2d_with_indices"},
    "RELU": {"relu"}, "RELU6": {"relu6", "hardtanh", "clamp"}, "LOGISTIC": {"sigmoid"}, "TANH": {"tanh"},
    "HARD_SWISH": {"hardswish"}, "GELU": {"gelu"}, "LEAKY_RELU": {"leaky_relu"}, "PRELU": {"prelu"},
    "SOFTMAX": {"softmax", "_softmax"}, "CONCATENATION": {"cat", "concat"}, "EXP": {"exp"}, "SQRT": {"sqrt"},
    "RSQRT": {"rsqrt"}, "RESIZE_BILINEAR": {"upsample_bilinear2d"},
    "RESIZE_NEAREST_NEIGHBOR": {"upsample_nearest2d"},
}
_TFL_FUSED = {1: ("RELU", {"relu"}), 2: ("RELU_N1_TO_1", {"hardtanh", "clamp"}),
              3: ("RELU6", {"relu6", "hardtanh", "clamp"}), 4: ("TANH", {"tanh"})}  # ActivationFunctionType
# a weighted op's (weight, bias) inputs 1 and 2 are the plain graph's args 1 and 2, the weight permuted so
_TFL_WEIGHTS = {"CONV_2D": (0, 2, 3, 1), "DEPTHWISE_CONV_2D": (1, 2, 3, 0), "FULLY_CONNECTED": (0, 1)}


@dataclass
class _TflOp:
    index: int
    name: str
    inputs: list[int]
    outputs: list[int]
    fused: int  # ActivationFunctionType, 0 when none


@dataclass
class _TflGraph:
    names: list[str]
    shapes: list[tuple]
    floats: set[int]
    constants: set[int]  # tensors with data in the file, and what only constants feed (a DEQUANTIZE of one)
    ops: list[_TflOp]
    inputs: list[int]
    outputs: list[int]
    signature_outputs: dict[str, int]  # the first signature's output names and tensors


def _tflite_graph(path: str) -> _TflGraph:
    """The first subgraph of the ``.tflite`` file at ``path``: its ops in execution order, tensor names and shapes
    (read from the flatbuffer with the schema ``ai_edge_litert`` ships)."""
    schema = require("ai_edge_litert.schema_py_generated", "tflite", "deploy doctor")
    data = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(data, 0)
        sg = model.Subgraphs(0)
        codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        options = {v: k for k, v in vars(schema.BuiltinOptions).items() if not k.startswith("_")}
        names, shapes, floats, constants = [], [], set(), set()
        for i in range(sg.TensorsLength()):
            t = sg.Tensors(i)
            names.append((t.Name() or b"").decode("utf-8", "replace"))
            shapes.append(tuple(int(v) for v in t.ShapeAsNumpy()) if t.ShapeLength() else ())
            if t.Type() in _TFL_FLOATS:
                floats.add(i)
            buf = model.Buffers(t.Buffer()) if t.Buffer() else None
            if buf is not None and (buf.DataLength() or buf.Offset()):
                constants.add(i)
        ops = []
        for k in range(sg.OperatorsLength()):
            op = sg.Operators(k)
            code = model.OperatorCodes(op.OpcodeIndex())
            name = codes.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            fused = 0
            table = op.BuiltinOptions()
            kind = options.get(op.BuiltinOptionsType())
            if table is not None and kind and hasattr(schema, kind):
                opts = getattr(schema, kind)()
                opts.Init(table.Bytes, table.Pos)
                fused = int(opts.FusedActivationFunction()) if hasattr(opts, "FusedActivationFunction") else 0
            ins = [int(v) for v in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(v) for v in op.OutputsAsNumpy()] if op.OutputsLength() else []
            ops.append(_TflOp(k, name, ins, outs, fused))
            if ins and all(i < 0 or i in constants for i in ins):
                constants.update(outs)
        inputs = [int(v) for v in sg.InputsAsNumpy()]
        outputs = [int(v) for v in sg.OutputsAsNumpy()]
        signature = {}
        if model.SignatureDefsLength():
            sig = model.SignatureDefs(0)
            for j in range(sig.OutputsLength()):
                signature[(sig.Outputs(j).Name() or b"").decode("utf-8", "replace")] = int(sig.Outputs(j).TensorIndex())
    except Exception as e:  # noqa: BLE001 - a malformed flatbuffer raises whatever its offsets hit
        raise CorruptArtifact(f"{path} is not a readable TFLite file ({first_line(e)}); rerun deploy convert") from e
    return _TflGraph(names, shapes, floats, constants, ops, inputs, outputs, signature)


def _run_tflite_all(path: str, graph: _TflGraph, x: np.ndarray, batch: int, nhwc: bool) -> dict[int, np.ndarray]:
    """Every float tensor of the ``.tflite`` file on the rows of ``x`` (``experimental_preserve_all_tensors``), by
    tensor index. Run on LiteRT's builtin kernels: the XNNPACK delegate keeps the tensors inside it to itself."""
    lite = require("ai_edge_litert.interpreter", "tflite", "deploy doctor")
    from runtimes.base import native_stderr_to_log

    try:
        with native_stderr_to_log("INFO: ", "LiteRT"):
            it = lite.Interpreter(model_path=path, num_threads=1, experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            [detail] = it.get_input_details()
            if detail["shape"][0] != batch:
                it.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
            it.allocate_tensors()
    except ValueError as e:
        raise CorruptArtifact(f"{path} cannot be opened by LiteRT ({first_line(e)}); rerun deploy convert") from e
    wanted = sorted(graph.floats - graph.constants)
    chunks: dict[int, list[np.ndarray]] = {}
    for chunk, _ in _chunks(x, batch):
        it.set_tensor(detail["index"], np.ascontiguousarray(chunk.transpose(0, 2, 3, 1) if nhwc else chunk))
        it.invoke()
        for i in wanted:
            chunks.setdefault(i, []).append(np.array(it.get_tensor(i)))
    values = {k: np.concatenate(v) if v[0].ndim and len(v) > 1 else v[0] for k, v in chunks.items()}
    values.update({i: np.array(it.get_tensor(i)) for i in graph.constants})  # weights, and a transpose's perm
    return values


def _litert_location(node) -> str | None:
    """The location litert-torch gives the TFLite ops it lowers ``node`` into: the classes and names of the
    modules on its ``nn_module_stack``, as ``Class_name/Class_name``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    parts = []
    for name, cls in stack.values():
        cls = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        parts.append(cls + (f"_{name.split('.')[-1]}" if name else ""))
    return "/".join(parts)


def _packet(node) -> str:
    target = node.target
    name = getattr(getattr(target, "overloadpacket", None), "__name__", None) or getattr(target, "__name__", "")
    return name.split(".")[-1]


_VIEWS = frozenset({"flatten", "view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "permute", "transpose",
                    "contiguous", "clone", "alias", "t"})  # plain nodes TFLite folds into layout or into the next op


def _through_views(node):
    """``node``, or what it is a view of (a flatten TFLite folds into the MEAN before it, say)."""
    while node.op == "call_function" and _packet(node) in _VIEWS and node.args and hasattr(node.args[0], "op"):
        node = node.args[0]
    return node


def _align(ref: np.ndarray, test: np.ndarray, layout: str | None) -> tuple[np.ndarray | None, str]:
    """``ref`` (the plain graph's NCHW tensor) in the layout of ``test``: NHWC when the TFLite tensor is known to be,
    else the one of NCHW and NHWC its shape fits (None with the reason when neither or both fit)."""
    if ref.ndim != 4:
        return ref, ""
    nhwc = ref.transpose(0, 2, 3, 1)
    if layout is not None:
        return (nhwc if layout == "NHWC" else ref), ""
    squeeze = lambda s: tuple(v for v in s[1:] if v != 1)  # noqa: E731
    fits = [a for a in (ref, nhwc) if squeeze(a.shape) == squeeze(test.shape)]
    if len(fits) == 1 or (fits and squeeze(ref.shape) == squeeze(nhwc.shape)):
        return fits[0], ""
    return None, f"layout of shape {list(test.shape[1:])} vs {list(ref.shape[1:])} not known"


def tflite_divergence(graph: _TflGraph, gm, program_values: dict[str, np.ndarray], values: dict[int, np.ndarray],
                      rtol: float, atol: float = 0.0, *, input_layout: str = "NCHW",
                      output_order: list[str] | None = None) -> dict:
    """The first op of a TFLite ``graph`` (execution order) whose output differs from the plain graph's node it
    computes, as :func:`first_divergence` (rows also name the ``layer``, the plain node the op lowers, and the
    TFLite tensor as ``node``). An op is matched with a plain node when exactly one node (i) carries a location
    among the tensor's (litert-torch names a tensor after the ``nn_module_stack`` of the nodes it was lowered from,
    fused locations joined by ``;``), (ii) is an aten op the TFLite op computes, (iii) takes the plain nodes the
    op's inputs carry; a fused activation is the one user of that node of its kind. Ops that only move values
    (transpose, reshape, pad, dequantize) carry their input's node; every other tensor is left unmatched (with the
    reason, in ``"unmatched"``). A graph output (which LiteRT renames after the signature) is the plain graph's
    output leaf of the same position, the outputs ordered by ``output_order`` (their signature names in the torch
    order) when given. Plain views (flatten, reshape, ...) count as the node they view."""
    import torch

    by_location: dict[str, list] = {}
    placeholders = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            placeholders.append(n)
        elif n.op == "call_function":
            loc = _litert_location(n)
            if loc is not None:
                by_location.setdefault(loc, []).append(n)
    carries: dict[int, tuple] = {}  # tensor -> (plain node, the tensor matched with it)
    layout: dict[int, str | None] = {}
    for t in graph.inputs:
        if len(placeholders) == 1 and len(graph.inputs) == 1:
            carries[t] = (placeholders[0], t)
            layout[t] = input_layout if len(graph.shapes[t]) == 4 else None
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [n for n in torch.utils._pytree.tree_leaves(out_node.args[0]) if isinstance(n, torch.fx.Node)]
    order = ([graph.signature_outputs[n] for n in output_order if n in graph.signature_outputs]
             if output_order else list(graph.outputs))
    out_alias = dict(zip(order, leaves)) if len(order) == len(leaves) == len(graph.outputs) else {}
    errors: dict[int, dict] = {}
    compared, unmatched = [], []

    def error_of(t: int, node) -> dict | None:
        if t not in errors:
            ref, test = program_values.get(node.name), values.get(t)
            if ref is None or test is None:
                errors[t] = None
                return None
            aligned, why = _align(ref, test, layout.get(t))
            errors[t] = _error(aligned, test, rtol, atol) if aligned is not None else {"comparable": False,
                                                                                       "reason": why}
        e = errors[t]
        return e if e and e.get("comparable") else None

    for op in graph.ops:
        acts = [i for i in op.inputs if i >= 0 and i not in graph.constants and i in graph.floats]
        outs = [o for o in op.outputs if o in graph.floats and o not in graph.constants]
        first_act = acts[0] if acts else None
        lay = layout.get(first_act) if first_act is not None else None
        if op.name in _TFL_CARRY:
            for o in outs:
                if first_act in carries:
                    carries[o] = carries[first_act]
                if op.name == "TRANSPOSE" and len(graph.shapes[o]) == 4 and lay is not None:
                    perm = values.get(op.inputs[1])
                    perm = tuple(int(v) for v in np.ravel(perm)) if perm is not None else ()
                    layout[o] = {((0, 2, 3, 1), "NCHW"): "NHWC", ((0, 3, 1, 2), "NHWC"): "NCHW"}.get((perm, lay))
                elif op.name == "RESHAPE" and first_act is not None and lay == "NCHW":
                    s_in, s_out = graph.shapes[first_act], graph.shapes[o]  # (N, 1, H, W) -> (N, H, W, 1)
                    layout[o] = "NHWC" if len(s_in) == 4 and s_in[1] == 1 and s_out == (s_in[0], *s_in[2:], 1) else None
                else:
                    layout[o] = lay if op.name in ("PAD", "PADV2", "DEQUANTIZE") else None
            continue
        if len(outs) != 1:
            unmatched.extend((o, f"{op.name} with {len(outs)} float outputs") for o in outs)
            continue
        [o] = outs
        same = first_act is not None and graph.shapes[o] == graph.shapes[first_act]
        layout[o] = "NHWC" if op.name in _TFL_NHWC else (lay if same else None)
        segments = {s for s in graph.names[o].split(";") if s}
        kinds = _TFL_COMPUTES.get(op.name)
        if kinds is None:
            unmatched.append((o, f"{op.name} is not one of the ops matched"))
            continue
        sources = [_through_views(carries[i][0]) for i in acts if i in carries]
        fused = _TFL_FUSED.get(op.fused, (str(op.fused), set())) if op.fused else None
        if o in out_alias:  # the output of the same position
            leaf = _through_views(out_alias[o])
            layer = leaf.args[0] if fused and _packet(leaf) in fused[1] and leaf.args else leaf
            cands = [layer] if _packet(layer) in kinds else []
        else:
            cands = [n for s in segments for n in by_location.get(s, ()) if _packet(n) in kinds]
        cands = [n for n in dict.fromkeys(cands)
                 if len(sources) == len(acts) and all(p in map(_through_views, n.all_input_nodes) for p in sources)]
        if len(cands) != 1:
            why = ("its inputs are not matched" if len(sources) != len(acts) else
                   f"{len(cands)} plain nodes fit its location, kind and inputs")
            unmatched.append((o, why))
            continue
        [layer] = cands
        value, label = layer, op.name
        if fused:
            act_name, act_kinds = fused
            users = [u for u in layer.users if _packet(u) in act_kinds and u.op == "call_function"
                     and (_litert_location(u) in segments or o in out_alias)]
            if len(users) != 1:
                unmatched.append((o, f"its fused {act_name} matches {len(users)} plain nodes"))
                continue
            value, label = users[0], f"{op.name}+{act_name}"
        carries[o] = (value, o)
        e = error_of(o, value)
        if e is None:
            unmatched.append((o, (errors.get(o) or {}).get("reason", "no plain value to compare")))
            continue
        inputs = []
        for i in acts:
            if i in carries:
                src, t = carries[i]
                ie = error_of(t, src) if t in values and src.op != "placeholder" else None
                if ie is not None:
                    inputs.append({"tensor": src.name, "kind": "activation", "max_rel": ie["max_rel"],
                                   "passed": ie["passed"]})
        perm = _TFL_WEIGHTS.get(op.name)
        if perm is not None and _packet(layer) in ("conv2d", "convolution", "linear"):
            for pos in (1, 2):
                arg = layer.args[pos] if len(layer.args) > pos else None
                t = op.inputs[pos] if len(op.inputs) > pos else -1
                if not isinstance(arg, torch.fx.Node) or t < 0 or arg.name not in program_values or t not in values:
                    continue
                ref = program_values[arg.name]
                ref = ref.transpose(perm) if pos == 1 and ref.ndim == len(perm) else ref
                we = _error(ref, values[t], rtol, atol)
                if we.get("comparable"):
                    inputs.append({"tensor": arg.name, "kind": "weight", "max_rel": we["max_rel"],
                                   "passed": we["passed"]})
        row = {"tensor": value.name, "layer": layer.name, "node": graph.names[o], "op": label,
               "max_rel": e["max_rel"], "passed": e["passed"], "inputs": inputs,
               **({"reason": e["reason"]} if "reason" in e else {})}
        compared.append(row)
        if not e["passed"]:
            return {"compared": compared, "first": row, "unmatched": unmatched}
    return {"compared": compared, "first": None, "unmatched": unmatched}


def _divergence(record: RunRecord, root: Path, stage: StageRecord, *, trust_pickle: bool, samples: int,
                progress: Progress) -> Diagnosis:
    headers = ["#", "tensor", "op", "max rel error", "tolerance", "result"]
    if stage.name == "pt2":
        return Diagnosis(stage.name, "not diagnosed", headers, [],
                         "pt2 is the plain graph every other stage is compared with: its difference from the training "
                         "model comes from the passes (report.md, 'reparameterize'), not from a runtime")
    if stage.format == "tflite" and stage.export.artifact is not None:
        return _tflite_stage(record, root, stage, headers, trust_pickle=trust_pickle, samples=samples,
                             progress=progress)
    source = _onnx_stage(record, stage)
    if source is None:
        return Diagnosis(stage.name, "not diagnosed", headers, [],
                         f"{stage.name} ({stage.format}) is not made from an ONNX file, and {stage.format}'s "
                         "intermediates are not compared yet: no first divergence found",
                         notes=[f"intermediates of {stage.format} are not compared yet (only ONNX, OpenVINO and "
                                "TFLite files are)"])
    rtol, atol = _tolerance(record, stage)
    art = source.export.artifact_in(root)
    model = _onnx_model(Path(art.path))
    weights = {i.name for i in model.graph.initializer}
    feeds = [i.name for i in model.graph.input if i.name not in weights]
    if len(feeds) != 1:
        return Diagnosis(stage.name, "not diagnosed", headers, [],
                         f"{source.name} takes {len(feeds)} inputs ({', '.join(feeds)}); doctor compares the "
                         "intermediates of single-input models only")
    from .stages import batch_of

    x = _inputs(record, root, samples)
    batch = batch_of(source, len(x))
    progress(f"running the plain graph and {source.name} ({Path(art.path).name}) on {len(x)} input(s), every "
             "intermediate tensor recorded ...")
    plain_values, plain_outputs = _record_plain(_plain_graph(record, root, trust_pickle), x, batch)
    ov = stage.format == "openvino" and stage.export.artifact is not None
    if ov:
        progress(f"running {stage.name} ({Path(stage.path).name}) with every named tensor exposed ...")
        values = _run_openvino_all(stage.export.artifact_in(root).path, x, batch, stage.precision)
    else:
        values, _ = _run_onnx_all(model, x, batch)
    found = first_divergence(model, plain_values, plain_outputs, values, rtol, atol, weights=not ov)
    notes = [f"{len(found['compared'])} tensor(s) compared by name with the plain graph (model.deploy.pt2) on "
             f"{len(x)} input(s); tolerance rtol {rtol:g}, atol {atol:g}"]
    if ov:
        notes.append(f"OpenVINO's tensors are matched by their ONNX names, walked in the order of {source.name}; "
                     f"weights are {source.name}'s")
    elif source is not stage:
        notes.append(f"intermediates of {stage.format} are not compared yet: its ONNX source {source.name} is "
                     "diagnosed instead")
    label = "" if source is stage or ov else f" (through its ONNX source {source.name})"
    own = ("" if source is stage or ov or not stage.failed else
           f"; the divergence is in {stage.format}'s own conversion or runtime")
    same_op = ("; its inputs agree, so the op itself computes differently" if not ov else
               "; its inputs agree, so the op or its weights in this file compute differently")
    return _divergence_table(stage, headers, found, rtol, atol, notes, label, own, same_op, source.name)


def _divergence_table(stage: StageRecord, headers: list[str], found: dict, rtol: float, atol: float,
                      notes: list[str], label: str, own: str, same_op: str, source: str) -> Diagnosis:
    """The table, conclusion and details of case 1 from ``found`` (:func:`first_divergence` or
    :func:`tflite_divergence`)."""
    compared, first = found["compared"], found["first"]
    rows = []
    if first is not None:
        for i in first["inputs"]:
            rows.append(["in", i["tensor"], i["kind"], _num(i["max_rel"]), f"{rtol:g}",
                         "ok" if i["passed"] else "DIFFERS"])
        rows.append([str(len(compared)), first["tensor"], first["op"], _num(first["max_rel"]), f"{rtol:g}",
                     "FIRST DIVERGENCE"])
    else:
        tail = compared[-TABLE_ROWS:]
        rows = [[str(len(compared) - len(tail) + k + 1), r["tensor"], r["op"], _num(r["max_rel"]), f"{rtol:g}", "ok"]
                for k, r in enumerate(tail)]
    layer = None
    if first is not None:
        layer = first.get("layer") or (first["node"][5:] if first["node"].startswith("node_") else first["tensor"])
    if first is None:
        conclusion = (f"{stage.name}{label}: every one of the {len(compared)} compared tensors agrees with the plain "
                      f"graph within rtol {rtol:g}{own}")
    else:
        bad_weights = [i for i in first["inputs"] if not i["passed"] and i["kind"] == "weight"]
        bad_inputs = [i for i in first["inputs"] if not i["passed"] and i["kind"] != "weight"]
        why = (f"; its weight {', '.join(w['tensor'] for w in bad_weights)} differs from the plain graph's (max rel "
               f"error {_num(bad_weights[0]['max_rel'])})" if bad_weights else "" if bad_inputs else same_op)
        conclusion = (f"{stage.name}{label} first diverges at {layer} ({first['op']}): max rel error "
                      f"{_num(first['max_rel'])} > {rtol:g}{why}")
    details = {"layer": layer, "first": first, "compared": len(compared), "rtol": rtol, "atol": atol,
               "source": source}
    if "unmatched" in found:
        details["unmatched"] = len(found["unmatched"])
    return Diagnosis(stage.name, "divergence", headers, rows, conclusion, notes, details)


def _tflite_stage(record: RunRecord, root: Path, stage: StageRecord, headers: list[str], *, trust_pickle: bool,
                  samples: int, progress: Progress) -> Diagnosis:
    """Case 1 for a TFLite file: its every tensor (LiteRT, builtin kernels) against the plain graph's nodes,
    matched by :func:`tflite_divergence`."""
    from .stages import batch_of

    rtol, atol = _tolerance(record, stage)
    art = stage.export.artifact_in(root)
    path = os.fspath(art.path)
    graph = _tflite_graph(path)
    if len(graph.inputs) != 1:
        return Diagnosis(stage.name, "not diagnosed", headers, [],
                         f"{stage.name} takes {len(graph.inputs)} inputs; doctor compares the intermediates of "
                         "single-input models only")
    nhwc = (art.metadata.get("layout") or {}).get("inputs", ["NCHW"])[0] == "NHWC"
    x = _inputs(record, root, samples)
    batch = batch_of(stage, len(x))
    progress(f"running the plain graph and {stage.name} ({Path(path).name}) on {len(x)} input(s), every "
             "intermediate tensor recorded ...")
    program = _plain_graph(record, root, trust_pickle)
    gm = program.module()
    plain_values, _ = _record_plain(program, x, batch)
    values = _run_tflite_all(path, graph, x, batch, nhwc)
    found = tflite_divergence(graph, gm, plain_values, values, rtol, atol, input_layout="NHWC" if nhwc else "NCHW",
                              output_order=art.metadata.get("tflite_outputs"))
    computed = sum(1 for op in graph.ops if op.name not in _TFL_CARRY)
    notes = [f"{len(found['compared'])} tensor(s) compared with the plain graph (model.deploy.pt2) on {len(x)} "
             f"input(s); tolerance rtol {rtol:g}, atol {atol:g}",
             f"TFLite tensors matched with plain-graph nodes by litert-torch's location names (the nodes' "
             f"nn_module_stack), the op's kind and its inputs, walking the {len(graph.ops)} ops in execution order "
             f"({computed} computing, the rest moving values); NHWC tensors compared after permuting the plain "
             f"graph's; {len(found['unmatched'])} tensor(s) left unmatched"
             + (" before the first divergence" if found["first"] is not None else ""),
             "run on LiteRT's builtin kernels with every tensor preserved (the XNNPACK delegate the stage's runner "
             "uses keeps its intermediates to itself)"]
    if found["unmatched"]:
        shown = "; ".join(f"{graph.names[t][-60:]}: {why}" for t, why in found["unmatched"][:3])
        notes.append(f"unmatched: {shown}" + (" ..." if len(found["unmatched"]) > 3 else ""))
    own = ("; the divergence is in the XNNPACK delegate the stage runs on" if stage.failed else "")
    same_op = "; its inputs and weights agree, so the op itself computes differently"
    return _divergence_table(stage, headers, found, rtol, atol, notes, "", own, same_op, stage.name)


def _num(v) -> str:
    if v is None:
        return "-"
    return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.2e}"


# ------------------------------------------------------------------------------------------ case 2: INT8

def int8_scope(record: RunRecord, root: Path, stage: StageRecord, *, samples: int = 64,
               progress: Progress | None = None) -> Diagnosis:
    """The per-layer table of ``stage`` (worst first) and the float scope: the run's fallback, else the
    ranking's suggestion."""
    progress = progress or _noop
    q = record.int8 or {}
    layers, source = [], "recorded in report.json"
    onnx_int8 = record.stage("onnx-int8")
    notes = []
    if onnx_int8 is not None and not onnx_int8.export.error and onnx_int8.export.artifact is not None:
        parent = record.stage(onnx_int8.parent) if onnx_int8.parent else None
        try:
            from runtimes.int8 import layer_errors

            from .stages import batch_of

            x = _inputs(record, root, samples)[1:]  # the held-out samples (the seeded input is not one)
            x = x if len(x) else _inputs(record, root, 0)
            progress(f"per-layer INT8 errors of {onnx_int8.name} against {parent.name} on {len(x)} input(s) ...")
            found = layer_errors(parent.export.artifact_in(root).path, onnx_int8.export.artifact_in(root).path, x,
                                 batch_of(onnx_int8, len(x)))
            layers = sorted((e.to_dict() for e in found), key=lambda r: -_finite(r["lost_db"]))
            source = f"measured now on {len(x)} input(s), ONNX Runtime QDQ model vs its fp32 parent"
        except Exception as e:  # noqa: BLE001 - the recorded table is the fallback
            log.info("per-layer errors not measured", exc_info=True)
            notes.append(f"per-layer errors not measured again ({first_line(e)}): the table is the run's")
    if not layers:
        layers = [r for r in q.get("layers", []) if isinstance(r, dict) and "name" in r]
    headers = ["layer", "op", "in float", "SQNR in (dB)", "SQNR out (dB)", "dB lost", "weight max/median"]
    rows = [[r["name"], r.get("op", "-"), "no" if r.get("quantized", True) else "yes", _db(r.get("sqnr_in_db")),
             _db(r.get("sqnr_out_db")), _db(r.get("lost_db")),
             _db((r.get("weights") or {}).get("max_median_ratio"))] for r in layers[:TABLE_ROWS]]
    if len(layers) > TABLE_ROWS:
        notes.append(f"{len(layers) - TABLE_ROWS} more layer(s), losing less, not shown")
    notes.insert(0, f"per-layer table {source}")
    guard = q.get("guard") or {}
    bound = (f"--max-drop {guard['max_drop']:g}" if guard.get("max_drop") is not None else "the guard's bound")
    v = stage.verification
    verdict = "passes" if v.passed else "fails"
    fb = next((f for f in q.get("fallbacks", []) if f.get("stage") == stage.name), None)
    ranking = [r["name"] for r in layers if r.get("quantized", True)]
    if not layers:
        conclusion = (f"{stage.name} {verdict} the guard; no per-layer table (it is measured on the onnx-int8 "
                      "stage: add onnx to --targets)")
    else:
        worst = layers[0]
        head = f"{stage.name} {verdict} the guard and loses most in {worst['name']} ({worst['lost_db']:.1f} dB)"
        if fb is not None and fb.get("kept_in_float"):
            kept = ", ".join(fb["kept_in_float"])
            conclusion = (f"{head}; keeping {kept} in float {'meets' if fb.get('passed') else 'still does not meet'} "
                          f"{bound} (the run's --int8-fallback auto)")
        elif fb is not None:
            tried = max((t.get("kept", 0) for t in fb.get("tried", [])), default=0)
            conclusion = (f"{head}; the run's --int8-fallback auto kept up to {tried} of the worst layers in float "
                          f"and none of those forms did better, so it kept none: the loss is spread over the layers "
                          f"(see the table)")
        elif v.passed:
            conclusion = f"{head}; it meets {bound} with no layer kept in float"
        else:
            k = max(1, min(len(ranking) // 2, 2))
            conclusion = (f"{head}; keep {', '.join(ranking[:k])} in float first (rerun without --int8-fallback "
                          f"off: the default keeps the 1, 2, 4, ... worst layers in float until {bound} is met)")
    details = {"layers": layers, "fallback": fb, "guard": guard, "int8": v.int8, "ranking": ranking}
    return Diagnosis(stage.name, "int8", headers, rows, conclusion, notes, details)


def _finite(v) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else (1e9 if v and v > 0 else -1e9)


def _db(v) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


# ---------------------------------------------------------------------- case 3: the smallest failing graph

def target_check(target_name: str, path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """Convert the ONNX file ``path`` for ``target_name`` into ``folder``, open it on its runtime and run it
    once on zeros: ``""`` when all that works, else the error's message."""
    from exporters.onnx import describe_onnx
    from exporters.targets import ExportJob

    target = registry.get(target_name)
    try:
        art = describe_onnx(path)
        if target.name != "onnx":
            products = target.export(ExportJob(None, (), Path(folder), source=art))
            failed = next((p for p in products if p.error), None)
            if failed is not None:
                return failed.error
            art = next(p.artifact for p in products if p.main)
        feeds = [np.zeros(s.concrete_shape(1), dtype=s.dtype) for s in art.inputs]
        with target.open(art) as runner:
            runner.infer(feeds)
    except Exception as e:  # noqa: BLE001 - any failure is what is being reduced
        return str(e) or type(e).__name__
    return ""


def _forked(fn, args: tuple, timeout: float) -> str:
    """``fn(*args)`` in a forked process: its result, or a sentence when it crashed or ran past ``timeout``."""
    import multiprocessing as mp

    try:
        ctx = mp.get_context("fork")
    except ValueError:  # no fork (Windows): in this process, without the timeout
        return fn(*args)
    reader, writer = ctx.Pipe(duplex=False)

    def child():
        try:
            writer.send(fn(*args))
        except BaseException as e:  # noqa: BLE001
            writer.send(f"{type(e).__name__}: {first_line(e)}")

    p = ctx.Process(target=child, daemon=True)
    p.start()
    writer.close()
    try:
        if reader.poll(timeout):
            try:
                return reader.recv()
            except EOFError:
                pass
        elif p.is_alive():
            p.kill()
            p.join()
            return f"the check ran past {timeout:g} s"
        p.join()
        return f"the check crashed (exit status {p.exitcode})"
    finally:
        reader.close()
        if p.is_alive():
            p.kill()
        p.join()


def _signature(message: str, folder: str) -> str:
    """The first line of a failure with the check's folder and every number blanked (layer indices change as
    the graph shrinks)."""
    line = first_line(message).replace(folder, "<dir>")
    return re.sub(r"\d+", "#", line).strip()


@dataclass
class Reduction:
    """The result of :func:`reduce_onnx`: the smallest failing model found and how it was found."""

    model: object | None  # onnx.ModelProto, None when the whole model does not fail
    nodes: int
    ops: list[str]
    message: str  # the failure of the smallest model (of the whole one when nothing failed)
    checks: int
    original_nodes: int
    complete: bool  # False when the check budget ran out first


def _subgraph(model, inferred, lo: int, hi: int):
    """The nodes ``lo:hi`` of ``model`` as a model: the tensors they take from outside become graph inputs
    (typed and shaped by shape inference), the initializers they use are kept, and the tensors later nodes or
    the graph outputs use become its outputs."""
    import onnx

    nodes = list(model.graph.node)
    inits = {i.name: i for i in model.graph.initializer}
    infos = {v.name: v for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    part = nodes[lo:hi]
    constants = {o: n for n in nodes[:lo] if n.op_type == "Constant" and not n.input for o in n.output}
    produced = {o for n in part for o in n.output if o}
    pulled = []  # Constant nodes outside the range that it uses: they stay constants
    for n in part:
        for i in n.input:
            if i in constants and i not in produced:
                pulled.append(constants[i])
                produced.update(constants[i].output)
    inputs, used_inits = [], []
    for n in part:
        for i in n.input:
            if not i or i in produced or i in {x.name for x in inputs} or i in {x.name for x in used_inits}:
                continue
            if i in inits:
                used_inits.append(inits[i])
            else:
                inputs.append(infos.get(i) or onnx.helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, None))
    later = {i for n in nodes[hi:] for i in n.input} | {o.name for o in model.graph.output}
    outs = [o for n in part for o in n.output if o and o in later] or [o for o in part[-1].output if o]
    graph = onnx.helper.make_graph(
        pulled + part, f"{model.graph.name or 'graph'}_{lo}_{hi}", inputs,
        [infos.get(o) or onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs],
        initializer=used_inits)
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    sub.functions.extend(model.functions)
    return sub


def reduce_onnx(model, check: Callable[[str, str], str], *, max_checks: int = MAX_CHECKS,
                progress: Progress | None = None) -> Reduction:
    """The smallest contiguous run of ``model``'s nodes (topological order) that still fails ``check`` the way
    the whole model does. ``check(path, folder) -> message`` ("" when it passes) is given each candidate
    written to ``folder/model.onnx``; at most ``max_checks`` checks run."""
    import onnx

    progress = progress or _noop
    inferred = onnx.shape_inference.infer_shapes(model)
    n = len(model.graph.node)
    count = [0]

    want = ""

    def run(candidate, what: str) -> str:
        count[0] += 1
        with tempfile.TemporaryDirectory(prefix="deploy-doctor-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save(candidate, path)
            message = check(path, tmp)
            sig = _signature(message, tmp) if message else ""
            message = message.replace(path, "the subgraph").replace(tmp, "<folder>")
        same = bool(message) and (not want or sig == want)
        progress(f"check {count[0]}/{max_checks}: {what}: {'fails' if message else 'passes'}"
                 + (" (another failure: counted as passing)" if message and not same else ""))
        return (message, sig) if same else ("", "")

    whole, want = run(model, f"the whole model ({n} nodes)")
    if not whole:
        return Reduction(None, n, [], "", count[0], n, True)
    best = (0, n, whole)
    complete = True

    def fails(lo: int, hi: int) -> bool:
        nonlocal best
        message, _ = run(_subgraph(model, inferred, lo, hi), _span(lo, hi))
        if message and hi - lo < best[1] - best[0]:
            best = (lo, hi, message)
        return bool(message)

    a, b = 1, n  # the shortest failing prefix: nodes 0..b-1
    while a < b:
        if count[0] >= max_checks:
            complete = False
            break
        m = (a + b) // 2
        if fails(0, m):
            b = m
        else:
            a = m + 1
    hi = b if complete else best[1]
    a, c = best[0], hi - 1  # the shortest failing suffix of it: nodes a..hi-1
    while complete and a < c:
        if count[0] >= max_checks:
            complete = False
            break
        m = (a + c + 1) // 2
        if fails(m, hi):
            a = m
        else:
            c = m - 1
    lo, hi, message = best
    reduced = model if (lo, hi) == (0, n) else _subgraph(model, inferred, lo, hi)
    return Reduction(reduced, hi - lo, [x.op_type for x in reduced.graph.node], message, count[0], n, complete)


def _span(lo: int, hi: int) -> str:
    return f"node {lo}" if hi - lo == 1 else f"nodes {lo}..{hi - 1} ({hi - lo} nodes)"


def _failure(record: RunRecord, root: Path, stage: StageRecord, out_dir: Path, *, max_checks: int,
             check_timeout: float, progress: Progress) -> Diagnosis:
    headers = ["step", "nodes", "ops", "result"]
    error = stage.export.error or _runtime_error(stage)
    what = "export" if stage.export.error else "runtime"
    target = registry.get(stage.format) if stage.format in registry.names(selectable=False) else None
    if stage.format == "onnx":
        source = stage if not stage.export.error and stage.export.artifact is not None else None
    else:
        parent = record.stage(stage.parent) if stage.parent else None
        source = _onnx_stage(record, parent) if parent is not None else None
    if target is None or source is None or (target.source != "onnx" and target.name != "onnx"):
        fmt = stage.format
        return Diagnosis(stage.name, "failure", headers, [["-", "-", "-", f"{what} failed"]],
                         f"{stage.name}'s {what} failed ({first_line(error)}); it is not made from an ONNX file, so "
                         "it is not reduced (the reduction works on the ONNX file of ONNX-sourced targets)",
                         [f"{fmt} is converted from {target.source if target else 'an unknown source'}"],
                         {"error": error})
    path = Path(source.export.artifact_in(root).path)
    model = _onnx_model(path)
    progress(f"reducing {source.name} ({path.name}, {len(model.graph.node)} nodes) to the smallest subgraph that "
             f"still fails {target.label} (at most {max_checks} checks, {check_timeout:g} s each) ...")

    def check(candidate: str, folder: str) -> str:
        return _forked(target_check, (target.name, candidate, folder), check_timeout)

    red = reduce_onnx(model, check, max_checks=max_checks, progress=progress)
    rows = [["recorded", "-", "-", first_line(error)[:100]]]
    if red.model is None:
        rows.append(["whole model", str(red.nodes), "-", "passes here"])
        return Diagnosis(stage.name, "failure", headers, rows,
                         f"{stage.name}'s {what} failure does not happen here on {path.name} with {target.label}: "
                         "nothing to reduce (another machine or package version?)", [], {"error": error})
    rows.append(["whole model", str(red.original_nodes), "-", first_line(red.message)[:100]])
    written = _write_reduced(red.model, out_dir)
    ops = ", ".join(dict.fromkeys(red.ops))
    rows.append(["reduced", str(red.nodes), ops, first_line(red.message)[:100]])
    notes = [f"{red.checks} check(s)" + ("" if red.complete else f"; stopped at the limit of {max_checks} checks")]
    if written["replaced"]:
        notes.append(f"replaced the previous {written['path']}")
    conclusion = (f"{stage.name}'s {what} fails on a {red.nodes}-node subgraph ({ops}) of {path.name}: "
                  f"{written['path']} reproduces it for a bug report")
    return Diagnosis(stage.name, "failure", headers, rows, conclusion, notes,
                     {"error": error, "reduced": written["path"], "nodes": red.nodes, "ops": red.ops,
                      "checks": red.checks, "message": red.message, "original_nodes": red.original_nodes})


def _write_reduced(model, out_dir: Path) -> dict:
    """Write ``model`` to ``out_dir/reduced.onnx`` atomically (a temporary file renamed into place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "reduced.onnx"
    replaced = path.exists()
    fd, tmp = tempfile.mkstemp(prefix=".reduced-", suffix=".onnx", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"path": os.fspath(path), "replaced": replaced}
