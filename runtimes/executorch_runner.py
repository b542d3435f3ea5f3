"""ExecuTorch: a ``.pte`` program run by ExecuTorch's Python runtime (``executorch.runtime``) on this CPU.

The program's ``forward`` method is loaded once; its input specs come from the method's metadata
(shapes are static: ExecuTorch plans memory at export). Inputs are passed as torch tensors and the
outputs come back as torch tensors, returned as arrays. The XNNPACK subgraphs run on XNNPACK's
thread pool; ``threads`` sets its size where the runtime lets Python set it, else the run notes that it
keeps its default.
"""

from __future__ import annotations

import logging

import numpy as np

from .base import Runner, check_file, corrupt, native_stderr_to_log
from .core import TensorSpec, require

__all__ = ["ExecuTorchRunner", "CPU_PROBE"]

log = logging.getLogger(__name__)
CPU_PROBE = "[cpuinfo_utils.cpp"  # how the lines ExecuTorch's CPU probe writes on stderr start


class ExecuTorchRunner(Runner):
    """Runs the ``forward`` method of a ``.pte`` program."""

    runtime = "executorch"
    suffixes = (".pte",)

    def __init__(self, path, *, threads: int | None = None, name: str | None = None, artifact=None,
                 method: str = "forward"):
        super().__init__(name, threads=threads, artifact=artifact)
        self.path, self.method_name = str(path), method
        self.program = self.method = None

    def activate_impl(self) -> None:
        path = check_file(self.path, "ExecuTorch")
        runtime = require("executorch.runtime", "executorch", "the ExecuTorch runner")
        if self.threads is not None:
            _set_threads(self.threads)
        try:
            with native_stderr_to_log(CPU_PROBE, "ExecuTorch"):  # loading probes the CPU, on stderr
                self.program = runtime.Runtime.get().load_program(
                    path, verification=runtime.Verification.InternalConsistency)
                if self.method_name not in self.program.method_names:
                    raise ValueError(f"it has no method {self.method_name!r}")
                self.method = self.program.load_method(self.method_name)
            meta = self.method.metadata
        except Exception as e:
            raise corrupt(path, "ExecuTorch", e) from e
        self.input_specs = [_spec(f"input{i}", meta.input_tensor_meta(i)) for i in range(meta.num_inputs())]
        self.output_names = [f"output{i}" for i in range(meta.num_outputs())]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        inputs = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in self.input_specs]
        return [np.array(t.detach().numpy() if hasattr(t, "detach") else t) for t in self.method.execute(inputs)]

    def deactivate_impl(self) -> None:
        self.method = self.program = None


def _spec(name: str, meta) -> TensorSpec:
    code = int(meta.dtype())
    if code not in _SCALAR_TYPES:
        raise ValueError(f"{name} has ExecuTorch scalar type {code}, which this runner does not feed")
    return TensorSpec(name, tuple(int(v) for v in meta.sizes()), _SCALAR_TYPES[code])


# ExecuTorch's ScalarType codes (c10's numbering) for the dtypes a deploy model takes or gives
_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                 7: "float64", 11: "bool"}


def _set_threads(threads: int) -> None:
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    except ImportError:
        log.info("this ExecuTorch build does not let Python size its thread pool; it keeps its default")
        return
    _unsafe_reset_threadpool(threads)
