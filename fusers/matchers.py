"""Patterns that more than one pass (or an exporter) recognises, in one place.

Single ops are described in ``graph`` (``as_conv``, ``as_batchnorm``, ``as_avgpool``); here are the
patterns over several nodes:

* :func:`channel_affine`: a node that is ``s * x + t`` per channel (an eval BatchNorm, or an add /
  sub / mul by a per-channel constant); ``fold_into_next`` folds it, ``merge_sequence`` looks
  through it;
* :func:`match_sequence`: a 1x1 conv, an optional constant pad and per-channel affine op, then a
  kxk conv or average pooling, as one conv (``merge_sequence`` rewrites it; ``merge_linear`` uses
  it as a branch of a sum);
* :func:`integer_exponent`: a power with an exact product form (``pow_to_mul`` and the TFLite
  legalization).

A matcher returns what it found, an :class:`Unproven` (the pattern is here but the rewrite would
not be exact: a :class:`~fusers.rules.RefusalCode` and the reason), or None (no pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from . import algebra
from .graph import Conv, aten, as_avgpool, as_batchnorm, as_conv, const_value, per_channel, shape, sole_user
from .rules import RefusalCode

__all__ = ["Unproven", "Sequence", "conv_branch", "channel_affine", "match_sequence", "integer_exponent",
           "MAX_EXPONENT"]

_AFFINE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor}
_PAD_OPS = {aten.pad.default, aten.constant_pad_nd.default}
MAX_EXPONENT = 16


@dataclass
class Unproven:
    """The pattern is present but its rewrite cannot be proven exact."""

    code: RefusalCode
    why: str


def conv_branch(conv: Conv, label: str = "conv") -> algebra.Branch:
    """A conv (or Linear) node's weights as a Branch; a missing bias is zero."""
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.weight.shape[0], dtype=conv.weight.dtype)
    return algebra.Branch(conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, label)


def channel_affine(gm, node, channel_dim: int) -> tuple[fx.Node, torch.Tensor, torch.Tensor] | None:
    """``node`` as ``(x, s, t)`` with ``node = s * x + t`` per channel, or None."""
    out = shape(node)
    if out is None or len(out) <= channel_dim:
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
        if not isinstance(x, fx.Node) or shape(x) != out:
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


@dataclass
class Sequence:
    """``kxk(affine(pad(conv1x1(x))))`` as one conv."""

    first: Conv                 # the 1x1 conv; ``first.x`` is the merged conv's input
    merged: algebra.Branch      # the one conv
    chain: list[fx.Node]        # the nodes it replaces, the kxk op first


def _as_kxk(gm, node) -> tuple[fx.Node, algebra.Branch] | None:
    """The second op as a Branch: a conv, or average pooling as a depthwise conv."""
    conv = as_conv(gm, node)
    if conv is not None and conv.kind == "conv":
        return conv.x, conv_branch(conv)
    pool = as_avgpool(node)
    if pool is not None:
        x, kernel, stride, padding = pool
        return x, algebra.avgpool_branch(shape(node)[1], kernel, stride, padding, dtype=torch.float64)
    return None


def _explicit_pad(node) -> tuple[fx.Node, tuple[int, ...], float] | None:
    """``(input, per-dim symmetric padding, value)`` of a constant pad node, or None."""
    if getattr(node, "target", None) not in _PAD_OPS:
        return None
    args = list(node.args) + [None] * 3
    pads, mode, value = list(args[1]), "constant", args[2]
    if node.target == aten.pad.default:
        mode, value = node.kwargs.get("mode", args[2] or "constant"), node.kwargs.get("value", args[3])
    if mode != "constant" or len(pads) % 2:
        return None
    pairs = [(pads[i], pads[i + 1]) for i in range(0, len(pads), 2)][::-1]  # first spatial dim first
    if any(a != b or a < 0 for a, b in pairs):
        return None
    return node.args[0], tuple(a for a, _ in pairs), float(value or 0.0)


def match_sequence(gm, node, check_cost: bool = True) -> Sequence | Unproven | None:
    """``node`` as the end of a 1x1 -> (pad) -> (affine) -> kxk sequence (see ``passes/merge_sequence``).

    With ``check_cost`` a merged kernel holding more weights than the two ops is refused (a
    bottleneck); a branch sum that pays for the kxk kernel anyway passes ``check_cost=False``.
    """
    second = _as_kxk(gm, node)
    if second is None:
        return None
    mid, b2 = second
    chain = [node]
    affine = channel_affine(gm, mid, 1) if isinstance(mid, fx.Node) else None  # DBB's "+ v" after the pad
    if affine is not None:
        chain.append(mid)
        mid = affine[0]
    pad = _explicit_pad(mid) if isinstance(mid, fx.Node) else None
    if pad:
        chain.append(mid)
        mid = pad[0]
    first = as_conv(gm, mid)
    if first is None or first.kind != "conv" or not isinstance(first.x, fx.Node):
        return None
    if any(k != 1 for k in first.weight.shape[2:]) or any(s != 1 for s in first.stride) or any(first.padding):
        return None
    chain.append(mid)
    if any(sole_user(n) is not user for n, user in zip(chain[1:], chain)):
        return Unproven(RefusalCode.OTHER_USERS, "an intermediate result is also used elsewhere")
    nd = first.weight.dim() - 2
    explicit = pad[1] if pad else (0,) * nd
    if len(explicit) != nd:
        return None
    a = conv_branch(first)
    b1 = a.bias
    scale = max(float(b1.abs().max()), float(first.weight.abs().max()), 1e-30)
    if any(explicit) and float((b1 - pad[2]).abs().max()) > 1e-12 * scale:
        return Unproven(RefusalCode.PAD_VALUE_MISMATCH,
                        f"pad value {pad[2]:g} differs from the 1x1 conv's output on zero input "
                        f"(bias, max |diff| {float((b1 - pad[2]).abs().max()):.2g})")
    if any(b2.padding) and float(b1.abs().max()) > 1e-12 * scale:
        return Unproven(RefusalCode.ZERO_PAD_WITH_BIAS,
                        f"the kxk op zero-pads the 1x1 conv's output whose bias is nonzero "
                        f"(max |b| {float(b1.abs().max()):.2g}); merging would change the border")
    if affine is not None:  # s * (pad(conv1(x))) + t == pad(s * conv1(x) + t) once the pad value is b1
        a = a.affine(affine[1], affine[2])
    b2.padding = tuple(p + e for p, e in zip(b2.padding, explicit))
    try:
        merged = algebra.compose_pointwise(a, b2)
    except algebra.NotExact as e:
        return Unproven(e.code, str(e))
    if check_cost and merged.kernel.numel() > a.kernel.numel() + b2.kernel.numel():
        return Unproven(RefusalCode.WOULD_GROW,
                        f"merging would raise the weights from {a.kernel.numel() + b2.kernel.numel():,} to "
                        f"{merged.kernel.numel():,} (a bottleneck); kept as two ops (exact either way: `deploy tune "
                        "--passes default,default+grow` measures the merged form)")
    return Sequence(first, merged, chain)


def integer_exponent(node) -> int | None:
    """The exponent of an ``aten.pow.Tensor_Scalar`` node when it is an integer in 1..MAX_EXPONENT."""
    if node.op != "call_function" or node.target != aten.pow.Tensor_Scalar:
        return None
    n = node.args[1]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or float(n) != int(n):
        return None
    return int(n) if 1 <= int(n) <= MAX_EXPONENT else None
