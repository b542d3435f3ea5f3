"""Fold a BatchNorm that no single neighbour absorbs by changing coordinates on the linear region around it.

Write the BatchNorm as ``y = s * x + t`` per channel. Give each tensor ``v`` of a region ``R`` new
coordinates ``v' = a_v * v + c_v`` per channel (``v' = v`` outside ``R``) such that the BatchNorm becomes the
identity, and rewrite every op that touches ``R`` to compute in them, adding no op:

* the seed: backward, ``x' = s * x + t`` (the BatchNorm's users read ``x'``), or forward,
  ``y' = (y - t) / s`` (they read ``x``);
* a conv or Linear whose output is in ``R`` takes ``K' = a * K``, ``b' = a * b + c``; one that reads ``v`` in
  ``R`` takes ``K' = K / a[in]``, ``b' = b - sum(K * c / a)[in]``, with ``c_v = 0`` when it zero-pads its input
  (``0 * a`` is still 0, a shift is not);
* another BatchNorm ``s2 * u + t2`` touching ``R`` becomes ``a_out * (s2 * (u' - c_in) / a_in + t2) + c_out``,
  still one BatchNorm;
* ops that commute with the change carry it and stay as they are: ``p + q`` and ``p - q`` (one ``a``;
  ``c = c_p +- c_q``), ``cat`` and channel slices or splits (``a`` and ``c`` concatenated or sliced), average
  pooling and means over non-channel dims (``avg(a*v + c) = a*avg(v) + c``; ``c = 0`` where zero padding is
  averaged in), max pooling (``max(a*v + c) = a*max(v) + c`` for ``a > 0``), ReLU (``relu(a*v) = a*relu(v)``
  for ``a > 0``, ``c = 0``); views that keep the channel dim whole, permutes and transposes move the dim the
  change runs along (a Linear reads its last dim);
* any other op reads ``v`` only where ``a_v = 1`` and ``c_v = 0``.

The scales follow from the seed along these rules; a tensor that would need two scales is refused. The
shifts are free at conv, Linear and BatchNorm outputs (a bias takes them) and tied elsewhere: a linear
system whose unknowns are blocks of channels that move together, solved in float64 by least squares and
used only when it leaves no residual; otherwise the constraint with the largest residual is named. A scale
under 1e-6 of the largest is refused: undoing it would lose the channel's precision.

Examples: CoAtNet's first pre-norm reads the stem conv, whose output also feeds the average-pooled
shortcut (the conv takes ``s``, ``t``; the sums carry them to the next convs and BatchNorms). A
pre-activation ResNet's BN -> ReLU on the residual stream: the stream carries the change, each ReLU
passes its positive scale to the conv after it and the shifts go into the convs ending the branches.
A BatchNorm on the q slice of a qkv conv. Sites it cannot fold return no refusal (``fold_bn`` already
refuses each BatchNorm); :func:`why_not` gives the reason for the left-unfused list.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from .. import algebra
from ..graph import (add_tensor, as_batchnorm, as_conv, aten, erase_unused, out_of_place, replace_conv, shape,
                     slice_range, value_users, written_arg)
from ..rules import Match, Pass

__all__ = ["FoldBatchNormRegion", "why_not"]

MIN_SCALE = 1e-6  # smallest |s| relative to the largest that is still undone
_SUMS = {aten.add.Tensor: 1.0, aten.sub.Tensor: -1.0}
_SAME = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
          aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default}
_AVERAGES = {aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
             aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default}
_MAX_POOLS = {aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default}
_RELUS = {aten.relu.default, aten.relu_.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_NONLINEAR = {"silu", "gelu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "softmax", "_softmax", "log_softmax",
              "_log_softmax", "exp", "log", "elu", "selu", "celu", "mish", "sqrt", "rsqrt", "pow", "abs", "hardtanh",
              "clamp", "clamp_min", "clamp_max", "softplus", "erf", "layer_norm", "native_layer_norm", "group_norm",
              "native_group_norm", "instance_norm", "relu6", "leaky_relu", "prelu", "threshold"}
_PRODUCTS = {"mul", "div", "bmm", "matmul", "mm", "baddbmm", "einsum", "scaled_dot_product_attention"}
_MOVES = {"view", "reshape", "_unsafe_view", "permute", "transpose", "flatten", "unflatten", "pixel_shuffle",
          "pixel_unshuffle", "unfold", "expand", "select", "index_select", "gather", "roll", "t", "squeeze",
          "unsqueeze", "channel_shuffle", "constant_pad_nd", "pad", "cat", "split", "split_with_sizes", "chunk",
          "slice", "getitem"}


class _Blocked(Exception):
    """The region cannot be built; the message says where and why."""


def _op(node) -> str:
    """The op's name without an in-place suffix: ``relu`` for ``relu_``."""
    target = getattr(node, "target", None)
    name = getattr(target, "__name__", str(target if target is not None else node.op)).split(".")[0]
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _category(node) -> str:
    """Why a per-channel change of coordinates does not pass ``node``, as a predicate."""
    op = _op(node)
    if op in _NONLINEAR:
        return "is nonlinear"
    if op in _PRODUCTS and sum(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args[:2]) == 2:
        return "multiplies two activations"
    if op in _MOVES:
        return "moves data across the channel dim"
    return "is not known to commute with a per-channel affine"


