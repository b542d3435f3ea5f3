"""The deploy pipeline as library functions: ``convert`` a model into verified artifacts, ``verify`` a run.

``convert`` runs: load (``deploy.sources``) → capture + passes (``fusers.reparameterize``) → the
plain model saved as ``model.deploy.pt2`` (torch.export) → exporters (ONNX, simplified ONNX,
OpenVINO, TFLite, TensorRT) → verification of every stage → ``report.json`` / ``report.md``.

Verification compares every artifact, run on its own runtime, with the training model's outputs:
on seeded random inputs at the export shape, and on real samples when there are any (``--inputs``
or the samples shipped with a zoo model). The training model's outputs are recorded in the run's
``verify/`` folder, so ``verify(out_dir)`` re-runs exactly the same checks later from the files
alone, and ``convert`` itself verifies through that same function. When the samples carry
``labels`` the report adds task numbers: accuracy of every stage and its prediction agreement with
the training model (required to be 100 % for fp32 stages).

Everything is written into a temporary sibling of the output directory and moved into place at
the end; on an error nothing is left behind. An export that fails is recorded as a failed stage
(its partial files removed) and the other targets go on; ``ConvertResult.passed`` is False.

Library code logs (``logging``); progress messages go to the optional ``progress`` callback, which
the command line prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import fusers
from exporters.base import Artifact, DeployError, MissingDependency, TensorSpec, first_line, require

from . import sources
from .sources import LoadedModel

__all__ = ["ConvertOptions", "ConvertResult", "StageRecord", "VerifyResult", "PipelineError", "convert", "verify",
           "plan_out_dir", "load_report", "load_arguments", "versions", "DEFAULT_TARGETS", "TARGETS", "REPORT_NAME"]

log = logging.getLogger(__name__)

TARGETS = ("onnx", "openvino", "tflite", "tensorrt")
DEFAULT_TARGETS = ("onnx", "openvino", "tflite")
PRECISIONS = ("fp32", "fp16")
REPORT_NAME = "report.json"
TOOL = "reparam-deploy"
PT2 = "model.deploy.pt2"
_NEEDS = {  # target -> (module, pip extra) it cannot run without
    "onnx": [("onnx", "onnx"), ("onnxscript", "onnx"), ("onnxruntime", "onnx"), ("onnxsim", "onnx")],
    "openvino": [("openvino", "openvino")],
    "tflite": [("litert_torch", "tflite"), ("ai_edge_litert", "tflite")],
    "tensorrt": [("tensorrt", "tensorrt")],
}
_VERSIONS = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxsim", "openvino", "litert-torch",
             "ai-edge-litert", "tensorrt", "timm", "torchvision")

Progress = Callable[[str], None]


class PipelineError(DeployError):
    """A run cannot start or go on; the message names the problem and the fix."""


@dataclass
class ConvertOptions:
    """What ``deploy convert`` takes; see ``deploy convert --help``."""

    model: str = sources.DEFAULT_MODEL
    checkpoint: str | None = None
    checkpoint_key: str | None = None
    code_path: Sequence[str] = ()
    num_classes: int | None = None
    width: float | None = None
    input_shape: tuple[int, ...] | None = None
    targets: Sequence[str] = DEFAULT_TARGETS
    precision: str = "fp32"
    dynamic: bool = False
    passes: Sequence[str] | None = None
    inputs: str | None = None
    rtol: float | None = None
    atol: float = 0.0
    out: str | None = None
    force: bool = False
    allow_train_mode: bool = False
    seed: int = 0
    opset: int = 18
    command: str | None = None  # the command line, for the report


@dataclass
class StageRecord:
    """One stage of a run: how it was made and how it verified."""

    name: str
    format: str
    path: str | None = None  # relative to the output directory
    files: list[str] = field(default_factory=list)
    parent: str | None = None
    precision: str = "fp32"
    size: int = 0
    sha256: dict[str, str] = field(default_factory=dict)
    export_seconds: float | None = None
    artifact: dict | None = None
    notes: list[str] = field(default_factory=list)
    error: str = ""  # the export (or the run) failed
    # verification
    passed: bool = False
    blame: str | None = None
    reason: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    parent_max_rel: float | None = None
    samples_max_rel: float | None = None
    accuracy: float | None = None
    agreement: float | None = None
    changed: bool = False  # verify: a file's sha256 differs from the recorded one
    verify_seconds: float | None = None
    checks: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StageRecord:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class VerifyResult:
    """Verification of the stages of a run directory."""

    out_dir: str
    stages: list[StageRecord]
    tolerance: dict
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages)

    @property
    def failed(self) -> list[StageRecord]:
        return [s for s in self.stages if not s.passed]


@dataclass
class ConvertResult:
    out_dir: str
    report: dict
    stages: list[StageRecord]

    @property
    def passed(self) -> bool:
        return self.report["passed"]

    @property
    def failed(self) -> list[StageRecord]:
        return [s for s in self.stages if not s.passed]


# ------------------------------------------------------------------------------------------- helpers

def _noop(_: str) -> None:
    pass


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (None when not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0], "reparam-deploy": None}
    for name in ("reparam-deploy",) + _VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _check_targets(targets: Sequence[str], precision: str) -> list[str]:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise PipelineError(f"unknown target(s) {', '.join(unknown)}; known targets: {', '.join(TARGETS)} "
                            "(or none)")
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    for t in targets:
        for module, extra in _NEEDS[t] + (_NEEDS["onnx"] if t in ("openvino", "tensorrt") else []):
            try:
                require(module, extra, f"the {t} target")
            except MissingDependency as e:
                raise PipelineError(f"{str(e).rstrip('.')}, or drop {t} from --targets") from e
        if t == "tensorrt":
            from runtimes.tensorrt_runner import require_cuda

            try:
                require_cuda("the tensorrt target")
            except MissingDependency as e:
                raise PipelineError(f"{str(e).rstrip('.')}; drop tensorrt from --targets on this machine") from e
    order = [t for t in TARGETS if t in targets]
    if ("openvino" in order or "tensorrt" in order) and "onnx" not in order:
        order.insert(0, "onnx")  # both are built from the ONNX file
    return order


def _check_passes(passes):
    try:
        fusers.reparam.resolve_passes(passes)
    except ValueError as e:
        raise PipelineError(f"{e}; fix --passes ('default' expands to {','.join(fusers.DEFAULT_PASSES)})") from e


def _is_run_dir(path: Path) -> bool:
    try:
        with open(path / REPORT_NAME) as f:
            return json.load(f).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def plan_out_dir(out: str | None, model_name: str, force: bool) -> tuple[Path, bool]:
    """The output directory and whether an existing one will be replaced.

    Without ``out`` the run goes to ``runs/<model>`` and replaces a previous run there. An
    explicit ``out`` that exists needs ``force``. A non-empty directory that holds no deploy
    report is never replaced.
    """
    default = out is None
    path = Path(out) if out is not None else Path("runs") / model_name
    if not path.exists():
        return path, False
    if not path.is_dir():
        raise PipelineError(f"output path {path} exists and is not a directory; choose another --out")
    empty = not any(path.iterdir())
    if not empty and not _is_run_dir(path):
        raise PipelineError(f"output directory {path} exists and was not written by deploy (no {REPORT_NAME}); "
                            "refusing to replace it, even with --force: choose another --out")
    if not (default or force or empty):
        raise PipelineError(f"output directory {path} already exists; pass --force to replace it or choose another "
                            "--out")
    return path, True


def _read_samples(path: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """Real inputs from an ``.npz``: one input array ``(N, ...)`` plus optional integer ``labels`` ``(N,)``."""
    if not os.path.isfile(path):
        raise PipelineError(f"--inputs file {path} does not exist; pass an .npz holding the input array "
                            "(and optionally 'labels')")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise PipelineError(f"--inputs file {path} is not a readable .npz ({first_line(e)}); save it with "
                            "numpy.savez(path, input0=images, labels=labels)") from e
    labels = arrays.pop("labels", None)
    if len(arrays) != 1:
        raise PipelineError(f"--inputs file {path} holds {len(arrays)} input arrays ({', '.join(arrays)}); the model "
                            "has one input: save one array (and optionally 'labels')")
    (name, x), = arrays.items()
    if len(x) == 0:
        raise PipelineError(f"--inputs array {name!r} in {path} holds no samples; save at least one")
    if x.ndim != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:]):
        raise PipelineError(f"--inputs array {name!r} has shape {tuple(x.shape)} but the model input is "
                            f"{','.join(map(str, shape))}; samples must be (N, {', '.join(map(str, shape[1:]))})")
    if labels is not None and (labels.shape != (len(x),) or labels.dtype.kind not in "iu"):
        raise PipelineError(f"--inputs 'labels' must be {len(x)} integer class indices, got shape "
                            f"{tuple(labels.shape)} dtype {labels.dtype}")
    return np.ascontiguousarray(x.astype(np.float32)), labels


@contextlib.contextmanager
def _forward_logs(logger_name: str, progress: Progress):
    """Forward INFO records of ``logger_name`` (e.g. each pass of the pass manager) to ``progress``."""

    logger = logging.getLogger(logger_name)
    level, propagate, effective = logger.level, logger.propagate, logger.getEffectiveLevel()

    class _Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if ": 0 rewrites, 0 refused, 0 rolled back" not in message:
                progress(message)
            if not logger.propagate and record.levelno >= effective and logger.parent is not None:
                logger.parent.handle(record)  # what the caller's logging would have shown anyway

    handler = _Handler(logging.INFO)
    logger.addHandler(handler)
    if effective > logging.INFO:  # records below the caller's level go to progress only
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _relativize(obj, root: str):
    """Every string under ``root`` in a JSON-like object, made relative to it."""
    if isinstance(obj, str):
        return os.path.relpath(obj, root) if obj.startswith(root + os.sep) else obj
    if isinstance(obj, dict):
        return {k: _relativize(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_relativize(v, root) for v in obj]
    return obj


def _files_of(art: Artifact) -> list[str]:
    files = [art.path]
    if art.format == "openvino":
        files.append(str(Path(art.path).with_suffix(".bin")))
    if art.format == "tensorrt" and os.path.exists(art.path + ".json"):
        files.append(art.path + ".json")
    return files


def _fill_files(stage: StageRecord, root: Path, files: Sequence[str]) -> None:
    stage.files = [os.path.relpath(f, root) for f in files]
    stage.path = stage.files[0]
    stage.size = sum(os.path.getsize(root / f) for f in stage.files)
    stage.sha256 = {f: sources.sha256(root / f) for f in stage.files}


def _output_leaves(module, args) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        return [t for t in pytree.tree_leaves(module(*args)) if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------------------------------ verification

def _batch_of(stage: StageRecord, n: int) -> int:
    art = stage.artifact or {}
    shape = (art.get("inputs") or [{}])[0].get("shape") or [None]
    return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else n


def run_batched(runner, x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Run ``runner`` on the rows of ``x`` in chunks of ``batch`` (the last one padded); outputs concatenated."""
    chunks: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        k = len(part)
        if k < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - k, axis=0)])
        outs = list(runner.infer([np.ascontiguousarray(part)]).values())
        chunks.append([o[:k] if o.ndim and o.shape[0] == batch else o for o in outs])
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def _open(stage: StageRecord, root: Path):
    from runtimes import open_runner

    art = Artifact.from_dict(_absolute(stage.artifact, root))
    kwargs = {"precision": stage.precision} if stage.format == "openvino" else {}
    if stage.format == "pt2":
        kwargs["threads"] = _torch_threads(art.inputs[0].concrete_shape(1) if art.inputs else ())
    return open_runner(art, **kwargs)


