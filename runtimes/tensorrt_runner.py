"""TensorRT: a plain serialized engine (``.engine`` / ``.plan``) run with the TensorRT 10/11 tensor API.

Device buffers are torch CUDA tensors (no pycuda / cuda-python needed): ``set_input_shape``,
``set_tensor_address`` for every I/O tensor, then ``execute_async_v3`` on the current torch stream.
Names and the build settings come from the sidecar ``<engine>.json`` when present.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from .core import Artifact, MissingDependency, TensorSpec, require

from .base import Runner, check_file, corrupt

__all__ = ["TensorRTRunner", "require_cuda"]

log = logging.getLogger(__name__)


def require_cuda(purpose: str = "TensorRT") -> None:
    """Raise :class:`MissingDependency` unless torch sees a CUDA GPU."""
    try:
        import torch

        ok = torch.cuda.is_available()
    except ImportError:
        ok = False
    if not ok:
        raise MissingDependency(f"no CUDA GPU found; {purpose} needs an NVIDIA GPU with a working driver.")


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine on the current CUDA device (optimization profile 0)."""

    runtime = "tensorrt"
    suffixes = (".engine", ".plan", ".trt")

    def __init__(self, path, *, threads: int | None = None, name: str | None = None,
                 artifact: Artifact | None = None):
        super().__init__(name, threads=threads, artifact=artifact)
        self.path = str(path)
        self.engine = None
        self.context = None
        if artifact is None and os.path.isfile(self.path + ".json"):
            try:
                with open(self.path + ".json") as f:
                    meta = json.load(f)
                self.artifact = Artifact(self.path, "tensorrt",
                                         [TensorSpec.from_dict(s) for s in meta.get("inputs", [])],
                                         [TensorSpec.from_dict(s) for s in meta.get("outputs", [])],
                                         meta.get("precision", "fp32"))
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable sidecar %s.json: %s", self.path, e)

    def activate_impl(self) -> None:
        path = check_file(self.path, "TensorRT engine")
        trt = require("tensorrt", "tensorrt", "the TensorRT runner")
        require_cuda("running TensorRT engines")
        import torch

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(path, "rb") as f:
            blob = f.read()
        try:
            self.engine = self._runtime.deserialize_cuda_engine(blob)
        except Exception as e:
            raise corrupt(path, "TensorRT engine", e) from e
        if self.engine is None:
            raise corrupt(path, "TensorRT engine", RuntimeError("deserialize_cuda_engine returned None: the file is "
                                                                "truncated or was built by another TensorRT version"))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.input_specs = [TensorSpec(n, tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n)),
                                       self._dtypes[n].name) for n in self._inputs]
        self.output_names = list(self._outputs)
        self._torch = torch
        self._stream = torch.cuda.Stream()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        keep = []
        with torch.cuda.stream(self._stream):
            for native, spec in zip(self._inputs, self.input_specs):
                t = torch.from_numpy(np.ascontiguousarray(feed[spec.name])).cuda(non_blocking=False)
                keep.append(t)
                self.context.set_input_shape(native, tuple(t.shape))
                self.context.set_tensor_address(native, t.data_ptr())
            outs = []
            for native in self._outputs:
                shape = tuple(self.context.get_tensor_shape(native))
                t = torch.empty(shape, dtype=_torch_dtype(torch, self._dtypes[native]), device="cuda")
                outs.append(t)
                self.context.set_tensor_address(native, t.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {self.path} failed (execute_async_v3 returned False).")
        self._stream.synchronize()
        return [t.cpu().numpy() for t in outs]

    def deactivate_impl(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None


def _torch_dtype(torch, dtype: np.dtype):
    return {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64,
            "int8": torch.int8, "bool": torch.bool, "uint8": torch.uint8}[dtype.name]
