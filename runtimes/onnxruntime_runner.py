"""ONNX Runtime: CPU execution provider by default; CUDA / TensorRT providers when installed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .core import Artifact, TensorSpec, require

from .base import Runner, check_file, corrupt

__all__ = ["OnnxRuntimeRunner", "OPT_LEVELS", "PROVIDERS"]

log = logging.getLogger(__name__)

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
               "tensor(bool)": "bool", "tensor(int16)": "int16"}


def _parses(path: str) -> bool:
    """Whether ``path`` is a readable ONNX protobuf (to tell a corrupt file from an unsupported model)."""
    try:
        import onnx

        onnx.load(path, load_external_data=False)
        return True
    except ImportError:
        return True
    except Exception:
        return False


class OnnxRuntimeRunner(Runner):
    """Runs an ``.onnx`` file.

    ``providers``: short names ("cpu", "cuda", "tensorrt") or full provider names, in priority
    order; "auto" picks TensorRT, then CUDA, then CPU among those installed. ``optimization``: graph
    optimization level, "basic" by default (what verification uses: constant folding and
    redundancy elimination, no layout or fusion rewrites). ``threads``: intra-op threads.
    ``allow_spinning``: the ``session.intra_op.allow_spinning`` entry (None leaves ORT's default).
    """

    runtime = "onnxruntime"
    suffixes = (".onnx",)

    def __init__(self, path, *, providers: Sequence[str] | str = ("cpu",), optimization: str = "basic",
                 threads: int | None = None, allow_spinning: bool | None = None, name: str | None = None,
                 artifact: Artifact | None = None):
        super().__init__(name, threads=threads, artifact=artifact)
        if optimization not in OPT_LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(OPT_LEVELS)}, got {optimization!r}")
        self.path = str(path)
        self.providers = providers
        self.optimization = optimization
        self.allow_spinning = allow_spinning
        self.session = None

    def _resolve_providers(self, ort) -> list[str]:
        available = ort.get_available_providers()
        if self.providers == "auto":
            return [p for p in (PROVIDERS["tensorrt"], PROVIDERS["cuda"], PROVIDERS["cpu"]) if p in available]
        wanted = [PROVIDERS.get(p.lower(), p) for p in ([self.providers] if isinstance(self.providers, str)
                                                         else self.providers)]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise RuntimeError(f"requested ONNX Runtime provider(s) {', '.join(missing)} are not available; "
                               f"available providers are: {', '.join(available)}.")
        return wanted

    def activate_impl(self) -> None:
        path = check_file(self.path, "ONNX")
        ort = require("onnxruntime", "onnx", "the ONNX Runtime runner")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[self.optimization])
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
        if self.allow_spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        providers = self._resolve_providers(ort)
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as e:
            if type(e).__name__ in ("InvalidProtobuf", "InvalidGraph") or not _parses(path):
                raise corrupt(path, "ONNX", e) from e
            raise
        self.input_specs = [TensorSpec(i.name, tuple(d if isinstance(d, int) else (d or None) for d in i.shape),
                                       _ORT_DTYPES.get(i.type, "float32")) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.native_inputs = [i.name for i in self.session.get_inputs()]
        log.debug("%s: providers %s", path, self.session.get_providers())

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        native = {n: feed[s.name] for n, s in zip(self.native_inputs, self.input_specs)} if self.input_specs \
            else feed
        return self.session.run(None, native)

    def deactivate_impl(self) -> None:
        self.session = None
