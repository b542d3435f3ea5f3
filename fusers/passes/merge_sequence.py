"""Merge a 1x1 convolution followed by a kxk convolution (or average pooling) into one kxk conv.

DBB's sequential branches: ``conv1x1 -> pad -> convkxk``. Per group, ``K = K2 . K1`` and
``b = b2 + sum(K2) * b1``. The merged conv pads its *input* with zeros, and a 1x1 conv maps a zero
input to its bias ``b1``; so the sequence is exact only when every padded value in between equals
``b1``: an explicit pad whose value is ``b1`` (DBB's BN-and-pad), or zero padding with ``b1 == 0``.
With zero padding and a nonzero bias the border outputs would change (error ~0.1): refused.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import algebra
from ..graph import aten, as_avgpool, as_conv, erase_unused, replace_conv, shape, sole_user
from ..manager import NodePass
from .fold_into_next import channel_affine

_PAD_OPS = {aten.pad.default, aten.constant_pad_nd.default}


def _as_kxk(gm, node):
    """The second op as a Branch: a conv, or average pooling as a depthwise conv."""
    conv = as_conv(gm, node)
    if conv is not None and conv.kind == "conv":
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.weight.shape[0], dtype=conv.weight.dtype)
        return conv.x, algebra.Branch(conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    pool = as_avgpool(node)
    if pool is not None:
        x, kernel, stride, padding = pool
        return x, algebra.avgpool_branch(shape(node)[1], kernel, stride, padding, dtype=torch.float64)
    return None


def _explicit_pad(node):
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


def analyze(gm, node, check_cost: bool = True):
    """(first conv, merged branch, nodes replaced) or (None, reason), or None when there is no pattern."""
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
        return None, "an intermediate result is also used elsewhere"
    nd = first.weight.dim() - 2
    explicit = pad[1] if pad else (0,) * nd
    if len(explicit) != nd:
        return None
    b1 = first.bias if first.bias is not None else torch.zeros(first.weight.shape[0], dtype=first.weight.dtype)
    scale = max(float(b1.abs().max()), float(first.weight.abs().max()), 1e-30)
    if any(explicit) and float((b1 - pad[2]).abs().max()) > 1e-12 * scale:
        return None, (f"pad value {pad[2]:g} differs from the 1x1 conv's output on zero input "
                      f"(bias, max |diff| {float((b1 - pad[2]).abs().max()):.2g})")
    if any(b2.padding) and float(b1.abs().max()) > 1e-12 * scale:
        return None, (f"the kxk op zero-pads the 1x1 conv's output whose bias is nonzero "
                      f"(max |b| {float(b1.abs().max()):.2g}); merging would change the border")
    a = algebra.Branch(first.weight, b1, first.stride, first.padding, first.dilation, first.groups)
    if affine is not None:  # s * (pad(conv1(x))) + t == pad(s * conv1(x) + t) once the pad value is b1
        a = algebra.Branch(a.kernel * affine[1].view(-1, 1, 1, 1), a.bias * affine[1] + affine[2], a.stride,
                           a.padding, a.dilation, a.groups)
    b2.padding = tuple(p + e for p, e in zip(b2.padding, explicit))
    try:
        merged = algebra.compose_pointwise(a, b2)
    except algebra.NotExact as e:
        return None, str(e)
    if check_cost and merged.kernel.numel() > a.kernel.numel() + b2.kernel.numel():
        return None, (f"merging would raise the weights from {a.kernel.numel() + b2.kernel.numel():,} to "
                      f"{merged.kernel.numel():,} (a bottleneck); kept as two ops")
    return first, merged, chain


class MergeSequence(NodePass):
    name = "merge_sequence"
    refusal = "1x1 -> kxk sequence not merged"

    def analyze(self, gm, node):
        return analyze(gm, node)

    def rewrite(self, gm, node, plan):
        first, b, _ = plan
        replace_conv(gm, node, first.x, "conv", b.kernel, b.bias, b.stride, b.padding, b.dilation, b.groups)
        erase_unused(gm.graph, [node])
        return f"1x1 conv + {node.target.__name__} -> conv"
