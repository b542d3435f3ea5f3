"""What every exporter shares: the artifact record, tensor specs, errors and lazy imports.

An :class:`Artifact` describes one file that an exporter wrote: its format, the names, shapes and
dtypes of its inputs and outputs, its precision, the artifact it was made from (``parent``) and
free-form notes (for example "onnxsim changed the numbers; kept the unsimplified model").
Records are plain data: ``to_dict()`` gives JSON, ``Artifact.from_dict`` reads it back.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Artifact",
    "TensorSpec",
    "DeployError",
    "ExportError",
    "MissingDependency",
    "CorruptArtifact",
    "PRECISIONS",
    "require",
    "check_precision",
    "dtype_name",
    "first_line",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


class DeployError(RuntimeError):
    """Base class of the errors raised by exporters and runtimes."""


class ExportError(DeployError):
    """A format cannot express the model (an op, a dtype, a dynamic shape), or the export failed."""


class MissingDependency(DeployError, ImportError):
    """An optional package (or a device) that a format or runtime needs is not available."""


class CorruptArtifact(DeployError):
    """An artifact file exists but cannot be parsed by its runtime (truncated, wrong format...)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


def require(module: str, extra: str, purpose: str | None = None):
    """Import ``module`` or raise :class:`MissingDependency` naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependency(
            f"Python package '{module}'{what} is not installed; install it with "
            f"pip install 'reparam-deploy[{extra}]'."
        ) from e


def check_precision(precision: str, supported: tuple[str, ...] = PRECISIONS, fmt: str = "") -> str:
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
