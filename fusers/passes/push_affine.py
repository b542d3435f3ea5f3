"""Move an eval BatchNorm past pure data movement so it can fold into the convs behind it.

``conv_k(r_k(BN(x))) == conv_k(BN_k(r_k(x)))`` when ``r_k`` only moves channels (a channel
shuffle's view / transpose / view, ``chunk``, ``split``, slicing): ``BN_k`` is BN with its
parameters permuted the way ``r_k`` permutes channels. The permutation is read by running the
movement ops on a tensor whose channel ``c`` holds the value ``c``, so any such arrangement works.
Applied only when every path ends in an unpadded conv, where ``fold_into_next`` absorbs ``BN_k``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..graph import add_tensor, as_batchnorm, as_conv, aten, erase_unused, shape
from ..rules import Match, Pass, RefusalCode

_MOVES = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.chunk.default,
          aten.split.Tensor, aten.split_with_sizes.default, aten.contiguous.default, aten.clone.default,
          aten.slice.Tensor, operator.getitem}


def _paths(bn_node):
    """The movement nodes after ``bn_node`` and the (tensor, conv) pairs where they end, or a reason."""
    moves, ends, stack = [], [], [bn_node]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.target in _MOVES:
                moves.append(user)
                stack.append(user)
            elif node is not bn_node and user.target in (aten.conv1d.default, aten.conv2d.default) \
                    and user.args[0] is node and len(node.users) == 1:
                ends.append((node, user))
            else:
                return None
    return (moves, ends) if ends and moves else None


def _channel_maps(bn, moves, ends) -> list[torch.Tensor] | None:
    """For each end tensor, the BN channel each of its channels came from (None if not per channel)."""
    x_shape = shape(bn.x)
    index = torch.arange(x_shape[1], dtype=torch.float64).reshape(1, -1, *([1] * (len(x_shape) - 2)))
    values = {bn.node: index.expand(x_shape).contiguous()}
    load = lambda a: values[a] if isinstance(a, fx.Node) else a  # noqa: E731
    for node in sorted(moves, key=lambda n: list(n.graph.nodes).index(n)):
        values[node] = node.target(*fx.node.map_aggregate(node.args, load),
                                   **fx.node.map_aggregate(node.kwargs, load))
    maps = []
    for tensor, _ in ends:
        v = values[tensor]
        if v.dim() < 2:
            return None
        per_channel = v.transpose(0, 1).reshape(v.shape[1], -1)
        if not bool((per_channel == per_channel[:, :1]).all()):
            return None  # a channel of the end tensor mixes BN channels
        maps.append(per_channel[:, 0].long())
    return maps


class PushAffine(Pass):
    name = "push_affine"
    refusal = "BatchNorm not moved"

    def match(self, gm, node):
        bn = as_batchnorm(gm, node)
        if bn is None or not bn.foldable or node.target is operator.getitem or not isinstance(bn.x, fx.Node):
            return None
        found = _paths(node)
        if found is None:
            return None
        moves, ends = found
        if any(any(as_conv(gm, conv).padding) for _, conv in ends):
            return self.refuse(RefusalCode.PADDED_CONV, [node], "a conv behind the data movement zero-pads its input")
        maps = _channel_maps(bn, moves, ends)
        if maps is None:
            return self.refuse(RefusalCode.MIXES_CHANNELS, [node], "the data movement mixes channels")
        return self.found([node], (bn, ends, maps))

    def rewrite(self, gm, match: Match) -> str:
        bn, ends, maps = match.plan
        node = bn.node
        graph = gm.graph
        params = [bn.weight, bn.bias, bn.mean, bn.var]
        for (tensor, conv), index in zip(ends, maps):
            with graph.inserting_before(conv):
                attrs = [graph.get_attr(add_tensor(gm, f"{tensor.name}_bn_{i}", p[index], parameter=False))
                         if p is not None else None for i, p in enumerate(params)]
                new = graph.call_function(aten.batch_norm.default, (tensor, *attrs, False, 0.0, bn.eps, False))
            new.meta["val"] = tensor.meta.get("val")
            conv.replace_input_with(tensor, new)
        node.replace_all_uses_with(bn.x)
        erase_unused(graph, [node])
        return f"BatchNorm moved past {len(ends)} data-movement path(s)"
