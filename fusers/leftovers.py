"""What the passes left that could have been a merge target, and why it stayed.

A deploy graph that silently keeps unfused branches is the most common complaint about
reparameterization tools, so after the passes every such site is listed:

* ``batchnorm``: a BatchNorm still in the graph;
* ``branch_sum``: a sum with two or more linear branches (conv, Linear, BatchNorm, average
  pooling, the input itself) of the same input, i.e. parallel branches not merged into one conv;
* ``in_place_write``: a write into a slice or view of a tensor (``copy_``, ``fill_``, ``index_put_``,
  ``slice_scatter`` ...), which exports as ScatterND.

Each carries the reason: the standing refusal of a pass on its nodes when there is one, otherwise
what surrounds it. A BatchNorm's reason is worked out on the final graph (``fold_bn_region.why_not``): which
op blocks moving it back into its input's producers and which blocks moving it forward into its readers,
unless batch statistics or a rolled-back rewrite settle it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

from .graph import (VIEW_OPS, aten, as_avgpool, as_batchnorm, as_conv, common_path, op_name, shape, sole_user,
                    written_arg)
from .passes.fold_bn_region import FoldBatchNormRegion, why_not
from .rules import ROLLBACK_CODES, Refusal, RefusalCode

__all__ = ["Leftover", "find_leftovers"]

_SUMS = {aten.add.Tensor, aten.sub.Tensor, aten.add_.Tensor, aten.sub_.Tensor}
_SCATTERS = {aten.slice_scatter.default, aten.select_scatter.default, aten.index_put.default, aten.scatter.src,
             aten.scatter.value, aten.index_put_.default, aten.scatter_.src, aten.scatter_.value}


@dataclass
class Leftover:
    """A site left unfused: its kind, the nodes that name it, where it is, and why it stayed."""

    kind: str  # "batchnorm", "branch_sum" or "in_place_write"
    nodes: list[str]
    reason: str
    path: str = ""

    @property
    def site(self) -> str:
        names = ", ".join(self.nodes)
        return f"{self.path} ({names})" if self.path else names

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": list(self.nodes), "path": self.path, "site": self.site,
                "reason": self.reason}


def _why(nodes: list[fx.Node], refusals: list[Refusal], otherwise: str) -> str:
    names = {n.name for n in nodes}
    for r in refusals:
        if names & set(r.nodes):
            return f"{r.pass_name}: {r.reason}"
    return otherwise


def _leaves(node, out) -> list[fx.Node]:
    """The terms of the sum tree rooted at ``node`` (through add/sub nodes only it reads)."""
    terms = []
    for a in node.args[:2]:
        if not isinstance(a, fx.Node) or a.op == "get_attr":
            continue
        if a.target in _SUMS and sole_user(a) is node and shape(a) == out:
            terms += _leaves(a, out)
        else:
            terms.append(a)
    return terms


def _linear_source(gm, node) -> tuple[fx.Node, bool]:
    """The input ``node`` is a linear function of, and whether it is a conv/Linear (else itself, False)."""
    conv = as_conv(gm, node)
    if conv is not None and isinstance(conv.x, fx.Node):
        return conv.x, True
    bn = as_batchnorm(gm, node)
    if bn is not None and isinstance(bn.x, fx.Node):
        return bn.x, False
    pool = as_avgpool(node)
    if pool is not None:
        return pool[0], False
    return node, False


def _branch_sums(gm, refusals) -> list[Leftover]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SUMS:
            continue
        if any(u.target in _SUMS and sole_user(node) is u for u in node.users):
            continue  # an inner node of a larger sum
        groups: dict[fx.Node, list[tuple[fx.Node, bool]]] = {}
        for leaf in _leaves(node, shape(node)):
            src, is_conv = _linear_source(gm, leaf)
            groups.setdefault(src, []).append((leaf, is_conv))
        for src, members in groups.items():
            if len(members) > 1 and any(is_conv for _, is_conv in members):
                leaves = [leaf for leaf, _ in members]
                what = ", ".join(op_name(leaf) for leaf in leaves)
                out.append(Leftover("branch_sum", [node.name] + [leaf.name for leaf in leaves],
                                    _why([node, *leaves], refusals, f"{len(leaves)} linear branches of {src.name} "
                                         f"({what}) are summed, not merged: no pass applies"), common_path([node])))
    return out


_DECISIVE = ROLLBACK_CODES | {RefusalCode.NO_RUNNING_STATS}


def _batchnorm_reason(gm, node: fx.Node, refusals: list[Refusal]) -> str:
    """Why a BatchNorm stayed: a refusal that settles it (batch statistics, a rewrite the float64 check undid),
    else why no change of coordinates around it is exact (``fold_bn_region``, derived from the graph now)."""
    for r in refusals:
        if node.name in r.nodes and r.code in _DECISIVE:
            return f"{r.pass_name}: {r.reason}"
    why = why_not(gm, node)
    if why is not None:
        return f"{FoldBatchNormRegion.name}: {FoldBatchNormRegion.refusal}: {why}"
    src = node.args[0] if node.target == aten.batch_norm.default else node.args[0].args[0]
    return _why([node], refusals, f"it follows {op_name(src)} ({src.name}); {FoldBatchNormRegion.name} can fold it "
                                  "but did not run")


def find_leftovers(gm: fx.GraphModule, refusals: list[Refusal]) -> list[Leftover]:
    """Every BatchNorm, unmerged sum of parallel linear branches and in-place write left in ``gm``."""
    out = []
    for node in gm.graph.nodes:
        if as_batchnorm(gm, node) is not None:
            out.append(Leftover("batchnorm", [node.name], _batchnorm_reason(gm, node, refusals), common_path([node])))
        written = written_arg(node)
        if node.target in _SCATTERS or (written is not None and written.target in VIEW_OPS):
            out.append(Leftover("in_place_write", [node.name], _why([node], refusals, f"{op_name(node)} into "
                                f"{written.name if written is not None else node.args[0].name} (exports as "
                                "ScatterND): no pass applies"), common_path([node])))
    return out + _branch_sums(gm, refusals)
