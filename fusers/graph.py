"""Small helpers over the captured torch.fx graph of aten ops: reading constants, describing
convolutions and BatchNorms, adding weights, building convolutions (:func:`build_conv` inserts one
without rewiring; :func:`replace_conv` also rewires the node it replaces), naming sites. No math
here (see ``algebra``); patterns over several nodes are in ``matchers``."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["CONV_OPS", "CONV_TRANSPOSE_OPS", "BN_OPS", "Conv", "BatchNorm", "fetch_attr", "is_const", "const_value",
           "shape", "sole_user", "as_conv", "as_avgpool", "as_batchnorm", "per_channel", "module_path", "common_path",
           "common_meta", "site", "value_users", "op_name", "slice_bounds", "slice_range", "views_of", "run_nodes",
           "row_major", "add_tensor", "build_conv", "replace_conv", "erase_unused", "is_erased",
           "op_counts", "remove_unused_attributes", "share_identical_weights", "VIEW_OPS", "written_arg", "view_root",
           "written_nodes"]

aten = torch.ops.aten

CONV_OPS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
CONV_TRANSPOSE_OPS = {aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2, aten.conv_transpose3d.input: 3}
_CONV_OF = {nd: op for op, nd in CONV_OPS.items()}
_CONV_TRANSPOSE_OF = {nd: op for op, nd in CONV_TRANSPOSE_OPS.items()}
BN_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
# ops whose result shares memory with their first argument: an in-place write into it changes both
VIEW_OPS = {aten.slice.Tensor, aten.select.int, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
            aten.expand.default, aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default, aten.as_strided.default,
            aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
            aten.unbind.int, aten.diagonal.default, aten.unflatten.int, aten.flatten.using_ints, aten.detach.default,
            aten.view_as.default, aten.expand_as.default, operator.getitem}


def fetch_attr(gm: torch.nn.Module, target: str):
    """``gm``'s attribute at the dotted ``target``, read from the modules' own tables where it is there (the passes
    read every weight many times; ``Module.__getattr__`` is slow)."""
    obj = gm
    for part in target.split("."):
        tables = vars(obj) if isinstance(obj, torch.nn.Module) else {}
        for table in ("_parameters", "_buffers", "_modules"):
            if part in tables.get(table, ()):
                obj = tables[table][part]
                break
        else:
            obj = getattr(obj, part)
    return obj


def is_const(node) -> bool:
    """A get_attr tensor (a weight or a folded constant)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def const_value(gm, node):
    """The tensor or Python number behind an argument, or None when it is not constant."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node
    if is_const(node):
        value = fetch_attr(gm, node.target)
        return value.detach() if isinstance(value, torch.Tensor) else None
    return None


def shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def sole_user(node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


_SHAPE_OF_SECOND = {aten.reshape_as.default, aten.view_as.default, aten.expand_as.default}


def value_users(node) -> list[fx.Node]:
    """The users that read ``node``'s values: not those that only take its shape (``y.reshape_as(node)``)."""
    return [u for u in node.users if not (u.target in _SHAPE_OF_SECOND and u.args[0] is not node)
            and u.target != aten.sym_size.int]


