"""Decode + NMS appended to an exported YOLO-style detector, inside the ONNX file.

The detector's output ``pred`` is (B, N, 5 + nc): cx, cy, w, h in pixels, objectness, class
probabilities, all already decoded (after the sigmoid). :func:`add_nms` replaces the model's outputs
by exactly four, zero-padded past ``num_dets`` and sorted by descending score per image:

    num_dets (B, 1) int32, boxes (B, max_det, 4) float32 x1 y1 x2 y2, scores (B, max_det) float32,
    classes (B, max_det) int32

Semantics (``runtimes.detection.nms`` computes the same on the host, operation for operation):

- boxes: ``x1y1 = cxcy - wh * 0.5``, ``x2y2 = cxcy + wh * 0.5`` (float32);
- score of box i for class c: ``obj_i * p_ic`` (float32). Multi-label (YOLOv7's NMS when nc > 1):
  every (box, class) pair is a candidate, so a box may be kept for several classes. ``agnostic``:
  one candidate per box, score ``max_c obj_i * p_ic``, class its first argmax, one NMS over all classes;
- a candidate is kept only if its score > ``conf``;
- per image and class (one group when agnostic), greedy NMS in descending score: a candidate is
  suppressed when its IoU with an already kept box is > ``iou`` (IoU as ONNX Runtime computes it:
  float32, boxes without positive intersection or area never suppress); at most ``max_det`` kept
  per class (more could never reach the final list). Exactly equal scores within a class are taken
  in the runtime's order (the host: lower box index first);
- the kept (box, class) pairs of an image are ranked by descending score, ties by the lower flat
  index ``c * N + i``; the first ``max_det`` are the output.

Graph (every node and intermediate tensor named ``nms/...``, the four outputs by their own names):
``Slice`` (xy, wh, obj, cls), ``Mul``/``Sub``/``Add`` + ``Concat`` (xyxy), ``Mul`` (scores), [agnostic:
``ReduceMax`` + ``ArgMax``], ``Transpose`` to (B, C, N), ``NonMaxSuppression`` (center_point_box=0; its
[y1, x1, y2, x2] order does not matter to IoU) -> selected (K, 3) = (b, c, i). The ragged selection
becomes padded per-image outputs without ScatterND and without Loop: ``GatherND`` the selected scores; a
flat buffer of B * M scores (M = C * N + max_det, ``ConstantOfShape`` -1) gets them by
``ScatterElements`` at ``b * M + c * N + i`` (``Shape``, ``Gather``, ``Mul``, ``Add``); ``Reshape`` to
(B, M) and ``TopK(max_det)`` per image (the max_det trailing -1 cells make TopK valid whatever N);
``Greater(-0.5)`` marks the real detections; box index ``Mod(j, N)`` and class ``Div(j, N)`` (agnostic:
the ArgMax gathered) with ``Unsqueeze`` + ``GatherND(batch_dims=1)``; ``Where`` zeroes the padding;
``Cast`` to int32; ``ReduceSum`` counts.

Everything else the model computed for other outputs is pruned. Needs opset >= 13 (``Unsqueeze``
and ``ReduceSum`` with axes inputs); ``ReduceMax`` is written for the model's opset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from runtimes.core import ExportError, first_line, require

__all__ = ["NmsOptions", "add_nms", "OUTPUTS", "PREFIX"]

log = logging.getLogger(__name__)

OUTPUTS = ("num_dets", "boxes", "scores", "classes")
PREFIX = "nms/"
MIN_OPSET = 13


@dataclass(frozen=True)
class NmsOptions:
    """Thresholds of the NMS tail: keep score > ``conf``, suppress IoU > ``iou``, at most ``max_det`` per image."""

    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    agnostic: bool = False

    def __post_init__(self) -> None:
        for name in ("conf", "iou"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"NmsOptions.{name} must be a number in [0, 1], got {value!r}.")
        if isinstance(self.max_det, bool) or not isinstance(self.max_det, int) or self.max_det < 1:
            raise ValueError(f"NmsOptions.max_det must be an integer >= 1, got {self.max_det!r}.")


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _used_names(graph) -> set[str]:
    """Every tensor name read by ``graph``'s nodes, their subgraphs included (outer-scope references)."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _used_names(sub)
    return names


def _prune(graph, outputs: set[str]) -> None:
    """Drop the nodes, initializers and value_info that no name in ``outputs`` depends on."""
    needed, kept = set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed |= {n for n in node.input if n}
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed |= _used_names(sub)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


