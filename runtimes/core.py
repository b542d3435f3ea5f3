"""The shared vocabulary below ``exporters`` and ``runtimes``: defined once, imported by both.

- :class:`Artifact` (one exported file: format, input/output :class:`TensorSpec` records, precision,
  parent artifact, notes) and :class:`TensorSpec`; plain data with ``to_dict``/``from_dict``;
- the errors: :class:`DeployError` and its kinds (:class:`ExportError`, :class:`MissingDependency`,
  :class:`CorruptArtifact`, :class:`UntrustedFile`); :func:`first_line` of an exception for
  one-sentence messages, :func:`untrusted_message` for a file that would run code when loaded;
- :func:`require`: a lazy import that names the pip extra when the package is missing;
- torch helpers that import torch only when called: :func:`output_leaves` (the tensor leaves of a
  nested output), :func:`eval_mode` (eval flags set and restored, also on modules made by
  ``torch.export``, which refuse ``.eval()``), :func:`count_parameters` (parameters and buffers);
- the error measure :func:`max_rel_error` (``max|a - b| / max|a|`` per output), for numpy arrays
  and torch tensors alike, and :func:`nonfinite` (the NaN and infinite values of an array, in words).

This module imports neither ``exporters`` nor ``runtimes``' runners: ``exporters`` sits above
``runtimes``, never below it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Artifact",
    "TensorSpec",
    "DeployError",
    "ExportError",
    "MissingDependency",
    "CorruptArtifact",
    "UntrustedFile",
    "untrusted_message",
    "require",
    "require_installed",
    "telemetry_off",
    "check_precision",
    "dtype_name",
    "first_line",
    "leaves",
    "output_leaves",
    "tensor_leaves",
    "as_numpy",
    "eval_mode",
    "set_training",
    "count_parameters",
    "max_rel_error",
    "nonfinite",
]

log = logging.getLogger(__name__)

class DeployError(RuntimeError):
    """Base class of the errors raised by exporters and runtimes."""


class ExportError(DeployError):
    """A format cannot express the model (an op, a dtype, a dynamic shape), or the export failed."""


class MissingDependency(DeployError, ImportError):
    """An optional package (or a device) that a format or runtime needs is not available."""


class CorruptArtifact(DeployError):
    """An artifact file exists but cannot be parsed by its runtime (truncated, wrong format...)."""


class UntrustedFile(DeployError):
    """A file would run code from itself when loaded (pickled Python objects, compiled code), and nobody said
    that its source is trusted."""


def untrusted_message(subject: str, found: str) -> str:
    """One sentence for ``subject`` (e.g. "checkpoint best.pt") that holds ``found`` (e.g. "Python objects
    (GLOBAL models.yolo.Model)"): loading it runs code from it, and the flag that allows it."""
    return f"{subject} holds {found}; loading it runs code from it; pass --trust-pickle if you trust its source"


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


def _missing(module: str, extra: str, purpose: str | None) -> MissingDependency:
    what = f" (needed for {purpose})" if purpose else ""
    return MissingDependency(f"Python package '{module}'{what} is not installed; install it with "
                             f"pip install 'reparam-deploy[{extra}]'.")


def require(module: str, extra: str, purpose: str | None = None):
    """Import ``module`` or raise :class:`MissingDependency` naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _missing(module, extra, purpose) from e


# The tool makes no network call of its own. Libraries that report usage are told not to, before any of them
# is imported: NNCF and Hugging Face's hub read these variables (a value the user set is kept); OpenVINO's
# converter sends through the ``openvino_telemetry`` package whatever its variables say (it forked a child that
# hung in getaddrinfo after a run), and falls back to its own stub when that package cannot be imported, as
# NNCF does: an entry of None in ``sys.modules`` makes the import fail.
OFFLINE_ENVIRONMENT = {"NNCF_CI": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
SILENCED_MODULES = ("openvino_telemetry",)


def telemetry_off() -> None:
    """Turn every loaded library's usage telemetry off for this process (done when this module is imported)."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for module in SILENCED_MODULES:
        if sys.modules.get(module) is not None:
            log.warning("%s was imported before deploy: its telemetry may send usage reports", module)
        else:
            sys.modules[module] = None


def require_installed(module: str, extra: str, purpose: str | None = None) -> None:
    """Like :func:`require`, without importing ``module`` (a check before any work; some runtimes take
    seconds to import)."""
    if module in sys.modules:
        if sys.modules[module] is None:  # an import known to fail
            raise _missing(module, extra, purpose)
        return
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _missing(module, extra, purpose)


def check_precision(precision: str, supported: tuple[str, ...] = ("fp32", "fp16"), fmt: str = "") -> str:
    if precision not in supported:
        where = f" for {fmt}" if fmt else ""
        raise ExportError(f"precision {precision!r} is not supported{where}; choose one of {', '.join(supported)}.")
    return precision


@dataclass
class TensorSpec:
    """Name, shape and dtype of one input or output; a ``str`` (or ``None``) dimension is dynamic."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str = "float32"

    def __post_init__(self):
        self.shape = tuple(self.shape)
        self.dtype = dtype_name(self.dtype)

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) or d < 0 for d in self.shape)

    def concrete_shape(self, fill: dict[str, int] | int = 1) -> tuple[int, ...]:
        """The shape with every dynamic dimension replaced (by ``fill[name]`` or the int ``fill``)."""
        out = []
        for d in self.shape:
            if isinstance(d, int) and d >= 0:
                out.append(d)
            elif isinstance(fill, dict):
                out.append(fill.get(d, 1) if isinstance(d, str) else 1)
            else:
                out.append(fill)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d.get("dtype", "float32"))


def dtype_name(dtype: Any) -> str:
    """Canonical numpy dtype name for a numpy dtype, a torch dtype or a string."""
    if isinstance(dtype, str) and not dtype.startswith("torch."):
        import numpy as np

        return np.dtype(dtype).name
    text = str(dtype)
    if text.startswith("torch."):
        return {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32",
                "bool": "bool"}.get(text[6:], text[6:])
    import numpy as np

    return np.dtype(dtype).name


@dataclass
class Artifact:
    """One exported file and what is known about it."""

    path: str
    format: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str = "fp32"
    parent: str | None = None
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.path = os.fspath(self.path)
        if self.parent is not None:
            self.parent = os.fspath(self.parent)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def note(self, message: str, level: int = logging.INFO) -> None:
        """Record ``message`` in the notes and log it."""
        self.notes.append(message)
        log.log(level, "%s: %s", self.path, message)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [s.to_dict() for s in self.inputs]
        d["outputs"] = [s.to_dict() for s in self.outputs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(
            path=d["path"],
            format=d["format"],
            inputs=[TensorSpec.from_dict(s) for s in d.get("inputs", [])],
            outputs=[TensorSpec.from_dict(s) for s in d.get("outputs", [])],
            precision=d.get("precision", "fp32"),
            parent=d.get("parent"),
            notes=list(d.get("notes", [])),
            metadata=dict(d.get("metadata", {})),
        )

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Write the record as JSON (default ``<artifact path>.json``) and return where."""
        path = os.fspath(path) if path is not None else self.path + ".json"
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Artifact:
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ------------------------------------------------------------------------------ torch-side helpers

def leaves(outputs) -> list:
    """The leaves of a nested output (tuples, lists, dicts in insertion order, as torch.export and torch.onnx
    flatten them)."""
    from torch.utils import _pytree as pytree

    return pytree.tree_leaves(outputs)


def tensor_leaves(outputs) -> list:
    """The leaves of a nested output that are tensors or arrays."""
    return [v for v in leaves(outputs) if hasattr(v, "shape")]


def output_leaves(module, args: tuple) -> list:
    """Run ``module`` once in eval mode without gradients; its outputs flattened leaf by leaf.

    Raises :class:`ExportError` when an output is not a tensor (an exported graph returns tensors only).
    """
    import torch
    from torch.utils import _pytree as pytree

    with torch.no_grad(), eval_mode(module):
        out = module(*args)
    leaves = pytree.tree_leaves(out)
    bad = [type(v).__name__ for v in leaves if not isinstance(v, torch.Tensor)]
    if bad:
        raise ExportError(f"the model returns non-tensor outputs ({', '.join(sorted(set(bad)))}); "
                          "exported graphs can only return tensors.")
    return leaves


def count_parameters(module) -> tuple[int, int]:
    """``(parameters, buffers)`` of a torch module: the elements of ``module.parameters()`` (trainable
    or not; a tensor registered under two names counted once) and of ``module.buffers()`` (BatchNorm
    running statistics and ``num_batches_tracked``, ...). The one definition every count uses."""
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    return sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers())


