"""Target legalization: rewrite ops a target cannot lower into exact equivalents it can.

TFLite: litert-torch fails on ``aten.pow`` over YOLOv7's 5-D decode tensors ("failed to legalize
operation 'tfl.pow'"). An integer power is a product, so the compiler's ``pow_to_mul`` pass
rewrites it, under the same float64 proof as every other pass (see ``fusers.passes.pow_to_mul``).
A power with no exact product form is refused here with the op, its source line and the target.
"""

from __future__ import annotations

import logging

from typing import TYPE_CHECKING

from runtimes.core import ExportError

from ._torch import as_args, eval_flags, plain_graph_module, source_line

if TYPE_CHECKING:
    from torch import fx

__all__ = ["legalize_for_tflite"]

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
