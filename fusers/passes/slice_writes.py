"""Turn in-place writes into slices of an intermediate tensor into functional ``cat``s.

Authors write ``y[..., 0:2] = f(y[..., 0:2])`` (YOLOv7's decode) or ``out[:, :, 0:p, :] = v``
(DBB's BN-and-pad border); ``torch.export`` keeps them as ``copy_`` (or ``fill_``) into ``slice``
views of the tensor, which export as ScatterND and hide the tensor's value from every matcher.
Along one dim ``d``, writing ``s`` into ``[a, b)`` of ``y`` is the concatenation

    ``y' = cat([y[a0:a], s, y[b:n]], d)``    (``s`` broadcast to the slice's shape)

and a write into a box of several dims nests one ``cat`` per dim. Each value of ``y`` is kept as a
list of pieces along ``d``: consecutive writes on ``d`` splice the list, and a later read of a slice
of ``y`` along ``d`` takes the pieces it covers (``y'[..., 2:4]`` after a write into ``0:2`` is
``y[..., 2:4]``), so a set of writes that together cover the dim leaves one ``cat`` of the computed
pieces. Every other read sees the ``cat`` of the current pieces. A ``slice_scatter`` (the functional
form of one such write) becomes a ``cat`` the same way.

Refused (left as it is, with the reason) when the written tensor is a graph input, a weight or
itself a view of another tensor (the write would be visible there), when a view of it is created
before a write and read after it, when a write goes through anything but step-1 slices and
selects (``y[:, 4] = v`` writes a box one wide), or when the source's dtype differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..graph import (VIEW_OPS, aten, erase_unused, shape, slice_bounds, slice_range, view_root, views_of,
                     written_arg)
from ..rules import Match, Pass, RefusalCode

__all__ = ["SliceWrites"]

WRITE_OPS = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor}


def _box(base, chain: list[fx.Node]) -> dict[int, tuple[int, int]] | None:
    """The box ``{dim: (start, end)}`` of ``base`` that ``chain`` (slices and selects, the last one applied
    first in the list) views: a select is a box one wide. None when the chain holds anything else."""
    if any(n.target not in (aten.slice.Tensor, aten.select.int) for n in chain):
        return None
    full = shape(base)
    dims = list(range(len(full)))  # the base dim of each dim of the current view
    box: dict[int, tuple[int, int]] = {}
    for s in reversed(chain):
        size = shape(s.args[0])
        d = s.args[1] % len(size)
        lo, _ = box.get(dims[d], (0, full[dims[d]]))
        if s.target == aten.select.int:
            index = s.args[2] % size[d]
            box[dims.pop(d)] = (lo + index, lo + index + 1)
            continue
        found = slice_range(s)
        if found is None:
            return None
        _, start, end = found
        box[dims[d]] = (lo + start, lo + end)
    return {d: r for d, r in box.items() if r != (0, full[d])}


@dataclass
class Write:
    node: fx.Node                     # the copy_ / fill_
    box: dict[int, tuple[int, int]]   # where it writes
    chain: list[fx.Node]              # the slice views it writes through


def _plan(base, order) -> list[Write] | str:
    """The writes into ``base`` in graph order, or why they cannot be made functional."""
    views = views_of(base)
    writes, chain_nodes = [], set()
    for v in views:
        for user in v.users:
            if user.target in WRITE_OPS and user.args[0] is v:
                chain, n = [], v
                while n is not base:
                    chain.append(n)
                    n = n.args[0]
                box = _box(base, chain)
                if box is None:
                    other = next((n for n in chain if n.target not in (aten.slice.Tensor, aten.select.int)), v)
                    return (f"a write into {v.name} goes through {other.name} ({other.target}), not step-1 slices "
                            "and selects")
                writes.append(Write(user, box, chain))
                chain_nodes |= set(chain)
    for user in base.users:  # a write straight into the tensor, ``y.copy_(s)`` / ``y.fill_(0)``
        if user.target in WRITE_OPS and user.args[0] is base:
            writes.append(Write(user, {}, []))
    writes.sort(key=lambda w: order[w.node])
    for w in writes:
        src = w.node.args[1] if w.node.target != aten.fill_.Scalar else None
        val = base.meta.get("val")
        if isinstance(src, fx.Node) and src.meta.get("val") is not None and val is not None \
                and src.meta["val"].dtype != val.dtype:
            return f"{w.node.name} writes {src.meta['val'].dtype} into {val.dtype}"
    times = [order[w.node] for w in writes]
    for v in views:  # a view read across a write would see the write: keep such graphs as they are
        if v in chain_nodes:
            if not all(u in chain_nodes or u.target in WRITE_OPS for u in v.users):
                return f"the slice {v.name} is written into and also read"
            continue
        uses = [order[u] for u in _uses(v)]
        if uses and any(order[v] < t < max(uses) for t in times):
            return f"the view {v.name} is made before a write and read after it"
    return writes


def _uses(view) -> list[fx.Node]:
    """The nodes that read ``view``'s data: its users, through further views."""
    out, stack = [], [view]
    while stack:
        for user in stack.pop().users:
            (stack if user.target in VIEW_OPS else out).append(user)
    return out


