"""Numbers for the exactness proof: dtype conversion of a captured graph, seeded inputs and quicker float64
depthwise convolutions (:class:`float64_kernels`).

The comparison of nested outputs is the project's one error measure, ``runtimes.core.max_rel_error``
(``max|a - b| / max|a|`` per output leaf), re-exported here with ``leaves`` (its tensor leaves).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from runtimes.core import max_rel_error
from runtimes.core import tensor_leaves as leaves

__all__ = ["convert_dtype", "float64_kernels", "seeded_like", "leaves", "max_rel_error"]


def _swap(value, src, dst):
    if value is src:
        return dst
    if isinstance(value, (list, tuple)):
        return type(value)(_swap(v, src, dst) for v in value)
    return value


def convert_dtype(gm: fx.GraphModule, src: torch.dtype, dst: torch.dtype) -> int:
    """Cast every ``src`` tensor held by ``gm`` to ``dst`` and every ``dtype=src`` in its graph.

    New tensor objects replace the old ones, so a model sharing tensors with ``gm`` is untouched.
    Returns the number of graph nodes whose arguments changed.
    """
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and t.dtype == src:
                    new = t.detach().to(dst)
                    store[name] = torch.nn.Parameter(new, t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
        for name, t in list(vars(module).items()):
            if isinstance(t, torch.Tensor) and t.dtype == src:
                setattr(module, name, t.detach().to(dst))
    changed = 0
    for module in gm.modules():  # the graph and the subgraphs of higher-order ops (autocast, set_grad_enabled)
        if not isinstance(module, fx.GraphModule):
            continue
        before = changed
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            args, kwargs = _swap(node.args, src, dst), {k: _swap(v, src, dst) for k, v in node.kwargs.items()}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed += 1
        if changed > before:  # the code reads tensors by name: only a dtype written in it needs new code
            module.recompile()
    return changed


def seeded_like(example, seed: int = 0, dtype=None):
    """Random tensors with the shapes (and dtypes, unless ``dtype`` is given) of ``example``'s tensors."""
    gen = torch.Generator().manual_seed(seed)

    def make(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype or t.dtype)
        return t.clone()

    return pytree.tree_map(make, example)


class float64_kernels(TorchDispatchMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within it, float64 depthwise convolutions on the CPU run as a sum over the kernel's taps.

    torch has no float64 depthwise kernel on the CPU: it unfolds the input group by group, 5 to 15 times slower
    than one multiply-add of the shifted input per tap, and these convs are most of a float64 check of
    MobileNet-style networks. Only 2-D convs in which each output channel reads one input channel
    (``groups == in_channels``, any multiplier, stride, zero padding and dilation) are taken; every other op runs
    as it would. The sums come in another order than torch's, a difference of float64 rounding, far below any
    check's tolerance; both sides of a check run within it.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and _taps_apply(*args):
            x, weight, bias, stride, padding, dilation, _, _, groups = args
            return _depthwise(x, weight, bias, stride, padding, dilation, groups)
        return func(*args, **(kwargs or {}))


def _taps_apply(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups) -> bool:
    return (not transposed and x.dtype == torch.float64 and x.device.type == "cpu" and x.dim() == 4
            and weight.dim() == 4 and groups > 1 and weight.shape[1] == 1 and x.shape[1] == groups
            and weight.dtype == torch.float64 and (bias is None or bias.dtype == torch.float64)
            and all(s > 0 for s in _out_size(x, weight, stride, padding, dilation)))


def _out_size(x, weight, stride, padding, dilation) -> list[int]:
    return [(x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1) // stride[d] + 1
            for d in range(2)]


def _depthwise(x, weight, bias, stride, padding, dilation, groups):
    """``conv2d(x, weight, bias, stride, padding, dilation, groups)`` with ``weight.shape[1] == 1`` and
    ``groups == x.shape[1]``: output channel ``o`` reads input channel ``o // multiplier``."""
    n = x.shape[0]
    out_channels, _, kh, kw = weight.shape
    multiplier = out_channels // groups
    oh, ow = _out_size(x, weight, stride, padding, dilation)
    padded = torch.constant_pad_nd(x, [padding[1], padding[1], padding[0], padding[0]])
    out = x.new_zeros(n, groups, multiplier, oh, ow)
    taps = weight.reshape(1, groups, multiplier, kh, kw)
    for i in range(kh):
        rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (oh - 1) + 1, stride[0])
        for j in range(kw):
            cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (ow - 1) + 1, stride[1])
            out.addcmul_(padded[:, :, rows, cols].unsqueeze(2), taps[..., i, j, None, None])
    out = out.view(n, out_channels, oh, ow)
    return out if bias is None else out.add_(bias.view(1, out_channels, 1, 1))
