"""TensorRT engine from an ONNX file, with the TensorRT 10/11 Python API.

- Workspace: ``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`` (TensorRT 10
  removed ``max_workspace_size``).
- Precision lives in the ONNX file (:func:`precision_plan`): TensorRT 11 builds strongly typed
  networks only (``BuilderFlag.FP16`` is gone), so fp16 means an fp16 ONNX model
  (:func:`exporters.onnx.convert_onnx_to_fp16`, fp32 inputs/outputs) parsed into a strongly typed
  network. TensorRT 10 gets the same file with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``,
  so both versions build the same network. fp32 clears ``BuilderFlag.TF32`` where it exists
  (TF32 matmuls/convolutions are off by ~1e-3, far outside an fp32 tolerance of 1e-5). int8 is explicit
  quantization, also in the file: the QDQ model of ONNX Runtime's static quantizer
  (:func:`quantize_tensorrt`), parsed into a strongly typed network.
- One optimization profile per input (:func:`profile_shapes`): static models use the export
  shape; a dynamic batch gets min 1, opt N, max 2N (or ``max_batch``).
- The engine file is the plain serialized engine, loadable by ``trtexec``; metadata goes to a
  sidecar ``<engine>.json`` (:func:`sidecar_metadata`), never into the engine file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtimes.core import Artifact, ExportError, TensorSpec, check_precision, require

from .targets import ExportJob, Product, Target

__all__ = ["PrecisionPlan", "profile_shapes", "precision_plan", "sidecar_metadata", "export_tensorrt",
           "parse_version", "quantize_tensorrt", "DEFAULT_WORKSPACE", "TARGET"]

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = 1 << 30  # 1 GiB
PRECISIONS = ("fp32", "fp16", "int8")


def parse_version(version: str | Sequence[int]) -> tuple[int, int]:
    """``"10.13.0.35"`` -> ``(10, 13)``."""
    if isinstance(version, str):
        parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    else:
        parts = [int(p) for p in version[:2]]
    if not parts:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def profile_shapes(input_shape: Sequence[int | str | None], dynamic: bool = False,
                   max_batch: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(min, opt, max)`` shapes of an optimization profile for one input.

    Static: the shape three times (every dimension must be known). Dynamic batch: dimension 0 runs
    from 1 over N (the export batch, 1 if symbolic) to ``max_batch`` (default 2N); the other
    dimensions must be static.
    """
    shape = list(input_shape)
    if not shape:
        return (), (), ()
    rest = shape[1:]
    if any(not isinstance(d, int) or d < 1 for d in rest):
        raise ExportError(f"input shape {tuple(input_shape)} has a dynamic non-batch dimension; TensorRT profiles "
                          "here support a dynamic batch only.")
    batch = shape[0]
    if not dynamic:
        if not isinstance(batch, int) or batch < 1:
            raise ExportError(f"input shape {tuple(input_shape)} has a dynamic batch; build with dynamic=True.")
        static = tuple([batch] + rest)
        return static, static, static
    n = batch if isinstance(batch, int) and batch >= 1 else 1
    top = max_batch if max_batch is not None else 2 * n
    if top < n:
        raise ExportError(f"max_batch {top} is smaller than the export batch {n}.")
    return tuple([1] + rest), tuple([n] + rest), tuple([top] + rest)


@dataclass
class PrecisionPlan:
    """How a precision is obtained on a TensorRT version."""

    precision: str
    trt_version: tuple[int, int]
    onnx_fp16: bool  # convert the ONNX model to fp16 (fp32 I/O) before parsing
    strongly_typed_flag: bool  # pass 1 << STRONGLY_TYPED to create_network (TensorRT 10)
    clear_flags: list[str] = field(default_factory=list)  # BuilderFlag names to clear when present
    set_flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trt_version"] = list(self.trt_version)
        return d


