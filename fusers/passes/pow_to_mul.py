"""Target legalization: an integer power becomes multiplications, ``x ** n == x * x * ... * x``.

LiteRT rejects ``tfl.pow`` on the 5-D tensors of YOLOv7's decode (``(wh * 2) ** 2``: "failed to
legalize operation 'tfl.pow'"). Repeated squaring needs about ``log2(n)`` multiplications; ``n = 1``
is the identity. Exponents that are not integers in ``1..16`` have no exact product form: refused.
Not a default pass: exporters run it for the targets that need it.
"""

from __future__ import annotations

from ..graph import aten, erase_unused
from ..matchers import MAX_EXPONENT, integer_exponent
from ..rules import Match, Pass, RefusalCode

__all__ = ["PowToMul", "integer_exponent", "MAX_EXPONENT"]


class PowToMul(Pass):
    name = "pow_to_mul"
    refusal = "power kept"

    def match(self, gm, node):
        if node.op != "call_function" or node.target not in (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor):
            return None
        n = integer_exponent(node)
        if n is None:
            return self.refuse(RefusalCode.NON_INTEGER_EXPONENT, [node], f"exponent {node.args[1]!r} is not an "
                               f"integer in 1..{MAX_EXPONENT}; no exact product form")
        return self.found([node], (node, n))

    def rewrite(self, gm, match: Match) -> str:
        (node, n), graph = match.plan, gm.graph
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
