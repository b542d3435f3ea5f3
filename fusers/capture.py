"""Capture a model as an editable graph of aten ops with ``torch.export`` (non-strict).

``torch.fx.symbolic_trace`` is not enough: detectors such as YOLOv7 use tensor shapes in Python
control flow, which torch.export captures for the given (static) input shapes.

Before capturing, the inputs and the BatchNorm statistics the fold passes read are checked: a NaN or
infinite example input, or a BatchNorm whose ``running_var`` is negative or whose statistics or
affine parameters are not finite, is an :class:`InputError` naming the input or the layer
(``BatchNormStatisticsError``): folding ``gamma / sqrt(running_var + eps)`` would turn them into
NaN weights that no later check can explain.

What the eval forward computes for nothing: ``torch.export`` keeps every op the forward ran, also those no
output depends on (YOLOv7's ``IAuxDetect`` runs its auxiliary heads ``m2``, and the layers feeding them, in eval
mode and returns only the lead heads). :func:`live_nodes` finds what the outputs depend on,
:func:`drop_dead_code` erases the rest, and :func:`unused_parameters` / :func:`describe_unused` name the
parameters and buffers that only dead code (or nothing) reads, so a report can say what the deploy form
leaves out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import traceback
import warnings

import torch
from torch import fx

from runtimes.core import first_line, nonfinite, set_training

from .graph import VIEW_OPS, op_name, written_arg

__all__ = ["capture", "CaptureError", "InputError", "BatchNormStatisticsError", "as_args", "check_inputs",
           "check_batchnorms", "live_nodes", "drop_dead_code", "unused_parameters", "describe_unused"]

log = logging.getLogger(__name__)
_TORCH_DIR = os.path.dirname(torch.__file__)


class CaptureError(RuntimeError):
    """torch.export could not capture the model."""


class InputError(ValueError):
    """The example inputs do not fit the model."""


class BatchNormStatisticsError(InputError):
    """A BatchNorm's running statistics or affine parameters cannot be folded (NaN, infinite, negative variance)."""


def as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    return example_inputs


def check_inputs(args: tuple) -> None:
    """Raise :class:`InputError` when an example input holds a NaN or an infinity."""
    for i, a in enumerate(args):
        bad = nonfinite(a) if isinstance(a, torch.Tensor) else ""
        if bad:
            raise InputError(f"example input {i} (shape {tuple(a.shape)}) holds {bad}; pass finite inputs")


def _batchnorm_problem(bn: torch.nn.Module) -> str:
    if bn.running_var is not None:
        if nonfinite(bn.running_var):
            return f"running_var holds {nonfinite(bn.running_var)}"
        negative = bn.running_var < 0
        if negative.any():
            return (f"running_var holds {int(negative.sum())} negative value(s) of {bn.running_var.numel()} "
                    f"(min {float(bn.running_var.min()):.3g}), which no variance can be")
    for name in ("running_mean", "weight", "bias"):
        t = getattr(bn, name, None)
        if isinstance(t, torch.Tensor) and nonfinite(t.detach()):
            return f"{name} holds {nonfinite(t.detach())}"
    return ""