def _rank(node) -> int:
    s = shape(node)
    return len(s) if s is not None else 0


def _identity(a, c) -> bool:
    return bool((a == 1).all()) and not bool(c.any())


def _view_dim(src: tuple, out: tuple, dim: int) -> int | None:
    """Where a row-major reshape from ``src`` to ``out`` puts dim ``dim`` whole, else None."""
    before = math.prod(src[:dim])
    for j in range(len(out)):
        if math.prod(out[:j]) == before and out[j] == src[dim]:
            return j
    return None


@dataclass
class _Eq:
    """``sum(coef * c_node[lo:lo + size]) = rhs`` (zero when None); ``why`` names the rule for a reason."""

    terms: list[tuple[fx.Node, int, float]]
    size: int
    rhs: torch.Tensor | None
    why: str | None  # for a constraint (a tensor that must keep its shift at 0); None for a relation


@dataclass
class Plan:
    bn: object                                  # the BatchNorm removed (``graph.BatchNorm``)
    forward: bool
    scale: dict = field(default_factory=dict)   # node -> a
    shift: dict = field(default_factory=dict)   # node -> c
    touched: list = field(default_factory=list)  # conv / Linear / BatchNorm value nodes to rewrite


class _Region:
    """The region grown from one BatchNorm in one direction; :meth:`plan` or :class:`_Blocked`.

    Each tensor in it has a scale vector and the dim it runs along (1 for NCHW, the last dim for tokens).
    """

    def __init__(self, gm, bn, forward: bool):
        self.gm, self.bn, self.forward = gm, bn, forward
        self.call = bn.node if bn.node.target == aten.batch_norm.default else bn.node.args[0]
        self.scale: dict[fx.Node, torch.Tensor] = {}
        self.dim: dict[fx.Node, int] = {}
        self.eqs: list[_Eq] = []
        self.touched: dict[fx.Node, None] = {}
        self.queue: list[fx.Node] = []
        self.done: set[fx.Node] = set()

    # ---------------------------------------------------------------- growing
    def plan(self) -> Plan:
        bn = self.bn
        s, t = algebra.bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
        s, t = s.double(), t.double()
        small = ~torch.isfinite(s) | (s.abs() < MIN_SCALE * s.abs().max())
        if bool(small.any()):
            c = int(small.nonzero()[0])
            raise _Blocked(f"its scale is {float(s[c]):.1e} in channel {c}, under {MIN_SCALE:g} of its largest: "
                           "undoing it would lose that channel's precision")
        x, y = bn.x, bn.node
        seed, fixed, a, c = (y, x, 1 / s, -t / s) if self.forward else (x, y, s, t)
        self.assign(fixed, torch.ones_like(a), 1)
        self.done.add(fixed)
        self.eqs.append(_Eq([(fixed, 0, 1.0)], len(a), None, f"{fixed.name}, which keeps its value"))
        self.assign(seed, a, 1)
        if self.forward:
            self.done.add(seed)  # its producer is the BatchNorm itself
            for u in value_users(seed):
                self.consumer(seed, u)
        self.eqs.append(_Eq([(seed, 0, 1.0)], len(a), c, None))
        self.grow()
        shift = _solve(self.eqs, {n: len(v) for n, v in self.scale.items()})
        return Plan(bn, self.forward, self.scale, shift, list(self.touched))

    def assign(self, v, a: torch.Tensor, dim: int) -> None:
        s = shape(v) if isinstance(v, fx.Node) else None
        if s is None or not 0 <= dim < len(s) or s[dim] != len(a):
            raise _Blocked(f"{getattr(v, 'name', v)} has no dim of {len(a)} channels where the change runs")
        if v in self.scale:
            if self.dim[v] != dim or not torch.equal(self.scale[v], a):
                raise _Blocked(f"{v.name} would need two different scales")
            return
        self.scale[v], self.dim[v] = a, dim
        self.queue.append(v)

    def grow(self) -> None:
        while self.queue:
            v = self.queue.pop()
            if v in self.done:
                continue
            self.done.add(v)
            self.producer(v)
            for u in value_users(v):
                self.consumer(v, u)

    def zero(self, v, why: str) -> None:
        self.eqs.append(_Eq([(v, 0, 1.0)], len(self.scale[v]), None, why))

    def unchanged(self, v, blocked: str, shifted: str) -> None:
        """``v`` is computed or read by an op that carries no change: it may only keep its value."""
        if not bool((self.scale[v] == 1).all()):
            raise _Blocked(blocked)
        self.zero(v, shifted)

    def producer(self, v) -> None:
        """Make ``v'`` computable from the inputs of the op that computes ``v``."""
        a, dim = self.scale[v], self.dim[v]
        if v.op != "call_function":
            what = "the model input" if v.op == "placeholder" else "the constant"
            return self.unchanged(v, f"{v.name} is {what}", f"{what} {v.name}")
        conv = as_conv(self.gm, v)
        if conv is not None and conv.kind in ("conv", "linear") and dim == (1 if conv.kind == "conv" else _rank(v) - 1):
            self.touched[v] = None  # its bias takes any shift
            return
        bn = as_batchnorm(self.gm, v)
        if bn is not None and dim == 1:
            if not bn.foldable:
                raise _Blocked(f"{v.name} normalises with batch statistics")
            self.touched[v] = None
            return
        target, args = v.target, v.args
        if target in _SUMS and self._two_tensors(v):
            alpha = float(v.kwargs.get("alpha", 1)) * _SUMS[target]
            p, q = args[:2]
            self.assign(p, a, dim)
            self.assign(q, a, dim)
            self.eqs.append(_Eq([(v, 0, 1.0), (p, 0, -1.0), (q, 0, -alpha)], len(a), None, None))
            return
        if target == aten.cat.default and self._cat_dim(v) == dim:
            lo = 0
            for part in args[0]:
                n = shape(part)[dim]
                self.assign(part, a[lo:lo + n], dim)
                self.eqs.append(_Eq([(v, lo, 1.0), (part, 0, -1.0)], n, None, None))
                lo += n
            return
        parent = self._slice_of(v, dim)
        if parent is not None:
            src, lo = parent
            full = self.scale.get(src, torch.ones(shape(src)[dim], dtype=a.dtype)).clone()
            full[lo:lo + len(a)] = a
            self.assign(src, full, dim)
            self.eqs.append(_Eq([(v, 0, 1.0), (src, lo, -1.0)], len(a), None, None))
            return
        carried = self._carrier(v, out_dim=dim)
        if carried is None:
            return self.unchanged(v, f"{v.name} is computed by {_op(v)}, which {_category(v)}",
                                  f"{v.name} ({_op(v)}), which {_category(v)}")
        p, _, in_dim = carried
        if target in _MAX_POOLS or target in _RELUS:
            negative = int((a <= 0).sum())
            if negative:
                raise _Blocked(f"{v.name} ({_op(v)}) passes only positive scales and {negative} channel(s) would "
                               "need a negative one")
        self.assign(p, a, in_dim)
        self.eqs.append(_Eq([(v, 0, 1.0), (p, 0, -1.0)], len(a), None, None))
        if target in _RELUS:
            why = f"{v.name} ({_op(v)}), which passes a positive scale but not a shift"
            self.zero(v, why)
            self.zero(p, why)
        elif target in _AVERAGES and not self._keeps_constants(v):
            self.zero(p, f"{v.name} ({_op(v)}), which averages in zero padding")

    def consumer(self, v, u) -> None:
        """Make ``u`` compute what it did from ``v'``."""
        a, dim = self.scale[v], self.dim[v]
        if u is self.call or _op(u).startswith(("_assert", "sym_")):
            return
        if u.op == "output":
            return self.unchanged(v, f"the model returns {v.name}", f"the model output {v.name}")
        conv = as_conv(self.gm, u)
        if conv is not None and conv.x is v and conv.kind in ("conv", "linear") and \
                dim == (1 if conv.kind == "conv" else _rank(v) - 1):
            if any(conv.padding):
                self.zero(v, f"{u.name} ({_op(u)}), which zero-pads its input {v.name}")
            self.touched[u] = None
            return
        bn = self._batchnorm_reading(u, v)
        if bn is not None and dim == 1:
            if not bn.foldable:
                raise _Blocked(f"{u.name} normalises with batch statistics")
            self.touched[bn.node] = None
            return
        if u.target in _SPLITS and self._split_dim(u) == dim:
            lo = 0
            for g, n in self._split_outputs(u, dim):
                if g is not None:
                    self.assign(g, a[lo:lo + n], dim)
                lo += n
            return
        rng = slice_range(u)
        if rng is not None and rng[0] == dim and u.args[0] is v:
            return self.assign(u, a[rng[1]:rng[2]], dim)
        if u.target in _SUMS and self._two_tensors(u):
            return self.assign(u, a, dim)
        if u.target == aten.cat.default and self._cat_dim(u) == dim:
            parts = [self.scale.get(p, torch.ones(shape(p)[dim], dtype=a.dtype)) for p in u.args[0]]
            return self.assign(u, torch.cat(parts), dim)
        carried = self._carrier(u, in_dim=dim)
        if carried is not None and carried[0] is v:
            return self.assign(u, a, carried[1])
        self.unchanged(v, f"{u.name} ({_op(u)}) reads {v.name} and {_category(u)}",
                       f"{u.name} ({_op(u)}), which reads {v.name} and {_category(u)}")

    # ---------------------------------------------------------------- op shapes
    def _two_tensors(self, node) -> bool:
        args = node.args[:2]
        return (len(args) == 2 and all(isinstance(x, fx.Node) and x.op != "get_attr" for x in args)
                and shape(args[0]) == shape(args[1]) == shape(node))

    @staticmethod
    def _cat_dim(node) -> int | None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = shape(node)
        if out is None or any(shape(p) is None or len(shape(p)) != len(out) for p in node.args[0]):
            return None
        return dim % len(out)

    @staticmethod
    def _split_dim(node) -> int | None:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        s = shape(node.args[0])
        return dim % len(s) if s else None

    @staticmethod
    def _split_outputs(node, dim: int) -> list[tuple[fx.Node | None, int]]:
        """``(getitem node or None, channels)`` for each output of a split, in order."""
        vals = node.meta.get("val") or []
        items = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        return [(items.get(i), int(v.shape[dim])) for i, v in enumerate(vals)]

    def _slice_of(self, v, dim: int) -> tuple[fx.Node, int] | None:
        """``(tensor, first channel)`` when ``v`` is a channel slice or split piece of ``tensor``."""
        rng = slice_range(v)
        if rng is not None and rng[0] == dim:
            return v.args[0], rng[1]
        if v.target is operator.getitem and getattr(v.args[0], "target", None) in _SPLITS:
            split = v.args[0]
            if self._split_dim(split) != dim:
                return None
            lo = sum(n for _, n in self._split_outputs(split, dim)[:v.args[1]])
            return split.args[0], lo
        return None

    @staticmethod
    def _carrier(node, in_dim: int | None = None, out_dim: int | None = None) -> tuple[fx.Node, int, int] | None:
        """``(input, output dim, input dim)`` when ``node`` carries a change of coordinates of its input along
        ``input dim`` to its output along ``output dim`` unchanged (same scale, same shift), else None."""
        target = getattr(node, "target", None)
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        x = node.args[0]
        xs, out = shape(x), shape(node)
        if xs is None or out is None or len(xs) < 2 or len(out) < 1:
            return None
        carried = None
        if target in _SAME or target in _RELUS:
            carried = [(d, d) for d in range(len(xs))]
        elif target in _MAX_POOLS or target in _AVERAGES:
            carried = [(1, 1)]
        elif target in _VIEWS:
            carried = [(j, d) for d in range(len(xs)) if (j := _view_dim(xs, out, d)) is not None]
        elif target == aten.permute.default:
            perm = [p % len(xs) for p in node.args[1]]
            carried = [(perm.index(d), d) for d in range(len(xs))]
        elif target == aten.transpose.int:
            i, j = (d % len(xs) for d in node.args[1:3])
            carried = [({i: j, j: i}.get(d, d), d) for d in range(len(xs))]
        elif target == aten.mean.dim:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = {d % len(xs) for d in ([dims] if isinstance(dims, int) else list(dims or []))}
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            carried = [(d if keep else d - sum(r < d for r in dims), d) for d in range(len(xs))
                       if dims and d not in dims]
        rng = slice_range(node)
        if rng is not None:
            carried = [(d, d) for d in range(len(xs)) if d != rng[0]]
        for o, i in carried or ():
            if (in_dim is None or i == in_dim) and (out_dim is None or o == out_dim):
                return x, o, i
        return None

    def _keeps_constants(self, node) -> bool:
        """Whether an averaging op maps a constant input to the same constant (no zero padding averaged in)."""
        if node.target not in (aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default):
            return True
        ones = torch.ones(shape(node.args[0]), dtype=torch.float64)
        with torch.no_grad():
            out = node.target(ones, *node.args[1:], **node.kwargs)
        return bool(torch.allclose(out, torch.ones_like(out), rtol=0, atol=1e-12))

    def _batchnorm_reading(self, u, v):
        """The BatchNorm (value node form) that reads ``v`` through ``u``, else None."""
        if u.target == aten.batch_norm.default and u.args[0] is v:
            return as_batchnorm(self.gm, u)
        if u.target == aten._native_batch_norm_legit_no_training.default and u.args[0] is v:
            item = next((g for g in u.users if g.target is operator.getitem and g.args[1] == 0), None)
            return as_batchnorm(self.gm, item) if item is not None else None
        return None


