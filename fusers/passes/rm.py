"""The RM operation (RMNet): remove a residual connection by carrying its input through the convs.

A residual block ``act(c_n(a(...a(c_1(x)))) + shortcut(x))``, where the main branch is a chain of
convolutions with activations ``a`` between them, becomes a plain chain:

* every ``c_i`` but the last reserves ``C_x`` extra output channels that carry ``x`` with Dirac
  kernels (a 1 at the tap that reads input offset 0, so padding is never read; a stride in ``c_i``
  subsamples ``x`` exactly as a 1x1 strided shortcut would);
* the activations leave the carried channels unchanged: the proof obligation is that ``x`` lies in
  the range each activation passes unchanged (``x >= 0`` from a ReLU through ReLUs; ``x`` in
  ``[0, 6]`` from a ReLU6 through ReLU6s). A block input that may be negative (MobileNetV2's
  linear bottlenecks) is refused: RMNet's PReLU substitute for ReLU6 does not clip at 6, so it is
  not exact and is not used;
* the last conv adds the shortcut from the carried channels: a Dirac for an identity shortcut, or
  the BN-folded 1x1 downsample kernel (placed at the same tap, i.e. padded to the conv's kernel),
  whose bias joins the conv's bias. The add disappears.

The kernels are ``algebra.carry_input`` and ``algebra.add_shortcut``; the tap is ``algebra.dirac_tap``.

Opt-in (not in ``DEFAULT_PASSES``): the carried channels make the convs wider, which costs FLOPs
(a lot in bottleneck blocks); ``benchmarks/rm_speed.py`` measures when it pays.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .. import algebra
from ..graph import aten, as_conv, common_path, erase_unused, replace_conv, shape, sole_user
from ..rules import Match, Pass, RefusalCode

INF = math.inf
_KEEP_RANGE = {aten.max_pool2d.default, aten.max_pool1d.default, aten.avg_pool2d.default, aten.avg_pool1d.default,
               aten.adaptive_avg_pool2d.default, aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default,
               aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten.clone.default,
               aten.contiguous.default, aten.cat.default, aten.max_pool2d_with_indices.default}
MAX_CHAIN = 4


def value_range(node, depth: int = 0) -> tuple[float, float]:
    """An interval that contains every value ``node`` can take (``(-inf, inf)`` when unknown)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 8:
        return -INF, INF
    t = node.target
    if t in (aten.relu.default, aten.relu_.default):
        return 0.0, INF
    if t in (aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default):
        lo = node.args[1] if len(node.args) > 1 else (-1.0 if "hardtanh" in str(t) else None)
        hi = node.args[2] if len(node.args) > 2 else (1.0 if "hardtanh" in str(t) else None)
        return (-INF if lo is None else float(lo)), (INF if hi is None else float(hi))
    if t == aten.relu6.default:
        return 0.0, 6.0
    if t in _KEEP_RANGE:
        inputs = node.args[0] if t == aten.cat.default else [node.args[0]]
        ranges = [value_range(a, depth + 1) for a in inputs]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)
    return -INF, INF


def passes_unchanged(act) -> tuple[float, float] | None:
    """The interval an activation maps to itself, or None when ``act`` is not an activation."""
    t = getattr(act, "target", None)
    if t in (aten.relu.default, aten.relu_.default):
        return 0.0, INF
    if t in (aten.leaky_relu.default, aten.silu.default, aten.gelu.default):
        return (0.0, INF) if t == aten.leaky_relu.default else None
    if t == aten.relu6.default:
        return 0.0, 6.0
    if t in (aten.hardtanh.default, aten.hardtanh_.default):
        return float(act.args[1]) if len(act.args) > 1 else -1.0, float(act.args[2]) if len(act.args) > 2 else 1.0
    return None


def _dirac_tap(conv) -> tuple[int, ...] | None:
    return algebra.dirac_tap(conv.weight.shape[2:], conv.padding, conv.dilation)