def set_training(module, mode: bool) -> None:
    """``module.train(mode)``; flags set directly where a module refuses it (modules made by torch.export)."""
    try:
        module.train(mode)
    except NotImplementedError:
        for m in module.modules():
            m.training = mode


@contextlib.contextmanager
def eval_mode(module) -> Iterator[Any]:
    """``module`` with every submodule's ``training`` flag off; the flags are restored afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield module
    finally:
        for m, flag in saved:
            m.training = flag


def max_rel_error(reference, outputs) -> float:
    """The largest ``max|a - b| / max|a|`` over the leaves of two nested outputs (numpy or torch).

    The error is relative to each output's scale (an element-wise relative error explodes near zero
    and says nothing about a network). Different leaf counts or shapes, a NaN or an infinite
    difference give ``inf``; integer leaves count 0 when equal, ``inf`` otherwise.
    """
    import numpy as np

    ref, out = tensor_leaves(reference), tensor_leaves(outputs)
    if len(ref) != len(out):
        return math.inf
    worst = 0.0
    for a, b in zip(ref, out):
        a, b = as_numpy(a), as_numpy(b)
        if a.shape != b.shape:
            return math.inf
        if a.dtype.kind not in "fc":
            if not np.array_equal(a, b):
                return math.inf
            continue
        if a.size == 0:
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = float(np.abs(a - b).max())
        if not math.isfinite(diff):
            return math.inf
        scale = float(np.abs(a).max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def nonfinite(value) -> str:
    """The NaN and infinite values of an array or tensor in words (``"3 NaN, 1 +Inf and 2 -Inf of 16 values"``), or
    ``""`` when every value is finite (integer and boolean arrays always are)."""
    import numpy as np

    a = as_numpy(value)
    if a.dtype.kind not in "fc" or a.size == 0:
        return ""
    counts = {"NaN": int(np.isnan(a).sum()), "+Inf": int(np.isposinf(a.real).sum() + np.isposinf(a.imag).sum()),
              "-Inf": int(np.isneginf(a.real).sum() + np.isneginf(a.imag).sum())}
    found = [f"{n} {kind}" for kind, n in counts.items() if n]
    if not found:
        return ""
    words = found[0] if len(found) == 1 else f"{', '.join(found[:-1])} and {found[-1]}"
    return f"{words} of {a.size} value{'s' if a.size > 1 else ''}"


def as_numpy(value):
    """A numpy view of a tensor (bfloat16 widened to float32) or an array."""
    import numpy as np

    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


telemetry_off()
