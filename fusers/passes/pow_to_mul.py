"""Target legalization: an integer power becomes multiplications, ``x ** n == x * x * ... * x``.

LiteRT rejects ``tfl.pow`` on the 5-D tensors of YOLOv7's decode (``(wh * 2) ** 2``: "failed to
legalize operation 'tfl.pow'"). Repeated squaring needs about ``log2(n)`` multiplications; ``n = 1``
is the identity. Exponents that are not integers in ``1..16`` have no exact product form: refused.
Not a default pass: exporters run it for the targets that need it.
"""

from __future__ import annotations

from ..graph import aten, erase_unused
from ..manager import NodePass

MAX_EXPONENT = 16


def integer_exponent(node) -> int | None:
    """The exponent of an ``aten.pow.Tensor_Scalar`` node when it is an integer in 1..MAX_EXPONENT."""
    if node.op != "call_function" or node.target != aten.pow.Tensor_Scalar:
        return None
    n = node.args[1]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or float(n) != int(n):
        return None
    return int(n) if 1 <= int(n) <= MAX_EXPONENT else None


class PowToMul(NodePass):
    name = "pow_to_mul"
    refusal = "power kept"

    def analyze(self, gm, node):
        if node.op != "call_function" or node.target not in (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor):
            return None
        n = integer_exponent(node)
        if n is None:
            return None, f"exponent {node.args[1]!r} is not an integer in 1..{MAX_EXPONENT}; no exact product form"
        return (n,)

    def rewrite(self, gm, node, plan):
        (n,), graph = plan, gm.graph
        result, base, created = None, node.args[0], []

        def mul(a, b):
            created.append(graph.call_function(aten.mul.Tensor, (a, b)))
            return created[-1]

        with graph.inserting_before(node):
            while n:  # repeated squaring
                if n & 1:
                    result = base if result is None else mul(result, base)
                n >>= 1
                if n:
                    base = mul(base, base)
        for new in created:
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(result)
        erase_unused(graph, [node] + created)
        return f"x ** {node.args[1]} -> {len(created)} mul"
