"""Numbers for the exactness proof: dtype conversion of a captured graph, seeded inputs,
leaf-by-leaf comparison of nested outputs."""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

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
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args, kwargs = _swap(node.args, src, dst), {k: _swap(v, src, dst) for k, v in node.kwargs.items()}
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    gm.recompile()
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


def leaves(outputs) -> list[torch.Tensor]:
    """Tensor leaves of a nested output (tuples, lists, dicts), in order."""
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def max_rel_error(reference, outputs) -> float:
    """Largest ``max|a - b| / max|a|`` over the leaves (error relative to each output's scale)."""
    ref, out = leaves(reference), leaves(outputs)
    if len(ref) != len(out):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            return float("inf")
        if not a.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        a, b = a.double(), b.double()
        scale = a.abs().max().item() if a.numel() else 0.0
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