def analyze(gm, add):
    """``(x, chain convs, activations, shortcut conv or None)``, ``(RefusalCode, reason)`` or None."""
    if getattr(add, "target", None) not in (aten.add.Tensor, aten.add_.Tensor) or add.kwargs.get("alpha", 1) != 1 \
            or len(add.args) != 2:
        return None
    a, b = add.args
    if add.target == aten.add_.Tensor and sole_user(a) is not add:  # in place on a tensor read elsewhere
        return None
    if not all(isinstance(v, fx.Node) for v in (a, b)) or shape(a) != shape(b) or shape(add) != shape(a):
        return None
    for main, other in ((a, b), (b, a)):
        short = as_conv(gm, other)
        x = short.x if short is not None and short.kind == "conv" and sole_user(other) is add else other
        if short is not None and x is other:
            short = None
        chain, acts, node = [], [], main
        while len(chain) < MAX_CHAIN:
            conv = as_conv(gm, node)
            if conv is None or conv.kind != "conv" or sole_user(node) is not (acts[0] if acts else add):
                break
            chain.insert(0, conv)
            if conv.x is x:
                return _check(add, x, chain, acts, short)
            act = conv.x
            if passes_unchanged(act) is None or sole_user(act) is not node:
                break
            acts.insert(0, act)
            node = act.args[0]
    return None


def _check(add, x, chain, acts, short):
    if len(chain) < 2:
        return None  # conv(x) + x is a branch sum: merge_linear's job
    lo, hi = value_range(x)
    for act in acts:
        p_lo, p_hi = passes_unchanged(act)
        if lo < p_lo or hi > p_hi:
            where = "may be negative" if lo < 0 else f"may exceed {p_hi:g}"
            code = RefusalCode.NOT_NONNEGATIVE if lo < 0 else RefusalCode.OUT_OF_RANGE
            return code, (f"block input {x.name} {where} (range [{lo:g}, {hi:g}]); {act.target.__name__} would "
                          "change the carried values, and no exact form exists")
    if any(c.groups != 1 for c in chain):
        return RefusalCode.GROUPED_CONV, "a grouped conv in the block; carrying the input would make it dense"
    if any(_dirac_tap(c) is None for c in chain):
        return RefusalCode.NO_DIRAC_TAP, "a conv has no kernel tap that reads input offset 0"
    stride = [math.prod(c.stride[d] for c in chain) for d in range(chain[0].ndim)]
    if short is not None:
        if any(k != 1 for k in short.weight.shape[2:]) or any(short.padding) or list(short.stride) != stride \
                or short.groups != 1:
            return RefusalCode.SHORTCUT_SHAPE, ("the shortcut conv is not a 1x1, unpadded conv with the block's "
                                                "total stride")
    elif any(s != 1 for s in stride):
        return RefusalCode.STRIDED_IDENTITY, "identity shortcut around a strided chain"
    return x, chain, acts, short


def _meta_shape(node, channels: int) -> None:
    old = node.meta.get("val")
    if isinstance(old, torch.Tensor):
        new_shape = list(old.shape)
        new_shape[1] = channels
        node.meta["val"] = torch.empty(new_shape, dtype=old.dtype, device="meta")


class RepMerge(Pass):
    name = "rm"
    refusal = "residual kept"

    def match(self, gm, node):
        found = analyze(gm, node)
        if found is None:
            return None
        if isinstance(found[0], RefusalCode):
            return self.refuse(found[0], [node], found[1])
        return self.found([node], (node, *found))

    def rewrite(self, gm, match: Match) -> str:
        add, x, chain, acts, short = match.plan
        cx = shape(x)[1]
        widths, last = [], len(chain) - 1
        for i, c in enumerate(chain):
            tap = _dirac_tap(c)
            o = c.weight.shape[0]
            if i < last:
                k, bias = algebra.carry_input(c.weight, c.bias, cx, tap, first=i == 0)
                widths.append(f"{o}->{o + cx}")
            else:
                k, bias = algebra.add_shortcut(c.weight, c.bias, cx, tap,
                                               *((short.weight, short.bias) if short is not None else ()))
            target = add if i == last else c.node
            new = replace_conv(gm, target, c.x, "conv", k, bias, c.stride, c.padding, c.dilation, 1,
                               hint=common_path([c.node]) or c.node.name, insert_before=c.node if i < last else add)
            if i < last:
                _meta_shape(new, o + cx)
                _meta_shape(acts[i], o + cx)
        erase_unused(gm.graph, [c.node for c in chain] + [add] + ([short.node] if short is not None else []))
        kind = "downsample" if short is not None else "identity"
        return f"{kind} residual removed; conv widths {', '.join(widths)}"
