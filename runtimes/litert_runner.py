"""LiteRT (TFLite): ``ai_edge_litert.interpreter.Interpreter`` on CPU (XNNPACK), ``num_threads`` set.

litert-torch names a model's signature inputs ``args_0, args_1, ...``. It names the outputs after
the torch output tree: ``output_0, output_1, ...`` for a tensor, a tuple or a list; the keys for a
dict (``{"zeta", "alpha"}`` gives ``zeta, alpha``; a container inside a dict adds ``_<key or
index>``). The signature lists them in string order (``alpha`` before ``zeta``, ``output_10``
before ``output_2``), not in the model's order. The runner puts them in the model's order: the
order the artifact record holds (``tflite_outputs``, written at export), else ``output_N`` by
number, else the order of the signature's output tensors in the graph (the order litert-torch
lowers them in: the torch order). It presents them under the artifact record's names when it has
one, else as ``input0.. / output0..``, the exporters' default names.

A quantized input or output (an int8/uint8/int16 tensor with one scale ``s`` and zero point ``z``,
as an int8 model converted without float edges has) is presented as float32 (``float_io``, the
default): the runner feeds ``clip(round(x / s) + z)`` in the tensor's integer range and returns
``s * (q - z)``. ``float_io=False`` feeds and returns the integers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np

from .core import Artifact, TensorSpec, require

from .base import Runner, check_file, corrupt, native_stderr_to_log

__all__ = ["LiteRTRunner"]

log = logging.getLogger(__name__)


def _numbered(names) -> list[str]:
    def key(name: str):
        m = re.search(r"(\d+)$", name)
        return (0, int(m.group(1)), name) if m else (1, 0, name)

    return sorted(names, key=key)


def _quantization(detail: dict) -> tuple[float, int, np.dtype] | None:
    """``(scale, zero point, integer dtype)`` of a per-tensor quantized tensor, else None."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype.kind not in "iu" or not scale:
        return None
    return float(scale), int(zero), dtype


def _quantize(x: np.ndarray, q: tuple[float, int, np.dtype]) -> np.ndarray:
    scale, zero, dtype = q
    info = np.iinfo(dtype)
    return np.clip(np.round(np.asarray(x, np.float32) / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(x: np.ndarray, q: tuple[float, int, np.dtype]) -> np.ndarray:
    scale, zero, _ = q
    return ((x.astype(np.float32) - zero) * np.float32(scale)).astype(np.float32)


def _output_order(tensors: dict[str, int], graph_outputs: Sequence[int] | None,
                  wanted: Sequence[str] | None) -> list[str]:
    """The signature's output names (``{name: tensor index}``) in the model's order; see the module docstring.

    ``graph_outputs``: the tensor indices of the signature's graph outputs, in order (None when unknown).
    """
    names = list(tensors)
    if wanted is not None and sorted(wanted) == sorted(names):
        return list(wanted)
    if all(re.fullmatch(r"output_\d+", n) for n in names):
        return _numbered(names)
    position = {t: i for i, t in enumerate(graph_outputs or ())}
    if all(tensors[n] in position for n in names):
        return sorted(names, key=lambda n: position[tensors[n]])
    log.warning("cannot tell the order of the TFLite outputs %s; ordering them by name", ", ".join(names))
    return _numbered(names)


class LiteRTRunner(Runner):
    """Runs a ``.tflite`` file through its (first, or named) signature.

    ``output_order``: the signature's output names in the model's order (default: the artifact
    record's ``tflite_outputs``; see the module docstring). ``float_io``: present quantized inputs
    and outputs as float32.
    """

    runtime = "litert"
    suffixes = (".tflite",)

    def __init__(self, path, *, threads: int | None = None, signature: str | None = None, name: str | None = None,
                 artifact: Artifact | None = None, output_order: Sequence[str] | None = None, float_io: bool = True):
        super().__init__(name, threads=threads, artifact=artifact)
        self.path = str(path)
        self.signature = signature
        if output_order is None and artifact is not None:
            output_order = artifact.metadata.get("tflite_outputs")
        self.output_order = list(output_order) if output_order is not None else None
        self.float_io = float_io
        self.interpreter = None
        self._runner = None
        self._in_q: list = []
        self._out_q: list = []

    def activate_impl(self) -> None:
        path = check_file(self.path, "TFLite")
        lite = require("ai_edge_litert.interpreter", "tflite", "the LiteRT runner")
        try:
            # allocating applies the XNNPACK delegate, which says so on stderr
            with native_stderr_to_log("INFO: ", "LiteRT"):
                self.interpreter = lite.Interpreter(model_path=path, num_threads=self.threads)
                self.interpreter.allocate_tensors()
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
            self.native_inputs = _numbered(details)
            out_all = self._runner.get_output_details()
            tensors = {n: d["index"] for n, d in out_all.items()}
            graph = [d["index"] for d in self.interpreter.get_output_details()] if len(signatures) == 1 else None
            self.native_outputs = _output_order(tensors, graph, self.output_order)
            in_details = [details[n] for n in self.native_inputs]
            out_details = [out_all[n] for n in self.native_outputs]
        else:  # a model without signatures: plain tensor indices
            self.interpreter.allocate_tensors()
            in_details = self.interpreter.get_input_details()
            self.native_inputs = [d["name"] for d in in_details]
            out_details = self.interpreter.get_output_details()
            self.native_outputs = [d["name"] for d in out_details]
        self._in_q = [_quantization(d) if self.float_io else None for d in in_details]
        self._out_q = [_quantization(d) if self.float_io else None for d in out_details]
        self.input_specs = [
            TensorSpec(f"input{i}", tuple(int(v) if v >= 0 else None for v in d.get("shape_signature", d["shape"])),
                       "float32" if q else np.dtype(d["dtype"]).name)
            for i, (d, q) in enumerate(zip(in_details, self._in_q))]
        self.output_names = [f"output{i}" for i in range(len(self.native_outputs))]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(_quantize(feed[s.name], q) if q else feed[s.name])
                  for s, q in zip(self.input_specs, self._in_q)]
        if self._runner is not None:
            result = self._runner(**dict(zip(self.native_inputs, arrays)))
            outs = [np.array(result[n]) for n in self.native_outputs]
        else:
            it = self.interpreter
            for d, a in zip(it.get_input_details(), arrays):
                it.set_tensor(d["index"], a)
            it.invoke()
            outs = [np.array(it.get_tensor(d["index"])) for d in it.get_output_details()]
        return [_dequantize(o, q) if q else o for o, q in zip(outs, self._out_q)]

    def deactivate_impl(self) -> None:
        self._runner = None
        self.interpreter = None
