"""Runners (one file per runtime), the output comparator and stage-by-stage verification.

The lowest layer: ``runtimes.core`` holds the vocabulary every package shares (artifact records,
tensor specs, errors, lazy requirements, output leaves, eval mode, the error measure); nothing here
imports ``exporters`` or ``deploy``.

    >>> from runtimes import open_runner, make_inputs, compare
    >>> with open_runner("out/model.onnx", threads=1) as r:
    ...     outputs = r.infer(make_inputs(r, seed=0))

Heavy runtimes are imported when a runner is activated, never at import time.
"""

from __future__ import annotations

import os
from typing import Any

from .base import InputMismatch, Runner
from .core import Artifact, CorruptArtifact, MissingDependency, UntrustedFile
from .compare import (
    ChainResult,
    ComparisonResult,
    OutputComparison,
    Stage,
    StageResult,
    Tolerance,
    compare,
    flatten,
    load_inputs,
    make_inputs,
    save_inputs,
    verify_chain,
)
from .coreml_runner import CoreMLRunner
from .executorch_runner import ExecuTorchRunner
from .litert_runner import LiteRTRunner
from .mnn_runner import MNNRunner
from .ncnn_runner import NcnnRunner
from .onnxruntime_runner import OnnxRuntimeRunner
from .openvino_runner import OpenVINORunner
from .tensorrt_runner import TensorRTRunner
from .torch_runner import TorchRunner

__all__ = [
    "Runner", "TorchRunner", "OnnxRuntimeRunner", "OpenVINORunner", "LiteRTRunner", "TensorRTRunner",
    "ExecuTorchRunner", "NcnnRunner", "MNNRunner", "CoreMLRunner",
    "open_runner", "RUNNERS", "RUNNERS_BY_SUFFIX", "InputMismatch", "CorruptArtifact", "MissingDependency",
    "UntrustedFile",
    "make_inputs", "load_inputs", "save_inputs", "flatten", "compare", "verify_chain", "Tolerance",
    "ComparisonResult", "OutputComparison", "Stage", "StageResult", "ChainResult",
]

RUNNERS = (OnnxRuntimeRunner, OpenVINORunner, LiteRTRunner, TensorRTRunner, TorchRunner, ExecuTorchRunner,
           NcnnRunner, MNNRunner, CoreMLRunner)
RUNNERS_BY_SUFFIX: dict[str, type[Runner]] = {suffix: cls for cls in RUNNERS for suffix in cls.suffixes}


def _runner_for(path: str) -> type[Runner] | None:
    """The runner whose longest suffix ends ``path`` (``.ncnn.param`` before ``.param``), or None."""
    name = os.fspath(path).lower()
    found = [s for s in RUNNERS_BY_SUFFIX if name.endswith(s)]
    return RUNNERS_BY_SUFFIX[max(found, key=len)] if found else None


def open_runner(target: Any, **kwargs) -> Runner:
    """A runner for an :class:`~exporters.Artifact`, a file path (chosen by extension) or a torch module.

    Keyword arguments go to the runner (``threads=``, ``providers=``, ``precision=``...). An
    artifact's record supplies the input/output names and, for OpenVINO, the precision.
    """
    if isinstance(target, Artifact):
        cls = _runner_for(target.path)
        if cls is None:
            raise ValueError(f"no runner for artifact format {target.format!r} ({target.path}); exporters.open_runner "
                             "also knows the formats registered as targets")
        return cls(target.path, artifact=target, **kwargs)
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        cls = _runner_for(path)
        if cls is None:
            raise ValueError(f"cannot tell the runtime of {path} from its extension; known extensions: "
                             f"{', '.join(RUNNERS_BY_SUFFIX)}")
        return cls(path, **kwargs)
    import torch

    if isinstance(target, (torch.nn.Module, torch.export.ExportedProgram)):
        return TorchRunner(target, **kwargs)
    raise TypeError(f"open_runner expects an Artifact, a path or a torch module, got {type(target).__name__}")
