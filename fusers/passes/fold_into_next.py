"""Fold a per-channel affine op into the convolution or Linear that reads it.

``conv(s * x + t) = conv'(x)`` with ``K' = K * s[in]`` and ``b' = b + sum(K * t[in])``. The affine
op is an eval-mode BatchNorm (a BN before a conv), or an add / sub / mul by a constant that varies
only along channels (YOLOv7's ImplicitA: ``implicit + x`` before a 1x1 conv). Exact only when the
conv reads no zero padding (a padded border would see ``0``, not ``t``) and the affine op has no
other user.
"""

from __future__ import annotations

import torch

from .. import algebra
from ..graph import aten, as_batchnorm, as_conv, const_value, erase_unused, per_channel, replace_conv, shape, sole_user
from ..manager import NodePass

_AFFINE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor}


def channel_affine(gm, node, channel_dim: int):
    """``node`` as ``(x, s, t)`` with ``node = s * x + t`` per channel, or None."""
    out = shape(node)
    if out is None:
        return None
    bn = as_batchnorm(gm, node)
    if bn is not None:
        if not bn.foldable or channel_dim != 1:
            return None
        s, t = algebra.bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
        return bn.x, s.to(torch.float64), t.to(torch.float64)
    if getattr(node, "target", None) not in _AFFINE or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[:2]
    for x, c, flipped in ((a, b, False), (b, a, True)):
        if not isinstance(x, torch.fx.Node) or shape(x) != out:
            continue
        value = per_channel(const_value(gm, c), out, channel_dim)
        if value is None:
            continue
        ones, zeros = torch.ones_like(value), torch.zeros_like(value)
        if node.target == aten.mul.Tensor:
            return x, value, zeros
        if node.target == aten.add.Tensor:
            return x, ones, value
        return (x, -ones, value) if flipped else (x, ones, -value)
    return None


class FoldIntoNext(NodePass):
    name = "fold_into_next"
    refusal = "affine op not folded into the next conv"

    def analyze(self, gm, node):
        conv = as_conv(gm, node)
        if conv is None or conv.kind == "conv_transpose" or not isinstance(conv.x, torch.fx.Node):
            return None
        channel_dim = 1 if conv.kind == "conv" else len(shape(conv.x) or (0,)) - 1
        affine = channel_affine(gm, conv.x, channel_dim)
        if affine is None:
            return None
        if sole_user(conv.x) is not node:
            return None, f"{conv.x.name} is also used elsewhere"
        if any(conv.padding):
            return None, (f"the conv zero-pads its input (padding {conv.padding}); the border would see 0 "
                          "instead of the affine shift")
        return conv, affine

    def rewrite(self, gm, node, plan):
        conv, (x, s, t) = plan
        k, b = algebra.fuse_affine_into_conv(conv.weight, conv.bias, s, t, conv.groups)
        old_input = conv.x
        replace_conv(gm, conv.node, x, conv.kind, k, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        erase_unused(gm.graph, [conv.node])
        return f"{getattr(old_input.target, '__name__', old_input.target)} folded into next {conv.kind}"
