"""Target legalization: rewrite ops a target cannot lower into exact equivalents it can.

TFLite: litert-torch fails on ``aten.pow`` over YOLOv7's 5-D decode tensors ("failed to legalize
operation 'tfl.pow'"). An integer power is a product, so the compiler's ``pow_to_mul`` pass
rewrites it, under the same float64 proof as every other pass (see ``fusers.passes.pow_to_mul``).
A power with no exact product form is refused here with the op, its source line and the target.

ONNX: the torch.onnx exporter translates an op with an ONNX function when it has one and decomposes
it with torch's table only when it has none; an op whose function exists but rejects a call is
lost. ``aten.scaled_dot_product_attention`` is one: its function takes 4-D query/key/value only,
while timm's Twins calls it on 5-D windows ``(B, windows, heads, tokens, dim)``. A failed export
names the op; :func:`plan_onnx_decomposition` then finds which calls of it the exporter cannot take
(a one-node export of each kind of call: ranks, dtypes and the other arguments) and checks that
torch's decomposition reproduces each in float64. :func:`decompose_program` decomposes exactly those
calls (``ExportedProgram.run_decompositions`` with a table entry that declines, ``NotImplemented``,
the calls the exporter takes), so attention in 4-D keeps the exporter's own translation, and a model
that exports as it is is never touched.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtimes.core import ExportError, first_line

from ._torch import as_args, eval_flags, plain_graph_module, source_line

if TYPE_CHECKING:
    import torch
    from torch import fx

__all__ = ["legalize_for_tflite", "Decomposition", "decomposition_of", "call_kind", "plan_onnx_decomposition",
           "decompose_program", "single_node_module"]

log = logging.getLogger(__name__)


def legalize_for_tflite(gm: fx.GraphModule, args, *, allow_unsupported_pow: bool = False
                        ) -> tuple[fx.GraphModule, list[str]]:
    """Return a TFLite-ready copy of ``gm`` (the input is untouched) and the rewrites made."""
    import fusers
    from fusers.passes.pow_to_mul import integer_exponent

    pows = [n for n in gm.graph.nodes if n.op == "call_function" and "pow" in str(n.target)]
    for node in pows:
        if integer_exponent(node) is None and not allow_unsupported_pow:
            where = source_line(node)
            exponent = node.args[1] if len(node.args) > 1 else "?"
            raise ExportError(f"TFLite cannot express {node.target} with exponent {exponent!r} (node {node.name}"
                              f"{', at ' + where if where else ''}): tfl.pow fails to legalize and only integer "
                              "exponents 1..16 can be rewritten exactly into multiplications.")
    if not any(integer_exponent(n) is not None for n in pows):
        return gm, []
    with eval_flags(gm):
        legal = fusers.reparameterize(gm, as_args(args), passes=["pow_to_mul"], verify=False)
    report = legal.reparam_report
    if any(p.rolled_back for p in report.passes):
        raise ExportError(f"TFLite legalization was not exact: {report.refusals()[0].reason}")
    rewrites = [r for p in report.passes for r in p.rewrites]
    log.info("TFLite legalization: %d pow node(s) rewritten into multiplications (float64 error %.1e)",
             len(rewrites), report.float64_error)
    return plain_graph_module(legal), rewrites


# ------------------------------------------------------------------------------------------ ONNX

EXACT = 1e-9  # float64 relative error a decomposition may have and still count as the op itself


@functools.lru_cache(maxsize=1)
def _core_table() -> dict:
    from torch._decomp import core_aten_decompositions

    return dict(core_aten_decompositions())


def decomposition_of(op) -> Callable | None:
    """torch's decomposition of ``op``: its entry in ``torch._decomp``'s table, or in the core ATen table (which
    holds the CompositeImplicitAutograd kernels, ``scaled_dot_product_attention``'s among them); else None."""
    from torch._decomp import decomposition_table

    return decomposition_table.get(op) or _core_table().get(op)


def _kind(value) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return f"{value.dim()}-D {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple)):
        return tuple(_kind(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # symbolic sizes, dtypes, devices


def call_kind(op, args, kwargs) -> tuple:
    """What decides whether an exporter can translate a call of ``op``: the rank and dtype of each tensor argument
    and the value of every other one, defaults filled in from the op's schema (so that ``f(q, k, v)`` and
    ``f(q, k, v, None, 0.0)`` are one kind)."""
    kind = []
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        else:
            value = arg.default_value if arg.has_default_value() else None
        kind.append((arg.name, _kind(value)))
    return tuple(kind)


def _describe_kind(kind: tuple) -> str:
    tensors = [f"{name} {k}" for name, k in kind if isinstance(k, str) and k.split("-D ")[0].isdigit()]
    return ", ".join(tensors) or "no tensors"


@dataclass
class Decomposition:
    """The calls of one op to decompose with torch's decomposition before ONNX export, and why.

    ``kinds`` maps each kind of call (:func:`call_kind`) to decompose to the exporter's failure on it;
    ``nodes`` names those calls in the plain graph, ``total`` counts the op's calls there. The object is
    the table entry: it decomposes a call of a listed kind and declines (``NotImplemented``) the others.
    """

    op: Any
    fn: Callable
    kinds: dict[tuple, str]
    nodes: list[str] = field(default_factory=list)
    total: int = 0
    error: float = 0.0  # the largest float64 relative error of the decomposition on the recorded calls
    every_call: bool = False  # planned for every call, the calls the exporter takes alone included

    def __call__(self, *args, **kwargs):
        if call_kind(self.op, args, kwargs) not in self.kinds:
            return NotImplemented  # the exporter translates this call itself
        return self.fn(*args, **kwargs)

    def __str__(self) -> str:
        reasons = sorted(set(self.kinds.values()))
        kinds = "; ".join(_describe_kind(k) for k in self.kinds)
        return (f"{len(self.nodes)} of {self.total} {self.op} call(s) ({kinds}) decomposed with torch's decomposition "
                f"(float64 error {self.error:.1e}): the torch.onnx exporter's translation fails on them "
                f"({'; '.join(reasons)})")

    def to_dict(self) -> dict:
        return {"op": str(self.op), "nodes": list(self.nodes), "total": self.total, "float64_error": self.error,
                "kinds": [_describe_kind(k) for k in self.kinds], "reasons": sorted(set(self.kinds.values()))}


def single_node_module(node: fx.Node) -> fx.GraphModule:
    """A GraphModule computing ``node`` alone; its inputs are ``node.all_input_nodes``, in that order."""
    import torch
    from torch import fx

    graph = fx.Graph()
    env = {n: graph.placeholder(f"input{i}") for i, n in enumerate(node.all_input_nodes)}
    call = graph.call_function(node.target, fx.map_arg(node.args, env.__getitem__),
                               fx.map_arg(node.kwargs, env.__getitem__))
    graph.output(call)
    return fx.GraphModule(torch.nn.Module(), graph)


@dataclass
class _Calls:
    """The calls of one kind: their nodes, and the values of the first one's inputs, args and kwargs."""

    nodes: list
    inputs: list
    args: tuple
    kwargs: dict


def _record_calls(gm: fx.GraphModule, args, nodes) -> dict[tuple, _Calls]:
    """Run ``gm`` on ``args`` and keep, for each kind of call among ``nodes``, the values of its first call."""
    import torch
    from torch import fx

    wanted, calls = set(nodes), {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            if n in wanted:
                a, k = self.fetch_args_kwargs_from_env(n)
                kind = call_kind(n.target, a, k)
                if kind in calls:
                    calls[kind].nodes.append(n)
                else:
                    calls[kind] = _Calls([n], [self.env[i] for i in n.all_input_nodes], a, k)
            return super().run_node(n)

    with torch.no_grad(), eval_flags(gm):
        Recorder(gm).run(*as_args(args))
    return calls


def _relative_error(op, fn, args, kwargs, dtype: torch.dtype | None) -> float:
    """Max relative error (to each output's largest magnitude) of ``fn`` against ``op``, floats cast to ``dtype``."""
    import torch
    from torch.utils._pytree import tree_leaves, tree_map

    def cast(v):
        return v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v

    args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
    with torch.no_grad():
        ref, got = tree_leaves(op(*args, **kwargs)), tree_leaves(fn(*args, **kwargs))
    if len(ref) != len(got):
        return math.inf
    error = 0.0
    for r, g in zip(ref, got):
        if not isinstance(r, torch.Tensor):
            error = max(error, 0.0 if r == g else math.inf)
        elif r.shape != g.shape or r.dtype != g.dtype:
            return math.inf
        elif r.is_floating_point():
            if r.numel():
                e = float((r - g).abs().max() / r.abs().max().clamp_min(torch.finfo(r.dtype).tiny))
                error = max(error, e) if not math.isnan(e) else math.inf  # NaN on either side: not the same
        else:
            error = max(error, 0.0 if torch.equal(r, g) else math.inf)
    return error


def _decomposition_error(op, fn, args, kwargs) -> tuple[float, float]:
    """``(error, tolerance)`` of ``fn`` against ``op`` on one call: in float64, or in the call's own dtype where
    the op has no float64 kernel (then to a tolerance of 1e-5)."""
    import torch

    try:
        return _relative_error(op, fn, args, kwargs, torch.float64), EXACT
    except Exception:  # noqa: BLE001 - a kernel without float64: check in the call's own dtype
        return _relative_error(op, fn, args, kwargs, None), 1e-5


def plan_onnx_decomposition(gm: fx.GraphModule, args, op_name: str, failure: str,
                            translation_failure: Callable[[fx.Node, list], str | None], *, every_call: bool = False
                            ) -> tuple[Decomposition | None, str]:
    """Which calls of ``op_name`` (as ``str(node.target)``) in ``gm`` to decompose so that the ONNX exporter can
    take the graph, after a whole export failed on that op with ``failure``.

    ``translation_failure(node, inputs)`` exports ``node`` alone and returns the exporter's failure or None.
    Each kind of call is probed once (with one kind, the failed export already answered). When every kind
    exports alone, or with ``every_call``, all calls are decomposed (the failure depends on the context).
    A kind whose decomposition does not reproduce the op (float64 relative error over :data:`EXACT`, e.g.
    dropout) is kept. Returns the :class:`Decomposition`, or None and the reason nothing can be decomposed.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == op_name]
    if not nodes:
        return None, f"{op_name} is not in the exported graph (the exporter's own decompositions made it)"
    op = nodes[0].target
    fn = decomposition_of(op)
    if fn is None:
        return None, f"torch has no decomposition of {op_name}"
    calls = _record_calls(gm, args, nodes)
    if len(calls) == 1 or every_call:
        failing = {kind: failure for kind in calls}
    else:
        failing = {kind: why for kind, c in calls.items()
                   if (why := translation_failure(c.nodes[0], c.inputs)) is not None}
        if not failing:
            failing = {kind: f"{failure} (in the whole graph; each call exports alone)" for kind in calls}
    plan = Decomposition(op, fn, {}, total=len(nodes), every_call=len(failing) == len(calls))
    refused = []
    for kind, why in failing.items():
        c = calls[kind]
        try:
            error, tolerance = _decomposition_error(op, fn, c.args, c.kwargs)
        except Exception as e:  # noqa: BLE001 - a decomposition that cannot run is not used
            error, tolerance = math.inf, EXACT
            log.info("torch's decomposition of %s fails on %s: %s", op_name, _describe_kind(kind), e)
        if not error <= tolerance:
            refused.append(f"{_describe_kind(kind)}: its decomposition differs from it (relative error {error:.1e})")
            continue
        plan.kinds[kind] = why
        plan.nodes += [n.name for n in c.nodes]
        plan.error = max(plan.error, error)
    if refused:
        log.info("ONNX legalization keeps %d kind(s) of %s call: %s", len(refused), op_name, "; ".join(refused))
    if not plan.kinds:
        return None, f"torch's decomposition of {op_name} does not reproduce it ({'; '.join(refused)})"
    log.info("ONNX legalization, the export is retried: %s", plan)
    return plan, ""


def decompose_program(gm: fx.GraphModule, args, decompositions: list[Decomposition], dynamic_shapes=None):
    """``gm`` captured with ``torch.export`` (non-strict, as the ONNX exporter does) and the calls the
    ``decompositions`` list replaced by torch's decomposition of them; every other op is kept as it is."""
    import torch

    try:
        program = torch.export.export(gm, as_args(args), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        if dynamic_shapes is None:
            raise
        # the exporter falls back to a static capture too; the caller's check of the written batch says why
        log.info("capturing the plain graph with a dynamic batch failed (%s); captured with a static batch",
                 first_line(e))
        program = torch.export.export(gm, as_args(args), strict=False)
    return program.run_decompositions({d.op: d for d in decompositions})
