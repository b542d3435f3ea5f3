"""Fold a per-channel affine op into the convolution or Linear that reads it.

``conv(s * x + t) = conv'(x)`` with ``K' = K * s[in]`` and ``b' = b + sum(K * t[in])``. The affine
op is an eval-mode BatchNorm (a BN before a conv), or an add / sub / mul by a constant that varies
only along channels (YOLOv7's ImplicitA: ``implicit + x`` before a 1x1 conv). Exact only when the
conv reads no zero padding (a padded border would see ``0``, not ``t``) and the affine op has no
other user.
"""

from __future__ import annotations

from torch import fx

from .. import algebra
from ..graph import as_conv, erase_unused, replace_conv, shape, sole_user
from ..matchers import channel_affine
from ..rules import Match, Pass, RefusalCode


class FoldIntoNext(Pass):
    name = "fold_into_next"
    refusal = "affine op not folded into the next conv"

    def match(self, gm, node):
        conv = as_conv(gm, node)
        if conv is None or conv.kind == "conv_transpose" or not isinstance(conv.x, fx.Node):
            return None
        channel_dim = 1 if conv.kind == "conv" else len(shape(conv.x) or (0,)) - 1
        affine = channel_affine(gm, conv.x, channel_dim)
        if affine is None:
            return None
        if sole_user(conv.x) is not node:
            others = ", ".join(u.name for u in conv.x.users if u is not node)
            return self.refuse(RefusalCode.OTHER_USERS, [node], f"{conv.x.name} is also read by {others}")
        if any(conv.padding):
            return self.refuse(RefusalCode.PADDED_CONV, [node],
                               f"the conv zero-pads its input (padding {conv.padding}); the border would see 0 "
                               "instead of the affine shift")
        return self.found([node], (conv, affine))

    def rewrite(self, gm, match: Match) -> str:
        conv, (x, s, t) = match.plan
        k, b = algebra.fuse_affine_into_conv(conv.weight, conv.bias, s, t, conv.groups)
        old_input = conv.x
        replace_conv(gm, conv.node, x, conv.kind, k, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        erase_unused(gm.graph, [conv.node])
        return f"{getattr(old_input.target, '__name__', old_input.target)} folded into next {conv.kind}"