class _Builder:
    """Appends ``nms/``-prefixed nodes and constant initializers to a graph."""

    def __init__(self, graph, helper, numpy_helper):
        self.graph, self.helper, self.numpy_helper = graph, helper, numpy_helper
        self.count = 0

    def const(self, name: str, value, dtype) -> str:
        full = PREFIX + name
        self.graph.initializer.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), full))
        return full

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, public: bool = False,
           **attrs) -> str | list[str]:
        """A node ``nms/<name>``; its output is ``nms/<name>`` (``<name>`` itself when ``public``), or
        ``nms/<name>_0 ..`` when it has several."""
        self.count += 1
        first = name if public else PREFIX + name
        names = [first] if outputs == 1 else [f"{PREFIX}{name}_{k}" for k in range(outputs)]
        self.graph.node.append(self.helper.make_node(op_type, inputs, names, name=PREFIX + name, **attrs))
        return names[0] if outputs == 1 else names


def add_nms(model, opts: NmsOptions, output: str | None = None):
    """A copy of ``model`` whose outputs are exactly ``num_dets, boxes, scores, classes``: decode + NMS of the
    graph output ``output`` (default: the first), a (B, N, 5 + nc) prediction; see the module docstring for
    the semantics and the ops. The batch dimension stays what it was (symbolic or fixed). The result passes
    ``onnx.checker`` (full check)."""
    onnx = require("onnx", "onnx", "adding NMS to an ONNX model")
    from onnx import TensorProto, helper, numpy_helper

    if not isinstance(opts, NmsOptions):
        raise TypeError(f"add_nms expects NmsOptions, got {type(opts).__name__}")
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise ExportError(f"add_nms needs an ONNX model of opset >= {MIN_OPSET}, but this one is opset {opset}; "
                          f"convert it with onnx.version_converter or re-export it.")
    outputs = {o.name: o for o in model.graph.output}
    if not outputs:
        raise ExportError("add_nms: the ONNX model has no outputs.")
    name = output if output is not None else model.graph.output[0].name
    if name not in outputs:
        raise ExportError(f"add_nms: the model has no output {name!r}; its outputs are {', '.join(outputs)}.")
    graph_names = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        graph_names.update(node.output)
        if node.name.startswith(PREFIX):
            raise ExportError(f"add_nms: the model already has a node {node.name!r}: NMS was added before.")
    clash = [n for n in OUTPUTS if n in graph_names]
    if clash or any(n.startswith(PREFIX) for n in graph_names):
        raise ExportError(f"add_nms: the model already has tensor(s) named {', '.join(clash) or PREFIX + '...'}; "
                          f"rename them before adding NMS (its outputs are {', '.join(OUTPUTS)}).")

    pred_info = outputs[name]
    tt = pred_info.type.tensor_type
    dims = list(tt.shape.dim)
    if len(dims) != 3 or not dims[2].HasField("dim_value") or dims[2].dim_value < 6:
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
        raise ExportError(f"add_nms: output {name!r} has shape {shape}, but a (batch, boxes, 5 + classes) "
                          f"prediction with a fixed last dimension >= 6 was expected; pass output= naming it.")
    if tt.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
        raise ExportError(f"add_nms: output {name!r} has element type "
                          f"{TensorProto.DataType.Name(tt.elem_type)}; a floating-point prediction was expected.")

    new = onnx.ModelProto()
    new.CopyFrom(model)
    g = new.graph
    b = _Builder(g, helper, numpy_helper)
    nc = dims[2].dim_value - 5
    groups = 1 if opts.agnostic else nc
    i64, f32 = "int64", "float32"

    pred = name
    if tt.elem_type != TensorProto.FLOAT:
        pred = b.op("Cast", [pred], "pred_f32", to=TensorProto.FLOAT)

    def cols(lo: int, hi: int, label: str) -> str:
        return b.op("Slice", [pred, b.const(f"{label}_start", [lo], i64), b.const(f"{label}_end", [hi], i64),
                              b.const(f"{label}_axis", [2], i64)], label)

    xy, wh, obj, cls = cols(0, 2, "xy"), cols(2, 4, "wh"), cols(4, 5, "obj"), cols(5, 5 + nc, "cls")
    half = b.op("Mul", [wh, b.const("half", 0.5, f32)], "half_wh")
    boxes = b.op("Concat", [b.op("Sub", [xy, half], "x1y1"), b.op("Add", [xy, half], "x2y2")], "boxes_xyxy",
                 axis=2)
    scores = b.op("Mul", [obj, cls], "class_scores")  # (B, N, nc)
    if opts.agnostic:
        best = b.op("ArgMax", [scores], "best_class", axis=2, keepdims=1)  # (B, N, 1) int64
        if opset >= 18:
            scores = b.op("ReduceMax", [scores, b.const("class_axis", [2], i64)], "best_score", keepdims=1)
        else:
            scores = b.op("ReduceMax", [scores], "best_score", axes=[2], keepdims=1)
    scores_t = b.op("Transpose", [scores], "scores_bcn", perm=[0, 2, 1])  # (B, C, N)
    selected = b.op("NonMaxSuppression", [boxes, scores_t, b.const("max_det", [opts.max_det], i64),
                                          b.const("iou", [opts.iou], f32), b.const("conf", [opts.conf], f32)],
                    "selected", center_point_box=0)  # (K, 3): batch, class, box
    sel_scores = b.op("GatherND", [scores_t, selected], "selected_scores")  # (K,)

    def column(k: int, label: str) -> str:
        return b.op("Gather", [selected, b.const(f"{label}_col", k, i64)], label, axis=1)  # (K,)

    sel_b, sel_c, sel_i = column(0, "sel_batch"), column(1, "sel_class"), column(2, "sel_box")
    shape = b.op("Shape", [pred], "pred_shape")
    n_batch = b.op("Gather", [shape, b.const("batch_dim", [0], i64)], "num_images")  # (1,)
    n_box = b.op("Gather", [shape, b.const("box_dim", [1], i64)], "num_boxes")  # (1,)
    row = b.op("Add", [b.op("Mul", [n_box, b.const("groups", [groups], i64)], "cells"),
                       b.const("pad_cells", [opts.max_det], i64)], "row")  # (1,) M = C * N + max_det
    flat = b.op("Add", [b.op("Add", [b.op("Mul", [sel_b, row], "row_start"),
                                     b.op("Mul", [sel_c, n_box], "class_start")], "cell_start"), sel_i], "cell")
    buffer = b.op("ConstantOfShape", [b.op("Mul", [n_batch, row], "buffer_size")], "empty_buffer",
                  value=numpy_helper.from_array(np.array([-1.0], dtype=f32)))
    buffer = b.op("ScatterElements", [buffer, flat, sel_scores], "buffer", axis=0)
    table = b.op("Reshape", [buffer, b.op("Concat", [n_batch, row], "table_shape", axis=0)], "table")  # (B, M)
    top, cell = b.op("TopK", [table, b.const("k", [opts.max_det], i64)], "top", outputs=2, axis=1, largest=1,
                     sorted=1)  # (B, max_det)
    valid = b.op("Greater", [top, b.const("padding_below", -0.5, f32)], "valid")
    box_idx = b.op("Unsqueeze", [b.op("Mod", [cell, n_box], "box_index"), b.const("last_axis", [2], i64)],
                   "box_index_3d")  # (B, max_det, 1)
    det_boxes = b.op("GatherND", [boxes, box_idx], "det_boxes", batch_dims=1)  # (B, max_det, 4)
    if opts.agnostic:
        det_class = b.op("Squeeze", [b.op("GatherND", [best, box_idx], "det_class_3d", batch_dims=1),
                                     b.const("squeeze_axis", [2], i64)], "det_class")
    else:
        det_class = b.op("Div", [cell, n_box], "det_class")
    zero_f, zero_i = b.const("zero_f", 0.0, f32), b.const("zero_i", 0, i64)
    valid_3d = b.op("Unsqueeze", [valid, b.const("valid_axis", [2], i64)], "valid_3d")
    b.op("ReduceSum", [b.op("Cast", [valid], "valid_i32", to=TensorProto.INT32), b.const("count_axis", [1], i64)],
         "num_dets", public=True, keepdims=1)
    b.op("Where", [valid_3d, det_boxes, zero_f], "boxes", public=True)
    b.op("Where", [valid, top, zero_f], "scores", public=True)
    b.op("Cast", [b.op("Where", [valid, det_class, zero_i], "classes_i64")], "classes", public=True,
         to=TensorProto.INT32)

    batch = dims[0]
    batch_dim = batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or "batch")
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("num_dets", TensorProto.INT32, [batch_dim, 1]),
                     helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch_dim, opts.max_det, 4]),
                     helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch_dim, opts.max_det]),
                     helper.make_tensor_value_info("classes", TensorProto.INT32, [batch_dim, opts.max_det])])
    _prune(g, set(OUTPUTS))
    try:
        onnx.checker.check_model(new, full_check=True)
    except Exception as e:
        raise ExportError(f"add_nms produced a model onnx.checker rejects: {first_line(e)}") from e
    log.info("added NMS to output %r (%d classes, %s): %d nodes", name, nc, opts, b.count)
    return new
