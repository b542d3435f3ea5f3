"""ONNX export with the torch.onnx dynamo exporter, then onnxsim, re-verified on ONNX Runtime.

- The model (normally the GraphModule from ``torch.export.export(model, args, strict=False).module()``)
  is re-exported by ``torch.onnx.export(..., dynamo=True)``; nested outputs are flattened leaf by
  leaf into ``output0, output1, ...`` (or the given names). Weights are embedded in the ``.onnx``
  file (``external_data=False``), so one file is the whole model.
- Opset 18 is the default: the opset the dynamo exporter's function library is written in
  (other opsets are reached by version conversion; 17 is the oldest accepted, ``max_opset()`` the
  newest the installed onnx defines). A conversion that fails leaves the file at opset 18 without
  an error from the exporter; the written opset is therefore checked, and a mismatch is an error.
- An op whose ONNX translation fails on some of its calls (``aten.scaled_dot_product_attention`` on 5-D
  windows, as in timm's Twins) is decomposed with torch's own decomposition for exactly those calls and the
  export retried (:mod:`exporters.legalize`); a model that exports as it is goes through unchanged. The
  artifact's ``decomposed`` metadata and its notes say what was decomposed and why.
- A global average pool (``adaptive_avg_pool2d`` to 1x1) is exported as the mean it is
  (``mean(x, [-2, -1], keepdim=True)``, ``ReduceMean``): on a channels-last tensor (ConvNeXt's
  ``permute`` back from its NHWC blocks) torch's decomposition of the pool restores the strides with
  ``as_strided``, which becomes ``Reshape`` + ``Gather`` in ONNX, and ncnn has no ``Gather``.
- ``dynamic=True`` makes dimension 0 of every input a symbol ``batch``. A graph captured with a
  static batch may have that batch baked into a reshape; then an output's first dimension stays a
  constant and the export is refused instead of writing a model that is wrong at other batches.
- Simplifiers can change a model's numbers: the onnxsim result is written to a second file,
  checked with ``onnx.checker`` and compared with the unsimplified model on ONNX Runtime; on
  mismatch the unsimplified model is kept and the record's notes say why.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtimes.core import Artifact, ExportError, TensorSpec, first_line, require

from ._torch import as_args, io_names, output_leaves, to_graph_module
from .legalize import Decomposition, decompose_program, plan_onnx_decomposition, single_node_module
from .targets import ExportJob, Product, Target

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "max_opset", "export_onnx", "export_onnx_raw", "simplify_onnx",
           "describe_onnx", "convert_onnx_to_fp16", "op_counts", "ONNX_DTYPES", "TARGET"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 17
_MAX_ATTEMPTS = 8  # exports of one model, each after decomposing the failing calls of one more op
_EXTRA = "onnx"

# ONNX TensorProto element types -> numpy dtype names
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


def _onnx():
    return require("onnx", _EXTRA, "ONNX export")


def max_opset() -> int:
    """The newest ONNX opset the installed onnx package defines: no export can be converted beyond it."""
    return int(_onnx().defs.onnx_opset_version())


def _specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        tt = v.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        specs.append(TensorSpec(v.name, tuple(dims), ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))))
    return specs


def op_counts(model_or_path) -> dict[str, int]:
    """Number of nodes per op type in the main graph of an ONNX model (or file)."""
    onnx = _onnx()
    model = onnx.load(os.fspath(model_or_path), load_external_data=False) \
        if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def describe_onnx(path, *, parent: str | None = None, precision: str = "fp32") -> Artifact:
    """An artifact record for an existing ``.onnx`` file (names, shapes and dtypes read from the file)."""
    onnx = _onnx()
    model = onnx.load(os.fspath(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return Artifact(
        path=os.fspath(path), format="onnx",
        inputs=_specs([i for i in model.graph.input if i.name not in initializers]),
        outputs=_specs(model.graph.output), precision=precision, parent=parent,
        metadata={"opset": opset, "ops": op_counts(model)},
    )


def _unsupported_op(exc: BaseException) -> str | None:
    text = str(exc)
    m = re.search(r"OpOverload\(op='([^']+)', overload='([^']+)'\)", text)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    m = re.search(r"target=(torch\.ops\.[\w.]+)", text)
    return m.group(1).replace("torch.ops.", "") if m else None


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of ``exc``'s chain as ``Type: first line`` (what the exporter actually tripped on)."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {first_line(exc)}"


def _run_exporter(program, args, path, opset, in_names, out_names, dynamic_shapes) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program, args, os.fspath(path), dynamo=True, opset_version=opset,
                          input_names=in_names, output_names=out_names, dynamic_shapes=dynamic_shapes,
                          external_data=False, optimize=True, verbose=False)


def _translation_failure(node, inputs: list, opset: int) -> str | None:
    """The exporter's failure on ``node`` exported alone on ``inputs`` (its recorded input values), or None."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(single_node_module(node), tuple(inputs), dynamo=True, opset_version=opset,
                              optimize=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - any failure of the exporter is the answer
        return _root_cause(e)
    return None


