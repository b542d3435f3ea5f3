"""Fold an eval-mode BatchNorm into the convolution, transposed convolution or Linear before it.

``K' = K * s``, ``b' = s * b + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``
(transposed convs scale their output channels in kernel dim 1, per group). Exact when the BN
uses running statistics and the producer's output has no other user. A Linear folds only with
a 2-D output, where BatchNorm1d normalises the Linear's features, or through views that merge its
leading dims into one (LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(...)``: users that only read
the Linear's shape do not count).

A BatchNorm (or a per-channel ``s * x + t``) after a ``cat`` along channels is split per producer:
the producer of channels ``[a, b)`` takes ``s[a:b]``, ``t[a:b]``. Done when every producer is a
convolution or Linear that only the ``cat`` reads; the ``cat`` then stands where the BatchNorm was.

A BatchNorm after anything else, or after a conv whose output others read too, is refused here with
what it follows; ``fold_bn_region`` may still fold it by rescaling the region around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .. import algebra
from ..graph import (Conv, aten, as_batchnorm, as_conv, erase_unused, op_name, replace_conv, shape, sole_user,
                     value_users)
from ..matchers import channel_affine
from ..rules import Match, Pass, RefusalCode

_BATCH_STATS = "BatchNorm uses batch statistics (train mode or track_running_stats=False); folding needs running statistics"


class FoldBatchNorm(Pass):
    name = "fold_bn"
    refusal = "BatchNorm not folded"

    def match(self, gm, node):
        bn = as_batchnorm(gm, node)
        pieces = _cat_producers(gm, node)
        if pieces:
            return self.found([node], pieces)
        if bn is None:
            return None
        if not bn.foldable:
            return self.refuse(RefusalCode.NO_RUNNING_STATS, [node], _BATCH_STATS)
        conv = as_conv(gm, bn.x) or _linear_behind_views(gm, bn)
        if conv is None:  # stands only if the BN is still there when the passes are done
            what = op_name(bn.x) if isinstance(bn.x, fx.Node) else "a constant"
            return self.refuse(RefusalCode.NO_PRODUCER, [node], f"it follows {what} ({getattr(bn.x, 'name', bn.x)}), "
                               "not a conv or Linear")
        if conv.node is not bn.x:  # a Linear whose features a view made the BatchNorm's channels
            return self.found([node], (conv, bn))
        if sole_user(conv.node) is not node:
            others = ", ".join(u.name for u in conv.node.users if u is not node)
            return self.refuse(RefusalCode.OTHER_USERS, [node], f"{conv.node.name}'s output is also read by {others}")
        if conv.kind == "linear" and len(shape(conv.node) or ()) != 2:
            return self.refuse(RefusalCode.LINEAR_NOT_2D, [node],
                               "BatchNorm after a Linear with a non-2-D output normalises another dim")
        return self.found([node], (conv, bn))

    def rewrite(self, gm, match: Match) -> str:
        if isinstance(match.plan, CatPlan):
            return _split_over_cat(gm, match.plan)
        conv, bn = match.plan
        s, t = algebra.bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
        if conv.node is not bn.x:
            _fold(gm, conv, conv.node, s, t)
            bn.node.replace_all_uses_with(bn.x)
        else:
            _fold(gm, conv, bn.node, s, t)
        erase_unused(gm.graph, [bn.node, conv.node])
        return f"{conv.kind} + BatchNorm -> {conv.kind}"


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}


def _linear_behind_views(gm, bn) -> Conv | None:
    """The Linear behind views that only merge its leading dims (LeViT's ``bn(linear(x).flatten(0, 1))``):
    a 2-D BatchNorm input whose channels are the Linear's features, read by nothing else."""
    prev, node, out = bn.node, bn.x, shape(bn.x)
    while getattr(node, "target", None) in _VIEWS and value_users(node) == [prev]:
        prev, node = node, node.args[0]
    conv = as_conv(gm, node)
    if conv is None or conv.kind != "linear" or prev is bn.node or out is None or len(out) != 2:
        return None
    if shape(node)[-1] != out[1] or value_users(node) != [prev]:
        return None
    return conv


def _fold(gm, conv, old, s, t) -> None:
    """Replace ``old`` (``s * conv + t``) by one conv."""
    if conv.kind == "conv_transpose":
        k, b = algebra.fuse_conv_transpose_bn(conv.weight, conv.bias, s, t, conv.groups)
    else:
        k, b = algebra.fuse_conv_bn(conv.weight, conv.bias, s, t)
    replace_conv(gm, old, conv.x, conv.kind, k, b, conv.stride, conv.padding, conv.dilation,
                 conv.groups, conv.output_padding, insert_before=old)


@dataclass
class CatPlan:
    node: fx.Node                            # the BatchNorm / affine op after the cat
    cat: fx.Node
    s: torch.Tensor
    t: torch.Tensor
    producers: list[tuple[Conv, int, int]]   # each producer and its channels [a, b) in the cat


def _cat_producers(gm, node) -> CatPlan | None:
    """``node`` as ``s * cat(convs, dim=1) + t`` where only the cat reads each conv, else None."""
    affine = channel_affine(gm, node, 1)
    if affine is None or getattr(affine[0], "target", None) != aten.cat.default or sole_user(affine[0]) is not node:
        return None
    cat, s, t = affine
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    out = shape(cat)
    if out is None or dim % len(out) != 1 or len(set(cat.args[0])) != len(cat.args[0]):
        return None
    producers, start = [], 0
    for piece in cat.args[0]:
        conv = as_conv(gm, piece)
        if conv is None or sole_user(piece) is not cat or (conv.kind == "linear" and len(out) != 2):
            return None
        producers.append((conv, start, start + shape(piece)[1]))
        start += shape(piece)[1]
    return CatPlan(node, cat, s, t, producers)


def _split_over_cat(gm, plan: CatPlan) -> str:
    for conv, a, b in plan.producers:
        _fold(gm, conv, conv.node, plan.s[a:b], plan.t[a:b])
        erase_unused(gm.graph, [conv.node])
    plan.node.replace_all_uses_with(plan.cat)
    erase_unused(gm.graph, [plan.node])
    return f"BatchNorm after a cat -> folded into {len(plan.producers)} producers"
