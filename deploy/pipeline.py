"""The deploy pipeline as library functions: ``convert`` a model into verified artifacts, ``verify`` a run.

``convert`` runs: load (``deploy.sources``) → capture + passes (``fusers.reparameterize``) → the
training model's outputs recorded in ``verify/`` → the artifacts of every target
(``deploy.forms.export_forms``: the plain model ``model.deploy.pt2``, ONNX, simplified ONNX,
OpenVINO, TFLite, TensorRT, ...) → verification of every stage (``deploy.verification``) →
``report.json`` / ``report.md`` (``deploy.record``).

Verification compares every artifact, run on its own runtime, with the training model's outputs:
on seeded random inputs at the export shape, and on real samples when there are any (``--inputs``
or the samples shipped with a zoo model). ``verify(out_dir)`` re-runs exactly the same checks later
from the files alone, and ``convert`` itself verifies through that same function. When the samples
carry ``labels`` the report adds task numbers: accuracy of every stage and its prediction agreement
with the training model (required to be 100 % for fp32 stages).

With ``precision="int8"`` (``deploy.int8``) the fp32 artifacts are exported as usual and each target that
can quantize adds an INT8 stage beside its fp32 one, calibrated on data that is never evaluated on
(``deploy.calibration``); INT8 stages are judged by the accuracy guard on held-out samples, with the
per-layer errors, the optional fallback and the equalize choice in ``report.json``'s ``int8`` section.

Everything is written into a temporary sibling of the output directory and moved into place at
the end (``deploy.record.RunDirectory``); on an error nothing is left behind. An export that fails
is recorded as a failed stage (its partial files removed) and the other targets go on;
``ConvertResult.passed`` is False.

Library code logs (``logging``); progress messages go to the optional ``progress`` callback, which
the command line prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import fusers
from exporters import targets as registry
from exporters.pt2 import FILENAME as PT2
from runtimes.core import first_line

from . import detection, int8, resources, sources
from .detection import NmsOptions
from .forms import check_targets, export_forms, without_int8
from .record import (REPORT_NAME, ExportRecord, FilesRecord, InputsRecord, PipelineError, RunDirectory, RunOptions,
                     RunRecord, SamplesRecord, StageRecord, VerificationRecord, inside, is_run_dir, load_record,
                     unlisted_files)
from .report import write_reports
from .sources import LoadedModel
from .verification import read_samples, record_reference, verify_stages

__all__ = ["ConvertOptions", "NmsOptions", "ConvertResult", "StageRecord", "VerifyResult", "PipelineError", "convert",
           "verify", "plan_out_dir", "load_record", "load_arguments", "versions", "default_targets", "target_names",
           "REPORT_NAME", "PT2", "recorded_source", "reload_command", "check_training_model"]

_VERSIONS = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxsim", "openvino", "litert-torch",
             "ai-edge-litert", "tensorrt", "timm", "torchvision")

Progress = Callable[[str], None]


def default_targets() -> tuple[str, ...]:
    return tuple(t.name for t in registry.all_targets() if t.default)


def target_names() -> tuple[str, ...]:
    return tuple(registry.names())


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
    targets: Sequence[str] | None = None  # None: the default targets
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
    trust_pickle: bool = False  # unpickle a checkpoint / pickled model fully (runs code from it)
    # --precision int8 (deploy.int8, deploy.calibration)
    calibration: str | None = None  # .npz, folder of images, "seeded"; None: shipped split / seeded for random weights
    calibration_size: int = 128
    int8_method: str = "minmax"
    per_tensor: bool = False  # one weight scale per tensor instead of per output channel
    max_drop: float = 1.0
    min_agreement: float | None = None
    min_sqnr: float | None = None
    int8_fallback: str = "auto"  # keep the most sensitive layers in float until the drop is within max_drop / 2
    weight_rounding: str = "nearest"  # "mse": search each channel's int8 weight grid, kept where it raises the SQNR
    bias_correction: str = "auto"  # "auto": keep INT8 bias correction where it raises the held-out SQNR; "off"
    mean: Sequence[float] | None = None  # image-folder calibration normalization
    std: Sequence[float] | None = None
    # detectors (deploy.detection): NMS inside the ONNX / OpenVINO artifacts, detections matched, mAP per stage
    nms: NmsOptions | None = None


@dataclass
class VerifyResult:
    """Verification of the stages of a run directory."""

    out_dir: str
    stages: list[StageRecord]
    tolerance: dict
    seconds: float = 0.0
    reference: list[str] = dataclasses.field(default_factory=list)  # what is wrong with verify/*.npz (fails the run)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(s.failed for s in self.stages) and not self.reference

    @property
    def failed(self) -> list[StageRecord]:
        return [s for s in self.stages if s.failed]


@dataclass
class ConvertResult:
    out_dir: str
    record: RunRecord

    @property
    def stages(self) -> list[StageRecord]:
        return self.record.stages

    @property
    def report(self) -> dict:
        """The run record as ``report.json`` holds it."""
        return self.record.to_dict()

    @property
    def passed(self) -> bool:
        return self.record.passed

    @property
    def failed(self) -> list[StageRecord]:
        return [s for s in self.stages if s.failed]


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


def _check_passes(passes):
    try:
        fusers.reparam.resolve_passes(passes)
    except ValueError as e:
        raise PipelineError(f"{e}; fix --passes ('default' expands to {','.join(fusers.DEFAULT_PASSES)})") from e


def _check_nms(targets: Sequence[str], precision: str) -> None:
    if "onnx" not in targets:
        raise PipelineError("--nms appends NMS to the fp32 ONNX export (and converts that for OpenVINO); add onnx to "
                            "--targets")
    if precision not in ("fp32", "int8"):
        raise PipelineError(f"--nms builds its artifacts from the fp32 ONNX export, which --precision {precision} "
                            "does not make; use --precision fp32 or int8 with --nms")


def plan_out_dir(out: str | None, model_name: str, force: bool, reads: Sequence[str | os.PathLike] = ()
                 ) -> tuple[Path, bool]:
    """The output directory and whether an existing one will be replaced.

    Without ``out`` the run goes to ``runs/<model>`` and replaces a previous run there, unless
    the previous run's folder holds files its report does not list (someone added them) and
    ``force`` is not given. An explicit ``out`` that exists needs ``force``. A non-empty directory
    that holds no deploy report is never replaced, nor one that holds the current directory or a
    file of ``reads`` (the model, checkpoint and samples the run reads). Its parent must be a
    writable folder. All of this is checked before any work.
    """
    default = out is None
    if out is not None:
        resources.check_output_path(out)
    path = Path(out) if out is not None else Path("runs") / model_name
    _check_writable(path)
    if not path.exists():
        return path, False
    if not path.is_dir():
        raise PipelineError(f"output path {path} exists and is not a directory; choose another --out")
    empty = not any(path.iterdir())
    if not empty and not is_run_dir(path):
        raise PipelineError(f"output directory {path} exists and was not written by deploy (no {REPORT_NAME}); "
                            "refusing to replace it, even with --force: choose another --out")
    if not (default or force or empty):
        raise PipelineError(f"output directory {path} already exists; pass --force to replace it or choose another "
                            "--out")
    here = path.resolve()
    if here == Path.cwd().resolve() or here in Path.cwd().resolve().parents:
        raise PipelineError(f"output directory {path} is or holds the current directory, which replacing it would "
                            "delete; choose another --out or run deploy from another directory")
    for read in reads:
        if here == Path(read).resolve() or here in Path(read).resolve().parents:
            raise PipelineError(f"output directory {path} holds {read}, which this run reads and replacing the "
                                "directory would delete; move it out or choose another --out")
    added = unlisted_files(path)
    if default and added and not force:
        raise PipelineError(f"{path} holds {len(added)} file(s) the previous run did not write ("
                            f"{', '.join(added[:5])}{', ...' if len(added) > 5 else ''}); replacing the previous run "
                            "would delete them: move them out, pass --out DIR, or pass --force to replace it anyway")
    return path, True


def _check_writable(path: Path) -> None:
    """Refuse an output directory whose nearest existing ancestor is a file or a folder this process cannot
    write into (the run needs a hidden sibling of ``path`` beside it)."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PipelineError(f"cannot create the output directory {path}: {parent} is a file, not a folder; choose "
                            "another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot create the output directory {path}: the folder {parent} is not writable "
                            "(permission denied); choose another --out")


