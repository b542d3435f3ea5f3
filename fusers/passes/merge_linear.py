"""Merge linear combinations of branches that read the same input into one convolution.

A tree of ``add`` / ``sub`` / ``neg`` / ``mul`` or ``div`` by a per-channel constant is flattened
into ``sum_i c_i * leaf_i + const``. Each leaf that is a linear function of some input ``x`` becomes
a branch ``(K_i, b_i)``: a convolution or Linear, an eval BatchNorm (identity ``s * x + t``), average
pooling (``1 / k^2``), or ``x`` itself. Branches of one ``x`` are summed into one kernel:
``K = sum(c_i * place(K_i))``, ``b = sum(c_i * b_i) + const``. This covers RepVGG / ACNet / MobileOne
/ DBB / RepConv branch sums, a BN after the sum (folded later), LayerScale ``gamma * conv(x)``,
ImplicitM ``m * conv(x)``, ACNet's cropped branches ``conv(x[:, :, c:-c])`` (a conv of ``x`` with
padding ``p - c``), bias shifts ``conv(x) - v``, and FastViT's RepMixer
``x + gamma * (mixer(x) - norm(x))``. A BatchNorm after a sum is distributed into it,
``s * (a + f) + t = (s * a + t) + s * f``, so ``bn(conv(x) + conv(relu(conv(x))))`` keeps no BatchNorm:
each branch's last conv takes ``s``, one of them ``t`` (a branch that is not a conv, such as a
residual ``x``, cannot take ``s``: then the BatchNorm stays). Exactness conditions are checked in ``algebra.merge_branches``:
a group that fails one is left as it was, with the reason. A group merges even when its kernel holds more
weights than the branches did (a 1x1 conv beside a 3x3 average pool, dilated 3x3s without a large kernel), as
ACNet's and DBB's own conversions do: one conv replaces several convs, pools and adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from .. import algebra
from ..graph import (aten, as_avgpool, as_batchnorm, as_conv, build_conv, common_meta, common_path, const_value,
                     erase_unused, per_channel, shape, slice_range, sole_user)
from ..matchers import Sequence, conv_branch, match_sequence
from ..rules import Match, Pass, Refusal, RefusalCode

_COMBINE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default}
_IN_PLACE = {aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor, aten.mul_.Tensor: aten.mul.Tensor}


@dataclass
class Term:
    coef: torch.Tensor
    node: fx.Node
    branch: algebra.Branch
    src: fx.Node
    kind: str  # "conv", "linear", "bn", "avgpool", "identity"
    nodes: list = field(default_factory=list)  # the nodes this branch replaces


@dataclass
class Plan:
    """What a sum becomes; the merged kernels are built by the rewrite (:meth:`merged`), not by the match."""

    root: fx.Node
    groups: list[list[Term]]          # groups to merge, one conv each
    in_sizes: list[tuple[int, ...]]   # the spatial size of each group's input
    rest: list[Term]                  # leaves kept as they are (unit coefficient)
    consumed: set = field(default_factory=set)
    kind: str = "conv"
    const: torch.Tensor | None = None  # the sum's constant, taken by the bias of group ``const_group``
    const_group: int | None = None

    def merged(self, i: int) -> algebra.Branch:
        b = algebra.merge_branches([t.branch.scaled(t.coef) for t in self.groups[i]], self.in_sizes[i])
        if i == self.const_group:
            b.bias = b.bias + self.const
        return b


def _is_root(gm, node) -> bool:
    """A combinator, or an eval BatchNorm of a sum (``bn(a + f) = s*a + s*f + t``: distributed into the branches)."""
    if _is_combinator(node):
        return True
    bn = as_batchnorm(gm, node)
    return bn is not None and bn.foldable and _is_combinator(bn.x) and sole_user(bn.x) is node


def _is_combinator(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in _IN_PLACE:  # ``out += y`` on an intermediate nothing else reads is an add
        return isinstance(node.args[0], fx.Node) and sole_user(node.args[0]) is node
    return node.target in _COMBINE


class _Flatten:
    """``root`` as a list of (coefficient, leaf) plus a constant, per channel."""

    def __init__(self, gm, root, channel_dim):
        self.gm, self.root, self.cd = gm, root, channel_dim
        self.out = shape(root)
        self.leaves, self.consumed = [], {root}
        self.const = torch.zeros(self.out[channel_dim], dtype=torch.float64)

    def constant(self, value):
        return per_channel(const_value(self.gm, value), self.out, self.cd)

    def walk(self, node, coef):
        if isinstance(node, (int, float)) or (isinstance(node, fx.Node) and node.op == "get_attr"):
            self.const += coef * self.constant(node)  # expand() admitted only per-channel constants
            return
        if node is not self.root and (not _is_combinator(node) or sole_user(node) is None
                                      or shape(node) != self.out or not self.expand(node, coef, dry=True)):
            self.leaves.append((coef, node))
            return
        self.consumed.add(node)
        self.expand(node, coef)

    def expand(self, node, coef, dry=False) -> bool:
        """Walk into a combinator; with ``dry`` only say whether it is one we can walk."""
        bn = as_batchnorm(self.gm, node) if node is self.root else None
        if bn is not None:  # the root BatchNorm of a sum: s * (sum) + t
            if self.cd != 1:
                return False
            s, t = algebra.bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
            if not dry:
                self.const += coef * t.to(torch.float64)
                self.walk(bn.x, coef * s.to(torch.float64))
            return True
        args, t = node.args, _IN_PLACE.get(node.target, node.target)
        alpha = node.kwargs.get("alpha", 1)
        tensor_args = [a for a in args[:2] if isinstance(a, fx.Node) and a.op != "get_attr"]
        if any(shape(a) != self.out for a in tensor_args):
            return False
        if t == aten.neg.default:
            steps = [(args[0], -coef)]
        elif t in (aten.add.Tensor, aten.sub.Tensor):
            constants = [a for a in args[:2] if not isinstance(a, fx.Node) or a.op == "get_attr"]
            if any(self.constant(c) is None for c in constants):  # e.g. a positional embedding
                return False
            sign = 1.0 if t == aten.add.Tensor else -1.0
            steps = [(args[0], coef), (args[1], coef * sign * alpha)]
        else:  # mul or div: one operand must be a per-channel constant
            a, b = args[:2]
            cb = self.constant(b)
            ca = self.constant(a) if t == aten.mul.Tensor else None
            if cb is not None and isinstance(a, fx.Node) and a.op != "get_attr":
                steps = [(a, coef * (cb if t == aten.mul.Tensor else 1.0 / cb))]
            elif ca is not None and isinstance(b, fx.Node) and b.op != "get_attr":
                steps = [(b, coef * ca)]
            else:
                return False
        if not dry:
            for n, c in steps:
                self.walk(n, c)
        return True


def _term(gm, coef, node, channel_dim, users_ok) -> Term:
    """Describe a leaf as a branch of its input, or as the identity of itself."""
    found = _branch(gm, node, channel_dim) if users_ok else None
    if found is None:
        out = shape(node)
        nd = len(out) - 2 if channel_dim == 1 else 0
        b = algebra.identity_branch(out[channel_dim], nd, dtype=coef.dtype)
        return Term(coef, node, b, node, "identity")
    branch, src, kind, nodes = found
    return Term(coef, node, branch, src, kind, nodes)


def _crops(node) -> tuple[fx.Node, tuple[int, ...]] | None:
    """``node`` as ``x`` cropped by ``c`` on both sides of each spatial dim (one step-1 slice per dim), or None."""
    out = shape(node)
    crops = [0] * (len(out or ()) - 2)
    while getattr(node, "target", None) == aten.slice.Tensor and len(crops) > 0:
        found = slice_range(node)
        if found is None:
            return None
        dim, start, end = found
        if dim < 2 or crops[dim - 2] or start != shape(node.args[0])[dim] - end or start <= 0:
            return None
        crops[dim - 2] = start
        node = node.args[0]
        if sole_user(node) is None and getattr(node, "target", None) == aten.slice.Tensor:
            return None
    return (node, tuple(crops)) if any(crops) else None


def _branch(gm, node, channel_dim):
    """``(Branch, input, kind, nodes it replaces)`` when ``node`` is a linear function of one input."""
    out = shape(node)
    if channel_dim == 1:
        seq = match_sequence(gm, node, check_cost=False)  # the sum pays for the kxk kernel
        if isinstance(seq, Sequence):
            return seq.merged, seq.first.x, "conv", seq.chain
    conv = as_conv(gm, node)
    if conv is not None and conv.kind in ("conv", "linear") and isinstance(conv.x, fx.Node):
        branch, x, crops = conv_branch(conv, node.name), conv.x, _crops(conv.x)
        if crops is not None and sole_user(conv.x) is node:  # ACNet's CropLayer: a conv of x[..., c:-c, ...]
            x, cropped = crops
            branch.padding = tuple(p - c for p, c in zip(branch.padding, cropped))
            return branch, x, conv.kind, [node, conv.x]
        return branch, x, conv.kind, [node]
    bn = as_batchnorm(gm, node)
    if bn is not None and bn.foldable and channel_dim == 1 and isinstance(bn.x, fx.Node):
        s, t = algebra.bn_scale_shift(bn.mean, bn.var, bn.weight, bn.bias, bn.eps)
        inner = _branch(gm, bn.x, channel_dim) if len(bn.x.users) == 1 else None
        if inner is not None:  # a BN after a linear branch (DBB's avg-pool branch)
            b, src, kind, nodes = inner
            return b.affine(s, t), src, kind, nodes + [node]
        return algebra.identity_branch(out[1], len(out) - 2, s, t, dtype=s.dtype), bn.x, "bn", [node]
    pool = as_avgpool(node) if channel_dim == 1 else None
    if pool is not None:
        x, kernel, stride, padding = pool
        return algebra.avgpool_branch(out[1], kernel, stride, padding), x, "avgpool", [node]
    return None


def analyze(gm, root, refuse) -> tuple[Plan | None, list[Refusal]]:
    """The merge plan of the tree rooted at ``root`` (or None) and the refusals of groups it leaves apart."""
    out = shape(root)
    if out is None or len(out) < 2:
        return None, []
    refusals = []
    for channel_dim in (1, len(out) - 1):
        flat = _Flatten(gm, root, channel_dim)
        flat.walk(root, torch.ones(out[channel_dim], dtype=torch.float64))
        if any(shape(n) != out for _, n in flat.leaves):
            continue
        in_tree = flat.consumed
        terms = [_term(gm, c, n, channel_dim, set(n.users) <= in_tree and len(n.users) == 1) for c, n in flat.leaves]
        kinds = {t.kind for t in terms}
        if "conv" in kinds and channel_dim != 1 or "linear" in kinds and channel_dim != len(out) - 1:
            continue
        if not kinds & {"conv", "linear"}:
            return None, []
        return _plan(root, terms, flat, "linear" if "linear" in kinds else "conv", refusals, refuse), refusals
    return None, refusals


def _plan(root, terms, flat, kind, refusals, refuse) -> Plan | None:
    by_src: dict[fx.Node, list[Term]] = {}
    for t in terms:
        by_src.setdefault(t.src, []).append(t)
    const = flat.const
    has_const = bool(const.abs().max() > 0)
    plan = Plan(root, [], [], [], set(flat.consumed), kind, const)
    const_taken = False
    for src, group in by_src.items():
        has_conv = any(t.kind in ("conv", "linear") for t in group)
        unit = all(bool((t.coef == 1).all()) for t in group)
        absorb = has_conv and has_const and not const_taken
        if not has_conv or (len(group) == 1 and unit and not absorb):
            plan.rest.extend(group)
            continue
        in_size = tuple(shape(src)[2:] if kind == "conv" else ())
        try:
            algebra.merge_layout([t.branch for t in group], in_size)
        except algebra.NotExact as e:
            refusals.append(refuse(e.code, [t.node for t in group], str(e)))
            plan.rest.extend(group)
            continue
        if absorb:
            plan.const_group, const_taken = len(plan.groups), True
        plan.groups.append(group)
        plan.in_sizes.append(in_size)
    _explain_nonlinear(plan, by_src, refusals, refuse)
    if not plan.groups or any(not bool((t.coef == 1).all()) for t in plan.rest) or (has_const and not const_taken):
        return None
    for group in plan.groups:
        plan.consumed |= {n for t in group for n in t.nodes}
    return plan


def _explain_nonlinear(plan, by_src, refusals, refuse) -> None:
    """A leaf that is a nonlinear function of a merged branch's input: say why it stays apart."""
    sources = {src for src, g in by_src.items() if any(t.kind in ("conv", "linear") for t in g)}
    for t in plan.rest:
        if t.kind != "identity" or t.node in sources:
            continue
        node = t.node
        for _ in range(3):
            ins = node.all_input_nodes
            if not ins:
                break
            if ins[0] in sources:
                refusals.append(refuse(RefusalCode.NONLINEAR_BRANCH, [t.node],
                                       f"branch through {t.node.target} is not linear in {ins[0].name}"))
                break
            node = ins[0]


