"""Torch-side preparation shared by the exporters: example arguments, graph copies, names.

The compiler hands exporters a ``torch.fx.GraphModule`` from ``torch.export.export(...).module()``.
Such a module carries a ``_guards_fn`` node and pre-forward hooks that pin the input shapes the
graph was captured with; every exporter re-traces it, so :func:`plain_graph_module` makes a copy
without them (parameters are shared, not copied) whose ``training`` flags are off.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

from typing import TYPE_CHECKING

from runtimes.core import ExportError, eval_mode, first_line, output_leaves, set_training

if TYPE_CHECKING:
    from torch import fx

__all__ = ["as_args", "plain_graph_module", "to_graph_module", "recaptured", "eval_flags", "output_leaves", "io_names",
           "source_line"]

log = logging.getLogger(__name__)


def _is_guard(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith("_guards_fn")


eval_flags = eval_mode  # the flags are set directly: modules made by torch.export refuse .eval()


def as_args(example_inputs) -> tuple:
    """Example inputs as a tuple of positional arguments (see ``fusers.capture.as_args``)."""
    from fusers.capture import as_args as _as_args

    return _as_args(example_inputs)


def plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without the input-shape guards of torch.export, in eval mode; weights shared."""
    from torch import fx

    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if _is_guard(node) and not node.users:
            graph.erase_node(node)
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__.split(".")[-1] or "GraphModule")
    set_training(out, False)
    return out


def to_graph_module(model, args: tuple) -> fx.GraphModule:
    """``model`` as a guard-free GraphModule: captured with torch.export unless it already is a graph."""
    import torch
    from torch import fx
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, fx.GraphModule):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
        if model.training:
            log.warning("%s is in train mode; exporting it in eval mode", type(model).__name__)
        with eval_flags(model):
            try:
                model = torch.export.export(model, args, strict=False).module()
            except Exception as e:
                raise ExportError(f"torch.export cannot capture {type(model).__name__}: {first_line(e)}") from e
    return plain_graph_module(model)


def recaptured(model, args: tuple) -> fx.GraphModule:
    """``model`` captured again with torch.export (guard-free, eval mode): every node carries its fake value
    (``meta["val"]``), which a pass-made graph may lack, and its name is the one the ONNX exporter gives it."""
    import torch

    try:
        return plain_graph_module(torch.export.export(to_graph_module(model, args), args, strict=False).module())
    except Exception as e:
        raise ExportError(f"torch.export cannot capture the plain model again: {first_line(e)}") from e


def io_names(given: Sequence[str] | None, count: int, prefix: str) -> list[str]:
    """``given`` names checked against ``count``, or ``prefix0 .. prefixN``."""
    if given is None:
        return [f"{prefix}{i}" for i in range(count)]
    given = list(given)
    if len(given) != count:
        raise ExportError(f"{len(given)} {prefix} names were given ({', '.join(given)}) but the model has "
                          f"{count} {prefix}s.")
    if len(set(given)) != len(given):
        raise ExportError(f"{prefix} names must be unique, got {', '.join(given)}.")
    return given


def source_line(node: fx.Node) -> str:
    """``file:line `code``` of the user code that produced ``node`` (from its stack trace), or ''."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            where = lines[i][5:].replace('"', "")
            return f"{where} `{code}`" if code else where
    return ""
