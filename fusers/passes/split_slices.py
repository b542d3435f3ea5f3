"""Slices that cut one tensor into consecutive parts along a dim become one ``split``.

``y[..., 0:2]``, ``y[..., 2:4]``, ``y[..., 4:]`` (what ``slice_writes`` leaves of YOLOv7's decode) export
as three Slice ops; ``split_with_sizes(y, [2, 2, n - 4], -1)`` is one Split. Exact (data movement);
done when the step-1 slices of the same dim tile it without gaps or overlaps.
"""

from __future__ import annotations

import operator

from torch import fx

from ..graph import aten, erase_unused, shape, slice_range
from ..rules import Match, Pass

__all__ = ["SplitSlices"]


def _tiling(node) -> tuple[int, list[fx.Node]] | None:
    """``(dim, slices in order)`` when slice users of ``node`` tile one of its dims, else None."""
    size = shape(node)
    if size is None:
        return None
    by_dim: dict[int, list[tuple[int, int, fx.Node]]] = {}
    for user in node.users:
        found = slice_range(user) if user.args and user.args[0] is node else None
        if found is not None and found[1] < found[2]:
            dim, start, end = found
            by_dim.setdefault(dim, []).append((start, end, user))
    for dim, parts in by_dim.items():
        parts.sort(key=lambda p: p[:2])
        if len(parts) > 1 and parts[0][0] == 0 and parts[-1][1] == size[dim] and \
                all(a[1] == b[0] for a, b in zip(parts, parts[1:])):
            return dim, [p[2] for p in parts]
    return None


class SplitSlices(Pass):
    name = "split_slices"

    def match(self, gm, node):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "placeholder"):
            return None
        found = _tiling(node)
        return None if found is None else self.found([node], found)

    def rewrite(self, gm, match: Match) -> str:
        dim, slices = match.plan
        graph = gm.graph
        x = slices[0].args[0]
        sizes = [shape(s)[dim] for s in slices]
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(slices, key=order.get)
        with graph.inserting_before(first):
            split = graph.call_function(aten.split_with_sizes.default, (x, sizes, dim))
            split.meta["val"] = [s.meta["val"] for s in slices]
            for i, s in enumerate(slices):
                part = graph.call_function(operator.getitem, (split, i))
                part.meta["val"] = s.meta["val"]
                s.replace_all_uses_with(part)
        erase_unused(graph, slices)
        return f"{len(slices)} slices along dim {dim} -> split"