def _torch_threads(shape) -> int | None:
    """One thread for small inputs: many small calls gain nothing from torch's thread pool but its
    synchronization, which on a busy machine costs more than the work."""
    import math

    return 1 if shape and math.prod(shape) < 100_000 else None


def _absolute(d: dict, root: Path) -> dict:
    d = dict(d)
    d["path"] = str(root / d["path"])
    if d.get("parent"):
        d["parent"] = str(root / d["parent"])
    return d


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _tolerance(precision: str, rtol: float | None, atol: float):
    from runtimes import Tolerance

    tol = Tolerance.for_precision(precision)
    if rtol is not None:
        tol.rtol = rtol
    tol.atol = atol
    return tol


def _verify_stages(root: Path, stages: list[StageRecord], rtol: float | None, atol: float,
                   progress: Progress) -> None:
    """Verify ``stages`` (the first one the recorded training reference) from the files in ``root``, in place."""
    from runtimes import Stage, verify_chain

    vdir = root / "verify"
    inputs = _load_npz(vdir / "inputs.npz")
    reference = list(_load_npz(vdir / "reference.npz").values())
    samples = _load_npz(vdir / "samples.npz") if (vdir / "samples.npz").exists() else None
    samples_ref = list(_load_npz(vdir / "samples_reference.npz").values()) if samples else None
    labels = samples.pop("labels", None) if samples else None
    x_samples = next(iter(samples.values())) if samples else None

    training, rest = stages[0], [s for s in stages[1:] if not s.error]
    runners, failed_open = {}, {}
    for s in rest:
        try:
            runners[s.name] = _open(s, root).activate()
        except Exception as e:  # a corrupt or missing file is this stage's failure, not the run's
            failed_open[s.name] = e
    outs_samples: dict[str, list[np.ndarray]] = {}

    def call(s: StageRecord, on_samples: bool):
        def run(feed):
            if s.name in failed_open:
                raise failed_open[s.name]
            start = time.perf_counter()
            if on_samples:
                outs = run_batched(runners[s.name], x_samples, _batch_of(s, len(x_samples)))
                outs_samples[s.name] = outs
            else:
                progress(f"verifying {s.name} ({s.path})")
                outs = list(runners[s.name].infer(list(feed.values())).values())
            s.verify_seconds = (s.verify_seconds or 0.0) + time.perf_counter() - start
            return outs
        return run

    def tol(s):
        precision = s.precision
        runner = runners.get(s.name)
        if getattr(runner, "effective_precision", None) == "bf16" and rtol is None:
            precision = "bf16"
            note = "OpenVINO ran the f16 hint in bf16 on this CPU (no native fp16); bf16 tolerance used"
            if note not in s.notes:
                s.notes.append(note)
        return _tolerance(precision, rtol, atol)

    by_name = {s.name: s for s in stages}
    included = {training.name} | {s.name for s in rest}

    def parent(s: StageRecord) -> str:  # the nearest ancestor that is verified too
        p = s.parent
        while p is not None and p not in included:
            p = by_name[p].parent if p in by_name else None
        return p or training.name

    try:
        chain = [Stage(training.name, lambda feed: reference)] + [
            Stage(s.name, call(s, False), parent(s), s.precision, tol(s)) for s in rest]
        seeded = verify_chain(chain, inputs)
        on_samples = None
        if samples is not None:
            chain = [Stage(training.name, lambda feed: samples_ref)] + [
                Stage(s.name, call(s, True), parent(s), s.precision, tol(s)) for s in rest]
            on_samples = verify_chain(chain, {"input0": x_samples})
    finally:
        for r in runners.values():
            r.deactivate()

    ref_pred = np.argmax(samples_ref[0], axis=1) if labels is not None and samples_ref[0].ndim == 2 else None
    training.passed, training.reason = True, "reference"
    if ref_pred is not None:
        training.accuracy = float(np.mean(ref_pred == labels))
        training.agreement = 1.0
    for s in rest:
        res = seeded[s.name]
        s.checks = {"seeded": res.to_dict()}
        s.blame, reasons = res.blame, []
        if res.error:
            reasons.append(res.error)
        elif res.vs_reference is not None:
            vr = res.vs_reference
            s.max_abs, s.max_rel = vr.max_abs, vr.max_rel
            s.cosine = min((o.cosine for o in vr.outputs), default=None)
            s.parent_max_rel = res.vs_parent.max_rel if res.vs_parent else None
            if not vr.passed:
                reasons.append(f"seeded inputs: {vr.summary()}")
        ok = res.passed
        if on_samples is not None and not res.error:
            sres = on_samples[s.name]
            s.checks["samples"] = sres.to_dict()
            if sres.error:
                reasons.append(f"samples: {sres.error}")
            elif sres.vs_reference is not None:
                s.samples_max_rel = sres.vs_reference.max_rel
                if not sres.vs_reference.passed:
                    reasons.append(f"samples: {sres.vs_reference.summary()}")
            ok = ok and sres.passed
            if ref_pred is not None and s.name in outs_samples:
                pred = np.argmax(outs_samples[s.name][0], axis=1)
                s.accuracy = float(np.mean(pred == labels))
                s.agreement = float(np.mean(pred == ref_pred))
                if s.precision == "fp32" and s.agreement < 1.0:
                    ok = False
                    reasons.append(f"fp32 predictions differ from the training model on "
                                   f"{int(np.sum(pred != ref_pred))} of {len(pred)} samples")
        s.passed, s.reason = ok and not reasons, "; ".join(reasons)
        log.info("stage %s: %s", s.name, "pass" if s.passed else f"FAIL: {s.reason}")