def _all_fine(bns) -> bool:
    """Whether every statistic and affine parameter of the BatchNorms is finite and no variance negative: one
    check over all of them, the common case (the problems are then spelled out a module at a time)."""
    values = [t.detach().reshape(-1) for _, m in bns for t in (m.running_var, m.running_mean,
              getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(t, torch.Tensor)]
    variances = [m.running_var.reshape(-1) for _, m in bns if m.running_var is not None]
    floating = [v for v in values if v.is_floating_point()]
    return (not floating or bool(torch.isfinite(torch.cat([v.double() for v in floating])).all())) and \
        (not variances or not bool((torch.cat([v.double() for v in variances]) < 0).any()))


def check_batchnorms(model: torch.nn.Module) -> None:
    """Raise :class:`BatchNormStatisticsError` naming every BatchNorm (by module path) whose statistics or
    affine parameters cannot be folded: a non-finite value, or a negative ``running_var``."""
    bns = [(path, m) for path, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if _all_fine(bns):
        return
    bad = []
    for path, m in bns:
        problem = _batchnorm_problem(m)
        if problem:
            bad.append(f"{path or 'the model'} ({type(m).__name__}): {problem}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise BatchNormStatisticsError(
            f"BatchNorm {'; '.join(bad[:3])}{more}; folding it divides by sqrt(running_var + eps) and would "
            "produce NaN weights: load a checkpoint with valid statistics, or re-estimate them (model.train() over "
            "training batches without gradients, then model.eval())")


def _where(exc: BaseException) -> str:
    """The last frame of the user's code (not torch's) in the exception's traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)
              and os.path.basename(f.filename) not in ("capture.py", "contextlib.py")]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


def _shapes(args) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)


def _capture_failure(model: torch.nn.Module, e: Exception) -> str:
    """The sentence for a failed ``torch.export``: the cause in words first, then torch's own line."""
    name = type(model).__name__
    if "data-dependent" in str(e) or type(e).__name__ == "GuardOnDataDependentSymNode":
        torch_says = first_line(e).split(" (unhinted")[0].strip().rstrip(".")
        return (f"torch.export cannot capture {name}: its Python control flow depends on tensor values"
                f"{_where(e)} ({torch_says}); rewrite that operation without data-dependent Python control flow "
                "(torch.where computes both branches), -v shows the graph captured so far")
    return (f"torch.export cannot capture {name}: {first_line(e)}{_where(e)}; rewrite that operation without "
            "data-dependent Python control flow")


def capture(model: torch.nn.Module, example_inputs, *, recorded: bool = True, record_on=None) -> fx.GraphModule:
    """The graph of ``model`` in eval mode (its mode is restored afterwards): recorded from one forward
    (:func:`fusers.recording.record`), or where a recording cannot be trusted (its reason logged at INFO) or
    ``recorded`` is false, ``torch.export``'s ``ep.module()``.

    The forward is recorded on ``record_on`` (inputs of the example inputs' shapes; by default the example
    inputs themselves), and the model's outputs on them are left in ``gm.meta["recorded_outputs"]``.

    Non-finite example inputs and BatchNorm statistics that cannot be folded are refused first
    (:func:`check_inputs`, :func:`check_batchnorms`). When ``torch.export`` fails, the partial graph it
    prints to stderr is logged at INFO instead (``deploy -v``) and the :class:`CaptureError` says what
    happened and where in the model's code."""
    args = as_args(example_inputs)
    check_inputs(args)
    check_batchnorms(model)
    was_training = model.training
    if was_training:
        warnings.warn(f"{type(model).__name__} was in train mode; capturing it in eval mode because folding "
                      "uses BatchNorm running statistics", stacklevel=2)
    set_training(model, False)
    try:
        gm = _recording(model, as_args(record_on) if record_on is not None else args) if recorded else None
        if gm is not None:
            log.info("recorded %s: %d graph nodes", type(model).__name__, len(gm.graph.nodes))
            gm.meta["captured_by"] = "recorded"
            return gm
        printed = io.StringIO()  # torch prints the partial graph of a failed export to stderr
        try:
            with contextlib.redirect_stderr(printed):
                ep = torch.export.export(model, args, strict=False)
        except Exception as e:
            try:  # the model itself failing on the inputs is the user's to fix, not an export failure
                with torch.no_grad():
                    model(*args)
            except Exception as eager:
                raise InputError(f"{type(model).__name__} fails on example inputs of shape {_shapes(args)}: "
                                 f"{first_line(eager)}{_where(eager)}; pass inputs the model accepts") from eager
            if printed.getvalue().strip():
                log.info("the graph torch.export captured of %s before it stopped:\n%s", type(model).__name__,
                         printed.getvalue().strip())
            raise CaptureError(_capture_failure(model, e)) from e
        sys.stderr.write(printed.getvalue())  # what a successful export printed (warnings) stays visible
    finally:
        set_training(model, was_training)
    gm = ep.module()
    gm.meta["captured_by"] = "torch.export"
    log.info("captured %s: %d graph nodes", type(model).__name__, len(gm.graph.nodes))
    return gm


def _recording(model: torch.nn.Module, args: tuple) -> fx.GraphModule | None:
    """:func:`fusers.recording.record`'s graph of the forward, or ``None`` for ``torch.export`` to capture it."""
    from .recording import NotRecordable, record

    try:
        return record(model, args)
    except NotRecordable as e:
        log.info("capturing %s with torch.export: %s", type(model).__name__, e)
    except Exception as e:  # noqa: BLE001 - the model failing on the inputs, or a torch without the hook: export says
        log.info("capturing %s with torch.export: the recording failed (%s: %s)", type(model).__name__,
                 type(e).__name__, first_line(e))
    return None


# ------------------------------------------------------------------------------------------ dead code

def aliases_input(node: fx.Node) -> bool:
    """Whether ``node``'s result may share memory with its first argument (a view, ``contiguous``, ``to``, an
    in-place op's return): its schema says so, or it is one of the views the graph module knows."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in VIEW_OPS:
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.returns and schema.returns[0].alias_info is not None)


def _memory_of(node: fx.Node) -> fx.Node:
    """The node whose fresh result ``node`` may alias (``node`` itself when it computes a new tensor)."""
    while aliases_input(node):
        node = node.args[0]
    return node


def _is_assert(node: fx.Node) -> bool:
    return getattr(node.target, "__name__", "").startswith("_assert")


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the outputs of ``graph`` depend on.

    Live are: the output node and every input of a live node; an in-place write (``copy_``, ``relu_`` ...) into
    memory a live node reads, or into an input, parameter or buffer (state that outlives the call); any other
    op with side effects. A write into a tensor nothing live reads (an in-place activation on a dead branch)
    is not live. An assert is kept with its tensors: live when all its inputs are."""
    writes, stack = [], []
    for n in graph.nodes:
        if n.op == "output":
            stack.append(n)
        elif n.op == "call_function" and written_arg(n) is not None:
            writes.append((n, _memory_of(written_arg(n))))
        elif n.op in ("call_function", "call_method", "call_module") and not _is_assert(n) and n.is_impure():
            stack.append(n)
    live: set[fx.Node] = set()
    while stack:
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.all_input_nodes)
        stack = [w for w, memory in writes
                 if w not in live and (memory in live or memory.op in ("placeholder", "get_attr"))]
    live.update(n for n in graph.nodes if _is_assert(n) and all(a in live for a in n.all_input_nodes))
    return live


def drop_dead_code(gm: fx.GraphModule) -> dict[str, int]:
    """Erase every op of ``gm`` that no output depends on (:func:`live_nodes`); the parameters they read stay
    registered until ``graph.remove_unused_attributes``. Returns the erased ops counted by name."""
    live = live_nodes(gm.graph)
    dead = [n for n in gm.graph.nodes if n not in live and n.op not in ("placeholder", "output")]
    counts: dict[str, int] = {}
    for n in reversed(dead):  # users before what they use
        if n.op == "call_function":
            counts[op_name(n)] = counts.get(op_name(n), 0) + 1
        gm.graph.erase_node(n)
    if dead:
        gm.recompile()
        log.info("dropped %d ops no output depends on: %s", len(dead),
                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return dict(sorted(counts.items()))


def _tensors(model: torch.nn.Module):
    """``(module path, module, tensor name, tensor, is_buffer)`` of every parameter and buffer, module by module."""
    seen = set()
    for path, m in model.named_modules():
        for is_buffer, items in ((False, m.named_parameters(recurse=False)), (True, m.named_buffers(recurse=False))):
            for name, t in items:
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield path, m, f"{path}.{name}" if path else name, t, is_buffer


def _prefixes(name: str):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def unused_parameters(model: torch.nn.Module, program) -> list[str]:
    """Names (as in ``model.state_dict()``) of the parameters and buffers of ``model`` that no output of its
    captured ``program`` depends on: the eval forward reads them for nothing (dead code) or not at all.

    ``program`` is what :func:`capture` returns (``ep.module()``: tensors read by ``get_attr`` under their names in
    ``model``) or the ``torch.export.ExportedProgram`` (tensors as placeholders named in its graph signature).
    A BatchNorm's ``num_batches_tracked`` (training bookkeeping) is listed only with the rest of its module.
    The names come module by module, in ``model``'s order."""
    if isinstance(program, torch.export.ExportedProgram):
        signature = program.graph_signature
        owner = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        read = {owner[n.name] for n in live_nodes(program.graph) if n.op == "placeholder" and n.name in owner}
    else:
        read = {n.target for n in live_nodes(program.graph) if n.op in ("get_attr", "call_module")}
    by_module: dict[str, list[tuple[str, bool]]] = {}
    for path, _, name, _, _ in _tensors(model):
        by_module.setdefault(path, []).append((name, any(p in read for p in _prefixes(name))))
    out = []
    for entries in by_module.values():
        module_read = any(is_read for name, is_read in entries if not name.endswith("num_batches_tracked"))
        out += [name for name, is_read in entries
                if not is_read and not (module_read and name.endswith("num_batches_tracked"))]
    return out


def describe_unused(model: torch.nn.Module, names) -> list[str]:
    """``names`` (from :func:`unused_parameters`) grouped for people: the outermost module all of whose
    tensors are among them, with its type and tensor count (``model.121 (Conv, 6 tensors)``,
    ``model.122.m2 (ModuleList in IAuxDetect, 8 tensors)``), else the tensor itself with its owner
    (``model.122.anchors (buffer of IAuxDetect)``)."""
    unused = set(names)
    modules = dict(model.named_modules())
    contents: dict[str, list[str]] = {path: [] for path in modules}
    for _, _, name, _, _ in _tensors(model):
        for prefix in _prefixes(name)[1:]:
            contents.get(prefix, []).append(name)
    out, done = [], set()
    for name in names:
        if name in done:
            continue
        whole = next((p for p in reversed(_prefixes(name)[1:]) if contents.get(p) and set(contents[p]) <= unused),
                     None)
        if whole is not None:
            module, parent = modules[whole], modules.get(whole.rpartition(".")[0])
            kind = type(module).__name__
            containers = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)
            if isinstance(module, containers) and parent is not None:
                kind += f" in {type(parent).__name__}"
            out.append(f"{whole} ({kind}, {len(contents[whole])} tensor{'s' if len(contents[whole]) > 1 else ''})")
            done.update(contents[whole])
        else:
            owner_path, _, attr = name.rpartition(".")
            owner = modules.get(owner_path, model)
            what = "buffer" if attr in owner._buffers else "parameter"
            out.append(f"{name} ({what} of {type(owner).__name__})")
            done.add(name)
    return out
