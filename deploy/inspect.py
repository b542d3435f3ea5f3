"""Op summaries of a model or an artifact: ops by type, convolutions, parameters, MACs/FLOPs, branches.

Each format is read into the same small graph (nodes with a native op type, a kind, input and
output tensor names, and the MACs of convolutions and linear layers); one analysis serves all:

- **parameters**: of a torch model or ``.pt2``, the module's parameters (:func:`count_parameters`:
  ``module.parameters()``, trainable or not, a tensor shared under two names counted once), with
  its buffers (BatchNorm running statistics, ``num_batches_tracked``) counted apart; of an ONNX,
  OpenVINO or TFLite file, which has no such distinction, the constant values the graph computes
  with (weights, biases, and BatchNorm statistics if left unfolded), each counted once: every
  floating-point constant, and of an INT8 file the quantized weights and int32 biases (what ONNX's
  DequantizeLinear / QLinearConv / ConvInteger read, OpenVINO's i8 Constant -> Convert -> [Subtract]
  -> Multiply decompression, TFLite's quantized tensors), but not the scales, zero points and
  FakeQuantize ranges, so an INT8 file counts what its fp32 source counts. An exporter leaves out an
  all-zero bias, so a file can hold fewer than its plain model (noted when the run's report says);
- **MACs**: multiply-accumulates of convolutions and linear layers, quantized ones included (QLinearConv,
  QLinearMatMul, ConvInteger, MatMulInteger, a weight through DequantizeLinear or decompression),
  ``numel(output) x (weight numel / output channels)``, per sample when the batch is dynamic;
  FLOPs = 2 x MACs;
- **mergeable branches**: an addition whose operands, looking through BatchNorm and per-channel
  affine ops, are convolutions / average pools / the identity of the *same* input tensor (looking
  through padding) is a branch group one convolution can replace (RepVGG, ACNet, DBB, MobileOne).
  A residual ``f(x) + x`` through a nonlinearity is not counted. **BatchNorms** are counted as
  foldable. For an artifact in a ``deploy convert`` output directory (or a ``.pt2`` written by it)
  the numbers merged by the run are read back from its report.

Readers: torch (a model, captured with torch.export, or a ``.pt2``), ONNX, OpenVINO IR, TFLite, ExecuTorch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from inspect import signature
from pathlib import Path

import numpy as np

from runtimes.core import count_parameters, require

__all__ = ["OpSummary", "count_parameters", "inspect_path", "inspect_module", "inspect_source", "layer_costs",
           "read_torch", "read_onnx", "read_openvino", "read_tflite", "read_executorch", "read_ncnn", "read_coreml",
           "read_mnn"]

log = logging.getLogger(__name__)

# native op type -> kind, per format. Kinds: conv, linear, bn, binary (add/sub/mul/div), sum, pad, pool,
# pass (no arithmetic: looked through), other.
_KINDS = {
    "torch": {**dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                               "conv_transpose2d"), "conv"),
              **dict.fromkeys(("linear", "addmm", "mm", "matmul"), "linear"),
              **dict.fromkeys(("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                               "_native_batch_norm_legit"), "bn"),
              **dict.fromkeys(("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"), "binary"),
              **dict.fromkeys(("constant_pad_nd", "pad"), "pad"),
              **dict.fromkeys(("avg_pool1d", "avg_pool2d"), "pool"),
              **dict.fromkeys(("getitem", "clone", "contiguous", "dropout", "alias", "detach", "_to_copy"), "pass")},
    "onnx": {"Conv": "conv", "ConvTranspose": "conv", "QLinearConv": "conv", "ConvInteger": "conv",
             "Gemm": "linear", "MatMul": "linear", "QLinearMatMul": "linear", "MatMulInteger": "linear",
             "BatchNormalization": "bn", "Add": "binary", "Sub": "binary", "Mul": "binary", "Div": "binary",
             "Sum": "sum", "Pad": "pad", "AveragePool": "pool", "Identity": "pass", "Dropout": "pass",
             "Cast": "pass"},
    "openvino": {"Convolution": "conv", "GroupConvolution": "conv", "ConvolutionBackpropData": "conv",
                 "MatMul": "linear", "BatchNormInference": "bn", "Add": "binary", "Subtract": "binary",
                 "Multiply": "binary", "Divide": "binary", "Pad": "pad", "AvgPool": "pool", "Convert": "pass"},
    "tflite": {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "conv", "TRANSPOSE_CONV": "conv", "CONV_3D": "conv",
               "FULLY_CONNECTED": "linear", "BATCH_MATMUL": "linear", "ADD": "binary", "SUB": "binary",
               "MUL": "binary", "DIV": "binary", "ADD_N": "sum", "PAD": "pad", "PADV2": "pad",
               "AVERAGE_POOL_2D": "pool", "DEQUANTIZE": "pass"},
    "executorch": {"Conv2d": "conv", "DepthwiseConv2d": "conv", "ConvTranspose2d": "conv",  # XNNPACK nodes
                   "FullyConnected": "linear", "BatchMatrixMultiply": "linear", "Add": "binary",
                   "Multiply": "binary", "Subtract": "binary", "Div": "binary", "StaticConstantPad": "pad",
                   "AvgPooling2d": "pool", "Convert": "pass"},
    "coreml": {"conv": "conv", "conv_transpose": "conv", "linear": "linear", "matmul": "linear", "batch_norm": "bn",
               "add": "binary", "sub": "binary", "mul": "binary", "real_div": "binary", "pad": "pad",
               "avg_pool": "pool", "cast": "pass", "identity": "pass"},
    "ncnn": {**dict.fromkeys(("Convolution", "ConvolutionDepthWise", "Convolution1D", "Convolution3D",
                              "ConvolutionDepthWise1D", "ConvolutionDepthWise3D", "Deconvolution",
                              "DeconvolutionDepthWise", "Deconvolution1D", "Deconvolution3D"), "conv"),
             "InnerProduct": "linear", "Gemm": "linear", "MatMul": "linear", "BatchNorm": "bn", "BinaryOp": "binary",
             "Scale": "binary", "Eltwise": "sum", "Padding": "pad", "Pooling": "pool", "Split": "pass",
             "Noop": "pass", "Cast": "pass"},
    "mnn": {**dict.fromkeys(("Convolution", "ConvolutionDepthwise", "Deconvolution", "DeconvolutionDepthwise",
                             "ConvInt8", "DepthwiseConvInt8"), "conv"),
            "MatMul": "linear", "BatchMatMul": "linear", "BatchNorm": "bn", "BinaryOp": "binary", "Scale": "binary",
            "Eltwise": "sum", "Padding": "pad", "Pooling": "pool", "ConvertTensor": "pass", "Cast": "pass",
            "FloatToInt8": "pass", "Int8ToFloat": "pass"},
}
# ONNX quantization ops -> their input slots holding scales and zero points (quantization parameters, not weights)
_ONNX_QPARAMS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "QLinearConv": (1, 2, 4, 5, 6, 7),
                 "QLinearMatMul": (1, 2, 4, 5, 6, 7), "ConvInteger": (2, 3), "MatMulInteger": (2, 3)}
_ONNX_FLOATS = (1, 10, 11, 16)  # float, float16, double, bfloat16
_ONNX_SAME_SHAPE = ("DequantizeLinear", "QuantizeLinear", "Cast", "Identity")  # output shape = shape of input 0
_ADDS = {"add", "add_", "Add", "ADD"}
_ACTIVATIONS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "silu", "silu_", "gelu", "leaky_relu",
                "leaky_relu_", "hardswish", "hardswish_", "hardsigmoid", "tanh",  # torch
                "Relu", "Sigmoid", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Tanh", "Gelu", "Swish",
                "HSwish", "Clamp", "PRelu",  # ONNX, OpenVINO
                "RELU", "RELU6", "LOGISTIC", "HARD_SWISH", "LEAKY_RELU", "TANH", "GELU"}  # TFLite


@dataclass
class _Node:
    op: str
    kind: str
    inputs: list[str]
    outputs: list[str]
    macs: int = 0
    kernel: str = ""
    bytes: int = 0  # memory access: bytes read (inputs, weights) + written (outputs); torch graphs only
    params: int = 0  # parameters it reads (buffers not counted); torch graphs only
    module: str = ""  # the module it came from; torch graphs only
    per_sample: bool = False  # its MACs count a dimension not fixed in the graph (a dynamic batch) as 1


@dataclass
class OpSummary:
    """What ``deploy inspect`` prints, as data."""

    source: str
    format: str
    ops: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    convolutions: int = 0
    conv_kernels: dict[str, int] = field(default_factory=dict)
    linears: int = 0
    params: int = 0   # torch: count_parameters; artifacts: constants computed with (see the module doc)
    buffers: int = 0  # torch: buffers (BatchNorm running statistics, ...); artifacts: 0
    macs: int = 0
    batchnorms: int = 0
    branch_groups: int = 0
    branches: int = 0
    memory_access: int = 0  # ShuffleNet V2 G1/G4: bytes read + written by every op (0: not known)
    elementwise: int = 0    # G4: element-wise ops (add/mul/activations)
    forks: int = 0          # G3 fragmentation: tensors read by two or more ops ...
    fork_branches: int = 0  # ... and the parallel paths leaving them
    merged: dict | None = None  # what a deploy run merged, when known
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flops"] = self.flops
        return d

    def summary(self) -> str:
        kernels = ", ".join(f"{k}: {v}" for k, v in sorted(self.conv_kernels.items(), key=lambda kv: -kv[1]))
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [f"{self.source} ({self.format})",
                 f"inputs:        {'; '.join(self.inputs) or '-'}",
                 f"outputs:       {'; '.join(self.outputs) or '-'}",
                 f"parameters:    {self.params:,}" + (f" (+ {self.buffers:,} in buffers)" if self.buffers else ""),
                 f"MACs:          {_si(self.macs)} (FLOPs {_si(self.flops)} = 2 x MACs of convolutions and "
                 "linear layers)",
                 f"convolutions:  {self.convolutions}" + (f" ({kernels})" if kernels else "")
                 + (f"; linear layers: {self.linears}" if self.linears else ""),
                 f"mergeable:     {self.branch_groups} branch group(s) ({self.branches} branches), "
                 f"{self.batchnorms} BatchNorm(s) to fold"]
        if self.merged:
            m = self.merged
            lines.append(f"merged:        {m.get('branch_groups_merged', 0)} branch group(s) "
                         f"({m.get('branches_merged', 0)} branches), {m.get('batchnorms_folded', 0)} BatchNorm(s) "
                         f"folded by deploy convert ({m.get('from', 'its report')})")
        access = f"{self.memory_access / 2**20:.2f} MiB" if self.memory_access else "n/a for this format"
        lines.append(f"guidelines:    memory access {access}; element-wise ops {self.elementwise}; "
                     f"fragmentation {self.forks} fork(s) into {self.fork_branches} parallel paths")
        lines.append(f"ops ({self.nodes}): {ops}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(n)


def _numel(shape) -> tuple[int, bool]:
    """(elements, every dimension fixed) of a tensor shape; a dimension the graph leaves open (a dynamic batch:
    None, a name, a symbol, -1) counts as 1, so MACs are per sample."""
    fixed = [isinstance(d, (int, np.integer)) and d >= 0 for d in shape]
    return math.prod(int(d) if f else 1 for d, f in zip(shape, fixed)), all(fixed)


def _spec(name: str, shape, dtype) -> str:
    dims = "x".join("?" if d is None or (isinstance(d, int) and d < 0) else str(d) for d in shape)
    return f"{name} {dims} {dtype}"


# ------------------------------------------------------------------------------------------- analysis

def _analyze(summary: OpSummary, nodes: list[_Node], consts: dict[str, int]) -> OpSummary:
    """Fill ``summary`` from the graph; ``consts`` maps constant tensor names to their float value count."""
    consts = dict(consts)
    for n in nodes:  # a node computed from constants only is a constant (Convert, DEQUANTIZE of weights)
        if n.inputs and all(i in consts for i in n.inputs) and n.kind in ("pass", "other", "binary"):
            for o in n.outputs:
                consts.setdefault(o, 0)
    summary.ops = dict(Counter(n.op for n in nodes))
    summary.nodes = len(nodes)
    summary.params = sum(consts.values())
    summary.macs = sum(n.macs for n in nodes)
    if any(n.per_sample and n.macs for n in nodes):
        summary.notes.append("MACs and memory access are per sample: a dimension the graph leaves open "
                             "(a dynamic batch) is counted as 1")
    convs = [n for n in nodes if n.kind == "conv"]
    summary.convolutions = len(convs)
    summary.conv_kernels = dict(Counter(n.kernel for n in convs if n.kernel))
    summary.linears = sum(1 for n in nodes if n.kind == "linear")
    summary.batchnorms = sum(1 for n in nodes if n.kind == "bn")
    summary.branch_groups, summary.branches = _branch_groups(nodes, consts)
    summary.memory_access = sum(n.bytes for n in nodes)
    summary.elementwise = sum(1 for n in nodes if _is_elementwise(n) and _data(n, consts) is not None)
    readers = Counter(i for n in nodes if n.kind != "pass" for i in set(n.inputs) if i not in consts)
    summary.forks = sum(1 for c in readers.values() if c >= 2)
    summary.fork_branches = sum(c for c in readers.values() if c >= 2)
    return summary


def _data(node: _Node, consts) -> str | None:
    """The first non-constant input of ``node``."""
    return next((i for i in node.inputs if i not in consts), None)


def _branch_groups(nodes: list[_Node], consts: dict[str, int]) -> tuple[int, int]:
    producer = {o: n for n in nodes for o in n.outputs}
    uses = Counter(i for n in nodes for i in n.inputs)

    def is_sum(n: _Node | None) -> bool:
        if n is None:
            return False
        live = [i for i in n.inputs if i not in consts]
        return (n.kind == "sum" or (n.kind == "binary" and n.op in _ADDS)) and len(live) >= 2

    def through(t: str, kinds: tuple[str, ...]) -> str:
        seen = 0
        while t in producer and seen < 1000:
            n = producer[t]
            live = [i for i in n.inputs if i not in consts]
            if not (n.kind in kinds or (n.kind == "binary" and "affine" in kinds and len(live) == 1)) or not live:
                break
            t, seen = live[0], seen + 1
        return t

    def source(t: str) -> tuple[str, str]:
        root = through(t, ("pass", "bn", "affine"))
        n = producer.get(root)
        if n is None or n.kind not in ("conv", "linear", "pool") or _data(n, consts) is None:
            return through(root, ("pass",)), "identity"
        x = _data(n, consts)
        while True:  # a 1x1 conv used only here, before the branch's conv or pool, is part of it (DBB)
            r = through(x, ("pass", "pad", "bn", "affine"))
            p = producer.get(r)
            if p is None or p.kind != "conv" or not _is_1x1(p.kernel) or uses[r] != 1 \
                    or _data(p, consts) is None:
                break
            x = _data(p, consts)
        return through(x, ("pass", "pad")), n.kind

    def operands(n: _Node) -> Iterable[str]:
        for i in n.inputs:
            if i in consts:
                continue
            p = producer.get(i)
            if is_sum(p) and uses[i] == 1:
                yield from operands(p)
            else:
                yield i

    groups = branches = 0
    inner = {i for n in nodes if is_sum(n) for i in n.inputs if is_sum(producer.get(i)) and uses[i] == 1}
    for n in nodes:
        if not is_sum(n) or any(o in inner for o in n.outputs):
            continue
        by_source: dict[str, list[str]] = {}
        for t in operands(n):
            src, kind = source(t)
            by_source.setdefault(src, []).append(kind)
        for kinds in by_source.values():
            if len(kinds) >= 2 and any(k != "identity" for k in kinds):
                groups += 1
                branches += len(kinds)
    return groups, branches


# -------------------------------------------------------------------------------------------- readers

def _kernel(shape, groups: int = 1, depthwise: bool = False) -> str:
    text = "x".join(str(int(d)) for d in shape)
    return text + (" dw" if depthwise else (f" g{groups}" if groups > 1 else ""))


def _is_1x1(kernel: str) -> bool:
    return bool(kernel) and set(kernel.split()[0].split("x")) == {"1"}


def inspect_module(module, args, source: str = "model", fmt: str = "torch") -> OpSummary:
    """Summary of a torch module (captured with torch.export on ``args``) or of an fx GraphModule."""
    return _torch_graph(_as_graph_module(module, args), OpSummary(source, fmt))


def _nbytes(val) -> int:
    import torch

    if isinstance(val, (list, tuple)):
        return sum(_nbytes(v) for v in val)
    return _numel(val.shape)[0] * val.element_size() if isinstance(val, torch.Tensor) else 0


def layer_costs(module, args) -> list[dict]:
    """The cost model per op of a torch module (captured on ``args``): FLOPs, parameters, memory
    access (bytes read + written) and whether it is element-wise, in graph order; data movement
    with no arithmetic (getitem, clone, ...) is left out."""
    gm = _as_graph_module(module, args)
    nodes, _ = _torch_nodes(gm, OpSummary("model", "torch"))
    return [{"name": n.outputs[0], "module": n.module, "op": n.op, "kind": n.kind, "flops": 2 * n.macs,
             "params": n.params, "bytes": n.bytes, "elementwise": _is_elementwise(n)}
            for n in nodes if n.kind != "pass"]


def _is_elementwise(n: _Node) -> bool:
    return n.kind == "binary" or n.op in _ACTIVATIONS


def _as_graph_module(module, args):
    import torch
    from torch import fx

    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    if not isinstance(module, fx.GraphModule):
        import fusers

        module = fusers.capture(module, args)
    return module


def _torch_graph(gm, summary: OpSummary) -> OpSummary:
    nodes, consts = _torch_nodes(gm, summary)
    _analyze(summary, nodes, consts)
    summary.params, summary.buffers = count_parameters(gm)
    return summary


def _torch_nodes(gm, summary: OpSummary) -> tuple[list[_Node], dict[str, int]]:
    """The nodes and constants of an fx graph, each constant mapped to its parameter count (0 for a
    buffer or a lifted constant: the module's registration decides, not the op reading it); fills
    the summary's input/output specs."""
    import torch

    from fusers.graph import fetch_attr, module_path

    parameters = {id(p) for p in gm.parameters()}
    nodes, consts = [], {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                consts[node.name] = value.numel() if id(value) in parameters else 0
            continue
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                summary.inputs.append(_spec(node.name, tuple(val.shape), str(val.dtype).replace("torch.", "")))
            continue
        if node.op == "output":
            from torch.utils import _pytree as pytree

            for i, leaf in enumerate(pytree.tree_leaves(node.args[0])):
                val = leaf.meta.get("val") if isinstance(leaf, torch.fx.Node) else None
                if isinstance(val, torch.Tensor):
                    summary.outputs.append(_spec(f"output{i}", tuple(val.shape),
                                                 str(val.dtype).replace("torch.", "")))
            continue
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if name.startswith("_assert") or name in ("sym_size", "_guards_fn"):
            continue
        kind = _KINDS["torch"].get(name, "other")
        n = _Node(name, kind, [a.name for a in node.all_input_nodes], [node.name])
        n.bytes = sum(_nbytes(a.meta.get("val")) for a in node.all_input_nodes) + _nbytes(node.meta.get("val"))
        n.params = sum(consts.get(a.name, 0) for a in node.all_input_nodes)
        n.module = module_path(node)
        if kind in ("conv", "linear"):
            w = node.args[2 if name == "addmm" else 1] if len(node.args) > (2 if name == "addmm" else 1) else None
            w = w if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None  # a weight, not an activation
            wval, out = (w.meta.get("val") if w is not None else None), node.meta.get("val")
            if w is not None and not isinstance(wval, torch.Tensor):
                wval = fetch_attr(gm, w.target)
            if isinstance(wval, torch.Tensor) and isinstance(out, torch.Tensor) and wval.dim() >= 2:
                numel, fixed = _numel(out.shape)
                n.per_sample = not fixed
                if kind == "conv":
                    groups = node.args[6] if name == "conv2d" and len(node.args) > 6 else \
                        node.args[8] if name in ("convolution", "_convolution") and len(node.args) > 8 else 1
                    n.kernel = _kernel(wval.shape[2:], groups if isinstance(groups, int) else 1)
                    n.macs = numel * math.prod(wval.shape[1:])
                else:
                    k = wval.shape[1] if name == "linear" else wval.shape[0]
                    n.macs = numel * int(k)
            elif kind == "linear":
                n.kind = "other"  # a product of two activations is not a layer
        nodes.append(n)
    return nodes, consts


def read_onnx(path: str, summary: OpSummary) -> OpSummary:
    onnx = require("onnx", "onnx", "inspecting ONNX files")
    from onnx import numpy_helper, shape_inference

    from runtimes.base import check_file
    from runtimes.core import CorruptArtifact

    model = onnx.load(check_file(path, "ONNX"))
    if not model.graph.node and not model.graph.output:
        raise CorruptArtifact(f"ONNX file {path} holds no graph (no nodes and no outputs), so there is nothing to "
                              "inspect; export the model again")
    try:
        model = shape_inference.infer_shapes(model)
    except Exception as e:  # shapes are only needed for MACs
        summary.notes.append(f"ONNX shape inference failed ({type(e).__name__}); MACs may be incomplete")
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    summary.format = f"{summary.format}, opset {opset}"
    shapes: dict[str, tuple] = {}
    for v in list(graph.value_info) + list(graph.output) + list(graph.input):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
    values: dict[str, tuple[int, bool]] = {}  # constant -> (element count, floating point)
    const_shapes: dict[str, tuple] = {}
    for init in graph.initializer:
        const_shapes[init.name] = tuple(init.dims)
        values[init.name] = (math.prod(init.dims), init.data_type in _ONNX_FLOATS)
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            arr = numpy_helper.to_array(value.t) if value is not None else np.zeros(0, np.int64)
            values[node.output[0]] = (arr.size, arr.dtype.kind == "f")
            const_shapes[node.output[0]] = arr.shape
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, i in enumerate(node.input):
            uses.setdefault(i, []).append((node.op_type, slot))
    consts = {name: _onnx_parameters(numel, is_float, uses.get(name, []))
              for name, (numel, is_float) in values.items()}
    from exporters.onnx import ONNX_DTYPES

    for v in graph.input:
        if v.name not in consts:
            summary.inputs.append(_spec(v.name, shapes[v.name], ONNX_DTYPES.get(v.type.tensor_type.elem_type, "?")))
    for v in graph.output:
        summary.outputs.append(_spec(v.name, shapes.get(v.name, ()),
                                     ONNX_DTYPES.get(v.type.tensor_type.elem_type, "?")))
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        inputs = [i for i in node.input if i]
        if node.op_type in _ONNX_SAME_SHAPE and inputs and all(i in const_shapes for i in inputs):
            const_shapes[node.output[0]] = const_shapes[inputs[0]]  # a dequantized (or cast) weight
        kind = _KINDS["onnx"].get(node.op_type, "other")
        n = _Node(node.op_type, kind, inputs, list(node.output))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out = shapes.get(node.output[0]) if node.output else None
        numel, fixed = _numel(out) if out else (0, True)
        n.per_sample = not fixed
        slot = 3 if node.op_type in ("QLinearConv", "QLinearMatMul") else 1
        wshape = const_shapes.get(node.input[slot]) if len(node.input) > slot else None
        if kind == "conv" and wshape:
            n.kernel = _kernel(wshape[2:], int(attrs.get("group", 1)))
            n.macs = numel * math.prod(wshape[1:])
        elif kind == "linear":
            if wshape is None:
                n.kind = "other"
            else:
                if node.op_type == "Gemm":  # Y = A B, B is (K, N), or (N, K) with transB
                    k = wshape[1] if attrs.get("transB", 0) else wshape[0]
                else:
                    k = wshape[-2] if len(wshape) >= 2 else wshape[0]
                n.macs = numel * int(k)
        nodes.append(n)
    return _analyze(summary, nodes, consts)


def _onnx_parameters(numel: int, is_float: bool, uses: list[tuple[str, int]]) -> int:
    """The parameters an ONNX constant holds, given its uses ``(op type, input slot)``: a floating-point one
    counts when an op reads it other than as a scale or zero point of quantization; an integer one when a
    quantization op reads it as a value (the int8 weight or int32 bias of DequantizeLinear, QLinearConv, ...),
    not as a shape, an axis or an index. A constant nothing reads counts nothing."""
    values = [op for op, slot in uses if slot not in _ONNX_QPARAMS.get(op, ())]
    return numel if values and (is_float or any(op in _ONNX_QPARAMS for op in values)) else 0


def read_openvino(path: str, summary: OpSummary) -> OpSummary:
    from runtimes.openvino_runner import read_ir

    ov = require("openvino", "openvino", "inspecting OpenVINO IR files")
    model = read_ir(ov.Core(), path)

    def name(output) -> str:
        return f"{output.get_node().get_friendly_name()}:{output.get_index()}"

    def static(pshape):
        return tuple(d.get_length() for d in pshape) if pshape.is_static else None

    def dims(pshape):
        return tuple(d.get_length() if d.is_static else None for d in pshape) if pshape.rank.is_static else ()

    nodes, values, uses = [], {}, {}  # values: constant -> (element count, real); uses: tensor -> [(op, slot)]
    derived, int_data = set(), set()  # computed from constants only; integer weights being decompressed
    for op in model.get_ordered_ops():
        t = op.get_type_name()
        outs = [name(o) for o in op.outputs()]
        if t == "Constant":
            values[outs[0]] = (math.prod(op.get_output_shape(0)), op.get_output_element_type(0).is_real())
            derived.add(outs[0])
            continue
        if t in ("Parameter", "Result"):
            continue
        inputs = [name(i.get_source_output()) for i in op.inputs()]
        for slot, i in enumerate(inputs):
            uses.setdefault(i, []).append((op, slot))
        if inputs and all(i in derived for i in inputs):
            derived.update(outs)
        if (t == "Convert" and inputs[0] in values and not values[inputs[0]][1]) or \
                (t == "Subtract" and inputs[0] in int_data):  # Constant i8 -> Convert -> Subtract zero point
            int_data.add(outs[0])
        kind = _KINDS["openvino"].get(t, "other")
        n = _Node(t, kind, inputs, outs)
        pshape = op.get_output_partial_shape(0) if op.get_output_size() else None
        numel, fixed = _numel(dims(pshape)) if pshape is not None and pshape.rank.is_static else (0, True)
        n.per_sample = not fixed
        wshape = static(op.get_input_partial_shape(1)) if len(inputs) > 1 and inputs[1] in derived else None
        if kind == "conv" and wshape:
            grouped = t == "GroupConvolution"
            n.kernel = _kernel(wshape[3:] if grouped else wshape[2:], wshape[0] if grouped else 1)
            n.macs = numel * math.prod(wshape[2:] if grouped else wshape[1:])
        elif kind == "linear":
            if wshape is None:
                n.kind = "other"
            else:
                transpose_b = op.get_attributes().get("transpose_b", False)
                n.macs = numel * int(wshape[-1] if transpose_b else wshape[-2] if len(wshape) >= 2 else wshape[0])
        nodes.append(n)

    def is_qparam(op, slot: int) -> bool:
        """A FakeQuantize range, or the zero point / scale of a weight decompression chain
        (Constant i8 -> Convert -> [Subtract zero point] -> Multiply scale)."""
        t, inputs = op.get_type_name(), [name(i.get_source_output()) for i in op.inputs()]
        return (t == "FakeQuantize" and slot >= 1) or \
            (t in ("Subtract", "Multiply") and slot == 1 and inputs[0] in int_data and inputs[1] in derived)

    def qparam_only(tensor: str) -> bool:  # every use is a quantization parameter (looking through Convert)
        found = uses.get(tensor, [])
        return bool(found) and all(is_qparam(op, slot) or (op.get_type_name() == "Convert" and
                                                         qparam_only(name(op.output(0)))) for op, slot in found)

    consts = {}
    for c, (numel, real) in values.items():  # a real constant is a parameter, an integer one when decompressed
        converts = [name(op.output(0)) for op, _ in uses.get(c, []) if op.get_type_name() == "Convert"]
        kept = not qparam_only(c) if real else any(o in int_data and not qparam_only(o) for o in converts)
        consts[c] = numel if kept else 0
    for p in model.inputs:
        summary.inputs.append(_spec(p.get_any_name(), dims(p.get_partial_shape()), p.get_element_type().to_dtype()))
    for p in model.outputs:
        summary.outputs.append(_spec(p.get_any_name(), dims(p.get_partial_shape()), p.get_element_type().to_dtype()))
    return _analyze(summary, nodes, consts)


def read_tflite(path: str, summary: OpSummary) -> OpSummary:
    lite = require("ai_edge_litert.interpreter", "tflite", "inspecting TFLite files")
    it = lite.Interpreter(model_path=path)
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    ops = it._get_ops_details()
    produced = {int(o) for op in ops for o in op["outputs"]}
    graph_inputs = {d["index"] for d in it.get_input_details()}
    consts = {}
    for idx, d in tensors.items():  # a float constant, or a quantized one (int8 weight, int32 bias), is a parameter
        if idx not in produced and idx not in graph_inputs:
            quantized = len(d["quantization_parameters"]["scales"]) > 0
            consts[str(idx)] = int(np.prod(d["shape"])) if np.dtype(d["dtype"]).kind == "f" or quantized else 0
    nodes = []
    for op in ops:
        t = op["op_name"]
        ins = [int(i) for i in op["inputs"] if int(i) >= 0]
        kind = _KINDS["tflite"].get(t, "other")
        n = _Node(t, kind, [str(i) for i in ins], [str(int(o)) for o in op["outputs"]])
        out = tuple(int(v) for v in tensors[int(op["outputs"][0])]["shape"]) if len(op["outputs"]) else ()
        numel = math.prod(out) if out else 0
        wshape = tuple(int(v) for v in tensors[ins[1]]["shape"]) if len(ins) > 1 else None
        if wshape is not None and str(ins[1]) not in consts and not _const_through(ins[1], ops, consts):
            wshape = None
        if kind == "conv" and wshape and len(wshape) == 4:
            depthwise = t == "DEPTHWISE_CONV_2D"
            n.kernel = _kernel(wshape[1:3], depthwise=depthwise)
            n.macs = numel * (math.prod(wshape[1:3]) if depthwise else math.prod(wshape[1:]))
        elif kind == "linear":
            if wshape is None:
                n.kind = "other"
            else:
                n.macs = numel * int(wshape[-1] if t == "FULLY_CONNECTED" else wshape[-2])
        nodes.append(n)
    for d in it.get_input_details():
        summary.inputs.append(_spec(d["name"], tuple(d.get("shape_signature", d["shape"])), np.dtype(d["dtype"]).name))
    for d in it.get_output_details():
        summary.outputs.append(_spec(d["name"], tuple(d.get("shape_signature", d["shape"])),
                                     np.dtype(d["dtype"]).name))
    return _analyze(summary, nodes, consts)


def read_executorch(path: str, summary: OpSummary) -> OpSummary:
    """An ExecuTorch ``.pte``: the kernel calls of its ``forward`` plan (by operator name) and the nodes of every
    XNNPACK delegate (its flatbuffer decoded with ExecuTorch's own schema, ``XNN`` prefix dropped: ``Conv2d``);
    parameters are the constant tensors of both. Other backends' delegates count as one op each."""
    require("executorch.exir", "executorch", "inspecting ExecuTorch files")
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(Path(path).read_bytes()).program
    plans = {p.name: p for p in program.execution_plan}
    plan = plans.get("forward") or program.execution_plan[0]
    values = [v.val for v in plan.values]
    consts = {f"v{i}": math.prod(t.sizes) for i, t in enumerate(values)
              if hasattr(t, "sizes") and t.data_buffer_idx > 0 and t.allocation_info is None}
    nodes = []
    for instruction in (i for chain in plan.chains for i in chain.instructions):
        call = instruction.instr_args
        if hasattr(call, "op_index"):  # KernelCall: inputs, then the out argument
            name = plan.operators[call.op_index].name.split("::")[-1]
            names = [f"v{a}" for a in call.args]
            nodes.append(_Node(name, _KINDS["torch"].get(name, "other"), names[:-1], names[-1:]))
        elif hasattr(call, "delegate_index"):
            delegate = plan.delegates[call.delegate_index]
            if delegate.id == "XnnpackBackend" and int(delegate.processed.location) == 0:  # inline data
                blob = program.backend_delegate_data[delegate.processed.index].data
                nodes += _xnnpack_nodes(blob, f"d{call.delegate_index}:", consts)
            else:
                nodes.append(_Node(delegate.id, "other", [f"v{a}" for a in call.args], []))
    for kind, ids in (("inputs", plan.inputs), ("outputs", plan.outputs)):
        for n, i in enumerate(ids):
            t = values[i]
            dtype = t.scalar_type.name.lower() if hasattr(t, "scalar_type") else "?"
            getattr(summary, kind).append(_spec(f"{kind[:-1]}{n}", tuple(getattr(t, "sizes", ())), dtype))
    return _analyze(summary, nodes, consts)


def _xnnpack_nodes(blob: bytes, prefix: str, consts: dict[str, int]) -> list[_Node]:
    """The nodes of one XNNPACK delegate's graph (``consts`` gets its constant tensors)."""
    import re
    import tempfile
    from importlib.resources import files

    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(blob[:XNNHeader.EXPECTED_LENGTH])
    if not header.is_valid():
        raise ValueError("an XNNPACK delegate has no valid header")
    schema = files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs")
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "graph.bin"
        graph.write_bytes(blob[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
        _flatc_decompile(tmp, os.fspath(schema), os.fspath(graph))
        text = (Path(tmp) / "graph.json").read_text()
    text = re.sub(r"(?<=[:\[,\s])(-?)inf\b", r"\1Infinity", text)  # flatc writes bare inf / nan
    data = json.loads(re.sub(r"(?<=[:\[,\s])-?nan\b", "NaN", text))
    dims = {}
    for value in data.get("xvalues", []):
        t = value["xvalue_union"]
        t = t.get("tensor_value", t)  # a quantized tensor wraps the plain one
        dims[t["id_out"]] = tuple(t.get("dims", ()))
        if t.get("constant_buffer_idx", 0) > 0:
            consts[f"{prefix}{t['id_out']}"] = math.prod(dims[t["id_out"]])
    nodes = []
    for x in data.get("xnodes", []):
        op, fields = x["xnode_union_type"].removeprefix("XNN"), x["xnode_union"]
        ids = [v for k, v in fields.items() if k.endswith("_id") and k != "output_id" and v in dims]
        out = fields.get("output_id")
        n = _Node(op, _KINDS["executorch"].get(op, "other"), [f"{prefix}{i}" for i in ids],
                  [f"{prefix}{out}"] if out is not None else [])
        numel = math.prod(dims.get(out, ()) or (0,))
        if n.kind == "conv" and "kernel_height" in fields:
            n.kernel = _kernel((fields["kernel_height"], fields["kernel_width"]), depthwise=op == "DepthwiseConv2d")
            n.macs = numel * fields["kernel_height"] * fields["kernel_width"] * fields.get("group_input_channels", 1)
        elif n.kind == "linear" and len(dims.get(fields.get("filter_id"), ())) == 2:
            n.macs = numel * dims[fields["filter_id"]][1]
        nodes.append(n)
    return nodes


def _const_through(index: int, ops, consts) -> bool:
    """Whether tensor ``index`` is computed from constants only (a DEQUANTIZE of fp16 weights)."""
    for op in ops:
        if index in [int(o) for o in op["outputs"]]:
            return all(str(int(i)) in consts for i in op["inputs"] if int(i) >= 0)
    return False


def read_coreml(path: str, summary: OpSummary) -> OpSummary:
    """An ``.mlpackage`` ML Program, from its model description alone (a protobuf: parsing it runs nothing; the
    weights file is not read, the weights' shapes are in the description). Its ``const`` ops are the constants
    (float ones count as parameters), ``constexpr_*`` ops the weights they decompress."""
    from runtimes.coreml_runner import MIL_DTYPES, feature_specs, load_spec, operations

    spec = load_spec(path)
    ops = list(operations(spec))

    def dims(value) -> tuple | None:
        if value.type.WhichOneof("type") != "tensorType":
            return None
        return tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None
                     for d in value.type.tensorType.dimensions)

    def args(op, key: str | None = None) -> list[str]:  # the tensors an op reads, x and y first
        keys = [key] if key else sorted(op.inputs, key=lambda k: (k not in ("x", "y"), k != "x", k))
        return [b.name for k in keys if k in op.inputs for b in op.inputs[k].arguments if b.name]

    shapes, consts, ints = {}, {}, {}
    for op in ops:
        for o in op.outputs:
            shapes[o.name] = dims(o)
        if op.type == "const" or op.type.startswith("constexpr_"):
            t = op.outputs[0].type.tensorType
            numel, _ = _numel(shapes[op.outputs[0].name] or ())
            floating = MIL_DTYPES.get(int(t.dataType), "").startswith(("float", "bfloat"))
            consts[op.outputs[0].name] = numel if floating else 0
            value = op.attributes["val"].immediateValue.tensor if "val" in op.attributes else None
            if value is not None and (value.ints.values or value.bools.values):  # groups, transpose_y
                ints[op.outputs[0].name] = [int(v) for v in (value.ints.values or value.bools.values)]
            for i in args(op):  # the compressed data and scales of a decompressed weight: counted as the weight
                consts[i] = 0
    nodes = []
    for op in ops:
        if op.type == "const" or op.type.startswith("constexpr_"):
            continue
        kind = _KINDS["coreml"].get(op.type, "other")
        n = _Node(op.type, kind, args(op), [o.name for o in op.outputs])
        out = shapes.get(n.outputs[0]) if n.outputs else None
        numel, fixed = _numel(out) if out else (0, True)
        n.per_sample = not fixed
        weight = next(iter(args(op, "weight") or args(op, "y")), None)
        wshape = shapes.get(weight) if weight in consts else None
        if kind == "conv" and wshape:
            groups = (ints.get(next(iter(args(op, "groups")), ""), [1]) or [1])[0]
            n.kernel = _kernel(wshape[2:], int(groups))
            if op.type == "conv_transpose":  # weight (C_in, C_out / groups, k...): every input element fans out
                x = shapes.get(next(iter(args(op, "x")), ""))
                n.macs = _numel(x)[0] * math.prod(wshape[1:]) if x else 0
            else:
                n.macs = numel * math.prod(wshape[1:])
        elif kind == "linear":
            if wshape is None:
                n.kind = "other"
            elif op.type == "linear":  # weight (out, in)
                n.macs = numel * int(wshape[-1])
            else:
                transposed = bool(ints.get(next(iter(args(op, "transpose_y")), ""), [0])[0])
                n.macs = numel * int(wshape[-1] if transposed else wshape[-2] if len(wshape) >= 2 else wshape[0])
        nodes.append(n)
    inputs, outputs = feature_specs(spec)
    summary.inputs += [_spec(s.name, s.shape, s.dtype) for s in inputs]
    summary.outputs += [_spec(s.name, s.shape, s.dtype) for s in outputs]
    stored = spec.description.metadata.userDefined.get("deploy.json")
    if stored:
        data = json.loads(stored)
        if isinstance(data, dict) and "merged" in data:
            summary.merged = dict(data.get("merged") or {}, **{"from": f"{Path(path).name} metadata"})
    return _analyze(summary, nodes, consts)


def read_ncnn(path: str, summary: OpSummary) -> OpSummary:
    """An ncnn ``.param`` text, parsed strictly (``runtimes.ncnn_runner.read_param``: it is untrusted input).
    Parameters: the weights and biases its layers read from the ``.bin``, from their parameters (Convolution
    ``6=weight_data_size``, ``5=bias_term``...). No MACs: the text holds no tensor shapes."""
    from runtimes.ncnn_runner import UNCOUNTED, input_dims, layer_weights, read_param

    param = read_param(path)
    nodes, consts, uncounted = [], {}, Counter()
    for layer in param.layers:
        if layer.type == "Input":
            summary.inputs += [_spec(t, input_dims(layer) or (None,), "float32") for t in layer.tops]
            continue
        weights = layer_weights(layer)
        if layer.type == "MemoryData":  # a constant blob
            consts.update({t: weights if i == 0 else 0 for i, t in enumerate(layer.tops)})
            continue
        uncounted[layer.type] += layer.type in UNCOUNTED
        kind = _KINDS["ncnn"].get(layer.type, "other")
        if layer.type == "BinaryOp" and layer.get(0) == 0 and len(layer.bottoms) == 2:  # 0=0: add
            kind = "sum"
        elif layer.type in ("Eltwise", "Pooling") and layer.get(0) != 1:  # Eltwise 0=1: sum; Pooling 0=1: average
            kind = "other"
        inputs = list(layer.bottoms) + ([f"{layer.name}:weights"] if weights else [])
        if weights:
            consts[f"{layer.name}:weights"] = weights
        n = _Node(layer.type, kind, inputs, list(layer.tops))
        if kind == "conv":
            kw = layer.get(1)
            kh, kd = layer.get(11, kw), layer.get(21, kw)
            dims = (kd, kh, kw) if "3D" in layer.type else (kw,) if "1D" in layer.type else (kh, kw)
            n.kernel = _kernel(dims, layer.get(7, 1) if "DepthWise" in layer.type else 1)
        nodes.append(n)
    summary.outputs += [_spec(t, (None,), "float32") for t in param.outputs()]
    summary.notes.append("ncnn blobs are one sample (no batch dimension); MACs not computed: an ncnn .param holds "
                         "no tensor shapes")
    if +uncounted:
        summary.notes.append("weights of " + ", ".join(f"{v} {k}" for k, v in sorted((+uncounted).items()))
                             + " layer(s) not counted in the parameters")
    return _analyze(summary, nodes, consts)


_MNN_DTYPES = {"DT_FLOAT": "float32", "DT_HALF": "float16", "DT_DOUBLE": "float64", "DT_INT32": "int32",
               "DT_INT64": "int64", "DT_UINT8": "uint8", "DT_INT8": "int8", "DT_BOOL": "bool"}


def read_mnn(path: str, summary: OpSummary) -> OpSummary:
    """A ``.mnn`` file: its ops and parameters from MNN's JSON dump (``exporters.mnn.dump_json``), the shapes of
    its tensors from MNN's runtime (``MNN.expr.load_as_dict``, for MACs). A convolution's parameters are its float
    weights and biases, or, when MNN stores the weights compressed (fp16 or int8 ``quanParameter``), the element
    count of its kernel; float ``Const`` blobs count, integer ones (shapes, axes) do not."""
    from exporters.mnn import dump_json
    from runtimes.mnn_runner import mnn_modules, native_output

    model = dump_json(path)
    names = [str(n) for n in model.get("tensorName") or []]

    def tensor(i) -> str:
        return names[i] if isinstance(i, int) and 0 <= i < len(names) else f"#{i}"

    _, _, expr = mnn_modules()
    with native_output("MNN"):
        variables = expr.load_as_dict(path)
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in variables.items()}
        names_of = {"float": "float32", "double": "float64", "int": "int32", "int64": "int64", "uint8": "uint8",
                    "int8": "int8"}
        dtypes = {k: names_of.get(str(v.dtype).replace("dtype.", ""), "?") for k, v in variables.items()}
    nodes, consts = [], {}
    for op in model["oplists"]:
        t, main = str(op.get("type", "?")), op.get("main") or {}
        outs = [tensor(i) for i in op.get("outputIndexes") or []]
        ins = [tensor(i) for i in op.get("inputIndexes") or []]
        if t == "Input":
            dtype = _MNN_DTYPES.get(str(main.get("dtype", "DT_FLOAT")), str(main.get("dtype")))
            summary.inputs.append(_spec(outs[0] if outs else "?", main.get("dims") or (), dtype))
            continue
        if t == "Const":
            real = main.get("dataType", "DT_FLOAT") in ("DT_FLOAT", "DT_HALF", "DT_BFLOAT16")
            consts[outs[0] if outs else "?"] = math.prod(main.get("dims") or [1]) if real else 0
            continue
        kind = _KINDS["mnn"].get(t, "other")
        if t in ("BinaryOp", "UnaryOp") and main.get("opType"):
            t = str(main["opType"])  # MNN's op families, by operation: ADD, MUL, SIGMOID...
        if kind == "pool" and main.get("type") != "AVEPOOL":
            kind = "other"
        n = _Node(t, kind, ins, outs)
        out = shapes.get(outs[0]) if outs else None
        numel = math.prod(out) if out else 0
        if kind == "conv":
            common = main.get("common") or {}
            k = (int(common.get("kernelY", 1)), int(common.get("kernelX", 1)))
            groups, cout = max(int(common.get("group", 1)), 1), int(common.get("outputCount", 0))
            cin = int(common.get("inputCount", 0)) or (shapes.get(ins[0], (0, 0))[1] if ins else 0)
            depthwise = "Depthwise" in t
            per_out = (1 if depthwise else cin // groups) * k[0] * k[1]
            n.kernel = _kernel(k, groups, depthwise=depthwise)
            n.macs = numel * per_out
            stored = len(main.get("weight") or [])
            consts[f"{op.get('name', t)}:weights"] = (stored or (cout * per_out if main.get("quanParameter") else 0)) \
                + len(main.get("bias") or [])
            n.inputs.append(f"{op.get('name', t)}:weights")
        elif kind == "linear":
            weights = [i for i in ins if i in consts]
            if not weights or not ins or ins[-1] not in consts:
                n.kind = "other"
            else:
                wshape = shapes.get(ins[-1]) or ()
                n.macs = numel * int(wshape[-2] if main.get("transposeB") is not True and len(wshape) >= 2
                                     else wshape[-1] if wshape else 0)
        nodes.append(n)
    read = {i for n in nodes for i in n.inputs}
    for name in model.get("outputName") or [o for n in nodes for o in n.outputs if o not in read]:
        summary.outputs.append(_spec(str(name), shapes.get(str(name), ()), dtypes.get(str(name), "?")))
    if any(op.get("name", "").endswith("__matmul_converted") for op in model["oplists"]):
        summary.notes.append("MNN's converter turns a MatMul with constant weights into a 1x1 convolution, "
                             "so linear layers are counted as convolutions")
    return _analyze(summary, nodes, consts)


# -------------------------------------------------------------------------------------------- entry

def _run_beside(path: Path):
    """The run record of the deploy run that wrote ``path`` (the ``report.json`` beside it lists the file),
    or None."""
    from .record import PipelineError, load_record

    try:
        record = load_record(path.parent)
    except PipelineError:
        return None
    return record if any(path.name in _names(s.files.files) for s in record.stages) else None


def _names(files) -> set[str]:
    """The files of a stage and the packages (folders) holding them, relative to the run directory."""
    return {part for f in files for part in (f, f.split("/")[0])}


def _changed_since(record, path: Path) -> bool:
    """Whether ``record`` lists ``path`` (a file, or the files of a package folder) with another sha256."""
    from .record import sha256

    recorded = [(f, h) for s in record.stages for f, h in s.files.sha256.items()
                if f == path.name or f.startswith(path.name + "/")]
    return any(not (path.parent / f).is_file() or sha256(path.parent / f) != h for f, h in recorded)


def read_torch(path: str, summary: OpSummary, *, trust_pickle: bool = False) -> OpSummary:
    """A ``.pt2`` written by torch.export (with the merge counts of the run that wrote it, when it says), loaded
    with :func:`runtimes.safe_load.load_program`: refused when loading it would run code, unless
    ``trust_pickle``."""
    from runtimes.safe_load import load_program

    extra = {"deploy.json": ""}
    ep = load_program(os.fspath(path), trust_pickle=trust_pickle, extra_files=extra)
    _torch_graph(ep.module(), summary)
    if extra["deploy.json"]:
        summary.merged = dict(json.loads(extra["deploy.json"]).get("merged") or {},
                              **{"from": f"{Path(path).name} metadata"})
    return summary


def inspect_path(path: str | os.PathLike, *, trust_pickle: bool = False) -> OpSummary:
    """Summary of an artifact file of any registered target with a reader (``.pt2``, ``.onnx``, OpenVINO
    ``.xml``, ``.tflite``, ...). A reader that can run code from a file (a ``.pt2`` with pickles) refuses it
    unless ``trust_pickle``; a file that a deploy run beside it recorded with another sha256 is noted, and
    such a ``.pt2`` is not opened at all without ``trust_pickle``."""
    from exporters import targets as registry

    p = Path(path)
    target = registry.by_suffix(p)
    if target is None or target.inspect is None:
        known = [s for t in registry.all_targets() if t.inspect for s in t.suffixes]
        raise ValueError(f"cannot inspect {p}: unknown extension {p.suffix!r}; expected "
                         f"{', '.join(known)} or a model (zoo name, timm:NAME, file.py:FACTORY)")
    if not (p.is_file() or p.is_dir() and p.suffix in target.suffixes):  # a package (.mlpackage) is a folder
        raise FileNotFoundError(f"{p} does not exist; check the path")
    summary = OpSummary(str(p), target.name)
    from runtimes.core import CorruptArtifact, UntrustedFile

    reader = registry.resolve(target.inspect)
    trusting = "trust_pickle" in signature(reader).parameters
    run = _run_beside(p)
    if run is not None and _changed_since(run, p):
        if trusting and not trust_pickle:
            raise UntrustedFile(f"{p} changed since deploy convert wrote it (its sha256 differs from "
                                f"{p.parent / 'report.json'}), and loading a changed {p.suffix} file can run code "
                                "from it; pass --trust-pickle if you trust its source")
        summary.notes.append(f"{p.name} changed since deploy convert wrote it (sha256 differs from report.json)")
    try:
        reader(os.fspath(p), summary, **({"trust_pickle": trust_pickle} if trusting else {}))
    except (ImportError, CorruptArtifact, UntrustedFile):
        raise
    except Exception as e:
        raise CorruptArtifact(f"cannot read {p} as {target.name}: {type(e).__name__}: "
                              f"{next((ln for ln in str(e).splitlines() if ln.strip()), '')}") from e
    if summary.merged is None and run is not None and "merged" in run.reparameterize:
        summary.merged = dict(run.reparameterize["merged"], **{"from": str(p.parent / "report.json")})
    plain = run.reparameterize.get("params_after") if run is not None else None
    if isinstance(plain, int) and plain != summary.params:
        fewer = summary.params < plain
        summary.notes.append(f"this file stores {summary.params:,} parameters, {abs(plain - summary.params):,} "
                             f"{'fewer' if fewer else 'more'} than the run's plain model ({plain:,}, report.json)"
                             + (": exporters leave out an all-zero bias (adding zero changes nothing), such as the "
                                "zero-initialised classifier bias of timm's RepVGG and MobileOne" if fewer else ""))
    return summary


def inspect_source(spec: str, input_shape: tuple[int, ...] | None = None, **load_kwargs) -> OpSummary:
    """Summary of a model source (zoo name, timm:NAME, torchvision:NAME, file.py:FACTORY, checkpoint)."""
    import torch

    from . import resources, sources

    loaded = sources.load_model(spec, **load_kwargs)
    shape = tuple(input_shape or loaded.input_shape or ())
    if not shape:
        raise sources.SourceError(f"{spec} has no default input shape; pass --input-shape, e.g. 1,3,224,224")
    need = resources.estimate(loaded.model, shape, conversion=False)  # a capture and one forward
    resources.check_memory(need, f"inspecting {spec} at {'x'.join(map(str, shape))}", "pass a smaller --input-shape")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    summary = inspect_module(loaded.model, (x,), source=f"{spec} ({type(loaded.model).__name__}, "
                             f"input {'x'.join(map(str, shape))})", fmt="torch model")
    summary.notes.append(f"weights: {loaded.weights}")
    return summary