class _PassProgress:
    """A pass-manager instrument: one progress line per pass and round that rewrote or rolled back something
    (refusals are counted once, at the end: only those that stand are refusals)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_pass_end(self, record) -> None:
        if record.rewrites or record.rolled_back:
            self.progress(f"  {record.name} (round {record.round}): {len(record.rewrites)} rewrites"
                          + (f", {len(record.rolled_back)} rolled back" if record.rolled_back else "")
                          + f" in {record.seconds:.2f} s")

    def on_restart(self, reason: str) -> None:
        self.progress(f"  {reason}: the passes again with every check at the captured size")


def merged_counts(before, after) -> dict[str, int]:
    """What reparameterization removed, from the op summaries (``deploy.inspect``) of both forms."""
    return {"branch_groups_merged": before.branch_groups - after.branch_groups,
            "branches_merged": before.branches - after.branches,
            "batchnorms_folded": before.batchnorms - after.batchnorms,
            "convolutions_before": before.convolutions, "convolutions_after": after.convolutions,
            "macs_before": before.macs, "macs_after": after.macs}


def _reparam_dict(report, merged: dict) -> dict:
    """The pass manager's report for ``report.json``: passes that did something, and the refusals that stand
    (each with its pass, code and reason; the per-pass ``refused`` counts add up to their number)."""
    d = report.to_dict()
    standing = [r.to_dict() for r in report.refusals()]
    refused_by_pass: dict[str, int] = {}
    for r in standing:
        refused_by_pass[r["pass"]] = refused_by_pass.get(r["pass"], 0) + 1
    passes, seen = [], set()
    for p in reversed(d["passes"]):  # a pass's standing refusals are counted on its last round
        refused = refused_by_pass.get(p["name"], 0) if p["name"] not in seen else 0
        seen.add(p["name"])
        if p["rewrites"] or refused or p["rolled_back"]:
            passes.append({"name": p["name"], "round": p["round"], "rewrites": len(p["rewrites"]), "refused": refused,
                           "rolled_back": len(p["rolled_back"]), "max_rel_error": p["max_rel_error"],
                           "seconds": p["seconds"], "rewrite_sites": p["rewrites"]})
    d["passes"] = passes[::-1]
    d["refusals"] = standing
    d["merged"] = merged
    return d


def load_arguments(opts: ConvertOptions) -> dict:
    """How ``sources.load_model`` was called, with absolute paths: what :func:`recorded_source` reloads a built-in
    model from, and what :func:`reload_command` shows for anything else."""
    absolute = lambda p: os.path.abspath(p) if p else p  # noqa: E731
    kind, target, factory = sources.parse_source(opts.model)
    spec = opts.model if kind in ("zoo", "timm", "torchvision") else absolute(target) + (f":{factory}" if factory
                                                                                         else "")
    return {"spec": spec, "checkpoint": absolute(opts.checkpoint), "checkpoint_key": opts.checkpoint_key,
            "code_path": [absolute(d) for d in opts.code_path], "num_classes": opts.num_classes,
            "width": opts.width, "allow_train_mode": opts.allow_train_mode, "seed": opts.seed,
            "trust_pickle": opts.trust_pickle}


def recorded_source(record: RunRecord) -> ConvertOptions | None:
    """How to reload a run's training model from its record alone, or None. A run directory never chooses code to
    run: only a built-in source (a zoo, timm or torchvision name) without a checkpoint is reloaded from it, with
    its recorded numbers checked; a model file, a pickled model, a ``.pt2``, a checkpoint or a code path must come
    from the user's own command line (:func:`reload_command` shows it)."""
    load = record.load
    spec = load.get("spec")
    if not isinstance(spec, str) or load.get("checkpoint") or load.get("code_path"):
        return None
    try:
        kind, _, _ = sources.parse_source(spec)
    except sources.SourceError:
        return None
    num_classes, width, seed = load.get("num_classes"), load.get("width"), load.get("seed", 0)
    numbers_ok = (num_classes is None or type(num_classes) is int and 0 < num_classes < 2**31) and \
        (width is None or type(width) in (int, float) and 0 < width < float("inf")) and \
        type(seed) is int and 0 <= seed < 2**63
    if kind not in sources.BUILT_IN or not numbers_ok:
        return None
    return ConvertOptions(model=spec, num_classes=num_classes, width=width, seed=seed)


