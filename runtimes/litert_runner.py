"""LiteRT (TFLite): ``ai_edge_litert.interpreter.Interpreter`` on CPU (XNNPACK), ``num_threads`` set.

litert-torch names a model's signature inputs ``args_0, args_1, ...`` and outputs ``output_0,
output_1, ...`` (listed in string order, so ``output_10`` comes before ``output_2``). The runner
orders them by their number and presents them under the artifact record's names when it has one,
else as ``input0.. / output0..``, the exporters' default names.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from exporters.base import Artifact, TensorSpec, require

from .base import Runner, check_file, corrupt

__all__ = ["LiteRTRunner"]

log = logging.getLogger(__name__)


def _numbered(names) -> list[str]:
    def key(name: str):
        m = re.search(r"(\d+)$", name)
        return (0, int(m.group(1)), name) if m else (1, 0, name)

    return sorted(names, key=key)


class LiteRTRunner(Runner):
    """Runs a ``.tflite`` file through its (first, or named) signature."""

    runtime = "litert"

    def __init__(self, path, *, threads: int | None = None, signature: str | None = None, name: str | None = None,
                 artifact: Artifact | None = None):
        super().__init__(name, threads=threads, artifact=artifact)
        self.path = str(path)
        self.signature = signature
        self.interpreter = None
        self._runner = None

    def activate_impl(self) -> None:
        path = check_file(self.path, "TFLite")
        lite = require("ai_edge_litert.interpreter", "tflite", "the LiteRT runner")
        try:
            self.interpreter = lite.Interpreter(model_path=path, num_threads=self.threads)
            signatures = self.interpreter.get_signature_list()
        except Exception as e:
            raise corrupt(path, "TFLite", e) from e
        if signatures:
            key = self.signature or next(iter(signatures))
            if key not in signatures:
                raise ValueError(f"{path} has no signature {key!r}; it has {', '.join(signatures)}.")
            self.signature = key
            self._runner = self.interpreter.get_signature_runner(key)
            details = self._runner.get_input_details()
            self._native_inputs = _numbered(details)
            self._native_outputs = _numbered(signatures[key]["outputs"])
            in_details = [details[n] for n in self._native_inputs]
        else:  # a model without signatures: plain tensor indices
            self.interpreter.allocate_tensors()
            in_details = self.interpreter.get_input_details()
            self._native_inputs = [d["name"] for d in in_details]
            self._native_outputs = [d["name"] for d in self.interpreter.get_output_details()]
        self.input_specs = [
            TensorSpec(f"input{i}", tuple(int(v) if v >= 0 else None for v in d.get("shape_signature", d["shape"])),
                       np.dtype(d["dtype"]).name)
            for i, d in enumerate(in_details)]
        self.output_names = [f"output{i}" for i in range(len(self._native_outputs))]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(feed[s.name]) for s in self.input_specs]
        if self._runner is not None:
            result = self._runner(**dict(zip(self._native_inputs, arrays)))
            return [np.array(result[n]) for n in self._native_outputs]
        it = self.interpreter
        for d, a in zip(it.get_input_details(), arrays):
            it.set_tensor(d["index"], a)
        it.invoke()
        return [np.array(it.get_tensor(d["index"])) for d in it.get_output_details()]

    def deactivate_impl(self) -> None:
        self._runner = None
        self.interpreter = None