def _legalize(module, args, exc: BaseException, opset: int, done: list[Decomposition]) -> str:
    """After an export failed with ``exc``: put into ``done`` the decomposition that may let it pass and return
    '', or return the reason there is none (then the export has failed)."""
    op = _unsupported_op(exc)
    if op is None:
        return "not an op the exporter failed on"
    earlier = next((d for d in done if str(d.op) == op), None)
    if earlier is not None and earlier.every_call:
        return ("decomposing every call of it that torch's decomposition reproduces did not help" if
                len(earlier.nodes) < earlier.total else "decomposing all its calls did not help")
    plan, why = plan_onnx_decomposition(module, args, op, _root_cause(exc),
                                        functools.partial(_translation_failure, opset=opset),
                                        every_call=earlier is not None)
    if plan is None:
        return why
    if earlier is not None:
        done.remove(earlier)
    done.append(plan)
    return ""


def _export_failure(exc: BaseException, opset: int, why: str) -> ExportError:
    op = _unsupported_op(exc)
    if op is None:
        return ExportError(f"torch.onnx.export failed for ONNX (opset {opset}): {first_line(exc)}")
    cause = _root_cause(exc)
    if "No ONNX function found" in cause:
        failed = "the torch.onnx exporter has no translation for it"
    else:
        failed = f"the torch.onnx exporter's translation of it fails ({cause})"
    return ExportError(f"ONNX (opset {opset}) cannot express op {op}: {failed}, and {why}.")


def _global_pools_as_means(module) -> None:
    """Replace every ``adaptive_avg_pool2d(x, [1, 1])`` of ``module``'s graph by ``mean(x, [-2, -1], True)``
    (see the module docstring)."""
    import torch

    aten, count = torch.ops.aten, 0
    for node in list(module.graph.nodes):
        if node.target == aten.adaptive_avg_pool2d.default and list(node.args[1]) == [1, 1]:
            with module.graph.inserting_before(node):
                mean = module.graph.call_function(aten.mean.dim, (node.args[0], [-2, -1], True))
            mean.meta = dict(node.meta)
            node.replace_all_uses_with(mean)
            module.graph.erase_node(node)
            count += 1
    if count:
        module.recompile()