def reload_command(record: RunRecord, command: str, out_dir: str | os.PathLike | None = None) -> str:
    """The command to type for ``command`` (``deploy bench``, say) on the run's training model, from what the
    record says it was loaded from: ``command DIR --model SPEC ...``, or ``command SPEC ...`` without ``out_dir``.
    Shown to the user (quoted for a shell), never run."""
    import shlex

    load = record.load
    spec = str(load.get("spec") or "MODEL")
    words = [*command.split(), *([os.fspath(out_dir), "--model", spec] if out_dir is not None else [spec])]
    if load.get("checkpoint"):
        words += ["--checkpoint", str(load["checkpoint"])]
    if load.get("checkpoint_key"):
        words += ["--checkpoint-key", str(load["checkpoint_key"])]
    for d in load.get("code_path") or []:
        words += ["--code-path", str(d)]
    for key, flag in (("num_classes", "--num-classes"), ("width", "--width"), ("seed", "--seed")):
        if load.get(key) not in (None, 0):
            words += [flag, str(load[key])]
    if load.get("trust_pickle"):
        words.append("--trust-pickle")
    return " ".join(shlex.quote(w) for w in words)


def check_training_model(model, record: RunRecord, root: str | os.PathLike, what: str) -> None:
    """Refuse ``model`` unless it computes the training outputs recorded in the run directory ``root`` (whose
    record is ``record``): ``verify/reference.npz`` on ``verify/inputs.npz``. The model given for a run must be the
    one it was converted from."""
    from runtimes import TorchRunner
    from runtimes.core import max_rel_error

    problems = reference_problems(record, root)
    if problems:
        raise PipelineError(f"the training model cannot be checked against {root}: {'; '.join(problems)}; rerun "
                            "deploy convert")
    vdir = inside(root, "verify", "the verification folder")
    x = next(iter(resources.read_npz(vdir / "inputs.npz").values()))
    reference = list(resources.read_npz(vdir / "reference.npz").values())
    try:
        with TorchRunner(model) as runner:
            outs = list(runner.infer([x]).values())
        err = max_rel_error(reference, outs) if len(outs) == len(reference) else float("inf")
    except Exception as e:  # noqa: BLE001 - a model that cannot run on the recorded input is not the run's model
        raise PipelineError(f"{what} does not run on the recorded input of {root} ({first_line(e)}); pass the model "
                            "the run was converted from") from e
    if not err <= 1e-4:
        raise PipelineError(f"{what} does not compute the training outputs recorded in {root}/verify (max relative "
                            f"error {err:.2g}); pass the model, --checkpoint and options the run was converted from")


