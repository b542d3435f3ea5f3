"""Cross-layer range equalization (Nagel et al., "Data-Free Quantization", 2019): an exact rescaling
that makes per-tensor int8 ranges fit merged kernels.

For ``conv2(act(conv1(x)))`` with ``act`` positively homogeneous (``act(x / s) = act(x) / s`` for
``s > 0``: ReLU, LeakyReLU), scaling output channel ``i`` of ``conv1`` (kernel and bias) by ``1 / s_i``
and input channel ``i`` of ``conv2`` by ``s_i`` computes the same function; zero padding stays zero.
With ``r1_i`` the range of ``conv1``'s output channel ``i`` and ``r2_i`` that of ``conv2``'s input
channel ``i``, ``s_i = sqrt(r1_i / r2_i)`` makes both ``sqrt(r1_i r2_i)``: RepVGG's merged kernels,
whose identity and 1x1 branches give a few channels ranges many times the median, come out even.

Opt-in (``passes=[..., "equalize"]``; not a default pass): it changes nothing a float runtime sees.
Refused across activations that are not positively homogeneous (SiLU, GELU, Hardswish, ReLU6,
sigmoid ...: ``silu(x / s) != silu(x) / s``), with the reason; a pair already equal is left alone.
"""

from __future__ import annotations

import torch
from torch import fx

from ..graph import as_conv, aten, erase_unused, op_name, replace_conv, sole_user
from ..rules import Match, Pass, RefusalCode

__all__ = ["Equalize", "channel_ranges"]

_HOMOGENEOUS = {aten.relu.default, aten.relu_.default, aten.leaky_relu.default, aten.leaky_relu_.default}
_NOT_HOMOGENEOUS = {aten.silu.default, aten.silu_.default, aten.gelu.default, aten.hardswish.default,
                    aten.hardswish_.default, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default,
                    aten.sigmoid.default, aten.tanh.default, aten.elu.default, aten.mish.default,
                    aten.hardsigmoid.default}
_SETTLED = 1e-6  # scales this close to 1: the pair is equalized already


def channel_ranges(kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """``max |kernel|`` per index of ``dim`` (0: output channels, 1: input channels)."""
    return kernel.abs().transpose(0, dim).flatten(1).amax(1)


def _input_ranges(conv) -> torch.Tensor:
    """Range of each input channel of ``conv`` over every output channel that reads it (any groups)."""
    k = conv.weight
    g = conv.groups
    per = k.reshape(g, k.shape[0] // g, k.shape[1], -1).abs().amax(dim=(1, 3))  # [groups, in / groups]
    return per.flatten()


class Equalize(Pass):
    name = "equalize"
    refusal = "not equalized"

    def match(self, gm, node):
        second = as_conv(gm, node)
        if second is None or second.kind != "conv" or not isinstance(second.x, fx.Node):
            return None
        act = second.x
        first = as_conv(gm, act.args[0]) if act.op == "call_function" and act.args else None
        if first is None or first.kind != "conv":
            return None
        if act.target in _NOT_HOMOGENEOUS:
            name = op_name(act)
            return self.refuse(RefusalCode.NOT_HOMOGENEOUS, [first.node, act, node],
                               f"{name} is not positively homogeneous ({name}(x / s) != {name}(x) / s)")
        if act.target not in _HOMOGENEOUS:
            return None
        if sole_user(first.node) is not act or sole_user(act) is not node:
            return self.refuse(RefusalCode.OTHER_USERS, [first.node, act, node], "an intermediate result is also "
                               "used elsewhere")
        r1, r2 = channel_ranges(first.weight, 0).double(), _input_ranges(second).double()
        s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-300)), torch.ones_like(r1))
        if float((s - 1).abs().max()) <= _SETTLED:
            return None
        return self.found([node], (first, act, second, s))

    def rewrite(self, gm, match: Match) -> str:
        first, act, second, s = match.plan
        per_out = s.reshape(-1, *([1] * (first.weight.dim() - 1)))
        k1 = first.weight / per_out.to(first.weight.dtype)
        b1 = first.bias / s.to(first.weight.dtype) if first.bias is not None else None
        replace_conv(gm, first.node, first.x, "conv", k1, b1, first.stride, first.padding,
                                 first.dilation, first.groups)
        g, k2 = second.groups, second.weight
        scale_in = s.reshape(g, 1, -1, *([1] * (k2.dim() - 2))).to(k2.dtype)
        k2 = (k2.reshape(g, k2.shape[0] // g, *k2.shape[1:]) * scale_in).reshape(k2.shape)
        replace_conv(gm, second.node, act, "conv", k2, second.bias, second.stride, second.padding,
                     second.dilation, second.groups)
        erase_unused(gm.graph, [first.node, second.node])
        ratio = float(s.max() / s.min())
        return f"conv -> {op_name(act)} -> conv equalized (scales spread {ratio:.3g}x)"
