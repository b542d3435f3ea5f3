"""Core ML: an ``.mlpackage`` (an ML Program) run by Apple's Core ML framework through coremltools, on macOS only.

Core ML itself is part of macOS and iOS; coremltools installs on Linux but cannot run a model there (its
``libcoremlpython`` binding is built for macOS alone). On Linux the runner refuses in one sentence; the
package can still be read: :func:`load_spec` parses its model description (a protobuf, safe to parse: it
holds no code) for the input and output specs and the program's operations (:func:`operations`), which
is what ``exporters.coreml`` checks an export with and ``deploy inspect`` reads.

A package is a folder: ``Manifest.json`` names the root model file (``Data/com.apple.CoreML/model.mlmodel``)
and the weights (``weights/weight.bin``, read by Core ML, never by this module).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .base import Runner, corrupt
from .core import CorruptArtifact, MissingDependency, TensorSpec, require

__all__ = ["CoreMLRunner", "load_spec", "feature_specs", "operations", "package_files", "quiet_coremltools",
           "not_run_here", "COMPUTE_UNITS", "FEATURE_DTYPES", "MIL_DTYPES"]

log = logging.getLogger(__name__)

# Core ML's compute units, by the short name the runner takes
COMPUTE_UNITS = {"cpu": "CPU_ONLY", "cpu_gpu": "CPU_AND_GPU", "cpu_ne": "CPU_AND_NE", "all": "ALL"}
# FeatureTypes.ArrayFeatureType.ArrayDataType (model inputs and outputs) -> numpy dtype names
FEATURE_DTYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32", 131080: "int8"}
# MIL.DataType (tensors inside the program) -> numpy dtype names (others keep MIL's own name)
MIL_DTYPES = {1: "bool", 10: "float16", 11: "float32", 12: "float64", 13: "bfloat16", 21: "int8", 22: "int16",
              23: "int32", 24: "int64", 31: "uint8", 32: "uint16", 33: "uint32", 34: "uint64"}


def not_run_here() -> str:
    """Why a Core ML model cannot run on this machine ("" on macOS)."""
    if sys.platform == "darwin":
        return ""
    return "coremltools runs Core ML models on macOS only; its spec was checked against the plain model"


class _Forward(logging.Handler):
    """Sends coremltools' log records to this module's debug log, keeping its warnings."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        if record.levelno >= logging.WARNING and message:
            self.warnings.append(message)
        log.debug("coremltools: %s", message)


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[list[str]]:
    """While the block runs, coremltools' log records (its version warnings, "Failed to load _MLModelProxy" on
    Linux), its Python warnings and its tqdm progress bars (written on ``sys.stderr``) go to the debug log;
    the list of its logged warnings is yielded. Logging and streams are restored afterwards."""
    logger = logging.getLogger("coremltools")
    saved = logger.handlers[:], logger.propagate, logger.level
    forward = _Forward()
    logger.handlers, logger.propagate = [forward], False
    logger.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.INFO)
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) \
                as caught:
            warnings.simplefilter("default")
            yield forward.warnings
        for w in caught:  # its own deprecation warnings (_TORCH_OPS_REGISTRY.__contains__ ...)
            log.debug("coremltools: %s: %s", w.category.__name__, w.message)
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
        text = "\n".join(ln.rstrip() for ln in out.getvalue().replace("\r", "\n").splitlines() if ln.strip())
        if text:
            log.debug("coremltools output:\n%s", text)


def _proto():
    """coremltools' protobuf modules (importing coremltools quietly)."""
    with quiet_coremltools():
        require("coremltools", "coreml", "reading Core ML packages")
        from coremltools.proto import Model_pb2

    return Model_pb2


def _root_model(package: Path) -> Path:
    """The model description file a package's ``Manifest.json`` names, checked to lie inside the package."""
    manifest = package / "Manifest.json"
    if not manifest.is_file():
        raise ValueError("it has no Manifest.json")
    with open(manifest) as f:
        data = json.load(f)
    entries, root = data.get("itemInfoEntries"), data.get("rootModelIdentifier")
    if not isinstance(entries, dict) or root not in entries or not isinstance(entries[root].get("path"), str):
        raise ValueError("its Manifest.json names no root model")
    data_dir = (package / "Data").resolve()
    model = (data_dir / entries[root]["path"]).resolve()
    if data_dir not in model.parents:
        raise ValueError(f"its Manifest.json points outside the package ({entries[root]['path']})")
    if not model.is_file():
        raise ValueError(f"its root model {entries[root]['path']} is missing")
    return model