def default_name(model: str) -> str:
    """The folder name of a model's default run directory, ``runs/<name>``: a zoo model's name; a timm or
    torchvision model's prefixed with its source (``timm_repvgg_a0``, never the zoo's ``repvgg_a0``); a file's stem
    (with the factory for ``file.py:FACTORY``)."""
    kind, target, factory = sources.parse_source(model)
    name = {"file": f"{Path(target).stem}_{factory}", "pickle": Path(target).stem,
            "pt2": Path(target).stem.split(".")[0], "timm": f"timm_{target}",
            "torchvision": f"torchvision_{target}"}.get(kind, target)
    return name.replace("/", "_")


def _reads(opts: ConvertOptions) -> list[str]:
    """The files and folders a run reads (its model file, checkpoint, samples, code): the output directory it
    replaces must not hold them."""
    kind, target, _ = sources.parse_source(opts.model)
    model = [target] if kind in ("file", "pickle", "pt2") else []
    return model + [p for p in (opts.checkpoint, opts.inputs) if p] + list(opts.code_path)


def convert(opts: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Convert ``opts.model`` into verified artifacts in the output directory; see the module docstring."""
    progress = progress or _noop
    started = time.perf_counter()
    timings: dict[str, float] = {}
    wanted = list(default_targets() if opts.targets is None else opts.targets)
    order = check_targets(wanted, opts.precision)
    _check_passes(opts.passes)
    if opts.nms is not None:
        _check_nms(wanted, opts.precision)
    out_dir, replaces = plan_out_dir(opts.out, default_name(opts.model), opts.force, reads=_reads(opts))
    if replaces and is_run_dir(out_dir):
        added = unlisted_files(out_dir)
        progress(f"replacing the previous run in {out_dir}" + (f", and {len(added)} file(s) it did not write: "
                                                              f"{', '.join(added)}" if added else ""))
    if opts.inputs is not None and not os.path.isfile(opts.inputs):
        raise PipelineError(f"--inputs file {opts.inputs} does not exist; pass an .npz holding the input array "
                            "(and optionally 'labels')")

    progress(f"loading {opts.model} ...")
    start = time.perf_counter()
    loaded: LoadedModel = sources.load_model(
        opts.model, checkpoint=opts.checkpoint, checkpoint_key=opts.checkpoint_key, code_path=opts.code_path,
        num_classes=opts.num_classes, width=opts.width, allow_train_mode=opts.allow_train_mode, seed=opts.seed,
        trust_pickle=opts.trust_pickle)
    timings["load"] = time.perf_counter() - start
    progress(f"loaded {type(loaded.model).__name__} ({loaded.weights})")
    shape = tuple(opts.input_shape or loaded.input_shape or ())
    if not shape:
        raise PipelineError(f"{opts.model} has no default input shape; pass --input-shape, e.g. 1,3,224,224")
    samples_path = opts.inputs or loaded.samples
    shipped_with = None if opts.inputs else opts.model
    samples = read_samples(samples_path, shape, shipped_with) if samples_path else None
    notes = list(loaded.notes)
    if opts.precision == "int8":
        notes += [f"--precision int8: the {name} target has no INT8 form ({registry.get(name).description}); its fp32 "
                  "stage only" for name in without_int8(wanted)]
    capture_shape = shape
    if opts.dynamic and shape[0] == 1:
        capture_shape = (2,) + shape[1:]
        notes.append("--dynamic: captured and verified at batch 2 (torch.export specializes a batch of 1)")
    detector = detection.plan(loaded.model, opts.model, opts.nms, samples_path,
                              len(samples[0]) if samples is not None else None, notes)
    quant = int8.plan(opts, loaded, shape, samples, progress) if opts.precision == "int8" else None
    if quant is not None and samples is None:
        samples = (quant.evaluation, None)

    with RunDirectory(out_dir, replaces) as run:
        _check_resources(loaded.model, capture_shape, order, samples, out_dir, progress)  # before the first tensor
        x = torch.randn(*capture_shape, generator=torch.Generator().manual_seed(opts.seed))
        args = (x,)
        progress(f"capturing {type(loaded.model).__name__} at {'x'.join(map(str, capture_shape))} and running "
                 f"passes (each checked in float64) ...")
        start = time.perf_counter()
        try:
            plain = fusers.reparameterize(loaded.model, args, passes=opts.passes, seed=opts.seed,
                                          instruments=[_PassProgress(progress)])
        except (fusers.CaptureError, fusers.InputError) as e:
            raise PipelineError(str(e)) from e
        if quant is not None and opts.passes is None:
            plain = int8.maybe_equalize(plain, loaded.model, args, quant, opts.seed, progress)
        if opts.dynamic:
            freed, why = fusers.free_batch(plain, x)
            if freed:
                notes.append(f"--dynamic: {freed} reshape(s) that held the captured batch now read the input's batch "
                             "(proven in float64 at batches 1 and 3, row for row against the captured graph)")
            elif why:
                notes.append(f"--dynamic: the batch baked into the graph's reshapes was left as captured: {why}")
        report = plain.reparam_report
        if report.unused:
            notes.append(_unused_note(loaded.model, report))
        timings["reparameterize"] = time.perf_counter() - start
        progress(f"reparameterized in {timings['reparameterize']:.1f} s: {report.count()} rewrites, "
                 f"{len(report.refusals())} refused; "
                 + (f"float64 error {report.float64_error:.1e}" if report.proof == "float64" else
                    f"checked in {report.proof}: error {report.float64_error:.1e}")
                 + f", float32 error {report.float32_error:.1e}")
        start = time.perf_counter()
        from .inspect import inspect_module

        before, after = inspect_module(loaded.model, args, "training"), inspect_module(plain, args, "plain")
        merged = merged_counts(before, after)
        timings["structure"] = time.perf_counter() - start
        progress(f"structure: {merged['branch_groups_merged']} branch groups ({merged['branches_merged']} branches) "
                 f"merged, {merged['batchnorms_folded']} BatchNorms folded; convolutions "
                 f"{before.convolutions} -> {after.convolutions}, MACs {before.macs:,} -> {after.macs:,}")

        progress("recording the training model's outputs on the seeded input"
                 + (f" and {len(samples[0])} samples" if samples is not None else ""))
        noise = record_reference(run.tmp / "verify", loaded.model, x.numpy(), samples, detector.truth)
        detector.settle(run.tmp / "verify")  # a YOLO-style detector: detections of every stage
        made = export_forms(plain, args, run.tmp, order, precision="fp32" if quant else opts.precision,
                            dynamic=opts.dynamic, opset=opts.opset, progress=progress,
                            metadata={"source": opts.model, "merged": merged, "float64_error": report.float64_error})
        if quant is not None:
            quant.set_scope(plain, args)
            if opts.weight_rounding == "mse":
                int8.choose_weight_rounding(plain, args, quant, loaded.model, progress)
            if opts.bias_correction == "auto":
                int8.choose_bias_correction(plain, args, quant, loaded.model, progress)
            else:
                quant.bias_correction = {"chosen": False, "reason": "--bias-correction off"}
            if quant.scope:
                progress(f"INT8 float scope: {len(quant.scope)} op(s) after the last conv of each output stay in float "
                         f"({', '.join(list(quant.scope)[:6])}{' ...' if len(quant.scope) > 6 else ''})")
            made += int8.quantize_stages(made, run.tmp, wanted, quant.options, plain, args, progress)
        made += detector.stages(made, run.tmp, wanted, progress)
        for s in made:
            if s.export.seconds is not None:
                timings[f"export {s.name}"] = s.export.seconds
        training = StageRecord("training", ExportRecord("torch"), verification=VerificationRecord(True, "reference"))
        stages = [training] + made

        start = time.perf_counter()
        if quant is not None:
            quant.guard.nms = detector.guard_nms()  # INT8 detectors are judged by their mAP@0.5 drop
        guard = quant.guard.to_dict() if quant else None
        outputs: dict = {}
        results = verify_stages(run.tmp, stages, opts.rtol, opts.atol, progress, guard=guard, outputs=outputs,
                                noise=noise)
        found = detector.verify(run.tmp, stages, results, outputs, args, progress)
        stages = [dataclasses.replace(s, verification=results.get(s.name) or _export_failure(s)) for s in stages]
        timings["verify"] = time.perf_counter() - start
        if quant is not None:
            start = time.perf_counter()
            stages = int8.guard_stages(quant, run.tmp, stages, plain, args, opts.rtol, opts.atol, progress,
                                       rescore=detector.rescore)
            timings["int8 blame and fallback"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - started

        record = _record(opts, loaded, shape, capture_shape, [t.name for t in order if not t.always],
                         samples_path, samples, _reparam_dict(report, merged), stages, timings, notes, out_dir)
        record.int8 = quant.record() if quant is not None else {}
        record.detection = found
        record.tolerance["rounding_noise"] = noise
        vdir = run.tmp / "verify"
        record.reference = FilesRecord.of(run.tmp, sorted(f"verify/{f.name}" for f in vdir.iterdir() if f.is_file()))
        write_reports(record.to_dict(), run.tmp)
        run.commit()
    progress(f"wrote {out_dir}/{REPORT_NAME} and report.md")
    return ConvertResult(str(out_dir), record)


def _check_resources(model, shape, order, samples, out_dir: Path, progress: Progress) -> None:
    """Refuse a conversion this machine cannot hold (memory) or store (disk) before any of it runs, announcing
    both estimates."""
    need = resources.estimate(model, shape, batch=min(len(samples[0]), 64) if samples is not None else None)
    have = resources.check_memory(need, f"converting {type(model).__name__} at {'x'.join(map(str, shape))}",
                                  "pass a smaller --input-shape or model, or free memory")
    progress(f"memory: {need}" + (f"; {resources.mb(have[0])} available" if have else ""))
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    sample_bytes = samples[0].nbytes if samples is not None else 0
    largest = max(weights, 2 * sample_bytes) + (1 << 20)  # an artifact, or verify/samples.npz
    disk = (len(order) + 2) * largest + 3 * sample_bytes + math.prod(shape) * 8
    resources.check_disk(out_dir.parent if out_dir.parent != Path("") else Path("."), disk, largest,
                         f"the run into {out_dir}")


def _unused_note(model, report) -> str:
    """What the eval forward never uses, dropped from the deploy form, and why."""
    from fusers.capture import describe_unused

    aux = any(type(m).__name__ == "IAuxDetect" for m in model.modules())
    ops = ", ".join(f"{k} {v}" for k, v in report.dead_ops.items())
    return (f"not used by the eval forward, dropped from the deploy form: "
            f"{', '.join(describe_unused(model, report.unused))}" + (f" (ops dropped: {ops})" if ops else "")
            + "; no output depends on them" + ("; IAuxDetect's auxiliary heads (m2 and the layers feeding them) serve "
                                               "only training, as the repository's deploy configs leave them out"
                                               if aux else ""))


def _export_failure(stage: StageRecord) -> VerificationRecord:
    return VerificationRecord(passed=False, reason=stage.export.error)


def _record(opts: ConvertOptions, loaded: LoadedModel, shape, capture_shape, targets, samples_path, samples,
            reparam: dict, stages: list[StageRecord], timings: dict, notes: list[str], out_dir: Path) -> RunRecord:
    samples_info = None
    if samples is not None and samples_path is None:  # seeded held-out inputs for the int8 guard
        samples_info = SamplesRecord(path=f"seeded: standard normal, seed {opts.seed + 1}", count=int(len(samples[0])),
                                     labels=False)
    elif samples is not None:
        shipped = samples_path == loaded.samples and opts.inputs is None
        samples_info = SamplesRecord(path=os.path.basename(samples_path) if shipped else samples_path,
                                     count=int(len(samples[0])), labels=samples[1] is not None,
                                     shipped_with_model=shipped)
    return RunRecord(
        model=loaded.to_dict(), load=load_arguments(opts),
        options=RunOptions(targets=list(targets), precision=opts.precision, dynamic=opts.dynamic,
                           passes=list(opts.passes) if opts.passes is not None else list(fusers.DEFAULT_PASSES),
                           seed=opts.seed, opset=opts.opset),
        inputs=InputsRecord(shape=list(shape), verified_shape=list(capture_shape),
                            seeded={"seed": opts.seed, "distribution": "standard normal", "file": "verify/inputs.npz"},
                            samples=samples_info),
        tolerance={"rtol": opts.rtol, "atol": opts.atol, "default_rtol": {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2},
                   **({"int8": "accuracy guard (see int8.guard)"} if opts.precision == "int8" else {})},
        reparameterize=reparam, stages=stages, timings={k: round(v, 3) for k, v in timings.items()},
        versions=versions(), notes=notes, command=opts.command, out_dir=str(out_dir),
        machine={"platform": sys.platform, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()})


def verify(out_dir: str | os.PathLike, *, rtol: float | None = None, atol: float | None = None,
           progress: Progress | None = None, allow_changed: bool = False, trust_pickle: bool = False) -> VerifyResult:
    """Re-run the verification of a ``convert`` output directory from its report and files.

    Stages are compared with the training outputs recorded at conversion time, with the run's
    tolerances unless ``rtol`` / ``atol`` are given; a stage that failed to export then is failed again.

    Every path the report names is checked to be inside the directory, and every file's sha256 is
    compared with the report, before anything is opened. A changed file is not the artifact that was
    verified: its stage fails (its numbers are still measured and shown) unless ``allow_changed``, which
    verifies it as it is now and notes that. A changed ``.pt2`` is not even loaded unless
    ``trust_pickle``; any ``.pt2`` that would unpickle is refused without it, whatever its hash.
    """
    progress = progress or _noop
    start = time.perf_counter()
    root = Path(out_dir)
    record = load_record(root)
    rtol = record.tolerance.get("rtol") if rtol is None else rtol
    atol = record.tolerance.get("atol", 0.0) if atol is None else atol
    if not (inside(root, "verify", "the verification folder") / "reference.npz").is_file():
        raise PipelineError(f"{root}/verify/reference.npz is missing; the recorded training outputs are needed: "
                            "rerun deploy convert")
    problems = reference_problems(record, root)
    notes = [f"{p}; verified with the files as they are (--allow-changed)" for p in problems] if allow_changed else []
    stages, changed = [], {}
    for s in record.stages:
        export = dataclasses.replace(s.export, notes=list(s.export.notes))
        if s.name != "training" and not export.error:
            s.export.artifact_in(root)  # refuses a path outside the run directory before anything is opened
            missing, changed[s.name] = s.files.check(root)
            if missing:
                export.error = f"missing file(s): {', '.join(missing)}"
            elif changed[s.name] and s.format == "pt2" and not trust_pickle:
                export.error = (f"{', '.join(changed[s.name])} changed since convert (sha256 differs) and was not "
                                "loaded: loading a changed .pt2 can run code from it; pass --trust-pickle if you "
                                "trust its source")
        stages.append(StageRecord(s.name, export, s.files))
    outputs: dict = {}
    noise = record.tolerance.get("rounding_noise")
    noise = float(noise) if isinstance(noise, (int, float)) and 0 <= noise < 1 else None  # an untrusted file's value
    results = verify_stages(root, stages, rtol, atol, progress, trust_pickle=trust_pickle,
                            guard=record.int8.get("guard"), outputs=outputs, noise=noise)
    if record.detection.get("nms"):
        detection.verify(root, stages, results, NmsOptions(**record.detection["nms"]), outputs,
                         names=record.detection.get("names", ()), trust_pickle=trust_pickle, pictures=False,
                         progress=progress)
    out = []
    for s in stages:
        v = results.get(s.name) or _export_failure(s)
        v.changed = bool(changed.get(s.name))
        if v.changed and not s.export.error:  # (a changed .pt2 left unloaded failed already, saying why)
            if allow_changed:
                v.notes.append("file changed since convert (sha256 differs); verified again as it is now "
                               "(--allow-changed)")
                if not v.passed:
                    v.reason = f"{v.reason}; its file changed since convert (sha256 differs)"
            else:
                v.notes.append("file changed since convert (sha256 differs)")
                why = ("its file changed since convert (sha256 differs): it is not the artifact that was verified"
                       + ("; its outputs still match: pass --allow-changed to accept it as it is now" if v.passed
                          else ""))
                v.passed, v.reason = False, f"{v.reason}; {why}" if v.reason else why
        out.append(dataclasses.replace(s, verification=v))
    return VerifyResult(str(root), out, {"rtol": rtol, "atol": atol}, time.perf_counter() - start,
                        reference=[] if allow_changed else problems, notes=notes)


def reference_problems(record: RunRecord, root: str | os.PathLike) -> list[str]:
    """What is wrong with the run's recorded inputs and training outputs (``verify/*.npz``), which every stage is
    judged by: a file missing (a deleted ``samples.npz`` would drop the held-out check) or changed since convert,
    or a report too old to hold their hashes. Paths are checked to stay inside ``root`` first."""
    if record.reference is None:
        return ["the report records no sha256 of verify/*.npz (report_version 2 or older): rerun deploy convert"]
    missing, changed = record.reference.check(root)
    return ([f"{f} is missing" for f in missing] + [f"{f} changed since convert (sha256 differs)" for f in changed])
