"""Fold an eval-mode BatchNorm into the convolution, transposed convolution or Linear before it.

``K' = K * s``, ``b' = s * b + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``
(transposed convs scale their output channels in kernel dim 1, per group). Exact when the BN
uses running statistics and the producer's output has no other user. A Linear folds only with
a 2-D output, where BatchNorm1d normalises the Linear's features.
"""

from __future__ import annotations

from .. import algebra
from ..graph import as_batchnorm, as_conv, erase_unused, replace_conv, shape, site, sole_user
from ..manager import Pass, Refusal, Site


class FoldBatchNorm(Pass):
    name = "fold_bn"

    def find(self, gm):
        sites, refusals = [], []
        for node in gm.graph.nodes:
            bn = as_batchnorm(gm, node)
            if bn is None:
                continue
            conv = as_conv(gm, bn.x)
            if conv is None:
                if not bn.foldable:
                    refusals.append(Refusal(site([node]), "BatchNorm uses batch statistics (train mode or "
                                            "track_running_stats=False); folding needs running statistics"))
                continue
            where = site([conv.node, node])
            if not bn.foldable:
                refusals.append(Refusal(where, "BatchNorm uses batch statistics (train mode or "
                                        "track_running_stats=False); folding needs running statistics"))
            elif sole_user(conv.node) is not node:
                refusals.append(Refusal(where, f"{conv.node.name} output is also used elsewhere"))
            elif conv.kind == "linear" and len(shape(conv.node) or ()) != 2:
                refusals.append(Refusal(where, "BatchNorm after a Linear with a non-2-D output normalises "
                                        "another dim"))
            else:
                sites.append(Site(where, _folder(node)))
        return sites, refusals


def _folder(bn_node):
    def apply(gm):
        bn = as_batchnorm(gm, bn_node)
        conv = as_conv(gm, bn.x)
        s, t = algebra.bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
        if conv.kind == "conv_transpose":
            k, b = algebra.fuse_conv_transpose_bn(conv.weight, conv.bias, s, t, conv.groups)
        else:
            k, b = algebra.fuse_conv_bn(conv.weight, conv.bias, s, t)
        replace_conv(gm, bn.node, conv.x, conv.kind, k, b, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.output_padding, insert_before=bn.node)
        erase_unused(gm.graph, [bn.node])
        return f"{conv.kind} + BatchNorm -> {conv.kind}"
    return apply