def _tuple(value, ndim: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * ndim
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    return value * ndim if len(value) == 1 else value


@dataclass
class Conv:
    """A convolution or Linear node with constant weights, in normal form."""

    node: fx.Node
    x: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    kind: str  # "conv", "conv_transpose" or "linear"
    output_padding: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2


def as_conv(gm, node) -> Conv | None:
    """Describe ``node`` as a Conv when it is one with constant weights, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    args = list(node.args) + [None] * 8
    kw = node.kwargs
    if node.target in CONV_OPS or node.target in CONV_TRANSPOSE_OPS:
        transposed = node.target in CONV_TRANSPOSE_OPS
        nd = CONV_OPS.get(node.target) or CONV_TRANSPOSE_OPS[node.target]
        names = (["stride", "padding", "output_padding", "groups", "dilation"] if transposed
                 else ["stride", "padding", "dilation", "groups"])
        vals = {n: kw.get(n, args[3 + i]) for i, n in enumerate(names)}
        if isinstance(vals["padding"], str):
            return None
        kind = "conv_transpose" if transposed else "conv"
        extra = {"output_padding": _tuple(vals["output_padding"], nd, 0)} if transposed else {}
        w, b = node.args[1], kw.get("bias", args[2])
    elif node.target == aten.linear.default:
        nd, kind, extra = 0, "linear", {}
        vals = {"stride": (), "padding": (), "dilation": (), "groups": 1}
        w, b = node.args[1], kw.get("bias", args[2])
    else:
        return None
    weight = const_value(gm, w)
    bias = const_value(gm, b) if b is not None else None
    if not isinstance(weight, torch.Tensor) or (b is not None and not isinstance(bias, torch.Tensor)):
        return None
    return Conv(node, node.args[0], weight, bias, _tuple(vals["stride"], nd, 1), _tuple(vals["padding"], nd, 0),
                _tuple(vals["dilation"], nd, 1), int(vals["groups"] or 1), kind, **extra)


def as_avgpool(node) -> tuple[fx.Node, list[int], list[int], list[int]] | None:
    """``(input, kernel, stride, padding)`` of an avg_pool2d that is a depthwise conv of ``1 / k^2``
    (no ceil mode, no divisor override, padded zeros counted), else None."""
    if getattr(node, "target", None) != aten.avg_pool2d.default:
        return None
    a = list(node.args) + [None] * 7
    kernel, stride, padding = ([int(v) for v in val] * (2 if len(val) == 1 else 1)
                               for val in (a[1], a[2] or a[1], a[3] or [0, 0]))
    include_pad = a[5] if a[5] is not None else True
    if a[4] or a[6] is not None or (not include_pad and any(padding)):
        return None
    return node.args[0], kernel, stride, padding


@dataclass
class BatchNorm:
    node: fx.Node  # the node whose value is the normalised tensor
    x: fx.Node
    mean: torch.Tensor | None
    var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    training: bool

    @property
    def foldable(self) -> bool:
        return not self.training and self.mean is not None and self.var is not None


def as_batchnorm(gm, node) -> BatchNorm | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.batch_norm.default:
        x, w, b, rm, rv, training, _, eps = node.args[:8]
        out = node
    elif node.target == operator.getitem and node.args[1] == 0 and \
            getattr(node.args[0], "target", None) == aten._native_batch_norm_legit_no_training.default:
        x, w, b, rm, rv, _, eps = node.args[0].args[:7]
        training, out = False, node
    else:
        return None
    vals = [const_value(gm, v) if v is not None else None for v in (rm, rv, w, b)]
    if any(v is None and a is not None for v, a in zip(vals, (rm, rv, w, b))):
        return None  # statistics computed at run time: not a BatchNorm we can reason about
    return BatchNorm(out, x, *vals, float(eps), bool(training))


def per_channel(value, out_shape: tuple[int, ...], channel_dim: int, dtype=torch.float64) -> torch.Tensor | None:
    """A constant operand that varies at most along ``channel_dim`` as a vector of length C.

    Returns None when it varies along another dim or would broadcast the output larger.
    """
    channels = out_shape[channel_dim]
    if isinstance(value, (int, float)):
        return torch.full((channels,), float(value), dtype=dtype)
    if not isinstance(value, torch.Tensor) or value.dim() > len(out_shape):
        return None
    v = value.reshape((1,) * (len(out_shape) - value.dim()) + tuple(value.shape))
    for d, n in enumerate(v.shape):
        if d != channel_dim and n != 1:
            return None
    if v.shape[channel_dim] not in (1, channels):
        return None
    return v.flatten().to(dtype).expand(channels).clone()


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module a node came from ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['self'\]\.?", "", str(path))


def common_path(nodes) -> str:
    paths = [module_path(n).split(".") for n in nodes if module_path(n)]
    if not paths:
        return ""
    prefix = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def common_meta(nodes) -> dict:
    """Meta for a node replacing ``nodes``: the first one's, its module stack cut to their common module."""
    nodes = list(nodes)
    meta = dict(nodes[0].meta)
    prefix = common_path(nodes)
    stack = meta.get("nn_module_stack") or {}
    meta["nn_module_stack"] = {k: v for k, v in stack.items()
                               if prefix == (p := re.sub(r"^L\['self'\]\.?", "", str(v[0]))) or prefix.startswith(p + ".")
                               or not p}
    return meta


def site(nodes) -> str:
    """A readable name for a rewrite site: module path and the first node name."""
    nodes = list(nodes)
    path = common_path(nodes)
    return f"{path} ({nodes[0].name})" if path else nodes[0].name


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides (a copy only where they differ). A kernel computed by broadcasting or a
    transpose can be contiguous yet strided like channels-last (a 1x1 kernel ``(72, 16, 1, 1)`` with strides
    ``(16, 1, 16, 16)``); a conv with it returns channels-last outputs, and the ONNX exporter then restores
    the layout after a global pool with ``as_strided`` (``Gather`` in ONNX, which ncnn cannot express).
    A broadcast view (a zero stride: a folded ``expand``) stays as it is, small."""
    if any(st == 0 and size > 1 for st, size in zip(t.stride(), t.shape)):
        return t
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    return t if t.stride() == tuple(reversed(expected)) else t.clone(memory_format=torch.contiguous_format)


def add_tensor(gm: torch.nn.Module, hint: str, value: torch.Tensor, parameter: bool = True) -> str:
    """Register ``value`` (:func:`row_major`) on ``gm`` under a fresh name derived from ``hint``; returns the
    name."""
    base = re.sub(r"\W", "_", hint).strip("_") or "w"
    if base[0].isdigit():
        base = f"layer{base}"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    value = row_major(value.detach())
    if parameter:
        gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    else:
        gm.register_buffer(name, value)
    return name


def build_conv(gm, x: fx.Node, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, stride=(), padding=(),
               dilation=(), groups: int = 1, output_padding=(), *, hint: str, meta: dict,
               insert_before: fx.Node) -> fx.Node:
    """Insert a conv/linear of ``x`` with new constant weights before ``insert_before``; no user is rewired.

    ``hint`` names the new weights; the node takes ``val``, ``nn_module_stack`` and ``stack_trace``
    from ``meta`` (the meta of the value it will stand for).
    """
    graph = gm.graph
    with graph.inserting_before(insert_before):
        w = graph.get_attr(add_tensor(gm, f"{hint}.weight", weight))
        b = graph.get_attr(add_tensor(gm, f"{hint}.bias", bias)) if bias is not None else None
        nd = weight.dim() - 2
        if kind == "linear":
            new = graph.call_function(aten.linear.default, (x, w, b))
        elif kind == "conv_transpose":
            new = graph.call_function(_CONV_TRANSPOSE_OF[nd], (x, w, b, list(stride), list(padding),
                                                               list(output_padding), groups, list(dilation)))
        else:
            new = graph.call_function(_CONV_OF[nd], (x, w, b, list(stride), list(padding), list(dilation), groups))
    new.meta.update({k: v for k, v in meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
    return new


def replace_conv(gm, old: fx.Node, x: fx.Node, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 stride=(), padding=(), dilation=(), groups: int = 1, output_padding=(), hint: str = "",
                 insert_before: fx.Node | None = None) -> fx.Node:
    """:func:`build_conv` computing ``old``'s value, with every user of ``old`` rewired to it."""
    new = build_conv(gm, x, kind, weight, bias, stride, padding, dilation, groups, output_padding,
                     hint=hint or common_path([old]) or old.name, meta=old.meta, insert_before=insert_before or old)
    old.replace_all_uses_with(new)
    return new


def erase_unused(graph: fx.Graph, nodes) -> None:
    """Erase the given nodes once nothing uses them, then their inputs that became unused. In any order: a node
    still used when it comes up is visited again as an input of its last user, when that one is erased."""
    stack = list(dict.fromkeys(nodes))
    while stack:
        node = stack.pop()
        if node.graph is not graph or node.users or node.op not in ("call_function", "get_attr") or is_erased(node):
            continue
        if getattr(node.target, "__name__", "").startswith("_assert"):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        stack.extend(inputs)


def op_name(node) -> str:
    """The aten op's short name of a call_function node (``conv2d``, ``batch_norm``, ``add``), else its ``op``."""
    if node.op != "call_function":
        return node.op
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def slice_bounds(start, end, size: int) -> tuple[int, int]:
    """``[start, end)`` of Python slicing (None, negative, past the end) as ``0 <= start <= end <= size``."""
    start = 0 if start is None else start
    end = size if end is None else end
    start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
    return start, max(start, end)


def slice_range(node) -> tuple[int, int, int] | None:
    """``(dim, start, end)`` of a step-1 ``slice`` node, normalised against its input's shape; else None."""
    if getattr(node, "target", None) != aten.slice.Tensor or shape(node.args[0]) is None:
        return None
    size = shape(node.args[0])
    args = list(node.args) + [None] * 4
    if (args[4] or 1) != 1:
        return None
    dim = args[1] % len(size)
    return (dim, *slice_bounds(args[2], args[3], size[dim]))


def views_of(node: fx.Node) -> list[fx.Node]:
    """Every view of ``node`` (slices of slices, views of views ...), in no particular order."""
    out, stack = [], [node]
    while stack:
        for user in stack.pop().users:
            if user.target in VIEW_OPS and user not in out:
                out.append(user)
                stack.append(user)
    return out


def run_nodes(gm, nodes, env: dict) -> dict:
    """Evaluate ``nodes`` (in graph order) on the values ``env`` holds for their inputs, reading weights from
    ``gm``; returns ``env`` with their values added."""
    load = lambda a: env[a] if a in env else fetch_attr(gm, a.target)  # noqa: E731
    for n in nodes:
        env[n] = n.target(*fx.node.map_arg(n.args, load), **fx.node.map_arg(n.kwargs, load))
    return env


def written_arg(node) -> fx.Node | None:
    """The tensor an in-place op (``copy_``, ``fill_``, ``relu_``, ``index_put_`` ...) writes into, or None."""
    schema = getattr(getattr(node, "target", None), "_schema", None)
    if schema is None or node.op != "call_function":
        return None
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            arg = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            return arg if isinstance(arg, fx.Node) else None
    return None


def view_root(node: fx.Node) -> fx.Node:
    """The tensor whose memory ``node`` views (``node`` itself when it is no view)."""
    while node.op == "call_function" and node.target in VIEW_OPS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def written_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Every node whose value an in-place op changes after it is computed: written tensors and their views."""
    roots = {view_root(w) for n in graph.nodes if (w := written_arg(n)) is not None}
    return roots.union(*(views_of(r) for r in roots))


def is_erased(node: fx.Node) -> bool:
    return getattr(node, "_erased", False)


def op_counts(gm: torch.nn.Module) -> dict[str, int]:
    """Count call_function nodes by aten op name (``conv2d``, ``batch_norm``, ``add``, ...)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counts[op_name(node)] = counts.get(op_name(node), 0) + 1
    return dict(sorted(counts.items()))


def remove_unused_attributes(gm: fx.GraphModule, recompile: bool = True) -> None:
    """Drop dead get_attr nodes and every parameter, buffer and submodule the graph no longer reads
    (``recompile=False``: the caller regenerates the code before the graph runs again)."""
    graph = gm.graph
    for node in list(graph.nodes):  # dtype assertions on folded constants guard nothing
        if node.target == aten._assert_tensor_metadata.default and all(a.op == "get_attr" for a in node.all_input_nodes):
            graph.erase_node(node)
    erase_unused(graph, [n for n in graph.nodes if n.op == "get_attr"])
    used = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            module._parameters.pop(attr, None)
            module._buffers.pop(attr, None)
    gm.delete_all_unused_submodules()
    if recompile:
        gm.recompile()


def share_identical_weights(gm: fx.GraphModule) -> int:
    """Point get_attr nodes reading equal tensors at one of them (a module called at several places
    gets one folded copy, not one per call); returns how many tensors became shared."""
    first: dict[tuple, list[str]] = {}
    rename: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in rename:
            continue
        value = fetch_attr(gm, node.target)
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        grad = value.requires_grad  # a BatchNorm's running_mean must not become a trainable bias of equal value
        value = value.detach()
        flat = value.reshape(-1)
        key = (tuple(value.shape), value.dtype, grad, float(flat[0]), float(flat[-1]), float(flat[len(flat) // 2]))
        for other in first.setdefault(key, []):
            if other != node.target and torch.equal(fetch_attr(gm, other), value):
                rename[node.target] = other
                break
        else:
            first[key].append(node.target)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in rename:
            node.target = rename[node.target]
    if rename:
        remove_unused_attributes(gm)
    return len(rename)


def out_of_place(node) -> object | None:
    """The functional overload of an in-place aten op (``relu_.default`` -> ``relu.default``), else None."""
    target = getattr(node, "target", None)
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    functional = getattr(aten, name[:-1], None)
    return getattr(functional, target._overloadname, None) if functional is not None else None
