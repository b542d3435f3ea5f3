"""Free the batch size that ``torch.export`` baked into a captured graph, so it exports with a dynamic batch.

A graph captured at batch B holds B as a literal wherever the model's code read ``x.shape[0]``: YOLO's
``x.view(bs, na, no, ny, nx)`` becomes ``aten.view(t, [B, 3, 85, 20, 20])``. :func:`free_batch` replaces
that literal by the input's own batch (``aten.sym_size.int(input, 0)``) in every ``view`` / ``reshape``
whose input and output both carry the batch in dimension 0 (their first dimension is B and they
depend on the input), and proves the result: at batch 1 and at B + 1 the rewritten graph must give,
row for row, what the captured graph gives on the same rows run B at a time (float64 copies,
relative error <= ``tol``: rows do not interact), else the graph is restored and the reason returned.
Capturing at a batch of 2 or more (``deploy convert --dynamic`` captures at 2) keeps the batch
distinguishable from the size-1 dimensions the rule would otherwise confuse it with.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx

from runtimes.core import first_line, max_rel_error, tensor_leaves

from .numerics import convert_dtype

__all__ = ["free_batch"]

log = logging.getLogger(__name__)

RESHAPES = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
TOL = 1e-9
GUARDS = "_guards_fn"  # the submodule torch.export's unlifted module calls to check the input's shape


def _depends_on(gm: fx.GraphModule, source: fx.Node) -> set[fx.Node]:
    reached = {source}
    for node in gm.graph.nodes:
        if any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    return reached


def _shapes(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, tuple[int, ...]]:
    """The shape of every tensor-valued node of ``gm`` on ``x``."""
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return shapes


def guard_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's calls of torch.export's input-shape guards (they assert the captured input size)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == GUARDS]


def free_batch(gm: fx.GraphModule, x: torch.Tensor, tol: float = TOL) -> tuple[int, str]:
    """Make ``gm`` (captured on the single input ``x``) batch-generic in place; see the module
    docstring. Returns ``(reshapes rewritten, "")``, or ``(0, reason)`` when the graph was left as it was."""
    batch = x.shape[0]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or batch < 2:
        return 0, "needs one input captured at a batch of 2 or more"
    source = inputs[0]
    fed = _depends_on(gm, source)
    shapes = _shapes(gm, x)
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in RESHAPES and n in fed
             and isinstance(n.args[1], (list, tuple)) and n.args[1] and n.args[1][0] == batch
             and shapes.get(n.args[0], (None,))[0] == batch and shapes.get(n, (None,))[0] == batch]
    if not sites:
        return 0, ""
    saved, before = copy.deepcopy(gm.graph), copy.deepcopy(gm)
    with gm.graph.inserting_after(source):
        size = gm.graph.call_function(torch.ops.aten.sym_size.int, (source, 0))
    for n in sites:
        n.args = (n.args[0], [size, *n.args[1][1:]], *n.args[2:])
    for guard in guard_calls(gm):
        gm.graph.erase_node(guard)  # torch.export's shape guards assert the captured batch
    gm.recompile()
    reason = _prove(before, gm, x, tol)
    if reason:
        gm.graph = saved
        gm.recompile()
        log.info("free_batch refused: %s", reason)
        return 0, reason
    log.info("free_batch: %d reshape(s) now take the input's batch", len(sites))
    return len(sites), ""


def _prove(before: fx.GraphModule, after: fx.GraphModule, x: torch.Tensor, tol: float) -> str:
    """"" when ``after`` at batch 1 and B + 1 gives, row for row, what ``before`` (fixed at the captured batch B)
    gives on the same rows run B at a time (float64 copies), else why not."""
    fixed, ours = copy.deepcopy(before), copy.deepcopy(after)
    for gm in (fixed, ours):
        convert_dtype(gm, x.dtype, torch.float64)
    batch = x.shape[0]
    generator = torch.Generator().manual_seed(0)
    for b in (1, batch + 1):
        probe = torch.randn(b, *x.shape[1:], generator=generator, dtype=torch.float64)
        padded = torch.cat([probe, probe[-1:].expand(-b % batch, *probe.shape[1:])])
        try:
            with torch.no_grad():
                got = tensor_leaves(ours(probe))
                parts = [tensor_leaves(fixed(chunk)) for chunk in padded.split(batch)]
        except Exception as e:  # noqa: BLE001 - any failure at another batch is a refusal, with its reason
            return f"at batch {b} the graph fails ({type(e).__name__}: {first_line(e)})"
        want = [torch.cat(leaf)[:b] for leaf in zip(*parts)]
        err = max_rel_error(want, got)
        if not err <= tol:
            return f"at batch {b} the graph's rows differ from the captured batch's (float64 relative error {err:.1e})"
    return ""