class _Value:
    """The current value of the written tensor: pieces ``(node, start, end)`` along ``dim``."""

    def __init__(self, gm, base, anchor):
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor
        self.shape, self.dtype = shape(base), base.meta["val"].dtype
        self.dim, self.pieces, self.node = None, [], base

    def _new(self, target, args, out_shape, kwargs=None) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), kwargs or {})
        node.meta["val"] = torch.empty(out_shape, dtype=self.dtype, device="meta")
        return node

    def _slice(self, node, dim, start, end, node_shape) -> fx.Node:
        if start == 0 and end == node_shape[dim]:
            return node
        return self._new(aten.slice.Tensor, (node, dim, start, end), _with(node_shape, dim, end - start))

    def materialize(self) -> fx.Node:
        """One node holding the current value (a ``cat`` of the pieces)."""
        if self.pieces:
            parts = [self._slice(n, self.dim, a, b, shape(n)) for n, a, b in self.pieces]
            self.node = parts[0] if len(parts) == 1 else self._new(aten.cat.default, (parts, self.dim), self.shape)
            self.dim, self.pieces = None, []
        return self.node

    def read(self, dim, start, end) -> fx.Node:
        """The slice ``[start, end)`` along ``dim`` of the current value, from the pieces it covers."""
        if self.dim != dim:
            self.materialize()
            return self._slice(self.node, dim, start, end, self.shape)
        parts, pos = [], 0
        for n, a, b in self.pieces:
            lo, hi = max(start, pos), min(end, pos + b - a)
            if lo < hi:
                parts.append(self._slice(n, dim, a + lo - pos, a + hi - pos, shape(n)))
            pos += b - a
        return parts[0] if len(parts) == 1 else self._new(aten.cat.default, (parts, dim), _with(self.shape, dim, end - start))

    def write(self, box, src, out_shape):
        """Write ``src`` (already of the box's shape) into ``box``."""
        if not box:
            self.dim, self.pieces, self.node = None, [], src
            return
        dims = sorted(box)
        d, (start, end) = dims[0], box[dims[0]]
        if len(dims) > 1:  # write into a slab along d, then put the slab back
            slab = _Value(self.gm, self.read(d, start, end), self.anchor)
            slab.shape = _with(self.shape, d, end - start)
            slab.write({k: box[k] for k in dims[1:]}, src, out_shape)
            src = slab.materialize()
        if self.dim != d:
            self.materialize()
            self.dim, self.pieces = d, [(self.node, 0, self.shape[d])]
        self.pieces = _splice(self.pieces, start, end, (src, 0, end - start))


def _splice(pieces, start: int, end: int, new) -> list:
    """``pieces`` with the range ``[start, end)`` replaced by the piece ``new``."""
    before, after, pos = [], [], 0
    for n, a, b in pieces:
        if pos < start:
            before.append((n, a, a + min(b - a, start - pos)))
        if pos + b - a > end:
            after.append((n, a + max(end - pos, 0), b))
        pos += b - a
    return before + [new] + after


def _with(shape_, dim, size) -> tuple[int, ...]:
    out = list(shape_)
    out[dim] = size
    return tuple(out)