class MergeLinear(Pass):
    name = "merge_linear"
    refusal = "branches not merged"

    def matches(self, gm):
        consumed = set()
        for node in reversed(list(gm.graph.nodes)):  # outermost sums first; their inner sums are consumed
            if not _is_root(gm, node) or node in consumed:
                continue
            plan, refusals = analyze(gm, node, self.refuse)
            yield from refusals
            if plan is not None:
                consumed |= plan.consumed
                yield self.found([node], plan)

    def match(self, gm, node):
        if not _is_root(gm, node):
            return None
        plan, refusals = analyze(gm, node, self.refuse)
        if plan is not None:
            return self.found([node], plan)
        return refusals[0] if refusals else None

    def rewrite(self, gm, match: Match) -> str:
        plan = match.plan
        root, graph = plan.root, gm.graph
        outs = []
        for i, group in enumerate(plan.groups):
            b = plan.merged(i)
            nodes = [t.node for t in group]
            meta = dict(common_meta(nodes), val=root.meta.get("val"))
            outs.append(build_conv(gm, group[0].src, plan.kind, b.kernel, b.bias, b.stride, b.padding, b.dilation,
                                   b.groups, hint=common_path(nodes) or nodes[0].name, meta=meta, insert_before=root))
        outs += [t.node for t in plan.rest]
        value = outs[0]
        for other in outs[1:]:
            with graph.inserting_before(root):
                value = graph.call_function(aten.add.Tensor, (value, other))
            value.meta["val"] = root.meta.get("val")
        root.replace_all_uses_with(value)
        erase_unused(graph, plan.consumed)
        labels = "+".join(sorted(t.kind for g in plan.groups for t in g))
        return f"{labels} -> {len(plan.groups)} {plan.kind}" + (f" + {len(plan.rest)} kept" if plan.rest else "")