def _solve(eqs: list[_Eq], channels: dict[fx.Node, int]) -> dict[fx.Node, torch.Tensor]:
    """The shifts ``c`` that satisfy every equation exactly (least squares, no residual), or :class:`_Blocked`.

    Channels move only in contiguous blocks (cat, slices), so each tensor is cut into segments that every
    equation maps onto whole segments; each connected set of segments is then one small system whose
    right-hand sides are its channels.
    """
    cuts = {n: {0, c} for n, c in channels.items()}
    for eq in eqs:
        for n, lo, _ in eq.terms:
            cuts[n] |= {lo, lo + eq.size}
    changed = True
    while changed:
        changed = False
        for eq in eqs:
            rel = {p - lo for n, lo, _ in eq.terms for p in cuts[n] if lo < p < lo + eq.size}
            for n, lo, _ in eq.terms:
                new = {lo + r for r in rel} - cuts[n]
                if new:
                    cuts[n] |= new
                    changed = True
    segments: dict[tuple[fx.Node, int], int] = {}
    bounds: list[tuple[fx.Node, int, int]] = []
    for n, cs in cuts.items():
        cs = sorted(cs)
        for start, end in zip(cs, cs[1:]):
            segments[(n, start)] = len(bounds)
            bounds.append((n, start, end))
    rows = []  # (terms as {segment: coef}, rhs or None, why)
    for eq in eqs:
        rel = sorted({0, eq.size} | {p - lo for n, lo, _ in eq.terms for p in cuts[n] if lo < p < lo + eq.size})
        for r0, r1 in zip(rel, rel[1:]):
            terms: dict[int, float] = {}
            for n, lo, coef in eq.terms:
                seg = segments[(n, lo + r0)]
                terms[seg] = terms.get(seg, 0.0) + coef
            rows.append((terms, None if eq.rhs is None else eq.rhs[r0:r1], eq.why))
    parent = list(range(len(bounds)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for terms, _, _ in rows:
        first, *rest = terms
        for other in rest:
            parent[find(other)] = find(first)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(find(next(iter(row[0]))), []).append(i)
    values = [None] * len(bounds)
    for members in groups.values():
        segs = sorted({seg for i in members for seg in rows[i][0]})
        col = {seg: j for j, seg in enumerate(segs)}
        width = bounds[segs[0]][2] - bounds[segs[0]][1]
        A = torch.zeros(len(members), len(segs), dtype=torch.float64)
        B = torch.zeros(len(members), width, dtype=torch.float64)
        for r, i in enumerate(members):
            terms, rhs, _ = rows[i]
            for seg, coef in terms.items():
                A[r, col[seg]] = coef
            if rhs is not None:
                B[r] = rhs
        # numpy: its pseudo-inverse is the least-squares solution of least norm, and it is fast on small systems
        U = torch.from_numpy(np.linalg.pinv(A.numpy()) @ B.numpy())
        residual = torch.from_numpy(np.abs(A.numpy() @ U.numpy() - B.numpy()).max(axis=1))
        if float(residual.max()) > 1e-10 * (1 + float(B.abs().max())):
            blamed = [r for r in range(len(members)) if rows[members[r]][2] is not None]
            if not blamed:
                raise _Blocked("its shift cannot be placed")
            worst = max(blamed, key=lambda r: float(residual[r]))
            raise _Blocked(f"its shift would reach {rows[members[worst]][2]}")
        for seg, j in col.items():
            values[seg] = U[j]
    shift = {}
    for n, c in channels.items():
        parts = [values[segments[(n, start)]] if values[segments[(n, start)]] is not None
                 else torch.zeros(end - start, dtype=torch.float64)
                 for (m, start, end) in bounds if m is n]
        shift[n] = torch.cat(parts) if parts else torch.zeros(c, dtype=torch.float64)
    return shift


def _analyse(gm, bn) -> Plan | str:
    """A plan folding ``bn`` (backward first), or why neither direction works."""
    writer = _inplace_blocker(bn)
    if writer is not None:
        return (f"{writer.name} writes its output in place and other ops read it: without the BatchNorm that write "
                f"would change {bn.x.name}")
    reasons = []
    for forward in (False, True):
        try:
            return _Region(gm, bn, forward).plan()
        except _Blocked as e:
            reasons.append(str(e))
    return f"not movable back ({reasons[0]}) or forward ({reasons[1]})"


def why_not(gm, node) -> str | None:
    """Why the eval BatchNorm ``node`` cannot be folded by a change of coordinates (None: it can, or it is no
    eval BatchNorm)."""
    bn = as_batchnorm(gm, node)
    if bn is None or not bn.foldable or not isinstance(bn.x, fx.Node):
        return None
    found = _analyse(gm, bn)
    return None if isinstance(found, Plan) else found


class FoldBatchNormRegion(Pass):
    name = "fold_bn_region"
    refusal = "BatchNorm not folded"

    def match(self, gm, node):
        bn = as_batchnorm(gm, node)
        if bn is None or not bn.foldable or not isinstance(bn.x, fx.Node):
            return None
        found = _analyse(gm, bn)
        return self.found([node], found) if isinstance(found, Plan) else None

    def rewrite(self, gm, match: Match) -> str:
        plan: Plan = match.plan
        bn = plan.bn
        changes = []
        for v in plan.touched:  # worked out before any node is replaced
            conv = as_conv(gm, v)
            inp = conv.x if conv is not None else as_batchnorm(gm, v).x
            a_in = (plan.scale[inp], plan.shift[inp]) if inp in plan.scale else None
            a_out = (plan.scale[v], plan.shift[v]) if v in plan.scale else None
            if all(t is None or _identity(*t) for t in (a_in, a_out)):
                continue
            changes.append((v, a_in, a_out))
        y, x = bn.node, bn.x
        for u in [u for u in y.users if written_arg(u) is y]:
            u.target = out_of_place(u)
        y.replace_all_uses_with(x)
        erase_unused(gm.graph, [y])
        for v, a_in, a_out in changes:
            conv = as_conv(gm, v)
            if conv is not None:
                k, b = conv.weight.double(), conv.bias.double() if conv.bias is not None else None
                if a_in is not None:
                    k, b = algebra.fuse_affine_into_conv(k, b, 1 / a_in[0], -a_in[1] / a_in[0], conv.groups)
                if a_out is not None:
                    k, b = algebra.fuse_conv_bn(k, b, *a_out)
                k, b = k.to(conv.weight.dtype), b.to(conv.weight.dtype)
                replace_conv(gm, v, conv.x, conv.kind, k, b, conv.stride, conv.padding, conv.dilation, conv.groups)
                erase_unused(gm.graph, [v])
            else:
                _rewrite_batchnorm(gm, as_batchnorm(gm, v), a_in, a_out)
        direction = "forward" if plan.forward else "back"
        return f"BatchNorm moved {direction} through {len(plan.scale)} tensors into {len(changes)} convs / BatchNorms"


def _inplace_blocker(bn) -> fx.Node | None:
    """An in-place write into the BatchNorm's output that removing it would turn into a write into its input."""
    y = bn.node
    writers = [u for u in y.users if written_arg(u) is y]
    if not writers:
        return None
    if len(writers) == 1 and value_users(y) == writers and out_of_place(writers[0]) is not None:
        return None
    return writers[0]


def _rewrite_batchnorm(gm, bn, a_in, a_out) -> None:
    """Replace the parameters of ``bn`` so that it reads and writes the new coordinates."""
    s, t = algebra.bn_scale_shift(bn.mean.double(), bn.var.double(), None if bn.weight is None else bn.weight.double(),
                                  None if bn.bias is None else bn.bias.double(), bn.eps)
    s, t = algebra.compose_affine(s, t, *(a_in or (None, None)), *(a_out or (None, None)))
    var = bn.var.double()
    weight, bias, mean = algebra.affine_as_batchnorm(s, t, var, bn.eps)
    call = bn.node if bn.node.target == aten.batch_norm.default else bn.node.args[0]
    dtype = bn.var.dtype
    graph = gm.graph
    with graph.inserting_before(call):
        for i, (label, value) in enumerate((("weight", weight), ("bias", bias), ("mean", mean), ("var", var)), 1):
            attr = graph.get_attr(add_tensor(gm, f"{call.name}_{label}", value.to(dtype), parameter=False))
            call.update_arg(i, attr)