def load_spec(path: str | os.PathLike):
    """The model description (``Model_pb2.Model``) of an ``.mlpackage`` folder (or a bare ``.mlmodel`` file),
    parsed from its protobuf; :class:`CorruptArtifact` names the package when it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Core ML package {p} does not exist.")
    Model_pb2 = _proto()
    try:
        model_file = _root_model(p) if p.is_dir() else p
        data = model_file.read_bytes()
        if not data:
            raise ValueError("its model description is empty")
        spec = Model_pb2.Model()
        spec.ParseFromString(data)
        if not spec.HasField("description"):
            raise ValueError("its model description has no inputs or outputs")
    except Exception as e:  # OSError, ValueError, protobuf's DecodeError
        raise corrupt(os.fspath(p), "Core ML", e) from e
    return spec


def _feature(f) -> TensorSpec:
    kind = f.type.WhichOneof("Type")
    if kind != "multiArrayType":
        return TensorSpec(f.name, (), "float32" if kind is None else kind)
    t = f.type.multiArrayType
    shape: list[int | None] = [int(d) for d in t.shape]
    if t.WhichOneof("ShapeFlexibility") == "shapeRange":
        shape = [int(r.lowerBound) if r.lowerBound == r.upperBound else None for r in t.shapeRange.sizeRanges]
    elif t.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
        shape = [None] * len(shape)
    dtype = FEATURE_DTYPES.get(int(t.dataType))
    if dtype is None:
        raise CorruptArtifact(f"Core ML feature {f.name!r} has array data type {t.dataType}, which is not known")
    return TensorSpec(f.name, tuple(shape), dtype)


def feature_specs(spec) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs a model description declares (name, shape, dtype)."""
    return [_feature(f) for f in spec.description.input], [_feature(f) for f in spec.description.output]


def operations(spec, function: str = "main") -> Iterator:
    """Every operation of the ML Program's ``function``, also those in nested blocks (``cond``, ``while_loop``),
    in program order. Raises ``ValueError`` for a model that is not an ML Program."""
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"it is a {spec.WhichOneof('Type')} model, not an ML Program")
    functions = spec.mlProgram.functions
    if function not in functions:
        raise ValueError(f"its ML Program has no function {function!r} (it has {', '.join(functions) or 'none'})")
    f = functions[function]
    block = f.block_specializations[f.opset] if f.opset in f.block_specializations else \
        next(iter(f.block_specializations.values()))

    def walk(b):
        for op in b.operations:
            yield op
            for inner in op.blocks:
                yield from walk(inner)

    return walk(block)


def package_files(path: str | os.PathLike) -> list[str]:
    """The regular files of a package folder, sorted (``Manifest.json`` first); a plain file is itself."""
    p = Path(path)
    if not p.is_dir():
        return [os.fspath(p)]
    files = sorted(os.fspath(f) for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    manifest = os.fspath(p / "Manifest.json")
    return ([manifest] if manifest in files else []) + [f for f in files if f != manifest]


class CoreMLRunner(Runner):
    """Runs an ``.mlpackage`` with Core ML (macOS only).

    ``compute_units``: ``"cpu"`` (the default: verification compares fp32 math), ``"cpu_gpu"``, ``"cpu_ne"``
    (the Neural Engine, fp16) or ``"all"``. Core ML chooses its own threads: ``threads`` is noted, not applied.
    """

    runtime = "coreml"
    suffixes = (".mlpackage",)

    def __init__(self, path, *, compute_units: str = "cpu", threads: int | None = None, name: str | None = None,
                 artifact=None):
        super().__init__(name, threads=threads, artifact=artifact)
        if compute_units not in COMPUTE_UNITS:
            raise ValueError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
        self.path, self.compute_units = os.fspath(path), compute_units
        self.model = None

    def activate_impl(self) -> None:
        if not_run_here():
            raise MissingDependency(f"cannot run Core ML package {self.path} on {sys.platform}: Core ML is part of "
                                    "macOS and coremltools cannot run a model elsewhere; run it on a Mac.")
        spec = load_spec(self.path)
        inputs, outputs = feature_specs(spec)
        with quiet_coremltools():
            ct = require("coremltools", "coreml", "the Core ML runner")
        if self.threads is not None:
            log.info("Core ML chooses its own threads; threads=%d is not applied", self.threads)
        try:
            with quiet_coremltools():
                self.model = ct.models.MLModel(self.path, compute_units=getattr(ct.ComputeUnit,
                                                                                COMPUTE_UNITS[self.compute_units]))
        except Exception as e:
            raise corrupt(self.path, "Core ML", e) from e
        self.input_specs = inputs
        self.output_names = [o.name for o in outputs]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.model.predict({s.name: np.ascontiguousarray(feed[s.name]) for s in self.input_specs})
        return [np.asarray(result[n]) for n in self.output_names]

    def deactivate_impl(self) -> None:
        self.model = None
