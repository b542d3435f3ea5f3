"""MNN: a ``.mnn`` model run by MNN's Python runtime (``MNN.nn.load_module_from_file``) on this CPU.

The model is loaded once as an MNN ``Module`` with static shapes (``shape_mutable=False``: the shapes the
file holds), or with mutable shapes when the artifact record leaves the batch open (an ONNX source exported
with ``--dynamic``: MNN then runs any batch); its input names, shapes, dtypes and layouts come
from the module's ``get_info()``, its output names from the file. Inputs are fed as NCHW constants (MNN
keeps the ONNX layout at conversion); an output MNN leaves in its packed NC4HW4 layout is converted back to
NCHW before it is read.

Runtime configuration (``MNN.nn.create_runtime_manager``): ``numThread`` = ``threads`` (default 1), and
``precision`` per stage: ``"high"`` for fp32 and int8 artifacts, ``"low"`` for fp16 ones. What ``precision``
changes on x86, read in MNN's source (``source/backend/cpu/CPUBackend.cpp``, ``x86_x64/AVX2Backend.cpp``):
``"low"`` selects fp16 arithmetic only on ARMv8.2 CPUs (the Arm82 backend), and bf16 only in builds with
``MNN_SUPPORT_BF16`` for ``"Low_BF16"``; on x86 the AVX2/AVX-512 backend computes in fp32 whatever is asked
(it sets its own precision mode to "low", which there only picks sigmoid/SiLU variants that are the same
fp32 code off ARM), and ``"high"`` changes nothing MNN's CPU code reads. So on this machine an fp16 artifact
is fp16 *storage*: its weights are widened to fp32 at load and computed in fp32.

Winograd: MNN computes a 3x3 convolution with Winograd transforms wherever its cost model prefers them (the
runtime hint ``WINOGRAD_MEMORY_LEVEL``, default on). Their float32 rounding is far from a direct convolution's:
three 32-channel 3x3 convolutions at 24x24 move the output by 6.7e-4 of its scale (direct: 6.5e-7), timm's
RepVGG-A0 at 96x96 by 1.5e-5. An fp32 stage is run with Winograd off (``set_hint(WINOGRAD_MEMORY_LEVEL, 0)``),
so it is judged at the fp32 tolerance like every other runtime, and ``deploy bench`` times that same
configuration; fp16 and int8 stages keep MNN's default (judged at their own tolerance or by accuracy; the int8
ranges are calibrated Winograd-aware).

MNN's C++ code prints on stdout (``The device supports: ...``, ``MNN use high precision``) and reports load
errors there too (``Invalidate buffer to create MNN Module``); :func:`native_output` holds both descriptors
while MNN runs and sends what it printed to the debug log, and a failed load becomes one
:class:`CorruptArtifact` sentence naming the file with MNN's reason. MNN checks the flatbuffer before it
builds anything (an empty, truncated, random or bit-flipped header was refused without a crash).

The MNN wheel also holds an HTTP client (its LLM "omni" code downloads media named by URL in a prompt);
neither this runner nor the converter reach it, and ``MNN.tools`` (whose Python wrappers send usage reports
to Alibaba's log service) is never imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from .base import Runner, check_file
from .core import CorruptArtifact, TensorSpec, require

__all__ = ["MNNRunner", "native_output", "load_mnn", "mnn_modules", "PRECISION"]

log = logging.getLogger(__name__)

PRECISION = {"fp32": "high", "fp16": "low", "int8": "high"}  # MNN's runtime "precision" per artifact precision
WINOGRAD = {"fp32": False, "fp16": True, "int8": True}  # whether MNN may pick Winograd 3x3 convolutions
_WINOGRAD_MEMORY_LEVEL = 3  # MNN::Interpreter::HintMode (include/MNN/Interpreter.hpp)
_EXTRA = "mnn"


class _Printed:
    text = ""


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no libc to flush (not on Linux/macOS)
        pass


@contextlib.contextmanager
def native_output(label: str) -> Iterator[_Printed]:
    """Hold what native code writes on file descriptors 1 and 2 while the block runs; the text goes to the
    debug log under ``label`` and is kept in the yielded object's ``text`` (MNN reports errors on stdout)."""
    printed = _Printed()
    sys.stdout.flush()
    sys.stderr.flush()
    _flush_c_stdio()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no descriptors to redirect
        yield printed
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield printed
        finally:
            _flush_c_stdio()  # C's stdout is block-buffered when it is not a terminal
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            printed.text = sink.read().decode(errors="replace")
            for line in printed.text.splitlines():
                if line.strip():
                    log.debug("%s: %s", label, line.rstrip())


def mnn_modules():
    """``MNN`` (imported with its CPU-feature line held), ``MNN.nn`` and ``MNN.expr``."""
    if "MNN" not in sys.modules:
        with native_output("MNN"):
            require("MNN", _EXTRA, "the MNN runner")
    mnn = require("MNN", _EXTRA, "the MNN runner")
    return mnn, mnn.nn, mnn.expr


