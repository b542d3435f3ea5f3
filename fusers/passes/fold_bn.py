"""Fold an eval-mode BatchNorm into the convolution, transposed convolution or Linear before it.

``K' = K * s``, ``b' = s * b + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``
(transposed convs scale their output channels in kernel dim 1, per group). Exact when the BN
uses running statistics and the producer's output has no other user. A Linear folds only with
a 2-D output, where BatchNorm1d normalises the Linear's features.
"""

from __future__ import annotations

from .. import algebra
from ..graph import as_batchnorm, as_conv, erase_unused, replace_conv, shape, sole_user
from ..rules import Match, Pass, RefusalCode

_BATCH_STATS = "BatchNorm uses batch statistics (train mode or track_running_stats=False); folding needs running statistics"


class FoldBatchNorm(Pass):
    name = "fold_bn"
    refusal = "BatchNorm not folded"

    def match(self, gm, node):
        bn = as_batchnorm(gm, node)
        if bn is None:
            return None
        if not bn.foldable:
            return self.refuse(RefusalCode.NO_RUNNING_STATS, [node], _BATCH_STATS)
        conv = as_conv(gm, bn.x)
        if conv is None:  # stands only if the BN is still there when the passes are done
            what = getattr(bn.x, "target", getattr(bn.x, "op", "input"))
            return self.refuse(RefusalCode.NO_PRODUCER, [node],
                               f"it follows {getattr(what, '__name__', what)}, not a conv or Linear, and feeds no "
                               "unpadded conv; kept as an affine op")
        if sole_user(conv.node) is not node:
            return self.refuse(RefusalCode.OTHER_USERS, [node], f"{conv.node.name} output is also used elsewhere")
        if conv.kind == "linear" and len(shape(conv.node) or ()) != 2:
            return self.refuse(RefusalCode.LINEAR_NOT_2D, [node],
                               "BatchNorm after a Linear with a non-2-D output normalises another dim")
        return self.found([node], (conv, bn))

    def rewrite(self, gm, match: Match) -> str:
        conv, bn = match.plan
        s, t = algebra.bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
        if conv.kind == "conv_transpose":
            k, b = algebra.fuse_conv_transpose_bn(conv.weight, conv.bias, s, t, conv.groups)
        else:
            k, b = algebra.fuse_conv_bn(conv.weight, conv.bias, s, t)
        replace_conv(gm, bn.node, conv.x, conv.kind, k, b, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.output_padding, insert_before=bn.node)
        erase_unused(gm.graph, [bn.node])
        return f"{conv.kind} + BatchNorm -> {conv.kind}"