def precision_plan(precision: str, trt_version: str | Sequence[int]) -> PrecisionPlan:
    """What to do for ``precision`` ("fp32", "fp16" or "int8") on TensorRT ``trt_version`` (>= 10)."""
    check_precision(precision, PRECISIONS, fmt="TensorRT")
    version = parse_version(trt_version)
    if version[0] < 10:
        raise ExportError(f"TensorRT {version[0]}.{version[1]} is not supported; this exporter uses the TensorRT "
                          f"10/11 API (set_memory_pool_limit, tensor-name I/O); install tensorrt>=10.")
    strongly_typed_flag = version[0] == 10  # TensorRT 11: always strongly typed, the flag is deprecated
    if precision == "fp32":
        return PrecisionPlan(precision, version, onnx_fp16=False, strongly_typed_flag=strongly_typed_flag,
                             clear_flags=["TF32"],
                             notes=["fp32 ONNX, strongly typed; TF32 disabled so fp32 layers stay IEEE fp32"])
    if precision == "int8":
        return PrecisionPlan(precision, version, onnx_fp16=False, strongly_typed_flag=strongly_typed_flag,
                             clear_flags=["TF32"],
                             notes=["int8 lives in the ONNX file: QuantizeLinear/DequantizeLinear pairs from ONNX "
                                    "Runtime's static quantizer (explicit quantization), parsed into a strongly typed "
                                    "network; layers without Q/DQ stay fp32"])
    return PrecisionPlan(precision, version, onnx_fp16=True, strongly_typed_flag=strongly_typed_flag,
                         notes=["fp16 lives in the ONNX file (fp16 weights/activations, fp32 I/O casts); "
                                + ("BuilderFlag.FP16 no longer exists in TensorRT 11" if version[0] >= 11 else
                                   "strongly typed in TensorRT 10 too, so both versions build the same network")])


def sidecar_metadata(*, engine_path: str, onnx_path: str, inputs: Sequence[TensorSpec],
                     outputs: Sequence[TensorSpec], precision: str, profiles: dict[str, Sequence[Sequence[int]]],
                     plan: PrecisionPlan, trt_version: str, workspace_bytes: int, device: str | None = None,
                     dynamic: bool = False) -> dict[str, Any]:
    """The JSON written next to the engine (``<engine>.json``); the engine file stays standard."""
    return {
        "format": "tensorrt",
        "engine": os.fspath(engine_path),
        "onnx": os.fspath(onnx_path),
        "precision": precision,
        "dynamic_batch": dynamic,
        "tensorrt_version": trt_version,
        "device": device,
        "workspace_bytes": int(workspace_bytes),
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "profiles": {name: {"min": list(p[0]), "opt": list(p[1]), "max": list(p[2])} for name, p in profiles.items()},
        "precision_plan": plan.to_dict(),
    }


def _parse_errors(parser) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        op = getattr(err, "node_operator", lambda: "")()
        errors.append(f"{op + ': ' if op else ''}{err.desc() if hasattr(err, 'desc') else err}")
    return errors


