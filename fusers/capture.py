"""Capture a model as an editable graph of aten ops with ``torch.export`` (non-strict).

``torch.fx.symbolic_trace`` is not enough: detectors such as YOLOv7 use tensor shapes in Python
control flow, which torch.export captures for the given (static) input shapes.

Before capturing, the inputs and the BatchNorm statistics the fold passes read are checked: a NaN or
infinite example input, or a BatchNorm whose ``running_var`` is negative or whose statistics or
affine parameters are not finite, is an :class:`InputError` naming the input or the layer
(``BatchNormStatisticsError``): folding ``gamma / sqrt(running_var + eps)`` would turn them into
NaN weights that no later check can explain.
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

__all__ = ["capture", "CaptureError", "InputError", "BatchNormStatisticsError", "as_args", "check_inputs",
           "check_batchnorms"]

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


def check_batchnorms(model: torch.nn.Module) -> None:
    """Raise :class:`BatchNormStatisticsError` naming every BatchNorm (by module path) whose statistics or
    affine parameters cannot be folded: a non-finite value, or a negative ``running_var``."""
    bad = []
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
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


def capture(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """Export ``model`` in eval mode (its mode is restored afterwards) and return ``ep.module()``.

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
        try:
            with torch.no_grad():
                model(*args)
        except Exception as e:
            raise InputError(f"{type(model).__name__} fails on example inputs of shape {_shapes(args)}: "
                             f"{first_line(e)}{_where(e)}; pass inputs the model accepts") from e
        printed = io.StringIO()  # torch prints the partial graph of a failed export to stderr
        try:
            with contextlib.redirect_stderr(printed):
                ep = torch.export.export(model, args, strict=False)
        except Exception as e:
            if printed.getvalue().strip():
                log.info("the graph torch.export captured of %s before it stopped:\n%s", type(model).__name__,
                         printed.getvalue().strip())
            raise CaptureError(_capture_failure(model, e)) from e
        sys.stderr.write(printed.getvalue())  # what a successful export printed (warnings) stays visible
    finally:
        set_training(model, was_training)
    gm = ep.module()
    log.info("captured %s: %d graph nodes", type(model).__name__, len(gm.graph.nodes))
    return gm