def _reason(printed: str, exc: BaseException | None = None) -> str:
    lines = [ln.strip().rstrip(".") for ln in printed.splitlines()
             if ln.strip() and not ln.startswith(("The device supports", "MNN use "))]
    if lines:
        return lines[-1]
    return str(exc).splitlines()[0] if exc is not None and str(exc).strip() else "MNN could not load it"


def load_mnn(path: str, *, threads: int = 1, precision: str = "high", outputs: Sequence[str] = (),
             mutable: bool = False, winograd: bool = True):
    """The MNN module of the ``.mnn`` file ``path`` (static shapes unless ``mutable``; Winograd 3x3 convolutions
    unless ``winograd`` is false) and its runtime manager, its outputs in the order ``outputs`` names them
    (default: the file's); CorruptArtifact for a file MNN cannot load."""
    path = check_file(path, "MNN")
    _, nn, _ = mnn_modules()
    config = {"backend": "CPU", "numThread": int(threads), "precision": precision}
    module, error = None, None
    with native_output("MNN") as printed:
        try:
            manager = nn.create_runtime_manager((config,))
            if not winograd:
                manager.set_hint(_WINOGRAD_MEMORY_LEVEL, 0)
            module = nn.load_module_from_file(path, [], list(outputs), runtime_manager=manager,
                                              shape_mutable=mutable)
        except Exception as e:  # MNN raises SystemError with the reason on stdout
            error = e
    if module is None:
        raise CorruptArtifact(f"MNN file {path} is corrupt or not a valid MNN model "
                              f"({_reason(printed.text, error)}).") from error
    return module, manager


def _dtype(dtype, F) -> str:
    names = {F.float: "float32", F.double: "float64", F.int: "int32", F.int64: "int64", F.uint8: "uint8",
             F.int8: "int8"}
    for key, name in names.items():
        if dtype == key:
            return name
    raise CorruptArtifact(f"MNN tensor type {dtype} is not one this runner feeds")


class MNNRunner(Runner):
    """Runs a ``.mnn`` model on MNN's CPU backend; see the module docstring."""

    runtime = "mnn"
    suffixes = (".mnn",)

    def __init__(self, path, *, threads: int | None = None, name: str | None = None, artifact=None,
                 precision: str = "fp32"):
        super().__init__(name, threads=threads, artifact=artifact)
        if precision not in PRECISION:
            raise ValueError(f"unknown precision {precision!r} for MNN; choose one of {', '.join(PRECISION)}")
        self.path, self.precision = str(path), precision
        self.module = self.manager = None
        self._formats: list = []

    def activate_impl(self) -> None:
        _, _, F = mnn_modules()
        declared = self.artifact.inputs if self.artifact is not None else []
        dynamic = any(not isinstance(d, int) for spec in declared for d in spec.shape)  # a dynamic batch
        options = {"threads": self.threads or 1, "precision": PRECISION[self.precision], "mutable": dynamic,
                   "winograd": WINOGRAD[self.precision]}
        self.module, self.manager = load_mnn(self.path, **options)
        info = self.module.get_info()
        named = [o.name for o in self.artifact.outputs] if self.artifact is not None else []
        if sorted(named) == sorted(info.get("outputNames") or []) and named != info.get("outputNames"):
            # the quantization tool may write the outputs in another order: return them in the record's
            self.module, self.manager = load_mnn(self.path, outputs=named, **options)
            info = self.module.get_info()
        names, variables = list(info.get("inputNames") or []), list(info.get("inputs") or [])
        if len(names) != len(variables):
            raise CorruptArtifact(f"MNN file {self.path} is corrupt or not a valid MNN model (it names "
                                  f"{len(names)} inputs but describes {len(variables)}).")
        self.input_specs = [TensorSpec(n, tuple(int(d) for d in v.shape), _dtype(v.dtype, F))
                            for n, v in zip(names, variables)]
        if dynamic and len(declared) == len(self.input_specs):  # MNN reports its default size; any batch runs
            self.input_specs = [TensorSpec(s.name, tuple(d.shape), s.dtype) for s, d in zip(self.input_specs, declared)]
        self._formats = [v.data_format for v in variables]
        self.output_names = list(info.get("outputNames") or [])
        self._F = F

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        F = self._F
        types = {"float32": F.float, "float64": F.double, "int32": F.int, "int64": F.int64, "uint8": F.uint8,
                 "int8": F.int8}
        inputs = []
        for spec, fmt in zip(self.input_specs, self._formats):
            x = np.ascontiguousarray(feed[spec.name])
            packed = fmt == F.NC4HW4  # fed as NCHW, then packed the way the model reads it
            var = F.const(x, list(x.shape), F.NCHW if packed else fmt, types[spec.dtype])
            inputs.append(F.convert(var, fmt) if packed else var)
        outs = []
        for o in self.module.forward(inputs):
            if o.data_format == F.NC4HW4:
                o = F.convert(o, F.NCHW)
            outs.append(np.array(o.read(), copy=True))
        return outs

    def deactivate_impl(self) -> None:
        self.module = self.manager = None
