"""Collapse a chain of elementwise ops with constants into at most one multiply and one add.

``((y * 2 - 0.5) + grid) * stride`` (YOLOv7's box decode) is ``y * A + B`` with ``A = 2 * stride`` and
``B = (grid - 0.5) * stride``: the chain is followed op by op, keeping ``(A, B)`` with
``x = y * A + B``:

* ``x * c``: ``(A c, B c)``;  ``x / c``: ``(A / c, B / c)``;  ``x + c``: ``(A, B + c)``;  ``x - c``,
  ``c - x``: ``(A, B - c)``, ``(-A, c - B)``;  ``-x``: ``(-A, -B)``;
* ``x ** k`` for an integer ``k`` when ``B = 0``: ``y ** k`` with ``A ** k`` (``(y * 2) ** 2 * anchor`` is
  ``y ** 2 * (4 * anchor)``).

Constants may have any shape that broadcasts into the chain's output (grids, anchors, per-channel
scales). Rewritten when the result has fewer ops than the chain; ``A`` and ``B`` are computed from the
float64 weights, so the change is rounding only (checked like every rewrite).
"""

from __future__ import annotations

import torch
from torch import fx

from ..graph import add_tensor, aten, const_value, erase_unused, op_name, shape, sole_user
from ..rules import Match, Pass

__all__ = ["AffineChain"]

_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.mul.Scalar,
        aten.div.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.pow.Tensor_Scalar}


def _step(gm, node) -> tuple[fx.Node, object] | None:
    """``(input, op)`` for an elementwise op of one tensor and constants; ``op`` maps ``(A, B)``, or None."""
    if node.op != "call_function" or node.target not in _OPS or node.kwargs.get("alpha", 1) != 1:
        return None
    name = op_name(node)
    if name == "neg":
        return (node.args[0], lambda a, b: (-a, -b)) if isinstance(node.args[0], fx.Node) else None
    x, c = node.args[:2]
    flipped = False
    if const_value(gm, x) is not None and not isinstance(c, (int, float)) and const_value(gm, c) is None:
        x, c, flipped = c, x, True
    value = const_value(gm, c)
    if not isinstance(x, fx.Node) or x.op == "get_attr" or value is None:
        return None
    if name == "pow":
        k = value
        if flipped or float(k) != int(k) or not 1 <= int(k) <= 16:
            return None
        return x, lambda a, b: (a ** int(k), b) if _is_zero(b) else None
    if flipped and name == "div":
        return None
    ops = {"mul": lambda a, b: (a * value, b * value), "div": lambda a, b: (a / value, b / value),
           "add": lambda a, b: (a, b + value), "sub": (lambda a, b: (-a, value - b)) if flipped else
           (lambda a, b: (a, b - value)), "rsub": lambda a, b: (-a, value - b)}
    return x, ops[name]


def _is_zero(b) -> bool:
    return bool((torch.as_tensor(b) == 0).all())


def _chain(gm, node) -> tuple[fx.Node, list[tuple[fx.Node, object]]] | None:
    """``(y, [(op node, its map of (A, B)), ...] from y to node)``: the longest chain ending at ``node`` whose
    inner values have one user."""
    steps, cur = [], node
    while (found := _step(gm, cur)) is not None:
        steps.append((cur, found[1]))
        x = found[0]
        if sole_user(x) is not cur:
            return x, steps[::-1]
        cur = x
    return (cur, steps[::-1]) if steps else None


def _compose(steps):
    """``(A, B, k)`` with ``node = (y ** k) * A + B``, or None when a power meets a shift."""
    a, b, k = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), 1
    for n, op in steps:
        if n.target == aten.pow.Tensor_Scalar:
            if not _is_zero(b) or k != 1:
                return None
            k = int(n.args[1])
        out = op(a, b)
        if out is None:
            return None
        a, b = (torch.as_tensor(v, dtype=torch.float64) for v in out)
    return a, b, k


class AffineChain(Pass):
    name = "affine_chain"

    def match(self, gm, node):
        if _step(gm, node) is None or any(_step(gm, u) is not None and sole_user(node) is u for u in node.users):
            return None  # not the end of a chain
        found = _chain(gm, node)
        if found is None:
            return None
        y, steps = found
        val = y.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
            return None  # integer index arithmetic stays integer
        ops = [n for n, _ in steps]
        composed = _compose(steps)
        if composed is None:
            return None
        a, b, k = composed
        needed = (k != 1) + (not bool((a == 1).all())) + (not _is_zero(b))
        out = shape(node)
        if needed >= len(ops) or out is None or torch.broadcast_shapes(shape(y) or (), a.shape, b.shape) != out:
            return None
        return self.found([node], (y, ops, a, b, k))

    def rewrite(self, gm, match: Match) -> str:
        y, ops, a, b, k = match.plan
        node, graph = ops[-1], gm.graph
        dtype = node.meta["val"].dtype
        value, steps = y, []
        if k != 1:
            steps.append((aten.pow.Tensor_Scalar, k))
        if not bool((a == 1).all()):
            steps.append((aten.mul.Tensor, a))
        if not _is_zero(b):
            steps.append((aten.add.Tensor, b))
        for op, operand in steps:
            with graph.inserting_before(node):
                if isinstance(operand, torch.Tensor):
                    c = graph.get_attr(add_tensor(gm, f"{node.name}_{op.__name__.split('.')[0]}", operand,
                                                  parameter=False))
                    c.meta["val"] = torch.empty(operand.shape, dtype=dtype, device="meta")
                    operand = c
                value = graph.call_function(op, (value, operand))
            out = torch.broadcast_shapes(shape(value.args[0]), shape(operand) or ()) \
                if isinstance(operand, fx.Node) else shape(value.args[0])
            value.meta["val"] = torch.empty(out, dtype=dtype, device="meta")
        node.replace_all_uses_with(value)
        erase_unused(graph, ops)
        return f"{len(ops)} elementwise ops with constants -> {len(steps)}"