# ------------------------------------------------------------------------------------------ convert

def _export_stages(targets: list[str], plain, args, root: Path, opts: ConvertOptions, timings: dict,
                   progress: Progress) -> list[tuple[StageRecord, Artifact | None]]:
    """Run the exporters; a failing one becomes a failed stage and its partial files are removed."""
    from exporters import export
    from exporters.onnx import convert_onnx_to_fp16, describe_onnx

    made: list[tuple[StageRecord, Artifact | None]] = []
    onnx_art: Artifact | None = None
    onnx_stage = None

    def attempt(name: str, fmt: str, parent: str | None, precision: str, fn) -> list[Artifact]:
        before = set(root.iterdir())
        progress(f"exporting {name} ({precision}) ...")
        start = time.perf_counter()
        try:
            arts = fn()
        except Exception as e:
            for p in set(root.iterdir()) - before:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            msg = first_line(e) if isinstance(e, DeployError) else f"{type(e).__name__}: {first_line(e)}"
            if not isinstance(e, MissingDependency):
                msg = f"{msg.rstrip('.')}; drop {name} from --targets or change the model"
            log.debug("export %s failed", name, exc_info=True)
            progress(f"export {name} FAILED: {msg}")
            made.append((StageRecord(name, fmt, parent=parent, precision=precision, error=msg, reason=msg,
                                     export_seconds=time.perf_counter() - start), None))
            return []
        seconds = time.perf_counter() - start
        timings[f"export {name}"] = seconds
        progress(f"exported {name} in {seconds:.1f} s")
        return arts

    if "onnx" in targets:
        def onnx():
            art = export("onnx", plain, root / "model.onnx", args=args, dynamic=opts.dynamic, opset=opts.opset)
            sim = root / "model.sim.onnx"
            if art.parent is None and sim.exists():
                sim.unlink()  # onnxsim's rejected result: the note in the record says why
            return [describe_onnx(art.parent, precision="fp32"), art] if art.parent else [art]

        arts = attempt("onnx", "onnx", "pt2", "fp32", onnx)
        for i, art in enumerate(arts):
            name = "onnx" if i == 0 else "onnx-simplified"
            made.append((StageRecord(name, "onnx", parent="pt2" if i == 0 else "onnx", precision="fp32",
                                     export_seconds=timings.get("export onnx") if i == 0 else None), art))
        if arts:
            onnx_art, onnx_stage = arts[-1], made[-1][0].name
        if arts and opts.precision == "fp16":
            fp16 = attempt("onnx-fp16", "onnx", onnx_stage, "fp16",
                           lambda: [convert_onnx_to_fp16(onnx_art, root / "model.fp16.onnx")])
            for art in fp16:
                made.append((StageRecord("onnx-fp16", "onnx", parent=onnx_stage, precision="fp16",
                                         export_seconds=timings.get("export onnx-fp16")), art))
    for target in targets:
        if target == "onnx":
            continue
        parent = "pt2" if target == "tflite" else onnx_stage
        if target in ("openvino", "tensorrt") and onnx_art is None:
            msg = "not exported: its source, the ONNX export, failed"
            made.append((StageRecord(target, target, parent="onnx", precision=opts.precision, error=msg,
                                     reason=msg), None))
            continue
        if target == "openvino":
            fn = lambda: [export("openvino", onnx_art, root / "model.xml", precision=opts.precision)]  # noqa: E731
        elif target == "tflite":
            fn = lambda: [export("tflite", plain, root / "model.tflite", args=args,  # noqa: E731
                                 precision=opts.precision)]
        else:
            fn = lambda: [export("tensorrt", onnx_art, root / "model.engine", precision=opts.precision,  # noqa: E731
                                 dynamic=opts.dynamic)]
        for art in attempt(target, target, parent, opts.precision, fn):
            made.append((StageRecord(target, target, parent=parent, precision=opts.precision,
                                     export_seconds=timings.get(f"export {target}")), art))
    return made


