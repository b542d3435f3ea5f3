"""Move an eval BatchNorm past data movement and per-channel pooling so it folds into the convs or
Linears behind it.

``f_k(r_k(BN(x))) == f_k(BN_k(r_k(x)))`` when ``r_k`` only moves channels (a channel shuffle's view /
transpose / view, ``chunk``, ``split``, slicing, ``flatten``) or averages within a channel (unpadded
average pooling, adaptive average pooling, ``mean`` over non-channel dims: an average of ``s*x + t`` is
``s*avg(x) + t``): ``BN_k`` is BN with its parameters permuted the way ``r_k`` permutes channels. The
permutation is read by running the ops on a tensor whose channel ``c`` holds ``c`` and again holding
``c^2``: an output element that averages one channel holds ``c`` and ``c^2``, one that mixes channels
does not. Applied only when every path ends in an unpadded conv (``BN_k`` is a BatchNorm there) or a
Linear reading the channels as its features (ViT-style ``flatten -> transpose -> linear``; ``BN_k`` is a
multiply and an add on the last dim), where ``fold_into_next`` absorbs it.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..algebra import bn_scale_shift
from ..graph import CONV_OPS, add_tensor, as_batchnorm, as_conv, aten, erase_unused, run_nodes, shape
from ..rules import Match, Pass, RefusalCode

_MOVES = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.chunk.default,
          aten.split.Tensor, aten.split_with_sizes.default, aten.contiguous.default, aten.clone.default,
          aten.slice.Tensor, operator.getitem, aten.flatten.using_ints, aten.unsqueeze.default,
          aten.squeeze.dim, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
          aten.adaptive_avg_pool3d.default, aten.mean.dim}
_POOLS = {aten.avg_pool1d.default, aten.avg_pool2d.default}
_CONVS = tuple(CONV_OPS)


def _is_move(node) -> bool:
    if node.target in _POOLS:  # averages of s*x + t are s*avg(x) + t only without zero padding
        padding = node.args[3] if len(node.args) > 3 else 0
        return not any(padding if isinstance(padding, (list, tuple)) else [padding])
    return node.target in _MOVES


def _paths(bn_node):
    """The movement nodes after ``bn_node`` and the (tensor, conv) pairs where they end, or a reason."""
    moves, ends, stack = [], [], [bn_node]
    while stack:
        node = stack.pop()
        for user in node.users:
            if _is_move(user):
                moves.append(user)
                stack.append(user)
            elif node is not bn_node and user.target in (*_CONVS, aten.linear.default) and user.args[0] is node:
                ends.append((node, user))
            else:
                return None
    return (moves, ends) if ends and moves else None


def _run(gm, bn, moves, code: torch.Tensor) -> dict:
    """The value of every movement node (``moves`` in graph order) when the BatchNorm's output holds ``code[c]``
    in channel ``c``."""
    x_shape = shape(bn.x)
    start = code.reshape(1, -1, *([1] * (len(x_shape) - 2))).expand(x_shape).contiguous()
    return run_nodes(gm, moves, {bn.node: start})


def _channel_maps(gm, bn, moves, ends) -> list[torch.Tensor] | None:
    """For each end tensor, the BN channel each of its channels came from (None if not per channel)."""
    index = torch.arange(shape(bn.x)[1], dtype=torch.float64)
    order = {n: i for i, n in enumerate(bn.node.graph.nodes)}
    moves = sorted(moves, key=order.get)
    plain, squared = _run(gm, bn, moves, index), _run(gm, bn, moves, index ** 2)
    maps = []
    for tensor, end in ends:
        v, v2 = plain[tensor], squared[tensor]
        if v.dim() < 2 or not torch.equal(v2, v ** 2):
            return None  # an element averages several channels
        dim = 1 if end.target in _CONVS else v.dim() - 1  # a Linear's features are its last dim
        per_channel = v.movedim(dim, 0).reshape(v.shape[dim], -1)
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
        if any(conv.target in _CONVS and any(as_conv(gm, conv).padding) for _, conv in ends):
            return self.refuse(RefusalCode.PADDED_CONV, [node], "a conv behind the data movement zero-pads its input")
        maps = _channel_maps(gm, bn, moves, ends)
        if maps is None:
            return self.refuse(RefusalCode.MIXES_CHANNELS, [node], "the data movement mixes channels")
        return self.found([node], (bn, ends, maps))

    def rewrite(self, gm, match: Match) -> str:
        bn, ends, maps = match.plan
        node = bn.node
        graph = gm.graph
        params = [bn.weight, bn.bias, bn.mean, bn.var]
        s, t = bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
        for (tensor, conv), index in zip(ends, maps):
            with graph.inserting_before(conv):
                if conv.target in _CONVS:
                    attrs = [graph.get_attr(add_tensor(gm, f"{tensor.name}_bn_{i}", p[index], parameter=False))
                             if p is not None else None for i, p in enumerate(params)]
                    new = graph.call_function(aten.batch_norm.default, (tensor, *attrs, False, 0.0, bn.eps, False))
                else:  # s * x + t on the last dim, which fold_into_next folds into the Linear
                    scale = graph.get_attr(add_tensor(gm, f"{tensor.name}_scale", s[index], parameter=False))
                    shift = graph.get_attr(add_tensor(gm, f"{tensor.name}_shift", t[index], parameter=False))
                    scaled = graph.call_function(aten.mul.Tensor, (tensor, scale))
                    scaled.meta["val"] = tensor.meta.get("val")
                    new = graph.call_function(aten.add.Tensor, (scaled, shift))
                    for c, v in ((scale, s), (shift, t)):
                        c.meta["val"] = torch.empty(v.shape, dtype=tensor.meta["val"].dtype, device="meta")
            new.meta["val"] = tensor.meta.get("val")
            conv.replace_input_with(tensor, new)
        node.replace_all_uses_with(bn.x)
        erase_unused(graph, [node])
        return f"BatchNorm moved past {len(ends)} data-movement / pooling path(s)"
