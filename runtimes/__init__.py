"""Runners (one file per runtime), the output comparator and stage-by-stage verification.

    >>> from runtimes import open_runner, make_inputs, compare
    >>> with open_runner("out/model.onnx", threads=1) as r:
    ...     outputs = r.infer(make_inputs(r, seed=0))

Heavy runtimes are imported when a runner is activated, never at import time.
"""

from __future__ import annotations

import os
from typing import Any

from exporters.base import Artifact, CorruptArtifact, MissingDependency

from .base import InputMismatch, Runner
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
from .litert_runner import LiteRTRunner
from .onnxruntime_runner import OnnxRuntimeRunner
from .openvino_runner import OpenVINORunner
from .tensorrt_runner import TensorRTRunner
from .torch_runner import TorchRunner

__all__ = [
    "Runner", "TorchRunner", "OnnxRuntimeRunner", "OpenVINORunner", "LiteRTRunner", "TensorRTRunner",
    "open_runner", "RUNNERS_BY_SUFFIX", "InputMismatch", "CorruptArtifact", "MissingDependency",
    "make_inputs", "load_inputs", "save_inputs", "flatten", "compare", "verify_chain", "Tolerance",
    "ComparisonResult", "OutputComparison", "Stage", "StageResult", "ChainResult",
]

RUNNERS_BY_SUFFIX: dict[str, type[Runner]] = {
    ".onnx": OnnxRuntimeRunner,
    ".xml": OpenVINORunner,
    ".tflite": LiteRTRunner,
    ".engine": TensorRTRunner,
    ".plan": TensorRTRunner,
    ".trt": TensorRTRunner,
    ".pt2": TorchRunner,
}
_BY_FORMAT = {"onnx": OnnxRuntimeRunner, "openvino": OpenVINORunner, "tflite": LiteRTRunner,
              "tensorrt": TensorRTRunner, "pt2": TorchRunner}


def open_runner(target: Any, **kwargs) -> Runner:
    """A runner for an :class:`~exporters.Artifact`, a file path (chosen by extension) or a torch module.

    Keyword arguments go to the runner (``threads=``, ``providers=``, ``precision=``...). An
    artifact's record supplies the input/output names and, for OpenVINO, the precision.
    """
    if isinstance(target, Artifact):
        cls = _BY_FORMAT.get(target.format) or RUNNERS_BY_SUFFIX.get(os.path.splitext(target.path)[1])
        if cls is None:
            raise ValueError(f"no runner for artifact format {target.format!r} ({target.path})")
        if cls is OpenVINORunner:
            kwargs.setdefault("precision", target.precision)
        return cls(target.path, artifact=target, **kwargs)
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in RUNNERS_BY_SUFFIX:
            raise ValueError(f"cannot tell the runtime of {path} from its extension; known extensions: "
                             f"{', '.join(RUNNERS_BY_SUFFIX)}")
        return RUNNERS_BY_SUFFIX[suffix](path, **kwargs)
    import torch

    if isinstance(target, (torch.nn.Module, torch.export.ExportedProgram)):
        return TorchRunner(target, **kwargs)
    raise TypeError(f"open_runner expects an Artifact, a path or a torch module, got {type(target).__name__}")