def _save_pt2(plain, args, path: Path, dynamic: bool, extra: dict) -> Artifact:
    from exporters._torch import to_graph_module

    module = to_graph_module(plain, args)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) + (None,) * (len(args) - 1) if dynamic else None
    try:
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        if dynamic:
            raise PipelineError(f"--dynamic: the plain model cannot take a dynamic batch ({first_line(e)}); its "
                                "graph fixes the batch size: convert without --dynamic") from e
        raise PipelineError(f"torch.export cannot re-export the plain model: {first_line(e)}") from e
    torch.export.save(ep, os.fspath(path), extra_files={"deploy.json": json.dumps(extra)})
    leaves = _output_leaves(module, args)
    batch = "batch" if dynamic else None
    inputs = [TensorSpec(f"input{i}", ((batch,) + tuple(a.shape[1:])) if batch else tuple(a.shape), "float32")
              for i, a in enumerate(args)]
    outputs = [TensorSpec(f"output{i}", ((batch,) + tuple(t.shape[1:])) if batch and t.dim() else tuple(t.shape),
                          str(t.dtype)) for i, t in enumerate(leaves)]
    return Artifact(os.fspath(path), "pt2", inputs, outputs, "fp32",
                    metadata={"exporter": f"torch.export (torch {torch.__version__})", "dynamic_batch": dynamic})


