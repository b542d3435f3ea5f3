"""``deploy bench``: measured latency of the deploy form (and the training form) on every runtime.

``bench(opts)`` takes a ``deploy convert`` output directory, or a model that it converts first
(into ``runs/<model>``, as ``deploy convert`` would). For each batch size and runtime it times the
run's verified artifacts with :mod:`runtimes.bench` (warm-up by count and time, then enough
iterations for the minimum duration), one runtime at a time in its own process. With
``compare_train`` the training model is loaded (from ``opts.model`` and this command's model options, or
from the run's record when it names a built-in model: a run directory never chooses code to run; see
``pipeline.recorded_source``), checked against the run's recorded outputs, exported the same way
(same exporters, precision and opset), and timed interleaved with the deploy form, so
the speed-up of reparameterization is a ratio measured on the same machine state.

A batch size other than the artifacts' static one re-exports both forms at that batch (the deploy
form by re-running the passes, each again checked in float64) into a temporary folder.

The result is appended to the directory's ``report.json`` (``benchmarks``, one entry per run) and
rendered in ``report.md``, with a chart ``bench-N.png``. Each timed row carries the 1-minute load
average before and after its measurement and the reasons it may be ``unreliable`` (a wide p90/p50
spread, a load above the usable CPUs: :func:`runtimes.bench.unreliable`); the table prints them
beside the numbers. Each entry holds the hardware facts (CPU
model, cores, threads, SIMD flags, the estimated peak FLOP/s and each measurement's achieved
fraction of it, GPUs and driver, runtime versions), the isolation used, and the cost model of
both forms (FLOPs, parameters, memory access, element-wise ops, forks) in total and per op.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from exporters import targets as registry
from runtimes.bench import ISOLATION, LOAD_PER_CPU, MAX_SPREAD, BenchJob, BenchSettings, run_isolated, run_job
from runtimes.core import MissingDependency, first_line, require, set_training
from runtimes.hardware import cpu_facts, gpu_facts, usable_cpus
from runtimes.safe_load import load_program

from . import resources, sources
from .forms import check_targets, export_forms, main_stage
from .pipeline import (PT2, ConvertOptions, PipelineError, check_training_model, convert, recorded_source,
                       reload_command, versions)
from .record import RunRecord, StageRecord, alive, inside, load_record
from .resources import check_threads

__all__ = ["BenchOptions", "BenchResult", "bench", "speedups", "int8_speedups", "slower_int8_notes", "nms_shares",
           "reliability"]

FORMS = ("training", "deploy", "int8", "nms")  # nms: the deploy form with NMS appended (deploy.detection)
WORK_PREFIX = "deploy-bench-"  # temporary folders: deploy-bench-<pid>-<random>

Progress = Callable[[str], None]


@dataclass
class BenchOptions:
    """What ``deploy bench`` takes; see ``deploy bench --help``."""

    target: str  # a deploy convert output directory, or a MODEL to convert first
    runtimes: Sequence[str] | None = None  # default: every runtime the run has an artifact for
    threads: int | None = None  # default: the CPUs this process may use
    batches: Sequence[int] = (1,)
    settings: BenchSettings = field(default_factory=BenchSettings)
    compare_train: bool = False
    device: str = "cpu"  # the torch runtime's device: cpu, cuda or auto
    isolation: str = "subprocess"
    chart: bool = True
    convert: ConvertOptions | None = None  # how to convert a MODEL (its targets follow the runtimes)
    model: str | None = None  # the training model of a run directory (with convert's checkpoint, code path, ...)
    allow_changed: bool = False  # time artifacts whose sha256 differs from the run's record
    trust_pickle: bool = False  # load what would unpickle (reloading a pickled training model, a changed .pt2)
    command: str | None = None


@dataclass
class BenchResult:
    out_dir: str
    entry: dict  # what was appended to report.json's "benchmarks"
    chart: str | None = None


def _noop(_: str) -> None:
    pass


def _check_runtimes(runtimes: Sequence[str], device: str) -> None:
    known = registry.runtimes()
    unknown = [r for r in runtimes if r not in known]
    if unknown:
        raise PipelineError(f"unknown runtime(s) {', '.join(unknown)}; known runtimes: {', '.join(known)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda needs a CUDA GPU and torch sees none on this machine; use --device cpu")
    for r in runtimes:
        target = registry.by_runtime(r)
        if target.device == "cuda" and not torch.cuda.is_available():
            raise PipelineError(f"the {r} runtime needs a CUDA GPU and torch sees none on this machine; drop {r} "
                                "from --runtimes")
        try:
            registry.check_available(target, f"benchmarking on {r}")
        except MissingDependency as e:
            raise PipelineError(f"{str(e).rstrip('.')}; drop {r} from --runtimes") from e
        if target.not_run_here():
            raise PipelineError(f"the {r} runtime cannot run here ({target.not_run_here()}); drop {r} from --runtimes")


def _check_options(opts: BenchOptions) -> str:
    """Refuse bad options before any work; the device the torch runtime uses."""
    if opts.isolation not in ISOLATION:
        raise PipelineError(f"unknown isolation {opts.isolation!r}; choose one of {', '.join(ISOLATION)}")
    if not opts.batches or min(opts.batches) < 1:
        raise PipelineError("--batch needs positive batch sizes, e.g. 1,8")
    if opts.threads is not None and opts.threads < 1:
        raise PipelineError(f"--threads must be at least 1, got {opts.threads}")
    check_threads(opts.threads)
    if opts.model is not None and not os.path.isdir(opts.target):
        raise PipelineError(f"--model names the training model of a run directory, and {opts.target} is not one; "
                            f"drop --model (a MODEL is converted first)")
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.runtimes:
        _check_runtimes(opts.runtimes, device)
    if opts.chart:
        require("matplotlib", "bench", "the benchmark chart (or pass --no-chart)")
    return device


def _refuse_missing(target: str) -> None:
    """A DIR_OR_MODEL that does not exist is refused here unless it names a model with no file (``timm:...``)."""
    try:
        kind, path, _ = sources.parse_source(target)
    except sources.SourceError:
        kind, path = "", target
    if kind in ("", "file", "pickle", "pt2") and not os.path.exists(path):
        raise PipelineError(f"{path} does not exist: pass a run directory that deploy convert wrote, or a model "
                            "to convert first (a zoo name such as repvgg_digits, timm:NAME, path/to/file.py:FACTORY "
                            "or a checkpoint)")


def _resolve_dir(opts: BenchOptions, progress: Progress) -> Path:
    """The run directory: ``opts.target`` itself, or where converting the model ``opts.target`` wrote."""
    if os.path.isdir(opts.target):
        load_record(opts.target)
        return Path(opts.target)
    if os.path.exists(opts.target) and not os.path.isfile(opts.target):
        raise PipelineError(f"{opts.target} is neither a deploy output directory nor a model")
    if not os.path.exists(opts.target):
        _refuse_missing(opts.target)
    runtimes = opts.runtimes or [registry.get(t).runtime for t in ("pt2", *registry.names()) if registry.get(t).default
                                 or registry.get(t).always]
    conv = opts.convert or ConvertOptions()
    conv.model = opts.target
    conv.targets = tuple(t.name for t in map(registry.by_runtime, runtimes) if not t.always)
    progress(f"{opts.target} is a model: converting it first (targets {', '.join(conv.targets) or 'none'})")
    result = convert(conv, progress=progress)
    if not result.passed:
        raise PipelineError(f"converting {opts.target} failed ({', '.join(s.name for s in result.failed)}); see "
                            f"{result.out_dir}/report.md: only verified artifacts are benchmarked")
    return Path(result.out_dir)


def _stage_files(record: RunRecord, runtimes: Sequence[str] | None) -> tuple[dict[str, StageRecord], list[str]]:
    """``{runtime: stage}`` of the verified artifact each runtime measures (its target's main stage), and notes."""
    picked, notes = {}, []
    made = [s for s in record.stages if s.name != "training"]
    wanted = runtimes or [t.runtime for t in registry.all_targets() if main_stage(made, t.name) is not None]
    for runtime in wanted:
        target = registry.by_runtime(runtime)
        stage = main_stage(made, target.name)
        if stage is None or not stage.path:
            raise PipelineError(f"the run in {record.out_dir} has no {runtime} artifact; convert with --targets "
                                f"including {target.name}, or drop {runtime} from --runtimes")
        if stage.verification.not_run:
            notes.append(f"{runtime}: skipped, its artifact {stage.path} was written, not run "
                         f"({stage.verification.not_run})")
            continue
        if not stage.passed:
            notes.append(f"{runtime}: skipped, its artifact {stage.path} did not verify ({stage.reason})")
            continue
        picked[runtime] = stage
    return picked, notes


def _int8_stages(record: RunRecord, picked: dict[str, StageRecord]) -> tuple[dict[str, StageRecord], list[str]]:
    """``{runtime: stage}`` of the verified INT8 artifact made from each picked fp32 stage (an int8 run), and notes
    for those that did not pass the accuracy guard."""
    found, notes = {}, []
    for runtime, stage in picked.items():
        q = next((s for s in record.stages if s.precision == "int8" and s.parent == stage.name), None)
        if q is None or not q.path:
            continue
        if q.passed:
            found[runtime] = q
        else:
            notes.append(f"{runtime}: INT8 artifact {q.path} not timed, it did not pass ({q.reason})")
    return found, notes


def _nms_stages(record: RunRecord, picked: dict[str, StageRecord]) -> dict[str, StageRecord]:
    """``{runtime: stage}`` of the verified artifact ending in NMS on each picked runtime (a ``--nms`` run)."""
    from .tasks import ends_in_nms

    found = {}
    for s in record.stages[1:]:
        runtime = registry.get(s.format).runtime
        if ends_in_nms(s) and s.passed and s.path and runtime in picked:
            found.setdefault(runtime, s)
    return found


def _check_unchanged(stages: Sequence[StageRecord], out_dir: Path, allow_changed: bool,
                     trust_pickle: bool) -> list[str]:
    """Refuse stages whose files changed since convert (sha256): they are not the artifacts that were verified.
    With ``allow_changed`` they are timed as they are, with a note each (a changed ``.pt2`` also needs
    ``trust_pickle``). Paths are checked to be inside ``out_dir`` and hashes compared before anything is opened."""
    notes, refused = [], []
    for s in {s.name: s for s in stages}.values():
        _, changed = s.files.check(out_dir)
        if not changed:
            continue
        if not allow_changed:
            refused.append(f"{s.name} ({', '.join(changed)})")
        elif s.format == "pt2" and not trust_pickle:
            raise PipelineError(f"{', '.join(changed)} changed since convert (sha256 differs), and loading a changed "
                                ".pt2 can run code from it; pass --trust-pickle if you trust its source")
        else:
            notes.append(f"{s.name}: {', '.join(changed)} changed since convert (sha256 differs); timed as it is "
                         "now (--allow-changed)")
    if refused:
        raise PipelineError(f"file(s) changed since convert (sha256 differs): {'; '.join(refused)}; they are not the "
                            "artifacts that were verified: rerun deploy convert, or pass --allow-changed to time "
                            "them as they are")
    return notes


def _dynamic(stage: StageRecord) -> bool:
    art = stage.export.artifact
    shape = art.inputs[0].shape if art is not None and art.inputs else (1,)
    return not (isinstance(shape[0], int) and shape[0] > 0)


def _load_training(record: RunRecord, out_dir: Path, opts: BenchOptions) -> torch.nn.Module:
    """The run's training model, from this command line (``--model`` with its ``--checkpoint``, ``--code-path``,
    ``--trust-pickle``), else from the record when it names a built-in source (``pipeline.recorded_source``): a run
    directory never chooses code to run. Either way it must compute the training outputs the run recorded."""
    given = opts.convert or ConvertOptions()
    model = opts.model or (None if os.path.isdir(opts.target) else opts.target)  # a MODEL was converted first
    source = replace(given, model=model) if model else recorded_source(record)
    if source is None:
        raise PipelineError(f"the training model of {out_dir} is not reloaded from its report, which names "
                            f"{record.load.get('spec')!r} (a run directory never chooses code to run); pass it on the "
                            f"command line: {reload_command(record, 'deploy bench', out_dir)}")
    try:
        model = sources.load_model(source.model, checkpoint=source.checkpoint, checkpoint_key=source.checkpoint_key,
                                   code_path=source.code_path, num_classes=source.num_classes, width=source.width,
                                   allow_train_mode=source.allow_train_mode, seed=source.seed,
                                   trust_pickle=given.trust_pickle).model
    except sources.SourceError as e:
        raise PipelineError(f"the training model {source.model} cannot be loaded ({str(e).rstrip('.')})") from e
    check_training_model(model, record, out_dir, f"the training model {source.model}")
    return model


def _check_memory(program, shape: Sequence[int], batches: Sequence[int], convert: bool) -> None:
    """Refuse batch sizes whose forms need more memory than this process can take: the deploy program's activations
    (one forward on fake tensors at the run's batch, scaled), or a whole conversion when the forms are made again."""
    module = program.module()
    batch = max(batches)
    need = resources.estimate(module, tuple(shape), batch=batch, conversion=convert)
    resources.check_memory(need, f"benchmarking at batch {batch}", "pass a smaller --batch")


def _remove_stale_work() -> None:
    """Delete the temporary folders of benchmarks whose process is gone (killed outright, say by SIGKILL)."""
    for path in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*-*"):
        pid = path.name[len(WORK_PREFIX):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _float_precision(record: RunRecord) -> str:
    """The precision of the run's main (float) artifacts: an int8 run's are fp32, its INT8 ones beside them."""
    return "fp32" if record.options.precision == "int8" else record.options.precision


def _export_form(module, x: torch.Tensor, runtimes: Sequence[str], record: RunRecord, folder: Path,
                 progress: Progress, label: str) -> dict[str, str | Exception]:
    """Export ``module`` at input ``x`` for each runtime with ``deploy convert``'s own export steps and the run's
    precision and opset: ``{runtime: path}``, or the error where an export failed."""
    folder.mkdir(parents=True, exist_ok=True)
    precision, opset = _float_precision(record), record.options.opset
    wanted = [registry.by_runtime(r).name for r in runtimes]
    order = check_targets([t for t in wanted if not registry.get(t).always], precision)
    made = export_forms(module, (x,), folder, order, precision=precision, opset=opset,
                        progress=lambda m: progress(f"  {label} form: {m}"))
    paths: dict[str, str | Exception] = {}
    for runtime, target in zip(runtimes, wanted):
        stage = main_stage(made, target)
        paths[runtime] = os.fspath(folder / stage.path) if stage.path else PipelineError(stage.export.error)
    return paths


def _forms_at(x: torch.Tensor, picked: dict[str, StageRecord], extra: dict[str, dict[str, StageRecord]],
              out_dir: Path, record: RunRecord, training, compare_train: bool,
              work: Path, progress: Progress) -> dict[str, dict[str, str | Exception]]:
    """``{form: {runtime: file, or the exception of its failed export}}`` at the batch of ``x``: the run's own
    artifacts where their batch fits, else the forms exported again at this batch. The ``extra`` forms
    (``int8``, ``nms``: ``{form: {runtime: stage}}``) are timed at their own batch only (quantizing again at
    another one is a new calibration, not a benchmark), or at any batch when it is dynamic."""
    batch, shape = x.shape[0], record.inputs.shape

    def fitting(stages: dict[str, StageRecord]) -> dict[str, str | Exception]:
        return {r: os.fspath(inside(out_dir, s.path)) for r, s in stages.items() if batch == shape[0] or _dynamic(s)}

    forms = {"deploy": fitting(picked), **{form: fitting(stages) for form, stages in extra.items()}}
    stale = [r for r in picked if r not in forms["deploy"]]
    if stale:
        import fusers

        progress(f"batch {batch}: re-running the passes and exporting the deploy form at batch {batch}")
        plain = fusers.reparameterize(training, (x,), seed=record.options.seed)
        forms["deploy"].update(_export_form(plain, x, stale, record, work / f"deploy-b{batch}", progress, "deploy"))
    if compare_train:
        progress(f"batch {batch}: exporting the training form the same way ...")
        forms["training"] = _export_form(training, x, list(picked), record, work / f"training-b{batch}", progress,
                                         "training")
    return forms


def _time_runtime(job: BenchJob, forms: dict, isolation: str, work: Path, settings_used: dict,
                  progress: Progress) -> list[dict]:
    """Rows of timing the forms of ``job.runtime`` (its ``forms`` are filled here); failures become rows."""
    runtime, batch = job.runtime, job.input_shape[0]
    rows = []
    for form in FORMS:
        got = forms.get(form, {}).get(runtime)
        if isinstance(got, Exception):
            rows.append({"runtime": runtime, "batch": batch, "form": form, "variant": job.precision,
                         "error": f"export failed: {first_line(got)}"})
        elif got is not None:
            job.forms[form] = got
    if not job.forms:
        return rows
    s = job.settings
    progress(f"batch {batch}: timing {' and '.join(job.forms)} on {runtime} (at least {s.min_iters} calls and "
             f"{s.min_ms:.0f} ms each) ...")
    try:
        result = run_isolated(job, os.fspath(work)) if isolation == "subprocess" else run_job(job)
    except Exception as e:
        return rows + [{"runtime": runtime, "batch": batch, "form": f, "variant": job.precision,
                        "error": first_line(e)} for f in job.forms]
    settings_used[runtime] = result["settings"]
    for row in result["rows"]:
        rows.append({"runtime": runtime, "batch": batch, **row})
        if "p50" in row:
            flag = f" UNRELIABLE: {'; '.join(row['unreliable'])}" if row.get("unreliable") else ""
            progress(f"  {runtime} {row['variant']} {row['form']}: p50 {row['p50']:.3f} ms (p90 {row['p90']:.3f}, "
                     f"{row['iters']} calls){flag}")
        else:
            progress(f"  {runtime} {row['form']}: FAILED {row['error']}")
    return rows


def _cost(module, x: torch.Tensor) -> dict:
    import fusers

    from .inspect import inspect_module, layer_costs

    if isinstance(module, torch.export.ExportedProgram):  # captured again: a dynamic batch gets concrete shapes
        module = module.module()
        set_training(module, False)  # an exported program's module comes in train mode; it has no BatchNorm left
        module = fusers.capture(module, (x,))
    s = inspect_module(module, (x,))
    return {"flops": s.flops, "params": s.params, "memory_access": s.memory_access, "elementwise": s.elementwise,
            "forks": s.forks, "fork_branches": s.fork_branches, "ops": s.nodes, "convolutions": s.convolutions,
            "batchnorms": s.batchnorms, "branch_groups": s.branch_groups, "layers": layer_costs(module, (x,))}


def int8_speedups(rows: Sequence[dict]) -> list[dict]:
    """fp32 deploy p50 / INT8 p50 for every (runtime, batch) measured in both."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "p50" in r and r["form"] in ("deploy", "int8"):
            by_key.setdefault((r["runtime"], r["batch"]), {})[r["form"]] = r
    return [{"runtime": k[0], "batch": k[1], "fp32_p50": v["deploy"]["p50"], "int8_p50": v["int8"]["p50"],
             "speedup": v["deploy"]["p50"] / v["int8"]["p50"]} for k, v in by_key.items() if len(v) == 2]


def slower_int8_notes(ratios: Sequence[dict]) -> list[str]:
    """One note for each INT8 form of :func:`int8_speedups` that is not faster than its fp32 form."""
    return [f"INT8 is not faster than fp32 on {s['runtime']} at batch {s['batch']} (p50 {s['fp32_p50']:.3f} -> "
            f"{s['int8_p50']:.3f} ms): keep the fp32 artifact there; deploy tune never chooses such a form"
            for s in ratios if s["speedup"] <= 1.0]


def nms_shares(rows: Sequence[dict]) -> list[dict]:
    """The share of the end-to-end (with NMS) p50 that NMS takes, for every (runtime, batch) measured with and
    without it: ``(p50 with NMS - p50 without) / p50 with NMS``."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "p50" in r and r["form"] in ("deploy", "nms"):
            by_key.setdefault((r["runtime"], r["batch"]), {})[r["form"]] = r
    return [{"runtime": k[0], "batch": k[1], "deploy_p50": v["deploy"]["p50"], "nms_p50": v["nms"]["p50"],
             "share": (v["nms"]["p50"] - v["deploy"]["p50"]) / v["nms"]["p50"]} for k, v in by_key.items()
            if len(v) == 2]


def reliability(rows: Sequence[dict], cpus: int, threads: int) -> tuple[dict, list[str]]:
    """The thresholds and load range of a benchmark's rows (``runtimes.bench.unreliable`` flagged each row), and a
    note when rows were flagged."""
    loads = [r[k] for r in rows for k in ("load_before", "load_after") if r.get(k) is not None]
    flagged = [r for r in rows if r.get("unreliable")]
    summary = {"max_spread": MAX_SPREAD, "load_limit": LOAD_PER_CPU * cpus, "usable_cpus": cpus, "threads": threads,
               "load_min": min(loads, default=None), "load_max": max(loads, default=None), "flagged": len(flagged)}
    if not flagged:
        return summary, []
    timed = sum("p50" in r for r in rows)
    return summary, [f"{len(flagged)} of {timed} timings are flagged unreliable (the table says why: p90/p50 above "
                     f"{MAX_SPREAD}, or a 1-minute load average above the {cpus} usable CPUs); rerun deploy bench on "
                     "a quiet machine before quoting them"]


def speedups(rows: Sequence[dict]) -> list[dict]:
    """Training p50 / deploy p50 for every (runtime, variant, batch) measured in both forms."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "p50" in r:
            by_key.setdefault((r["runtime"], r["variant"], r["batch"]), {})[r["form"]] = r
    return [{"runtime": k[0], "variant": k[1], "batch": k[2], "training_p50": v["training"]["p50"],
             "deploy_p50": v["deploy"]["p50"], "speedup": v["training"]["p50"] / v["deploy"]["p50"]}
            for k, v in by_key.items() if "training" in v and "deploy" in v]


def bench(opts: BenchOptions, progress: Progress | None = None) -> BenchResult:
    """Benchmark a run directory (or a model, converted first); see the module docstring."""
    progress = progress or _noop
    started = time.perf_counter()
    device = _check_options(opts)
    out_dir = _resolve_dir(opts, progress)
    record = load_record(out_dir)
    picked, notes = _stage_files(record, opts.runtimes)
    notes += [n for n in [registry.phone_note(list(picked))] if n]
    plain_stages = [s for s in record.stages if PT2 in s.files.files]  # the .pt2 the cost model reads
    notes += _check_unchanged([*picked.values(), *plain_stages], out_dir, opts.allow_changed, opts.trust_pickle)
    if not picked:
        raise PipelineError(f"no verified artifact in {out_dir} to benchmark; rerun deploy convert")
    _check_runtimes(list(picked), device)
    threads = opts.threads or usable_cpus()
    shape = list(record.inputs.shape)
    precision = _float_precision(record)
    int8, int8_notes = _int8_stages(record, picked)
    notes += int8_notes + _check_unchanged(list(int8.values()), out_dir, opts.allow_changed, opts.trust_pickle)
    if int8 and any(b != shape[0] and not _dynamic(s) for b in opts.batches for s in int8.values()):
        notes.append(f"INT8 artifacts are timed at their batch {shape[0]} only")
    nms = _nms_stages(record, picked)
    notes += _check_unchanged(list(nms.values()), out_dir, opts.allow_changed, opts.trust_pickle)
    if nms and any(b != shape[0] and not _dynamic(s) for b in opts.batches for s in nms.values()):
        notes.append(f"artifacts with NMS are timed at their batch {shape[0]} only (convert with --dynamic to time "
                     "them at any batch)")

    training = None
    needs_training = opts.compare_train or any(b != shape[0] and not _dynamic(s) for b in opts.batches
                                               for s in picked.values())
    program = load_program(out_dir / PT2, trust_pickle=opts.trust_pickle)
    _check_memory(program, shape, opts.batches, needs_training)
    progress(f"benchmarking {record.model['spec']} from {out_dir} on {', '.join(picked)} "
             f"({threads} thread(s), batch {','.join(map(str, opts.batches))}, "
             f"{'each runtime in its own process' if opts.isolation == 'subprocess' else 'one process'})")
    try:
        training = _load_training(record, out_dir, opts)
    except PipelineError as e:
        if needs_training:
            why = "--compare-train" if opts.compare_train else "a batch size other than the run's"
            raise PipelineError(f"{why} needs the training model: {str(e).rstrip('.')}") from e
        notes.append(f"cost model of the training form left out: {e}")

    rows: list[dict] = []
    settings_used: dict[str, dict] = {}
    _remove_stale_work()
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))
    try:
        for batch in opts.batches:
            x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(0))
            forms = _forms_at(x, picked, {"int8": int8, "nms": nms}, out_dir, record, training, opts.compare_train,
                              work, progress)
            for runtime, stage in picked.items():
                target = registry.by_runtime(runtime)
                job = BenchJob(runtime, {}, [batch, *shape[1:]], runner=target.runner,
                               runner_options={**target.runner_options(stage.precision), **target.bench_options,
                                               **({"trust_pickle": True} if opts.trust_pickle and
                                                  target.name == "pt2" else {})},
                               note=target.bench_note, threads=threads, precision=precision,
                               device=device if target.name == "pt2" else "cpu", settings=opts.settings,
                               variants={"int8": {"precision": "int8",
                                                  "runner_options": target.runner_options("int8")}})
                rows += _time_runtime(job, forms, opts.isolation, work, settings_used, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    x1 = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    cost = {"deploy": _cost(program, x1)}
    if training is not None:
        cost["training"] = _cost(training, x1)
    cpu = cpu_facts(threads)
    for r in rows:
        flops = cost.get(r["form"], {}).get("flops")
        target = registry.by_runtime(r["runtime"])
        on_cpu = target.device == "cpu" and not (target.name == "pt2" and device == "cuda")
        if "p50" in r and flops and cpu["peak_gflops"] and on_cpu:  # FLOPs of the run's batch, scaled
            r["achieved_fraction"] = flops * r["batch"] / shape[0] / (r["p50"] * 1e-3) / (cpu["peak_gflops"] * 1e9)
    checks, flag_notes = reliability(rows, cpu["usable_cpus"], threads)
    flag_notes += slower_int8_notes(int8_speedups(rows))
    entry = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": opts.command,
        "runtimes": list(picked),
        "batches": list(opts.batches),
        "threads": threads,
        "device": device,
        "compare_train": opts.compare_train,
        "isolation": {"subprocess": "each runtime timed in its own Python process",
                      "none": "all runtimes in one process"}[opts.isolation]
        + "; training and deploy forms of one runtime interleaved call by call; ONNX Runtime intra-op spinning off",
        "settings": {**asdict(opts.settings), "runtime_settings": settings_used},
        "hardware": {"cpu": cpu, "gpus": gpu_facts(), "versions": versions()},
        "results": rows,
        "reliability": checks,
        "speedups": speedups(rows),
        "int8_speedups": int8_speedups(rows),
        "nms_shares": nms_shares(rows),
        "cost": cost,
        "notes": flag_notes + notes,
        "seconds": round(time.perf_counter() - started, 2),
    }
    chart = _write(out_dir, record, entry, opts.chart)
    progress(f"appended the benchmark to {out_dir}/report.json and report.md"
             + (f"; chart {out_dir}/{chart}" if chart else ""))
    return BenchResult(str(out_dir), entry, os.fspath(out_dir / chart) if chart else None)


def _write(out_dir: Path, record: RunRecord, entry: dict, chart: bool) -> str | None:
    """Append ``entry`` to the record and draw its chart; files are replaced only once all are written."""
    from .report import jsonable, write_reports

    entry["chart"] = f"bench-{len(record.benchmarks) + 1}.png" if chart else None
    record.benchmarks.append(entry)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-", dir=out_dir))
    try:
        if chart:
            plot(jsonable(entry), tmp / entry["chart"], record.model["spec"])
        write_reports(record.to_dict(), tmp)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry["chart"]


def plot(entry: dict, path: Path, title: str):
    """A bar chart of p50 latency (whiskers to p90) per runtime/variant/batch, training beside deploy.

    The latency axis is logarithmic: a sub-millisecond ONNX Runtime bar stays visible beside a
    20 ms torch one. Returns the Figure saved to ``path`` (drawn on its own Agg canvas, without pyplot)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    groups: dict[str, dict[str, dict]] = {}
    for r in entry["results"]:
        if "p50" in r:
            variant = "" if r["variant"] in ("fp32", "int8") else f" {r['variant']}"
            label = r["runtime"] + variant + f"\nbatch {r['batch']}"
            groups.setdefault(label, {})[r["form"]] = r
    labels = list(groups)
    forms = [f for f in FORMS if any(f in g for g in groups.values())]
    width = 0.8 / max(len(forms), 1)
    fig_width = max(4.0, 1.6 * len(labels) + 1)
    fig = Figure(figsize=(fig_width, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_yscale("log")
    colors = {"training": "#c8a2a2", "deploy": "#3b6ea5", "int8": "#5aa469", "nms": "#e0a030"}
    legend = {"int8": "deploy form, int8", "nms": "deploy form with NMS"}
    times = [v for g in groups.values() for r in g.values() for v in (r["p50"], r["p90"]) if v and v > 0]
    # bars grow from a decade below the fastest p50; room above the slowest p90 for the speed-up labels
    bottom = 10 ** np.floor(np.log10(min(times)) - 0.3) if times else 0.01
    for i, form in enumerate(forms):
        xs = [j + (i - (len(forms) - 1) / 2) * width for j in range(len(labels))]
        p50 = np.array([groups[lb][form]["p50"] if form in groups[lb] else np.nan for lb in labels], dtype=float)
        p90 = np.array([groups[lb][form]["p90"] if form in groups[lb] else np.nan for lb in labels], dtype=float)
        ax.bar(xs, p50 - bottom, width, bottom=bottom, label=legend.get(form, f"{form} form"), color=colors[form],
               yerr=[np.zeros(len(p50)), np.maximum(p90 - p50, 0)], capsize=3)
    for j, lb in enumerate(labels):
        g = groups[lb]
        if "training" in g and "deploy" in g:
            top = max(g["training"]["p90"], g["deploy"]["p90"])
            ax.annotate(f"{g['training']['p50'] / g['deploy']['p50']:.2f}x", (j, top), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(bottom, (max(times) if times else 1.0) * 4)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("latency p50 (ms, log scale)\nwhisker to p90", fontsize=9)
    where = "torch on CUDA, " if entry["device"] == "cuda" else ""
    heading = f"{title}: {where}{entry['threads']} CPU thread(s)"
    flagged = sum(bool(r.get("unreliable")) for r in entry["results"])
    if flagged:
        heading += f"; {flagged} timing(s) UNRELIABLE (busy machine or wide spread: see report.md)"
    # centred on the figure, wrapped to its width (DejaVu Sans at 9 pt: about 5.4 pt a character)
    fig.suptitle(textwrap.fill(heading, width=int((fig_width - 0.4) * 72 / 5.4)), fontsize=9)
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 1), ncols=len(forms), frameon=False)  # above the bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
