"""INT8 error analysis: SQNR, weight statistics, and the per-layer errors of a QDQ model against its fp32 model.

**SQNR** (signal-to-quantization-noise ratio) of a tensor ``t`` against its reference ``r``, over all elements:

    SQNR(r, t) = 10 · log10( Σ r² / Σ (r − t)² )  dB,   +inf when t == r

A uniform b-bit quantizer of a full-scale uniform signal gives about 6.02·b dB (48 dB for int8); every 6 dB
a layer loses costs it one bit. SQNR is energy-weighted: a few large channels dominate it.

**Weight statistics** of a kernel ``W`` with output channels on axis 0, ``a_c = max |W_c|`` per channel:

    max_median_ratio = max_c a_c / median_c a_c
    kurtosis         = E[(w − μ)⁴] / σ⁴   (Pearson's, over all weights: 3 for a Gaussian, 1.8 for a uniform)

A per-tensor int8 scale is ``max_c a_c / 127``, so a channel at the median keeps about ``127 / ratio``
levels: merged RepVGG kernels (3x3 + 1x1 + identity, each scaled by its BatchNorm) often have a few channels
far above the rest. A per-channel scale (``a_c / 127``) does not care; a heavy-tailed kernel (large kurtosis)
wastes levels either way.

**Per-layer errors** (:func:`layer_errors`): for every Conv, Gemm and MatMul of the fp32 ONNX file
(:func:`onnx_layers`, graph order), the layer's input and output tensors are made graph outputs of in-memory
copies of both models; in the QDQ model the input is the DequantizeLinear output feeding the node (the
quantized activation) and the output is the node's float result before it is requantized. Both models run on
ONNX Runtime's CPU provider with graph optimizations off, so the QDQ model is simulated in float (QDQ nodes
are not fused into integer kernels, whose requantization rounds within one int8 step of the simulation).

    lost_db = SQNR_in − SQNR_out

is what the layer itself costs (its weights' quantization, and how it amplifies the error it receives). A
layer kept in float (no QDQ on its weight) still appears; it loses about 0 dB.

Layers are named as the plain model's graph nodes: the torch dynamo exporter names node ``conv2d_3``
``node_conv2d_3`` and its output ``conv2d_3`` (:func:`layer_name`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .core import require

__all__ = ["QUANTIZABLE_OPS", "sqnr_db", "weight_stats", "LayerError", "layer_errors", "onnx_layers", "layer_name"]

log = logging.getLogger(__name__)

QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
_EXTRA = "onnx"


def sqnr_db(reference, test) -> float:
    """``10·log10(Σ ref² / Σ (ref − test)²)`` in dB over all elements (float64); +inf when identical."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"SQNR needs tensors of one shape; the reference is {ref.shape}, the test {out.shape}")
    return _db(float(np.sum(ref * ref)), float(np.sum((ref - out) ** 2)))


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def weight_stats(kernel: np.ndarray) -> dict:
    """Range statistics of a kernel with output channels on axis 0; see the module docstring.

    Keys: ``channels``, ``abs_max``, ``channel_absmax_min`` / ``_median`` / ``_max`` (of the per-channel
    absolute maxima), ``max_median_ratio`` (inf when the median channel is all zeros), ``kurtosis`` (Pearson's,
    of all weights; 3 for a Gaussian; NaN for a constant kernel).
    """
    w = np.asarray(kernel, dtype=np.float64)
    if w.ndim == 0 or w.size == 0:
        raise ValueError(f"weight statistics need a kernel with output channels on axis 0, got shape {w.shape}")
    per_channel = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    median, top = float(np.median(per_channel)), float(per_channel.max())
    ratio = top / median if median > 0 else (math.inf if top > 0 else 1.0)
    centered = w - w.mean()
    var = float(np.mean(centered ** 2))
    kurtosis = float(np.mean(centered ** 4)) / var ** 2 if var > 0 else math.nan
    return {"channels": int(w.shape[0]), "abs_max": top, "channel_absmax_min": float(per_channel.min()),
            "channel_absmax_median": median, "channel_absmax_max": top, "max_median_ratio": ratio,
            "kurtosis": kurtosis}


@dataclass
class LayerError:
    """One layer's SQNR (dB) at its input and output in the int8 model, against the fp32 model."""

    name: str
    op: str
    sqnr_in_db: float
    sqnr_out_db: float
    weights: dict = field(default_factory=dict)  # weight_stats of the fp32 kernel ({} when it is not a constant)
    quantized: bool = True  # its weight is fed by a DequantizeLinear in the int8 model
    lost_db: float = field(init=False)

    def __post_init__(self):
        both_exact = math.isinf(self.sqnr_in_db) and self.sqnr_in_db == self.sqnr_out_db
        self.lost_db = 0.0 if both_exact else self.sqnr_in_db - self.sqnr_out_db

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- ONNX graphs

def layer_name(node) -> str:
    """The plain model's name of an ONNX node: ``conv2d_3`` for ``node_conv2d_3``, else its first output."""
    if node.name.startswith("node_"):
        return node.name[len("node_"):]
    return node.output[0] if node.output else node.name