def merged_counts(before, after) -> dict[str, int]:
    """What reparameterization removed, from the op summaries (``deploy.inspect``) of both forms."""
    return {"branch_groups_merged": before.branch_groups - after.branch_groups,
            "branches_merged": before.branches - after.branches,
            "batchnorms_folded": before.batchnorms - after.batchnorms,
            "convolutions_before": before.convolutions, "convolutions_after": after.convolutions,
            "macs_before": before.macs, "macs_after": after.macs}


def _reparam_dict(report, merged: dict) -> dict:
    d = report.to_dict()
    d["passes"] = [{"name": p["name"], "round": p["round"], "rewrites": len(p["rewrites"]),
                    "refused": len(p["refusals"]), "rolled_back": len(p["rolled_back"]),
                    "max_rel_error": p["max_rel_error"], "seconds": p["seconds"], "rewrite_sites": p["rewrites"]}
                   for p in d["passes"] if p["rewrites"] or p["refusals"] or p["rolled_back"]]
    d["refusals"] = [asdict(r) for r in report.refusals()]
    d["merged"] = merged
    return d


def convert(opts: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Convert ``opts.model`` into verified artifacts in the output directory; see the module docstring."""
    progress = progress or _noop
    started = time.perf_counter()
    timings: dict[str, float] = {}
    targets = _check_targets(list(opts.targets), opts.precision)
    _check_passes(opts.passes)
    kind, target, factory = sources.parse_source(opts.model)
    default_name = {"file": f"{Path(target).stem}_{factory}", "pickle": Path(target).stem,
                    "pt2": Path(target).stem.split(".")[0]}.get(kind, target)
    out_dir, replaces = plan_out_dir(opts.out, default_name.replace("/", "_"), opts.force)
    if opts.inputs is not None and not os.path.isfile(opts.inputs):
        raise PipelineError(f"--inputs file {opts.inputs} does not exist; pass an .npz holding the input array "
                            "(and optionally 'labels')")

    progress(f"loading {opts.model} ...")
    start = time.perf_counter()
    loaded: LoadedModel = sources.load_model(
        opts.model, checkpoint=opts.checkpoint, checkpoint_key=opts.checkpoint_key, code_path=opts.code_path,
        num_classes=opts.num_classes, width=opts.width, allow_train_mode=opts.allow_train_mode, seed=opts.seed)
    timings["load"] = time.perf_counter() - start
    progress(f"loaded {type(loaded.model).__name__} ({loaded.weights})")
    shape = tuple(opts.input_shape or loaded.input_shape or ())
    if not shape:
        raise PipelineError(f"{opts.model} has no default input shape; pass --input-shape, e.g. 1,3,224,224")
    samples_path = opts.inputs or loaded.samples
    samples = _read_samples(samples_path, shape) if samples_path else None
    notes = list(loaded.notes)
    capture_shape = shape
    if opts.dynamic and shape[0] == 1:
        capture_shape = (2,) + shape[1:]
        notes.append("--dynamic: captured and verified at batch 2 (torch.export specializes a batch of 1)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(os.path.abspath(out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        x = torch.randn(*capture_shape, generator=torch.Generator().manual_seed(opts.seed))
        args = (x,)
        progress(f"capturing {type(loaded.model).__name__} at {'x'.join(map(str, capture_shape))} and running "
                 f"passes (each checked in float64) ...")
        start = time.perf_counter()
        try:
            with _forward_logs("fusers.manager", lambda m: progress("  " + m)):
                plain = fusers.reparameterize(loaded.model, args, passes=opts.passes, seed=opts.seed)
        except (fusers.CaptureError, fusers.InputError) as e:
            raise PipelineError(str(e)) from e
        report = plain.reparam_report
        timings["reparameterize"] = time.perf_counter() - start
        progress(f"reparameterized in {timings['reparameterize']:.1f} s: {report.count()} rewrites, "
                 f"{len(report.refusals())} refused; float64 error {report.float64_error:.1e}, float32 error "
                 f"{report.float32_error:.1e}")
        start = time.perf_counter()
        from .inspect import inspect_module

        before, after = inspect_module(loaded.model, args, "training"), inspect_module(plain, args, "plain")
        merged = merged_counts(before, after)
        timings["structure"] = time.perf_counter() - start
        progress(f"structure: {merged['branch_groups_merged']} branch groups ({merged['branches_merged']} branches) "
                 f"merged, {merged['batchnorms_folded']} BatchNorms folded; convolutions "
                 f"{before.convolutions} -> {after.convolutions}, MACs {before.macs:,} -> {after.macs:,}")

        start = time.perf_counter()
        pt2_art = _save_pt2(plain, args, tmp / PT2, opts.dynamic,
                            {"source": opts.model, "merged": merged, "float64_error": report.float64_error})
        timings["export pt2"] = time.perf_counter() - start
        progress(f"saved the plain model as {PT2} in {timings['export pt2']:.1f} s")

        vdir = tmp / "verify"
        vdir.mkdir()
        progress("recording the training model's outputs on the seeded input"
                 + (f" and {len(samples[0])} samples" if samples is not None else ""))
        from runtimes import TorchRunner, save_inputs

        save_inputs(vdir / "inputs.npz", {"input0": x.numpy()})
        with TorchRunner(loaded.model, threads=_torch_threads(capture_shape)) as ref_runner:
            ref = list(ref_runner.infer([x.numpy()]).values())
            np.savez(vdir / "reference.npz", **{f"output{i}": o for i, o in enumerate(ref)})
            if samples is not None:
                xs, labels = samples
                try:  # an eager model takes any batch: fewer, larger calls
                    samples_ref = run_batched(ref_runner, xs, min(len(xs), 64))
                except Exception:
                    samples_ref = run_batched(ref_runner, xs, capture_shape[0])
                np.savez(vdir / "samples.npz", input0=xs, **({"labels": labels} if labels is not None else {}))
                np.savez(vdir / "samples_reference.npz", **{f"output{i}": o for i, o in enumerate(samples_ref)})

        stages = [StageRecord("training", "torch", parent=None, precision="fp32", passed=True)]
        pt2 = StageRecord("pt2", "pt2", parent="training", precision="fp32", export_seconds=timings["export pt2"])
        made = [(pt2, pt2_art)] + _export_stages(targets, plain, args, tmp, opts, timings, progress)
        root = str(tmp)
        for stage, art in made:
            if art is not None:
                stage.notes += [n for n in art.notes if n not in stage.notes]
                art_dict = _relativize(art.to_dict(), root)
                stage.artifact = art_dict
                if stage.format == "tensorrt":  # the sidecar names paths relative to the run directory
                    _relativize_sidecar(Path(art.path + ".json"), root)
                _fill_files(stage, tmp, _files_of(art))
            stages.append(stage)

        start = time.perf_counter()
        _verify_stages(tmp, stages, opts.rtol, opts.atol, progress)
        timings["verify"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - started

        result = ConvertResult(str(out_dir), {}, stages)
        result.report = _report(opts, loaded, shape, capture_shape, targets, samples_path, samples,
                                _reparam_dict(report, merged), stages, timings, notes, out_dir)
        from .report import write_reports

        write_reports(result.report, tmp)
        if replaces:
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"wrote {out_dir}/{REPORT_NAME} and report.md")
    return result


def load_arguments(opts: ConvertOptions) -> dict:
    """How ``sources.load_model`` was called, with absolute paths: ``deploy bench`` reloads the training
    model from it."""
    absolute = lambda p: os.path.abspath(p) if p else p  # noqa: E731
    kind, target, factory = sources.parse_source(opts.model)
    spec = opts.model if kind in ("zoo", "timm", "torchvision") else absolute(target) + (f":{factory}" if factory
                                                                                         else "")
    return {"spec": spec, "checkpoint": absolute(opts.checkpoint), "checkpoint_key": opts.checkpoint_key,
            "code_path": [absolute(d) for d in opts.code_path], "num_classes": opts.num_classes,
            "width": opts.width, "allow_train_mode": opts.allow_train_mode, "seed": opts.seed}


def _relativize_sidecar(path: Path, root: str) -> None:
    if path.exists():
        with open(path) as f:
            data = _relativize(json.load(f), root)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


def _report(opts: ConvertOptions, loaded: LoadedModel, shape, capture_shape, targets, samples_path, samples,
            reparam, stages: list[StageRecord], timings: dict, notes: list[str], out_dir: Path) -> dict:
    failed = [s.name for s in stages if not s.passed]
    tolerance = {"rtol": opts.rtol, "atol": opts.atol,
                 "default_rtol": {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2}}
    samples_info = None
    if samples is not None:
        samples_info = {"path": samples_path, "count": int(len(samples[0])), "labels": samples[1] is not None,
                        "shipped_with_model": samples_path == loaded.samples and opts.inputs is None}
    return {
        "tool": TOOL,
        "report_version": 1,
        "command": opts.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "out_dir": str(out_dir),
        "passed": not failed,
        "failed": failed,
        "model": loaded.to_dict(),
        "load": load_arguments(opts),
        "options": {"targets": targets, "precision": opts.precision, "dynamic": opts.dynamic,
                    "passes": list(opts.passes) if opts.passes is not None else list(fusers.DEFAULT_PASSES),
                    "seed": opts.seed, "opset": opts.opset},
        "inputs": {"shape": list(shape), "verified_shape": list(capture_shape), "dtype": "float32",
                   "seeded": {"seed": opts.seed, "distribution": "standard normal", "file": "verify/inputs.npz"},
                   "samples": samples_info},
        "tolerance": tolerance,
        "reparameterize": reparam,
        "stages": [s.to_dict() for s in stages],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "machine": {"platform": sys.platform, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------- verify

def load_report(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / REPORT_NAME
    if not Path(out_dir).is_dir():
        raise PipelineError(f"{out_dir} is not a directory; pass the output directory of deploy convert")
    if not path.is_file():
        raise PipelineError(f"{out_dir} holds no {REPORT_NAME}; pass the output directory of deploy convert")
    try:
        with open(path) as f:
            report = json.load(f)
    except ValueError as e:
        raise PipelineError(f"{path} is not valid JSON ({first_line(e)}); rerun deploy convert") from e
    if report.get("tool") != TOOL or "stages" not in report:
        raise PipelineError(f"{path} is not a deploy report; pass the output directory of deploy convert")
    return report


def verify(out_dir: str | os.PathLike, *, rtol: float | None = None, atol: float | None = None,
           progress: Progress | None = None) -> VerifyResult:
    """Re-run the verification of a ``convert`` output directory from its report and files.

    Stages are compared with the training outputs recorded at conversion time, with the run's
    tolerances unless ``rtol`` / ``atol`` are given. A stage whose files changed since the run is
    flagged (``changed``); a stage that failed to export then is failed again.
    """
    progress = progress or _noop
    start = time.perf_counter()
    root = Path(out_dir)
    report = load_report(root)
    tol = dict(report.get("tolerance", {}))
    rtol = tol.get("rtol") if rtol is None else rtol
    atol = tol.get("atol", 0.0) if atol is None else atol
    recorded = [StageRecord.from_dict(d) for d in report["stages"]]
    stages = []
    for old in recorded:
        s = StageRecord(old.name, old.format, old.path, list(old.files), old.parent, old.precision, old.size,
                        dict(old.sha256), old.export_seconds, old.artifact, list(old.notes), old.error)
        if s.name != "training" and not s.error:
            missing = [f for f in s.files if not (root / f).is_file()]
            if missing:
                s.error = f"missing file(s): {', '.join(missing)}"
            else:
                s.changed = any(sources.sha256(root / f) != h for f, h in s.sha256.items())
                s.size = sum((root / f).stat().st_size for f in s.files)
        elif s.error:
            s.reason = s.error
        stages.append(s)
    if not (root / "verify" / "reference.npz").is_file():
        raise PipelineError(f"{root}/verify/reference.npz is missing; the recorded training outputs are needed: "
                            "rerun deploy convert")
    _verify_stages(root, stages, rtol, atol, progress)
    for s in stages:
        if s.error and not s.reason:
            s.reason = s.error
        if s.changed:
            s.notes.append("file changed since convert (sha256 differs)")
            if not s.passed:
                s.reason = f"{s.reason}; its file changed since convert (sha256 differs)"
    return VerifyResult(str(root), stages, {"rtol": rtol, "atol": atol}, time.perf_counter() - start)