def export_tensorrt(source: Artifact | str | os.PathLike, path, *, precision: str = "fp32",
                    dynamic: bool | None = None, max_batch: int | None = None,
                    workspace_bytes: int = DEFAULT_WORKSPACE) -> Artifact:
    """Build a TensorRT engine at ``path`` from an fp32 ONNX artifact or file; see the module docstring.

    Needs the ``tensorrt`` package and a CUDA GPU; without either it raises
    :class:`MissingDependency` saying which.
    """
    check_precision(precision, PRECISIONS, fmt="TensorRT")
    trt = require("tensorrt", "tensorrt", "building TensorRT engines")
    from runtimes.tensorrt_runner import require_cuda

    require_cuda("building TensorRT engines")
    import torch

    from .onnx import convert_onnx_to_fp16, describe_onnx

    onnx_art = source if isinstance(source, Artifact) else describe_onnx(source)
    wanted = "int8" if precision == "int8" else "fp32"  # int8: a QDQ file (quantize_tensorrt makes it)
    if onnx_art.format != "onnx" or onnx_art.precision != wanted:
        raise ExportError(f"TensorRT {precision} export expects an {wanted} ONNX artifact, got {onnx_art.format} "
                          f"{onnx_art.precision} {onnx_art.path}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = precision_plan(precision, trt.__version__)
    parsed = onnx_art
    if plan.onnx_fp16:
        parsed = convert_onnx_to_fp16(onnx_art, path.with_suffix(".fp16.onnx"))
    if dynamic is None:
        dynamic = any(isinstance(s.shape[0], str) or s.shape[0] is None for s in onnx_art.inputs if s.shape)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(parsed.path):
        errors = _parse_errors(parser)
        raise ExportError(f"TensorRT cannot express {parsed.path}: {errors[0] if errors else 'the ONNX parser failed'}"
                          + (f" (and {len(errors) - 1} more error(s))." if len(errors) > 1 else "."))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for name in plan.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    for name in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    profiles = {}
    for spec in parsed.inputs:
        shapes = profile_shapes(spec.shape, dynamic, max_batch)
        profile.set_shape(spec.name, *shapes)
        profiles[spec.name] = shapes
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {parsed.path} (see the TensorRT log above).")
    for stale in (path, Path(str(path) + ".json")):
        if stale.exists():
            stale.unlink()
    with open(path, "wb") as f:
        f.write(bytes(serialized))
    device = torch.cuda.get_device_name(0)
    meta = sidecar_metadata(engine_path=os.fspath(path), onnx_path=parsed.path, inputs=onnx_art.inputs,
                            outputs=onnx_art.outputs, precision=precision, profiles=profiles, plan=plan,
                            trt_version=trt.__version__, workspace_bytes=workspace_bytes, device=device,
                            dynamic=dynamic)
    with open(str(path) + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    art = Artifact(os.fspath(path), "tensorrt", list(onnx_art.inputs), list(onnx_art.outputs), precision,
                   parent=parsed.path, metadata={"sidecar": str(path) + ".json", **meta})
    for note in plan.notes:
        art.note(note)
    log.info("built %s (%s, TensorRT %s, %s)", path, precision, trt.__version__, device)
    return art


def _export_target(job: ExportJob) -> list[Product]:
    art = export_tensorrt(job.source, job.folder / "model.engine", precision=job.precision, dynamic=job.dynamic)
    sidecar = Path(art.path + ".json")
    if sidecar.exists():  # paths in the sidecar relative to the run directory, like the run's record
        root = str(job.folder.resolve()) + os.sep
        data = json.loads(sidecar.read_text())
        data = {k: v[len(root):] if isinstance(v, str) and v.startswith(root) else v for k, v in data.items()}
        sidecar.write_text(json.dumps(data, indent=2))
    return [Product("tensorrt", art)]


def quantize_tensorrt(src: Artifact, path, options, module=None, args=None) -> Artifact:
    """An INT8 engine at ``path`` beside the fp32 engine ``src``: the fp32 ONNX file it was built from is quantized
    with ONNX Runtime's static QDQ quantizer (``exporters.onnx_int8``, the same calibration and choices as the
    ``onnx-int8`` stage) into ``<path stem>.qdq.onnx``, which TensorRT parses as an explicitly quantized network."""
    from .onnx_int8 import quantize_onnx

    onnx_path = src.metadata.get("onnx") or src.parent
    if not onnx_path or not str(onnx_path).endswith(".onnx"):
        raise ExportError(f"the TensorRT engine {src.path} does not record the ONNX file it was built from; "
                          "rebuild it with deploy convert.")
    qdq = quantize_onnx(onnx_path, _qdq_path(path), options)
    return export_tensorrt(qdq, path, precision="int8", dynamic=bool(src.metadata.get("dynamic_batch")))


def _qdq_path(engine) -> Path:
    return Path(engine).with_suffix(".qdq.onnx")


def _files(art: Artifact) -> list[str]:
    extra = [art.path + ".json", os.fspath(_qdq_path(art.path))]
    return [art.path] + [f for f in extra if os.path.exists(f)]


def _check_cuda(purpose: str) -> None:
    from runtimes.tensorrt_runner import require_cuda

    require_cuda(purpose)


TARGET = Target(
    name="tensorrt", title="TensorRT", runtime="tensorrt", suffixes=(".engine", ".plan", ".trt"), source="onnx",
    export=_export_target, function="exporters.tensorrt:export_tensorrt",
    runner="runtimes.tensorrt_runner:TensorRTRunner", requires=(("tensorrt", "tensorrt"),), files=_files,
    check=_check_cuda, device="cuda", precisions=PRECISIONS, quantize="exporters.tensorrt:quantize_tensorrt",
    description="TensorRT engine built from the ONNX file (GPU only)",
)
