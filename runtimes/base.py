"""The runner template: ``activate() / infer(feed) / deactivate()`` calling ``*_impl``.

A runner loads one artifact (or module) on one runtime. ``activate`` loads it and learns its
input specs; ``infer`` checks a feed against them (names, dtypes, static dimensions) and returns
``{output name: array}`` in output order; ``deactivate`` frees it. A runner is a context manager.
Adding a runtime is one new file with a subclass implementing the three ``*_impl`` methods.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .core import Artifact, CorruptArtifact, DeployError, MissingDependency, TensorSpec

__all__ = ["Runner", "InputMismatch", "CorruptArtifact", "MissingDependency", "check_file", "corrupt", "error_reason",
           "native_stderr_to_log"]

log = logging.getLogger(__name__)


class InputMismatch(DeployError, ValueError):
    """A feed does not match the runner's input specs."""


def check_file(path: str, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    if os.path.getsize(path) == 0:
        raise CorruptArtifact(f"{what} file {path} is corrupt: it is empty.")
    return path


def corrupt(path: str, what: str, exc: BaseException) -> CorruptArtifact:
    """The error for a file its runtime cannot parse: one sentence naming the file."""
    return CorruptArtifact(f"{what} file {path} is corrupt or not a valid {what} model ({error_reason(exc)}).")


def error_reason(exc: BaseException) -> str:
    """The informative line of a runtime's error (OpenVINO puts source locations first)."""
    lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[-1 if useful else 0]


@contextlib.contextmanager
def native_stderr_to_log(chatter: str, label: str) -> Iterator[None]:
    """Hold what a runtime's C++ code writes on file descriptor 2 while the block runs.

    Native libraries announce themselves there and no environment variable silences them (LiteRT's
    XNNPACK delegate: ``INFO: Created TensorFlow Lite XNNPACK delegate``; ExecuTorch's CPU probe:
    ``[cpuinfo_utils.cpp:71] Reading file ...``). Lines starting with ``chatter`` go to the debug log
    under ``label``; anything else (warnings, errors) is written back to stderr when the block ends,
    raising or not.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            kept = []
            for line in text.splitlines(keepends=True):
                if line.startswith(chatter):
                    log.debug("%s: %s", label, line.rstrip())
                else:
                    kept.append(line)
            if kept:
                os.write(2, "".join(kept).encode())


class Runner:
    """Base class of all runners; see the module docstring."""

    runtime = "base"
    suffixes: tuple[str, ...] = ()  # the file suffixes it opens

    def __init__(self, name: str | None = None, *, threads: int | None = None,
                 artifact: Artifact | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.name = name or self.runtime
        self.threads = threads
        self.artifact = artifact
        self.is_active = False
        self.input_specs: list[TensorSpec] = []
        self.output_names: list[str] = []

    # -- template -------------------------------------------------------------------------------
    def activate(self) -> Runner:
        if self.is_active:
            log.debug("%s is already active", self.name)
            return self
        self.activate_impl()
        self._apply_artifact_names()
        self.is_active = True
        return self

    def infer(self, feed: Mapping[str, Any] | Sequence[Any] | Any, *, check: bool = True) -> dict[str, np.ndarray]:
        """Run on ``feed`` (``{name: array}``, or arrays in input order) and return ``{name: array}``."""
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} is not active; call activate() or use it as a context manager")
        feed = self._normalize(feed)
        if check:
            self._check(feed)
        outputs = self.infer_impl(feed)
        if isinstance(outputs, Mapping):
            return dict(outputs)
        names = self.output_names or []
        return {(names[i] if i < len(names) else f"output{i}"): out for i, out in enumerate(outputs)}

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def get_input_specs(self) -> list[TensorSpec]:
        if not self.is_active and not self.input_specs:
            raise RuntimeError(f"runner {self.name} must be activated before its inputs are known")
        return list(self.input_specs)

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, active={self.is_active})"

    # -- to implement ---------------------------------------------------------------------------
    def activate_impl(self) -> None:
        """Load the model; set ``self.input_specs`` and ``self.output_names``."""
        raise NotImplementedError

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray] | dict[str, np.ndarray]:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass

    # -- helpers --------------------------------------------------------------------------------
    def _apply_artifact_names(self) -> None:
        """Use the artifact record's names where the runtime's own names differ (e.g. TFLite args_0)."""
        art = self.artifact
        if art is None:
            return
        if art.inputs and len(art.inputs) == len(self.input_specs):
            self.input_specs = [TensorSpec(a.name, s.shape, s.dtype) for a, s in zip(art.inputs, self.input_specs)]
        if art.outputs and (not self.output_names or len(art.outputs) == len(self.output_names)):
            self.output_names = [o.name for o in art.outputs]

    def _normalize(self, feed) -> dict[str, np.ndarray]:
        names = [s.name for s in self.input_specs]
        if isinstance(feed, Mapping):
            items = dict(feed)
        else:
            if not isinstance(feed, (list, tuple)):
                feed = [feed]
            if names and len(feed) != len(names):
                raise InputMismatch(f"{self.name} expects {len(names)} input(s) ({', '.join(names)}) "
                                    f"but {len(feed)} were given.")
            items = dict(zip(names or [f"input{i}" for i in range(len(feed))], feed))
        return {k: _as_array(v) for k, v in items.items()}

    def _check(self, feed: dict[str, np.ndarray]) -> None:
        if not self.input_specs:
            return
        expected = [s.name for s in self.input_specs]
        missing = [n for n in expected if n not in feed]
        extra = [n for n in feed if n not in expected]
        if missing or extra:
            raise InputMismatch(f"{self.name} expects inputs {expected} but got {list(feed)} "
                                f"(missing {missing}, unexpected {extra}).")
        for spec in self.input_specs:
            value = feed[spec.name]
            if value.dtype.name != spec.dtype:
                raise InputMismatch(f"input {spec.name!r} of {self.name} has dtype {value.dtype.name} but the model "
                                    f"expects {spec.dtype}; cast it with .astype('{spec.dtype}').")
            if len(value.shape) != len(spec.shape) or any(
                    isinstance(d, int) and d >= 0 and d != v for d, v in zip(spec.shape, value.shape)):
                raise InputMismatch(f"input {spec.name!r} of {self.name} has shape {tuple(value.shape)} but the model "
                                    f"expects {tuple(spec.shape)} (str/None dimensions are dynamic).")


def _as_array(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)
