"""ncnn: a ``.ncnn.param`` + ``.ncnn.bin`` pair run by ncnn's Python binding (``ncnn.Net``) on this CPU.

The net's options are set before the ``.param`` is loaded, as ncnn requires: Vulkan off, ``num_threads``
from ``threads``, and for fp32 every reduced-precision storage and arithmetic switch off (ncnn turns fp16
and bf16 storage on by default where the CPU has F16C / AVX512-BF16, which would round the weights and
activations of an "fp32" run); ``precision="fp16"`` turns fp16 storage, packing and arithmetic on (ncnn
has fp16 arithmetic kernels for ARM CPUs with asimdhp only: on x86 it stores fp16 and computes in fp32).

ncnn has no batch dimension: a blob is one sample (``w``, ``h, w``, ``c, h, w`` or ``c, d, h, w``). The
runner feeds a batch by running the net once per sample, and stacks the per-sample outputs, reshaped to the
artifact record's output shapes without their batch dimension (an ``(N, 10)`` classifier's output comes back
from ncnn as a ``w=10`` blob). pnnx names the blobs ``in0, in1, ...`` and ``out0, out1, ...`` in the order of
the source model's inputs and outputs; the runner presents them under the artifact record's names.

The ``.param`` text is read by :func:`read_param` before ncnn parses it: a file from anywhere is untrusted,
so it is parsed strictly and with bounds (magic ``7767517``, layer and blob counts, at most
:data:`MAX_LAYERS` layers, parameter ids and array lengths ncnn accepts). The input shapes come from the
artifact record, else from the shape an ``Input`` layer declares (``0=w 1=h 11=d 2=c``, written by
``exporters.ncnn``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .base import Runner, check_file, corrupt
from .core import CorruptArtifact, TensorSpec, require

__all__ = ["NcnnRunner", "NcnnLayer", "NcnnParam", "read_param", "bin_path", "layer_weights", "input_dims",
           "MAGIC", "MAX_LAYERS"]

log = logging.getLogger(__name__)

MAGIC = "7767517"
MAX_LAYERS = 200_000  # far beyond any network; a count above it is a corrupt (or hostile) file
MAX_PARAM_BYTES = 64 << 20
MAX_ARRAY = 1 << 20
_MAX_EDGES = 65_536  # bottoms or tops of one layer
_PARAM_IDS = 32  # ncnn's NCNN_MAX_PARAM_COUNT: ids 0..31, arrays -23300..-23331
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_PAIR = re.compile(r'\s+(-?\d+)=("[^"\n]*"|[^\s"]+)')
_NAME = re.compile(r"[^\s]{1,256}")
_PRECISIONS = ("fp32", "fp16")


@dataclass
class NcnnLayer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, int | float | str | tuple] = field(default_factory=dict)

    def get(self, key: int, default=0):
        return self.params.get(key, default)


@dataclass
class NcnnParam:
    """A parsed ``.param`` file: its layers in file order and the blob count its header declares."""

    layers: list[NcnnLayer]
    blob_count: int

    def inputs(self) -> list[NcnnLayer]:
        return [layer for layer in self.layers if layer.type == "Input"]

    def outputs(self) -> list[str]:
        """The blobs no layer reads (ncnn's outputs), in the order they are produced."""
        read = {b for layer in self.layers for b in layer.bottoms}
        return [t for layer in self.layers for t in layer.tops if t not in read]


def bin_path(param) -> str:
    """The weights file of a ``.param`` file: ``model.ncnn.param`` -> ``model.ncnn.bin``."""
    param = os.fspath(param)
    return (param[:-len(".param")] if param.endswith(".param") else param) + ".bin"


def _value(text: str, where: str):
    if text.startswith('"'):
        return text[1:-1]
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{where} has the value {text[:20]!r}, which is not a number")
    return float(text) if any(c in text for c in ".eE") else int(text)


def _parse_params(rest: str, where: str) -> dict:
    params, pos = {}, 0
    while pos < len(rest):
        m = _PAIR.match(rest, pos)
        if m is None:
            if rest[pos:].strip():
                raise ValueError(f"{where} has {rest[pos:].strip()[:30]!r} where key=value parameters belong")
            break
        pos = m.end()
        key, text = int(m.group(1)), m.group(2)
        if 0 <= key < _PARAM_IDS:
            params[key] = _value(text, f"{where} parameter {key}")
        elif -23300 - _PARAM_IDS < key <= -23300:
            items = text.split(",")
            if not items[0].isdigit() or int(items[0]) > MAX_ARRAY or int(items[0]) != len(items) - 1:
                raise ValueError(f"{where} array parameter {key} declares {items[0][:12]!r} values but holds "
                                 f"{len(items) - 1}")
            params[-23300 - key] = tuple(_value(v, f"{where} parameter {key}") for v in items[1:])
        else:
            raise ValueError(f"{where} has parameter id {key}; ncnn takes 0..{_PARAM_IDS - 1} "
                             f"(arrays -23300..{-23300 - _PARAM_IDS + 1})")
    return params


def read_param(path) -> NcnnParam:
    """Parse the ``.param`` text at ``path`` strictly (see the module docstring); a malformed file raises
    :class:`CorruptArtifact` naming the file and the line."""
    path = check_file(os.fspath(path), "ncnn")
    size = os.path.getsize(path)
    if size > MAX_PARAM_BYTES:
        raise CorruptArtifact(f"ncnn file {path} is corrupt or not an ncnn .param file: it holds {size:,} bytes, "
                              f"more than the {MAX_PARAM_BYTES:,} a network description takes.")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        return _parse(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptArtifact(f"ncnn file {path} is corrupt or not an ncnn .param file ({e}).") from e


def _parse(text: str) -> NcnnParam:
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[0].strip() != MAGIC:
        raise ValueError(f"its first line is not the magic number {MAGIC}")
    head = lines[1].split() if len(lines) > 1 else []
    if len(head) != 2 or not all(h.isdigit() for h in head):
        raise ValueError("its second line is not 'layer_count blob_count'")
    n_layers, n_blobs = int(head[0]), int(head[1])
    if n_layers > MAX_LAYERS or n_blobs > 4 * MAX_LAYERS:
        raise ValueError(f"it declares {n_layers:,} layers and {n_blobs:,} blobs, beyond {MAX_LAYERS:,} layers")
    if len(lines) - 2 != n_layers:
        raise ValueError(f"it declares {n_layers} layers but holds {len(lines) - 2} layer lines")
    layers, produced = [], set()
    for number, line in enumerate(lines[2:], start=3):
        where = f"line {number}"
        tokens = line.split(None, 4)
        if len(tokens) < 4 or not tokens[2].isdigit() or not tokens[3].isdigit():
            raise ValueError(f"{where} is not 'type name bottom_count top_count ...'")
        kind, name, nb, nt = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        if not _NAME.fullmatch(kind) or nb > _MAX_EDGES or nt > _MAX_EDGES:
            raise ValueError(f"{where} declares {nb} bottoms and {nt} tops")
        rest = line.split(None, 4 + nb + nt)
        blobs = rest[4:4 + nb + nt]
        if len(blobs) != nb + nt or any(_PAIR.fullmatch(" " + b) for b in blobs):
            raise ValueError(f"{where} ({kind} {name}) declares {nb} bottom and {nt} top blobs but names "
                             f"{len([b for b in blobs if '=' not in b])}")
        params = _parse_params(" " + rest[4 + nb + nt], where) if len(rest) > 4 + nb + nt else {}
        bottoms, tops = blobs[:nb], blobs[nb:]
        if any(t in produced for t in tops):
            raise ValueError(f"{where} ({kind} {name}) writes blob {next(t for t in tops if t in produced)}, "
                             "which an earlier layer writes")
        produced.update(tops)
        layers.append(NcnnLayer(kind, name, bottoms, tops, params))
    missing = sorted({b for layer in layers for b in layer.bottoms} - produced)
    if missing:
        raise ValueError(f"layers read blob(s) {', '.join(missing[:3])} that no layer writes")
    if len(produced) > n_blobs:
        raise ValueError(f"it declares {n_blobs} blobs but its layers write {len(produced)}")
    return NcnnParam(layers, n_blobs)


_CONVS = ("Convolution", "ConvolutionDepthWise", "Convolution1D", "Convolution3D", "ConvolutionDepthWise1D",
          "ConvolutionDepthWise3D", "Deconvolution", "DeconvolutionDepthWise", "Deconvolution1D", "Deconvolution3D",
          "DeconvolutionDepthWise1D", "DeconvolutionDepthWise3D")
# layer types holding weights this module does not count (their layout depends on several parameters)
UNCOUNTED = ("Gemm", "MultiHeadAttention", "RNN", "LSTM", "GRU", "SDPA")


def layer_weights(layer: NcnnLayer) -> int:
    """The weights and biases ``layer`` reads from the ``.bin`` (ncnn's operator parameters; 0 for a layer
    without weights, and for the types in :data:`UNCOUNTED`)."""
    t, p = layer.type, layer.get
    if t in _CONVS:
        return 0 if p(19) else _count(p(6)) + (_count(p(0)) if p(5) else 0)
    if t == "InnerProduct":
        return _count(p(2)) + (_count(p(0)) if p(1) else 0)
    if t == "BatchNorm":
        return 4 * _count(p(0))
    if t == "Scale":
        n = _count(p(0))
        return n + (n if p(1) else 0)
    if t == "PReLU":
        return _count(p(0))
    if t == "MemoryData":
        return math.prod(max(_count(p(k)), 1) for k in (0, 1, 11, 2))
    if t in ("LayerNorm", "InstanceNorm"):
        return 2 * _count(p(0)) if p(2) else 0
    if t == "GroupNorm":
        return 2 * _count(p(1)) if p(3) else 0
    if t == "RMSNorm":
        return _count(p(0)) if p(2) else 0
    if t == "Embed":
        return _count(p(3)) + (_count(p(0)) if p(2) else 0)
    return 0


def _count(v) -> int:
    return v if isinstance(v, int) and v > 0 else 0


def input_dims(layer: NcnnLayer) -> tuple[int, ...]:
    """The per-sample shape an ``Input`` layer declares (``c, d, h, w`` without the zero ones), or ()."""
    w, h, d, c = (_count(layer.get(k)) for k in (0, 1, 11, 2))
    if not w:
        return ()
    return tuple(v for v in (c, d, h) if v) + (w,)


@contextlib.contextmanager
def _stderr_lines() -> Iterator[list[str]]:
    """Collect what ncnn's C++ code writes on file descriptor 2 (its load errors) into the yielded list."""
    lines: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [ln.strip() for ln in sink.read().decode(errors="replace").splitlines() if ln.strip()]
            for ln in lines:
                log.debug("ncnn: %s", ln)


class NcnnRunner(Runner):
    """Runs a ``.ncnn.param`` (with the ``.ncnn.bin`` beside it) one sample at a time; see the module docstring."""

    runtime = "ncnn"
    suffixes = (".ncnn.param",)

    def __init__(self, path, *, threads: int | None = None, precision: str = "fp32", name: str | None = None,
                 artifact=None):
        super().__init__(name, threads=threads, artifact=artifact)
        if precision not in _PRECISIONS:
            raise ValueError(f"ncnn runs {', '.join(_PRECISIONS)}, not {precision!r}")
        self.path, self.precision = str(path), precision
        self.net = None
        self.blobs_in: list[str] = []
        self.blobs_out: list[str] = []
        self.sample_shapes: list[tuple[int, ...] | None] = []

    def activate_impl(self) -> None:
        param = read_param(self.path)
        weights = bin_path(self.path)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"ncnn file {weights} (the weights of {self.path}) does not exist.")
        if any(layer_weights(layer) for layer in param.layers):
            check_file(weights, "ncnn")
        ncnn = require("ncnn", "ncnn", "the ncnn runner")
        net = ncnn.Net()
        opt = net.opt
        opt.use_vulkan_compute = False
        half = self.precision == "fp16"
        for switch in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic"):
            setattr(opt, switch, half)
        opt.use_bf16_storage = opt.use_bf16_packed = False
        if self.threads is not None:
            opt.num_threads = self.threads
        for what, load, file in (("param", net.load_param, self.path), ("model", net.load_model, weights)):
            with _stderr_lines() as said:
                ret = load(file)
            if ret != 0:
                raise corrupt(file, "ncnn", RuntimeError(said[-1] if said else f"load_{what} returned {ret}"))
        self.net = net
        self.blobs_in = _numbered([t for layer in param.inputs() for t in layer.tops], "in")
        self.blobs_out = _numbered(param.outputs(), "out")
        art = self.artifact  # any batch: the net runs once per sample
        if art is not None and len(art.inputs) == len(self.blobs_in):
            self.input_specs = [TensorSpec(b, ("batch",) + tuple(s.shape[1:]), "float32")
                                for b, s in zip(self.blobs_in, art.inputs)]
        else:
            declared = {t: input_dims(layer) for layer in param.inputs() for t in layer.tops}
            unknown = [b for b in self.blobs_in if not declared.get(b)]
            if unknown:
                raise CorruptArtifact(f"ncnn file {self.path} declares no shape for input {unknown[0]} (its Input "
                                      "layer has no 0=w 1=h 2=c) and no artifact record gives one; open it with its "
                                      "artifact record.")
            self.input_specs = [TensorSpec(b, ("batch",) + declared[b], "float32") for b in self.blobs_in]
        self.output_names = list(self.blobs_out)
        outs = art.outputs if art is not None and len(art.outputs) == len(self.blobs_out) else ()
        self.sample_shapes = [_sample_shape(o.shape) for o in outs] or [None] * len(self.blobs_out)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(feed[s.name], dtype=np.float32) for s in self.input_specs]
        n = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        results: list[list[np.ndarray]] = [[] for _ in self.blobs_out]
        for i in range(n):
            for k, value in enumerate(self._extract([a[i] for a in arrays])):
                results[k].append(self._shaped(k, value))
        return [np.stack(r) for r in results]

    def _extract(self, sample: list[np.ndarray]) -> list[np.ndarray]:
        """One sample's outputs, copied out of ncnn. The extractor and its Mats are freed before this returns or
        raises: a traceback that kept them alive past the net's ``clear()`` would have ncnn free its pool allocator
        while they still use it, and the process crash (SIGSEGV) when they go."""
        import ncnn

        ex = self.net.create_extractor()
        mats = [ncnn.Mat(np.ascontiguousarray(a)) for a in sample]  # kept alive until extracted
        out = None
        try:
            for blob, mat in zip(self.blobs_in, mats):
                ex.input(blob, mat)
            values = []
            for blob in self.blobs_out:
                ret, out = ex.extract(blob)
                if ret != 0:
                    raise RuntimeError(f"ncnn could not compute output {blob} of {self.path} (extract returned "
                                       f"{ret})")
                values.append(np.array(out, dtype=np.float32))
            return values
        finally:
            del ex, mats, out

    def _shaped(self, k: int, value: np.ndarray) -> np.ndarray:
        shape = self.sample_shapes[k]
        if shape is None or value.shape == shape:
            return value
        if value.size != math.prod(shape):
            raise RuntimeError(f"ncnn output {self.blobs_out[k]} of {self.path} has shape {value.shape} per sample, "
                               f"but the model's output is {shape} per sample")
        return value.reshape(shape)

    def deactivate_impl(self) -> None:
        if self.net is not None:
            self.net.clear()
        self.net = None


def _sample_shape(shape) -> tuple[int, ...] | None:
    """An output shape without its batch dimension, or None when a dimension other than the batch is not fixed."""
    rest = tuple(shape[1:])
    return rest if all(isinstance(d, int) and d >= 0 for d in rest) else None


def _numbered(names: list[str], prefix: str) -> list[str]:
    """pnnx's ``in0, in1, ...`` (or ``out0, ...``) in number order; other names in file order."""
    if all(re.fullmatch(rf"{prefix}\d+", n) for n in names):
        return sorted(names, key=lambda n: int(n[len(prefix):]))
    return list(names)