def onnx_layers(model) -> list[tuple[str, object]]:
    """``(layer name, node)`` of every Conv, Gemm and MatMul of an ONNX model (or file), in graph order."""
    if isinstance(model, (str, os.PathLike)):
        model = require("onnx", _EXTRA, "reading ONNX layers").load(os.fspath(model))
    return [(layer_name(n), n) for n in model.graph.node if n.op_type in QUANTIZABLE_OPS]


def _find(model, fp32_node):
    """The node of ``model`` that stands for ``fp32_node``: the same name, else the same first output."""
    for n in model.graph.node:
        if n.name == fp32_node.name and n.op_type == fp32_node.op_type:
            return n
    return next((n for n in model.graph.node if fp32_node.output[0] in n.output), None)


def _kernel(model, node) -> np.ndarray | None:
    """The constant weight of a Conv / Gemm / MatMul with output channels on axis 0, or None."""
    from onnx import numpy_helper

    if len(node.input) < 2:
        return None
    init = next((i for i in model.graph.initializer if i.name == node.input[1]), None)
    if init is None:
        return None
    w = numpy_helper.to_array(init)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return w if trans_b else w.T
    if node.op_type == "MatMul":
        return np.moveaxis(w, -1, 0)
    return w


def _with_outputs(model, names):
    """A copy of ``model`` whose graph also outputs the float tensors ``names``."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name not in have:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return copy


def _session(model):
    ort = require("onnxruntime", _EXTRA, "per-layer INT8 errors")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _chunks(x: np.ndarray, batch: int):
    """``(chunk, rows)``: ``x`` in chunks of ``batch`` rows, the last padded by repeating its last row."""
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        rows = len(part)
        if rows < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - rows, axis=0)])
        yield np.ascontiguousarray(part, dtype=np.float32), rows


def _run(session, feed: str, chunk: np.ndarray, rows: int) -> dict[str, np.ndarray]:
    """Every output of ``session`` on ``chunk`` by name, and the input itself; padding rows dropped."""
    values = dict(zip((o.name for o in session.get_outputs()), session.run(None, {feed: chunk})), **{feed: chunk})
    return {k: v[:rows] if v.ndim and len(v) == len(chunk) else v for k, v in values.items()}


def _io(node) -> tuple[str, str]:
    return node.input[0], node.output[0]


def layer_errors(fp32_onnx, int8_onnx, x: np.ndarray, batch: int = 1) -> list[LayerError]:
    """Per-layer SQNR of the QDQ model ``int8_onnx`` against ``fp32_onnx`` on inputs ``x`` (``(N, ...)``,
    fed in chunks of ``batch``); one :class:`LayerError` per Conv / Gemm / MatMul of the fp32 file, in graph
    order. See the module docstring."""
    onnx = require("onnx", _EXTRA, "per-layer INT8 errors")
    fp32, q = onnx.load(os.fspath(fp32_onnx)), onnx.load(os.fspath(int8_onnx))
    layers = []  # (name, fp32 node, int8 node)
    for name, node in onnx_layers(fp32):
        found = _find(q, node)
        if found is None:
            raise ValueError(f"layer {name} ({node.op_type} node {node.name!r}) of {fp32_onnx} has no node of that "
                             f"name or output in {int8_onnx}; was the int8 model made from this fp32 model?")
        layers.append((name, node, found))
    feed = next(i for i in fp32.graph.input if i.name not in {t.name for t in fp32.graph.initializer})
    dims = feed.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
        raise ValueError(f"{fp32_onnx} takes batches of {dims[0].dim_value} on input {feed.name}; pass "
                         f"batch={dims[0].dim_value}, not {batch}")
    sessions = [_session(_with_outputs(model, {t for layer in layers for t in _io(layer[side])} - {feed.name}))
                for side, model in ((1, fp32), (2, q))]
    sums = np.zeros((len(layers), 2, 2))  # layer, (input, output), (Σ ref², Σ (ref − test)²)
    for chunk, rows in _chunks(np.asarray(x), batch):
        ref, test = (_run(sess, feed.name, chunk, rows) for sess in sessions)
        for i, (_, node, found) in enumerate(layers):
            for j, (r, t) in enumerate(zip(_io(node), _io(found))):
                a = ref[r].astype(np.float64)
                sums[i, j] += (np.sum(a * a), np.sum((a - test[t]) ** 2))
    dq_outputs = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    out = []
    for (name, node, found), s in zip(layers, sums):
        kernel = _kernel(fp32, node)
        out.append(LayerError(name, node.op_type, _db(*s[0]), _db(*s[1]),
                              weight_stats(kernel) if kernel is not None else {},
                              quantized=len(found.input) > 1 and found.input[1] in dq_outputs))
    log.debug("per-layer errors of %s: %s", int8_onnx, ", ".join(f"{e.name} {e.lost_db:+.1f} dB" for e in out))
    return out