def _source(write: Write, value: _Value, out_shape) -> fx.Node:
    """What ``write`` stores, as a node of the written box's shape."""
    node = write.node
    if node.target == aten.fill_.Scalar:
        return value._new(aten.full.default, ([*out_shape], node.args[1]), out_shape,
                          {"dtype": value.dtype, "device": node.args[0].meta["val"].device})
    src, view = node.args[1], shape(node.args[0])
    if shape(src) != view:
        src = value._new(aten.expand.default, (src, list(view)), view)
    if view != tuple(out_shape):  # a select dropped a dim the box keeps, one wide
        src = value._new(aten.reshape.default, (src, list(out_shape)), out_shape)
    return src


class SliceWrites(Pass):
    name = "slice_writes"
    refusal = "in-place write kept"

    def matches(self, gm):
        seen = set()
        for node in list(gm.graph.nodes):
            if node.target == aten.slice_scatter.default:
                found = self.match(gm, node)
                if found is not None:
                    yield found
                continue
            w = written_arg(node)
            if node.target in WRITE_OPS and w is not None and view_root(w) not in seen:
                seen.add(view_root(w))
                found = self.match(gm, view_root(w))
                if found is not None:
                    yield found

    def match(self, gm, node):
        if node.target == aten.slice_scatter.default:  # the functional form: ``base`` with ``src`` in a slice
            args = list(node.args) + [0, None, None, 1][len(node.args) - 2:]
            base, src, dim, start, end, step = args[:6]
            size = shape(base)
            if size is None or (step or 1) != 1:
                return None
            dim %= len(size)
            return self.found([node], ("scatter", base, src, dim, *slice_bounds(start, end, size[dim])))
        tensor_and_views = [node, *views_of(node)]
        writes = [u for v in tensor_and_views for u in v.users if u.target in WRITE_OPS]
        if not writes:
            return None
        if node.op != "call_function" or node.target in VIEW_OPS or written_arg(node) is not None:
            what = ("a graph input or weight" if node.op != "call_function" else f"a view ({node.target})"
                    if node.target in VIEW_OPS else f"the result of the in-place {node.target}")
            return self.refuse(RefusalCode.WRITES_VISIBLE, writes, f"it writes into {node.name}, {what}: "
                               "the write is seen outside the tensor")
        if any(written_arg(u) is not None and u.target not in WRITE_OPS
               for v in tensor_and_views for u in v.users):
            return self.refuse(RefusalCode.UNSUPPORTED_WRITE, writes, f"{node.name} is also changed by another in-place op")
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        plan = _plan(node, order)
        if isinstance(plan, str):
            return self.refuse(RefusalCode.UNSUPPORTED_WRITE, writes, plan)
        return self.found([node], (node, plan))

    def rewrite(self, gm, match: Match) -> str:
        if match.plan[0] == "scatter":
            _, base, src, dim, start, end = match.plan
            node = next(n for n in gm.graph.nodes if n.name == match.nodes[0])
            value = _Value(gm, base, node)
            value.write({dim: (start, end)}, src, shape(src))
            node.replace_all_uses_with(value.materialize())
            erase_unused(gm.graph, [node])
            return "slice_scatter -> cat"
        base, writes = match.plan
        chain = {n for w in writes for n in w.chain}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        events = sorted([w.node for w in writes] + [u for u in base.users if u not in chain
                                                    and u.target not in WRITE_OPS], key=order.get)
        by_node = {w.node: w for w in writes}
        value = _Value(gm, base, base)
        for node in events:
            value.anchor = node
            if node in by_node:
                w = by_node[node]
                out_shape = tuple(b - a for a, b in (w.box.get(d, (0, n)) for d, n in enumerate(shape(base))))
                value.write(w.box, _source(w, value, out_shape), out_shape)
                continue
            sliced = slice_range(node)
            if sliced is not None:
                node.replace_all_uses_with(value.read(*sliced))
            else:
                node.replace_input_with(base, value.materialize())
        erase_unused(gm.graph, [w.node for w in writes] + [n for n in events if not n.users])
        return f"{len(writes)} in-place write(s) into {base.name} -> cat"
