"""Remove ops that compute nothing in eval mode, so they stop no pattern.

``dropout(x, p, train=False)`` (and the feature / alpha variants) is ``x``; so are ``clone``,
``alias``, ``detach``, ``lift_fresh_copy``, a ``_to_copy`` / ``to`` to the dtype ``x`` already has, and a
``view`` / ``reshape`` / ``expand`` to the shape it already has. Each is replaced by its input: exact
by definition. timm's EfficientViT and LeViT heads put a Dropout between a BatchNorm and the Linear
it should fold into (``BN -> Dropout -> Linear``); authors ``clone()`` before in-place writes.

A dtype/device assertion on a tensor the graph computes itself (``_assert_tensor_metadata``, left
by ``.float()`` / ``.to()``) guards nothing in a graph of fixed dtypes and would count as a second
user of that tensor: it goes too (assertions on the graph's inputs stay).

A copy (``clone``, ``lift_fresh_copy``) is kept when its result or its input is written in place (a
``clone`` before ``y[...] = v`` is what keeps the write from reaching the original). ``alias`` and ``detach``
share their input's memory, so a write through them reaches the input anyway: they go even then (timm's
GhostNetV2 writes ``out += shortcut`` into ``out[:, :out_chs]``, a full slice that torch.export records as
``alias``, and Core ML's converter has no ``alias``).
"""

from __future__ import annotations

from torch import fx

from ..graph import aten, erase_unused, op_name, shape, written_nodes
from ..rules import Match, Pass

__all__ = ["DropNoOps"]

_DROPOUT = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
            aten.feature_alpha_dropout.default}
_COPIES = {aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
_SHARING = {aten.alias.default, aten.detach.default}  # same memory as the input: a write through them reaches it
_SAME_SHAPE = {aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default}
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}


def _is_noop(node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    t, x = node.target, node.args[0]
    if t == aten._assert_tensor_metadata.default:
        return x.op != "placeholder"
    if t in _DROPOUT:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
    if t in _COPIES:
        return True
    if t in _SAME_SHAPE:
        return shape(x) is not None and shape(x) == shape(node)
    if t in _CASTS:
        a, b = x.meta.get("val"), node.meta.get("val")
        return (a is not None and b is not None and a.dtype == b.dtype and a.device == b.device
                and node.kwargs.get("memory_format") is None and set(node.kwargs) <= {"dtype", "device", "layout"})
    return False


def _unwritten(node, written) -> bool:
    """Removing the op changes no write: it shares its input's memory, or neither is written in place."""
    return node.target in _SHARING or (node not in written and node.args[0] not in written)


class DropNoOps(Pass):
    name = "drop_noops"

    def matches(self, gm):
        written = written_nodes(gm.graph)
        return (self.found([n], n) for n in list(gm.graph.nodes) if _is_noop(n) and _unwritten(n, written))

    def match(self, gm, node):
        return self.found([node], node) if _is_noop(node) and _unwritten(node, written_nodes(gm.graph)) else None

    def rewrite(self, gm, match: Match) -> str:
        node = match.plan
        if node.target == aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
            return "dtype assertion on an intermediate removed"
        node.replace_all_uses_with(node.args[0])
        erase_unused(gm.graph, [node])
        return f"{op_name(node)} removed (identity in eval mode)"
