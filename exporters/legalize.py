"""Target legalization: rewrite ops a target cannot lower into equivalent ops it can.

TFLite: ``aten.pow.Tensor_Scalar`` with an integer exponent (YOLOv7's ``(wh * 2) ** 2`` on a 5-D
tensor) makes litert-torch fail with "failed to legalize operation 'tfl.pow'". For a positive
integer exponent n,

    x ** n  ==  x * x * ... * x   (n factors, by repeated squaring: about log2(n) multiplications)

which is exact up to rounding (checked below in float64: the relative difference must be at most
1e-9). ``n == 1`` is the identity. Exponents that are not positive integers have no exact
multiplication form: they are refused with the op, the source line and the target named.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ._torch import as_args, plain_graph_module, source_line
from .base import ExportError

__all__ = ["Rewrite", "legalize_for_tflite", "check_rewrite_float64", "MAX_POW_EXPONENT"]

log = logging.getLogger(__name__)

MAX_POW_EXPONENT = 16
_POW_OPS = {torch.ops.aten.pow.Tensor_Scalar, torch.ops.aten.pow.Tensor_Tensor, torch.ops.aten.pow.Scalar}
_MUL = torch.ops.aten.mul.Tensor


@dataclass
class Rewrite:
    """One applied rewrite: which node, what it became, where it came from in the source."""

    node: str
    op: str
    replacement: str
    source: str = ""

    def to_dict(self) -> dict[str, str]:
        return dict(vars(self))


def _integer_exponent(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _power_by_squaring(graph: fx.Graph, x: fx.Node, n: int) -> tuple[fx.Node, list[fx.Node]]:
    """Nodes computing ``x ** n`` (n >= 1) with multiplications; returns (result, created nodes)."""
    result, base, created = None, x, []
    while n:
        if n & 1:
            if result is None:
                result = base
            else:
                result = graph.call_function(_MUL, (result, base))
                created.append(result)
        n >>= 1
        if n:
            base = graph.call_function(_MUL, (base, base))
            created.append(base)
    return result, created


def legalize_for_tflite(gm: fx.GraphModule, *, max_exponent: int = MAX_POW_EXPONENT,
                        allow_unsupported_pow: bool = False) -> tuple[fx.GraphModule, list[Rewrite]]:
    """Rewrite ``x ** n`` (integer 1 <= n <= ``max_exponent``) into multiplications.

    Returns a new GraphModule (weights shared with ``gm``, which is left untouched) and the list of
    rewrites. Any other ``pow`` raises :class:`ExportError` naming the op, its source line and the
    target, unless ``allow_unsupported_pow`` (then it is kept and left to the converter).
    """
    gm = plain_graph_module(gm)
    graph = gm.graph
    rewrites: list[Rewrite] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _POW_OPS:
            continue
        where = source_line(node)
        n = _integer_exponent(node.args[1]) if node.target == torch.ops.aten.pow.Tensor_Scalar else None
        if n is None or not 1 <= n <= max_exponent:
            if allow_unsupported_pow:
                log.warning("keeping %s (%s) for TFLite: no exact multiplication form", node.target, where)
                continue
            exponent = node.args[1] if node.target != torch.ops.aten.pow.Scalar else "a tensor"
            raise ExportError(
                f"TFLite cannot express {node.target} with exponent {exponent!r} (node {node.name}"
                f"{', at ' + where if where else ''}): tfl.pow fails to legalize and only integer exponents "
                f"1..{max_exponent} can be rewritten exactly into multiplications.")
        with graph.inserting_before(node):
            new, created = _power_by_squaring(graph, node.args[0], n)
        for m in created:  # keep provenance (and shape metadata) for later passes and error messages
            m.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "val")})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewrites.append(Rewrite(node.name, str(node.target), f"{len(created)} x aten.mul.Tensor" if created
                                else "identity", where))
    if rewrites:
        graph.lint()
        gm.recompile()
        log.info("TFLite legalization: %d pow node(s) rewritten into multiplications", len(rewrites))
    return gm, rewrites


def _to_float64(gm: fx.GraphModule) -> fx.GraphModule:
    """A float64 deep copy of ``gm``: tensors and ``dtype=float32`` graph arguments converted."""
    gm = copy.deepcopy(gm)
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and t.dtype == torch.float32:
                    store[name] = torch.nn.Parameter(t.detach().double(), t.requires_grad) \
                        if isinstance(t, torch.nn.Parameter) else t.double()
        for name, t in list(vars(module).items()):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                setattr(module, name, t.double())

    def swap(v):
        return torch.float64 if v is torch.float32 else v

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = pytree.tree_map(swap, node.args)
            node.kwargs = pytree.tree_map(swap, node.kwargs)
    gm.recompile()
    return gm


def check_rewrite_float64(before: fx.GraphModule, after: fx.GraphModule, args, *, seed: int = 0,
                          tolerance: float = 1e-9) -> float:
    """Run ``before`` and ``after`` in float64 on seeded inputs shaped like ``args``.

    Returns the largest difference relative to each output's scale (max|a-b| / max|a|) and raises
    :class:`ExportError` if it exceeds ``tolerance``: a rewrite that is not exact is a bug.
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = tuple(torch.randn(a.shape, generator=gen, dtype=torch.float64) if isinstance(a, torch.Tensor)
                   and a.is_floating_point() else a for a in as_args(args))
    with torch.no_grad():
        ref = pytree.tree_leaves(plain_graph_module(_to_float64(before))(*inputs))
        out = pytree.tree_leaves(plain_graph_module(_to_float64(after))(*inputs))
    if len(ref) != len(out):
        raise ExportError(f"rewrite changed the number of outputs from {len(ref)} to {len(out)}.")
    worst = 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            raise ExportError(f"rewrite changed an output shape from {tuple(a.shape)} to {tuple(b.shape)}.")
        if not a.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        finite = torch.isfinite(a) & torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            worst = float("inf")
            continue
        if finite.any():
            diff = (a[finite] - b[finite]).abs().max().item()
            scale = a[finite].abs().max().item()
            worst = max(worst, diff / scale if scale > 0 else diff)
    if worst > tolerance:
        raise ExportError(f"rewrite is not exact: float64 relative difference {worst:.3e} exceeds {tolerance:.0e}.")
    return worst
