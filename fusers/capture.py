"""Capture a model as an editable graph of aten ops with ``torch.export`` (non-strict).

``torch.fx.symbolic_trace`` is not enough: detectors such as YOLOv7 use tensor shapes in Python
control flow, which torch.export captures for the given (static) input shapes.
"""

from __future__ import annotations

import logging
import os
import traceback
import warnings

import torch
from torch import fx

from runtimes.core import first_line, set_training

__all__ = ["capture", "CaptureError", "InputError", "as_args"]

log = logging.getLogger(__name__)
_TORCH_DIR = os.path.dirname(torch.__file__)


class CaptureError(RuntimeError):
    """torch.export could not capture the model."""


class InputError(ValueError):
    """The example inputs do not fit the model."""


def as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    return example_inputs


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


def capture(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """Export ``model`` in eval mode (its mode is restored afterwards) and return ``ep.module()``."""
    args = as_args(example_inputs)
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
        try:
            ep = torch.export.export(model, args, strict=False)
        except Exception as e:
            raise CaptureError(f"torch.export cannot capture {type(model).__name__}: {first_line(e)}{_where(e)}; "
                               "rewrite that operation without data-dependent Python control flow") from e
    finally:
        set_training(model, was_training)
    gm = ep.module()
    log.info("captured %s: %d graph nodes", type(model).__name__, len(gm.graph.nodes))
    return gm
