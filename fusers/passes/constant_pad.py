"""Recognise a pad with a per-channel constant, however it is written, as ``pad(x - v) + v``.

DBB's BN-and-pad layer pads its output with the value the BatchNorm gives a zero input, per
channel; its authors write ``F.pad`` and then assign ``v`` to the four border slices in place (made
``cat``s by ``slice_writes``), others concatenate constant borders. Any region of pure data movement
(``cat``, ``slice``, constant ``pad``, ``expand``, ``view``) from one tensor ``x`` and constants whose
result ``y`` satisfies

    ``y[n, c, i + p0, j + p1] = x[n, c, i, j]`` inside, ``y = v[c]`` on the border

is that pad, and becomes ``pad(x - v, p) + v`` (one ``pad`` with value ``v`` when ``v`` is the same for
every channel): the form ``merge_sequence`` merges into the convolutions around it.

The region's map is read, not assumed: it runs on ``x`` holding each element's index and again
shifted; elements that moved with the shift come from ``x`` (at the index they hold), the others
are constants. Data movement copies values, so the map is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from ..graph import add_tensor, aten, erase_unused, run_nodes, shape
from ..rules import Match, Pass

__all__ = ["ConstantPad"]

_MOVES = {aten.cat.default, aten.slice.Tensor, aten.pad.default, aten.constant_pad_nd.default, aten.expand.default,
          aten.view.default, aten.reshape.default}


def _region(node) -> tuple[list[fx.Node], fx.Node] | None:
    """The movement nodes ending at ``node`` (in graph order) and their one tensor input, or None."""
    region, inputs, stack = set(), set(), [node]
    while stack:
        n = stack.pop()
        if n in region:
            continue
        region.add(n)
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                continue
            if a.op == "call_function" and a.target in _MOVES and all(u in region or u is node or u.target in _MOVES
                                                                         for u in a.users):
                stack.append(a)
            else:
                inputs.add(a)
    if len(inputs) != 1 or any(u not in region for n in region - {node} for u in n.users):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(region, key=order.get), inputs.pop()


def _run(gm, region, x, value) -> torch.Tensor:
    return run_nodes(gm, region, {x: value})[region[-1]]


def _as_pad(gm, region, x) -> tuple[list[int], torch.Tensor] | None:
    """``(F.pad widths, per-channel value)`` when the region is a per-channel constant pad of ``x``."""
    xs, ys = shape(x), shape(region[-1])
    if xs is None or ys is None or len(xs) != len(ys) or len(xs) < 3 or xs[:2] != ys[:2]:
        return None
    codes = torch.arange(1, 1 + torch.Size(xs).numel(), dtype=torch.float64).reshape(xs)
    with torch.no_grad():
        a = _run(gm, region, x, codes).double()
        b = _run(gm, region, x, codes + codes.numel()).double()
    if a.shape != ys:
        return None
    moved = a != b
    first = (a == 1) & moved
    if int(first.sum()) != 1:
        return None
    start = [int(i) for i in first.nonzero()[0][2:]]
    widths = []
    for d in reversed(range(len(start))):  # F.pad order: last dim first
        widths += [start[d], ys[2 + d] - xs[2 + d] - start[d]]
    if any(w < 0 for w in widths):
        return None
    expected = F.pad(codes, widths)
    if not torch.equal(moved, expected > 0) or not torch.equal(a[moved], expected[moved]):
        return None
    border = a.transpose(0, 1).reshape(ys[1], -1)[~moved.transpose(0, 1).reshape(ys[1], -1)].reshape(ys[1], -1)
    if border.numel() == 0 or not bool((border == border[:, :1]).all()):
        return None
    return widths, border[:, 0].clone()


class ConstantPad(Pass):
    name = "constant_pad"

    def match(self, gm, node):
        if node.op != "call_function" or node.target not in _MOVES or any(u.target in _MOVES for u in node.users):
            return None
        found = _region(node)
        if found is None:
            return None
        region, x = found
        if all(n.target in (aten.pad.default, aten.constant_pad_nd.default) for n in region):
            return None  # already one pad
        pad = _as_pad(gm, region, x)
        return None if pad is None else self.found([node], (x, *pad))

    def rewrite(self, gm, match: Match) -> str:
        x, widths, v = match.plan
        graph = gm.graph
        node = next(n for n in graph.nodes if n.name == match.nodes[0])
        val, dtype = node.meta.get("val"), x.meta["val"].dtype
        uniform = bool((v == v[0]).all())
        with graph.inserting_before(node):
            if uniform:
                out = graph.call_function(aten.constant_pad_nd.default, (x, widths, float(v[0])))
            else:  # held in float64 while the passes run, rounded with the other weights at the end
                nd = len(shape(x)) - 2
                c = graph.get_attr(add_tensor(gm, f"{node.name}_pad_value", v.reshape(1, -1, *[1] * nd),
                                              parameter=False))
                c.meta["val"] = torch.empty((1, len(v), *[1] * nd), dtype=dtype, device="meta")
                shifted = graph.call_function(aten.sub.Tensor, (x, c))
                shifted.meta["val"] = x.meta["val"]
                padded = graph.call_function(aten.constant_pad_nd.default, (shifted, widths, 0.0))
                padded.meta["val"] = val
                out = graph.call_function(aten.add.Tensor, (padded, c))
        out.meta["val"] = val
        node.replace_all_uses_with(out)
        erase_unused(graph, [node])
        what = f"value {float(v[0]):.3g}" if uniform else "a value per channel"
        return f"data movement -> pad {widths} with {what}"

