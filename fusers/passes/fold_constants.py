"""Fold constant subgraphs: a node computed only from weights is evaluated once and stored.

Example: DBB's pad value ``bias - mean * gamma / sqrt(var + eps)``, YOLOv7's anchor grids. The
value is computed from the float64 weights, so what later passes read is exact. Random and
side-effecting ops are never folded, nor a tensor that an in-place op writes into later.
"""

from __future__ import annotations

import torch

from ..graph import add_tensor, erase_unused, fetch_attr, written_arg, written_nodes
from ..rules import Match, Pass

aten = torch.ops.aten
_NEVER = ("rand", "randn", "randint", "bernoulli", "dropout", "empty", "normal", "uniform", "_assert", "native_dropout")


def _foldable_op(node) -> bool:
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and not any(name.startswith(p) for p in _NEVER)


def _constants(gm) -> dict:
    """For every node: whether it is computed from weights only (and not written in place afterwards)."""
    const, written = {}, written_nodes(gm.graph)
    for node in gm.graph.nodes:
        if node in written or written_arg(node) is not None:
            const[node] = False
        elif node.op == "get_attr":
            const[node] = isinstance(fetch_attr(gm, node.target), torch.Tensor)
        elif _foldable_op(node):
            const[node] = all(const.get(a, False) for a in node.all_input_nodes)
        else:
            const[node] = False
    return const


def _on_frontier(node, const) -> bool:
    """A constant tensor that something non-constant reads: where a folded value goes."""
    return (node.op == "call_function" and const[node] and isinstance(node.meta.get("val"), torch.Tensor)
            and any(not const[u] for u in node.users))


class FoldConstants(Pass):
    name = "fold_constants"

    def matches(self, gm):
        const = _constants(gm)
        for node in gm.graph.nodes:
            if _on_frontier(node, const):
                yield self.found([node], node)

    def match(self, gm, node):
        return self.found([node], node) if _on_frontier(node, _constants(gm)) else None

    def rewrite(self, gm, match: Match) -> str:
        node = match.plan
        value = _evaluate(gm, node, {}).detach().clone()
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(add_tensor(gm, f"const_{node.name}", value, parameter=False))
        attr.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(attr)
        erase_unused(gm.graph, [node])
        return f"{node.target} -> constant {tuple(value.shape)}"


def _evaluate(gm, node, memo):
    if node in memo:
        return memo[node]
    if node.op == "get_attr":
        value = fetch_attr(gm, node.target)
    else:
        load = lambda a: _evaluate(gm, a, memo) if isinstance(a, torch.fx.Node) else a  # noqa: E731
        args = torch.fx.node.map_aggregate(node.args, load)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, load)
        with torch.no_grad():
            value = node.target(*args, **kwargs)
    memo[node] = value
    return value