def export_onnx_raw(model, args, path, *, opset: int = DEFAULT_OPSET, dynamic: bool = False,
                    input_names: Sequence[str] | None = None,
                    output_names: Sequence[str] | None = None) -> Artifact:
    """Export ``model`` on ``args`` to ``path`` without simplification; see the module docstring."""
    onnx = _onnx()
    require("onnxscript", _EXTRA, "the torch.onnx dynamo exporter")
    import torch

    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old; the dynamo exporter needs opset >= {MIN_OPSET}.")
    if opset > max_opset():
        raise ExportError(f"ONNX opset {opset} is newer than the installed onnx {onnx.__version__} defines; choose "
                          f"an opset in {MIN_OPSET}..{max_opset()}.")
    args = as_args(args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = to_graph_module(model, args)  # a copy of the graph: rewriting it leaves ``model`` alone
    _global_pools_as_means(module)
    leaves = output_leaves(module, args)
    in_names = io_names(input_names, len(args), "input")
    out_names = io_names(output_names, len(leaves), "output")
    dynamic_shapes = named_shapes = None  # the dims to capture with; their names, for an ExportedProgram
    if dynamic:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
        named_shapes = tuple(d and {0: "batch"} for d in dynamic_shapes)
    for stale in (path, Path(str(path) + ".data")):
        if stale.exists():
            stale.unlink()
    program, decomposed = module, []
    for _ in range(_MAX_ATTEMPTS):
        try:
            _run_exporter(program, args, path, opset, in_names, out_names,
                          dynamic_shapes if program is module else named_shapes)
            break
        except Exception as e:
            try:
                why = _legalize(module, args, e, opset, decomposed)
            except Exception as failed:  # noqa: BLE001 - the export's own failure is the one to report
                log.info("ONNX legalization failed", exc_info=True)
                why = f"decomposing it failed ({type(failed).__name__}: {first_line(failed)})"
            if why:
                raise _export_failure(e, opset, why) from e
        try:
            program = decompose_program(module, args, decomposed, dynamic_shapes)
        except Exception as e:
            raise ExportError(f"torch.export cannot capture the plain graph to decompose "
                              f"{', '.join(str(d.op) for d in decomposed)} for ONNX: {first_line(e)}") from e
    else:
        raise ExportError(f"the ONNX export still fails after decomposing the failing calls of {len(decomposed)} "
                          f"op(s) ({', '.join(str(d.op) for d in decomposed)}); -v logs the exporter's failures.")
    if Path(str(path) + ".data").exists():
        raise ExportError(f"the ONNX exporter wrote the weights of {path} to an external file {path}.data; "
                          f"models over 2 GB cannot be embedded in one file.")
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejects the exported file {path}: {first_line(e)}") from e
    art = describe_onnx(path)
    if art.metadata["opset"] not in (opset, None):  # the exporter keeps its own opset when the version conversion fails
        path.unlink()
        raise ExportError(f"ONNX opset {opset} was requested but the exporter wrote opset {art.metadata['opset']} "
                          f"(its version conversion of this model failed); choose --opset {art.metadata['opset']} "
                          "or another opset the conversion supports.")
    art.metadata.update(dynamic_batch=dynamic, exporter=f"torch.onnx dynamo (torch {torch.__version__})")
    if decomposed:
        art.metadata["decomposed"] = [d.to_dict() for d in decomposed]
        for d in decomposed:
            art.note(str(d))
    if dynamic:
        static = [s.name for s in art.outputs if s.shape and isinstance(s.shape[0], int)]
        if static:
            path.unlink()
            raise ExportError(
                f"dynamic batch was requested but output(s) {', '.join(static)} of {path} keep a constant first "
                f"dimension: the graph was captured with a fixed batch (a reshape bakes it in); capture the "
                f"model with a dynamic batch dimension or export with dynamic=False.")
    log.info("exported %s (opset %s, %d nodes)", path, opset, sum(art.metadata["ops"].values()))
    return art


def _run_onnx(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    ort = require("onnxruntime", _EXTRA, "verifying ONNX files")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _compare_files(ref_art: Artifact, art: Artifact, rtol: float, seed: int):
    from runtimes.compare import compare, make_inputs

    feeds = make_inputs(ref_art.inputs, seed=seed, dynamic_size=2)
    return compare(_run_onnx(ref_art.path, feeds), _run_onnx(art.path, feeds), rtol,
                   names=ref_art.output_names)


def simplify_onnx(raw: Artifact | str | os.PathLike, path=None, *, rtol: float = 1e-5,
                  seed: int = 0) -> tuple[Artifact, bool]:
    """Simplify ``raw`` with onnxsim into ``path`` (default ``<stem>.sim.onnx``) and re-verify it.

    Returns ``(artifact, accepted)``: the simplified artifact when it passes ``onnx.checker`` and
    matches the unsimplified model on ONNX Runtime within ``rtol`` (relative to each output's
    scale); otherwise the unsimplified artifact with a note saying why it was kept.
    """
    onnx = _onnx()
    onnxsim = require("onnxsim", _EXTRA, "ONNX simplification")
    raw = raw if isinstance(raw, Artifact) else describe_onnx(raw)
    path = Path(path) if path is not None else Path(raw.path).with_suffix(".sim.onnx")

    def keep_raw(reason: str) -> tuple[Artifact, bool]:
        raw.note(f"kept the unsimplified model: {reason}", logging.WARNING)
        raw.metadata["simplified"] = False
        return raw, False

    try:
        model, ok = onnxsim.simplify(onnx.load(raw.path))
        if not ok:
            return keep_raw("onnxsim reported that its own check failed")
        onnx.save(model, os.fspath(path))
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as e:
        return keep_raw(f"onnxsim failed ({type(e).__name__}: {first_line(e)})")
    art = describe_onnx(path, parent=raw.path, precision=raw.precision)
    art.metadata.update({k: v for k, v in raw.metadata.items() if k not in ("ops", "opset")})
    if [s.name for s in art.inputs] != raw.input_names or art.output_names != raw.output_names:
        return keep_raw(f"onnxsim changed the input/output names of {raw.path}")
    result = _compare_files(raw, art, rtol, seed)
    art.metadata["simplify_check"] = result.to_dict()
    if not result.passed:
        return keep_raw(f"onnxsim changed the numbers ({result.summary()}); {path} is not used")
    art.metadata["simplified"] = True
    before, after = sum(raw.metadata["ops"].values()), sum(art.metadata["ops"].values())
    art.note(f"simplified with onnxsim ({before} -> {after} nodes), matches the unsimplified model "
             f"(max rel error {result.max_rel:.2e})")
    return art, True


def export_onnx(model, args, path, *, opset: int = DEFAULT_OPSET, dynamic: bool = False,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                simplify: bool = True, simplified_path=None, rtol: float = 1e-5, seed: int = 0) -> Artifact:
    """Export to ONNX, then (by default) simplify with onnxsim and keep the result only if verified.

    Returns the artifact to use: the simplified one (its ``parent`` is the unsimplified file) or,
    when simplification is off or rejected, the unsimplified one (with a note saying why).
    """
    raw = export_onnx_raw(model, args, path, opset=opset, dynamic=dynamic, input_names=input_names,
                          output_names=output_names)
    if not simplify:
        return raw
    art, _ = simplify_onnx(raw, simplified_path, rtol=rtol, seed=seed)
    return art


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"ONNX graph has a cycle or a missing producer at node {rest[0].name!r}.")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def convert_onnx_to_fp16(src: Artifact | str | os.PathLike, path=None, *, rtol: float = 1e-2,
                         seed: int = 0) -> Artifact:
    """An fp16 copy of an fp32 ONNX model whose inputs and outputs stay fp32 (Cast nodes at the edges).

    Used where precision must live in the file (TensorRT 11 strongly typed networks). Uses ONNX
    Runtime's float16 converter (initializers, constants and Cast targets become fp16), then checks
    the file and compares it with the fp32 model on ONNX Runtime within ``rtol``.
    """
    onnx = _onnx()
    require("onnxruntime", _EXTRA, "fp16 conversion of ONNX files")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = src if isinstance(src, Artifact) else describe_onnx(src)
    path = Path(path) if path is not None else Path(src.path).with_suffix(".fp16.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(src.path), keep_io_types=True)
    _toposort(model.graph)
    onnx.save(model, os.fspath(path))
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as e:
        raise ExportError(f"the fp16 conversion of {src.path} is not a valid ONNX model: {first_line(e)}") from e
    art = describe_onnx(path, parent=src.path, precision="fp16")
    art.metadata.update({k: v for k, v in src.metadata.items() if k not in ("ops", "opset", "simplify_check")})
    result = _compare_files(src, art, rtol, seed)
    art.metadata["fp16_check"] = result.to_dict()
    if not result.passed:
        raise ExportError(f"the fp16 ONNX model {path} differs from {src.path} beyond rtol {rtol}: "
                          f"{result.summary()}.")
    art.note(f"fp16 weights and activations, fp32 inputs/outputs; max rel error vs fp32 {result.max_rel:.2e}")
    return art


def _export_target(job: ExportJob) -> list[Product]:
    """``model.onnx`` (stage ``onnx``), its onnxsim result ``model.sim.onnx`` when that verified (stage
    ``onnx-simplified``), and for ``--precision fp16`` an fp16 copy ``model.fp16.onnx`` (``onnx-fp16``)."""
    raw = export_onnx_raw(job.module, job.args, job.folder / "model.onnx", dynamic=job.dynamic, opset=job.opset)
    sim = job.folder / "model.sim.onnx"
    art, simplified = simplify_onnx(raw, sim)
    if not simplified and sim.exists():
        sim.unlink()  # onnxsim's rejected result: the note in the record says why
    if simplified:  # the unsimplified record keeps its own notes (what was decomposed for the exporter)
        made = [Product("onnx", raw, main=False), Product("onnx-simplified", art, parent="onnx")]
    else:
        made = [Product("onnx", art)]
    if job.precision == "fp16":
        try:
            made.append(Product("onnx-fp16", convert_onnx_to_fp16(art, job.folder / "model.fp16.onnx"),
                                parent=made[-1].stage, main=False))
        except Exception as e:  # the fp32 files stand on their own
            made.append(Product("onnx-fp16", None, parent=made[-1].stage, main=False, error=first_line(e),
                                precision="fp16"))
    return made


def _native(precision: str, cpu: dict) -> str:
    if precision == "fp16":
        return ("ONNX Runtime's CPU provider has no fp16 convolution kernels: an fp16 model runs slower than fp32 "
                "on a CPU")
    return ""


TARGET = Target(
    name="onnx", title="ONNX", runtime="onnxruntime", suffixes=(".onnx",), source="torch",
    export=_export_target, function="exporters.onnx:export_onnx",
    runner="runtimes.onnxruntime_runner:OnnxRuntimeRunner",
    requires=(("onnx", _EXTRA), ("onnxscript", _EXTRA), ("onnxruntime", _EXTRA), ("onnxsim", _EXTRA)),
    inspect="deploy.inspect:read_onnx", default=True,
    precisions=("fp32", "fp16", "int8"), quantize="exporters.onnx_int8:quantize_onnx", native=_native,
    bench_options={"optimization": "all", "allow_spinning": False},
    bench_note={"graph_optimization": "all", "intra_op_allow_spinning": 0},
    description="ONNX (dynamo exporter, onnxsim re-verified), run on ONNX Runtime",
)
