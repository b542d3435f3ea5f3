"""Numbers for the exactness proof: dtype conversion of a captured graph and seeded inputs.

The comparison of nested outputs is the project's one error measure, ``runtimes.core.max_rel_error``
(``max|a - b| / max|a|`` per output leaf), re-exported here with ``leaves`` (its tensor leaves).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from runtimes.core import max_rel_error
from runtimes.core import tensor_leaves as leaves

__all__ = ["convert_dtype", "seeded_like", "leaves", "max_rel_error"]


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
