"""``deploy bench``: measured latency of the deploy form (and the training form) on every runtime.

``bench(opts)`` takes a ``deploy convert`` output directory, or a model that it converts first
(into ``runs/<model>``, as ``deploy convert`` would). For each batch size and runtime it times the
run's verified artifacts with :mod:`runtimes.bench` (warm-up by count and time, then enough
iterations for the minimum duration), one runtime at a time in its own process. With
``compare_train`` the training model is reloaded from the run's record, exported the same way
(same exporters, precision and opset), and timed interleaved with the deploy form, so
the speed-up of reparameterization is a ratio measured on the same machine state.

A batch size other than the artifacts' static one re-exports both forms at that batch (the deploy
form by re-running the passes, each again checked in float64) into a temporary folder.

The result is appended to the directory's ``report.json`` (``benchmarks``, one entry per run) and
rendered in ``report.md``, with a chart ``bench-N.png``. Each entry holds the hardware facts (CPU
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporters.base import MissingDependency, first_line, require
from runtimes.bench import ISOLATION, RUNTIMES, BenchJob, BenchSettings, run_isolated, run_job
from runtimes.hardware import cpu_facts, gpu_facts, usable_cpus

from . import sources
from .pipeline import (PT2, ConvertOptions, PipelineError, _check_targets, _export_stages, _save_pt2, convert,
                       load_report, versions)

__all__ = ["BenchOptions", "BenchResult", "bench", "speedups", "RUNTIME_OF_STAGE"]


# the stage of a convert run whose artifact each runtime measures (the last that exists)
RUNTIME_OF_STAGE = {"torch": ("pt2",), "onnxruntime": ("onnx", "onnx-simplified"), "openvino": ("openvino",),
                    "tflite": ("tflite",), "tensorrt": ("tensorrt",)}
_TARGET_OF = {"onnxruntime": "onnx", "openvino": "openvino", "tflite": "tflite", "tensorrt": "tensorrt"}
_NEEDS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino"),
          "tflite": ("ai_edge_litert", "tflite"), "tensorrt": ("tensorrt", "tensorrt")}

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
    command: str | None = None


@dataclass
class BenchResult:
    out_dir: str
    entry: dict  # what was appended to report.json's "benchmarks"
    chart: str | None = None


def _noop(_: str) -> None:
    pass


def _check_runtimes(runtimes: Sequence[str], device: str) -> None:
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise PipelineError(f"unknown runtime(s) {', '.join(unknown)}; known runtimes: {', '.join(RUNTIMES)}")
    if "tensorrt" in runtimes and not torch.cuda.is_available():
        raise PipelineError("the tensorrt runtime needs a CUDA GPU and torch sees none on this machine; drop tensorrt "
                            "from --runtimes")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda needs a CUDA GPU and torch sees none on this machine; use --device cpu")
    for r in runtimes:
        if r in _NEEDS:
            module, extra = _NEEDS[r]
            try:
                require(module, extra, f"benchmarking on {r}")
            except MissingDependency as e:
                raise PipelineError(f"{str(e).rstrip('.')}, or drop {r} from --runtimes") from e


def _check_options(opts: BenchOptions) -> str:
    """Refuse bad options before any work; the device the torch runtime uses."""
    if opts.isolation not in ISOLATION:
        raise PipelineError(f"unknown isolation {opts.isolation!r}; choose one of {', '.join(ISOLATION)}")
    if not opts.batches or min(opts.batches) < 1:
        raise PipelineError("--batch needs positive batch sizes, e.g. 1,8")
    if opts.threads is not None and opts.threads < 1:
        raise PipelineError(f"--threads must be at least 1, got {opts.threads}")
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.runtimes:
        _check_runtimes(opts.runtimes, device)
    if opts.chart:
        require("matplotlib", "bench", "the benchmark chart (or pass --no-chart)")
    return device


def _resolve_dir(opts: BenchOptions, progress: Progress) -> Path:
    """The run directory: ``opts.target`` itself, or where converting the model ``opts.target`` wrote."""
    if os.path.isdir(opts.target):
        load_report(opts.target)
        return Path(opts.target)
    if os.path.exists(opts.target) and not os.path.isfile(opts.target):
        raise PipelineError(f"{opts.target} is neither a deploy output directory nor a model")
    runtimes = opts.runtimes or ("torch", "onnxruntime", "openvino", "tflite")
    conv = opts.convert or ConvertOptions()
    conv.model = opts.target
    conv.targets = tuple(_TARGET_OF[r] for r in runtimes if r in _TARGET_OF)
    progress(f"{opts.target} is a model: converting it first (targets {', '.join(conv.targets) or 'none'})")
    result = convert(conv, progress=progress)
    if not result.passed:
        raise PipelineError(f"converting {opts.target} failed ({', '.join(s.name for s in result.failed)}); see "
                            f"{result.out_dir}/report.md: only verified artifacts are benchmarked")
    return Path(result.out_dir)


def _stage_files(report: dict, runtimes: Sequence[str] | None) -> tuple[dict[str, dict], list[str]]:
    """``{runtime: stage record}`` of the verified artifact each runtime measures, and notes."""
    stages = {s["name"]: s for s in report["stages"]}
    picked, notes = {}, []
    wanted = runtimes or [r for r in RUNTIMES if any(n in stages for n in RUNTIME_OF_STAGE[r])]
    for runtime in wanted:
        names = [n for n in RUNTIME_OF_STAGE[runtime] if n in stages and stages[n].get("path")]
        if not names:
            target = _TARGET_OF.get(runtime, "pt2")
            raise PipelineError(f"the run in {report['out_dir']} has no {runtime} artifact; convert with --targets "
                                f"including {target}, or drop {runtime} from --runtimes")
        stage = stages[names[-1]]
        if not stage.get("passed"):
            notes.append(f"{runtime}: skipped, its artifact {stage['path']} did not verify ({stage.get('reason')})")
            continue
        picked[runtime] = stage
    return picked, notes


def _dynamic(stage: dict) -> bool:
    shape = ((stage.get("artifact") or {}).get("inputs") or [{}])[0].get("shape") or [1]
    return not (isinstance(shape[0], int) and shape[0] > 0)


def _load_training(report: dict) -> torch.nn.Module:
    args = dict(report.get("load") or {"spec": report["model"]["spec"]})
    spec = args.pop("spec")
    try:
        return sources.load_model(spec, **{k: v for k, v in args.items() if v is not None}).model
    except Exception as e:
        raise PipelineError(f"the training model {spec} of this run cannot be reloaded ({first_line(e)}); "
                            "--compare-train and other batch sizes need it: run deploy bench on the model itself"
                            ) from e


def _export_form(module, x: torch.Tensor, runtimes: Sequence[str], report: dict, folder: Path,
                 progress: Progress, label: str) -> dict[str, str | Exception]:
    """Export ``module`` at input ``x`` for each runtime with ``deploy convert``'s own export steps and the run's
    precision and opset: ``{runtime: path}``, or the error where an export failed."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = ConvertOptions(precision=report["options"]["precision"], opset=report["options"].get("opset", 18))
    targets = _check_targets([_TARGET_OF[r] for r in runtimes if r in _TARGET_OF], opts.precision)
    made = _export_stages(targets, module, (x,), folder, opts, {}, lambda m: progress(f"  {label} form: {m}"))
    stages = {stage.name: (stage, art) for stage, art in made}
    paths: dict[str, str | Exception] = {}
    for runtime in runtimes:
        if runtime == "torch":
            try:
                paths[runtime] = _save_pt2(module, (x,), folder / PT2, False, {}).path
            except PipelineError as e:
                paths[runtime] = e
            continue
        stage, art = next(stages[n] for n in reversed(RUNTIME_OF_STAGE[runtime]) if n in stages)
        paths[runtime] = art.path if art is not None else PipelineError(stage.error)
    return paths


def _forms_at(x: torch.Tensor, picked: dict[str, dict], out_dir: Path, report: dict, training, compare_train: bool,
              work: Path, progress: Progress) -> dict[str, dict[str, str | Exception]]:
    """``{form: {runtime: file, or the exception of its failed export}}`` at the batch of ``x``: the run's own
    artifacts where their batch fits, else the forms exported again at this batch."""
    batch, shape = x.shape[0], report["inputs"]["shape"]
    forms: dict[str, dict[str, str | Exception]] = {
        "deploy": {r: os.fspath(out_dir / s["path"]) for r, s in picked.items() if batch == shape[0] or _dynamic(s)}}
    stale = [r for r in picked if r not in forms["deploy"]]
    if stale:
        import fusers

        progress(f"batch {batch}: re-running the passes and exporting the deploy form at batch {batch}")
        plain = fusers.reparameterize(training, (x,), seed=report["options"].get("seed", 0))
        forms["deploy"].update(_export_form(plain, x, stale, report, work / f"deploy-b{batch}", progress, "deploy"))
    if compare_train:
        progress(f"batch {batch}: exporting the training form the same way ...")
        forms["training"] = _export_form(training, x, list(picked), report, work / f"training-b{batch}", progress,
                                         "training")
    return forms


def _time_runtime(job: BenchJob, forms: dict, isolation: str, work: Path, settings_used: dict,
                  progress: Progress) -> list[dict]:
    """Rows of timing the forms of ``job.runtime`` (its ``forms`` are filled here); failures become rows."""
    runtime, batch = job.runtime, job.input_shape[0]
    rows = []
    for form in ("training", "deploy"):
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
            progress(f"  {runtime} {row['variant']} {row['form']}: p50 {row['p50']:.3f} ms (p90 {row['p90']:.3f}, "
                     f"{row['iters']} calls)")
        else:
            progress(f"  {runtime} {row['form']}: FAILED {row['error']}")
    return rows


def _cost(module, x: torch.Tensor) -> dict:
    import fusers

    from .inspect import inspect_module, layer_costs

    if isinstance(module, torch.export.ExportedProgram):  # captured again: a dynamic batch gets concrete shapes
        module = module.module()
        for m in module.modules():  # an exported program's module comes in train mode; it has no BatchNorm left
            m.training = False
        module = fusers.capture(module, (x,))
    s = inspect_module(module, (x,))
    return {"flops": s.flops, "params": s.params, "memory_access": s.memory_access, "elementwise": s.elementwise,
            "forks": s.forks, "fork_branches": s.fork_branches, "ops": s.nodes, "convolutions": s.convolutions,
            "batchnorms": s.batchnorms, "branch_groups": s.branch_groups, "layers": layer_costs(module, (x,))}


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
    report = load_report(out_dir)
    picked, notes = _stage_files(report, opts.runtimes)
    if not picked:
        raise PipelineError(f"no verified artifact in {out_dir} to benchmark; rerun deploy convert")
    _check_runtimes(list(picked), device)
    threads = opts.threads or usable_cpus()
    shape = list(report["inputs"]["shape"])
    precision = report["options"]["precision"]

    training = None
    needs_training = opts.compare_train or any(b != shape[0] and not _dynamic(s) for b in opts.batches
                                               for s in picked.values())
    progress(f"benchmarking {report['model']['spec']} from {out_dir} on {', '.join(picked)} "
             f"({threads} thread(s), batch {','.join(map(str, opts.batches))}, "
             f"{'each runtime in its own process' if opts.isolation == 'subprocess' else 'one process'})")
    try:
        training = _load_training(report)
    except PipelineError as e:
        if needs_training:
            raise
        notes.append(f"cost model of the training form left out: {e}")

    rows: list[dict] = []
    settings_used: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="deploy-bench-"))
    try:
        for batch in opts.batches:
            x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(0))
            forms = _forms_at(x, picked, out_dir, report, training, opts.compare_train, work, progress)
            for runtime in picked:
                job = BenchJob(runtime, {}, [batch, *shape[1:]], threads=threads, precision=precision,
                               device=device if runtime == "torch" else "cpu", settings=opts.settings)
                rows += _time_runtime(job, forms, opts.isolation, work, settings_used, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    x1 = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    cost = {"deploy": _cost(torch.export.load(os.fspath(out_dir / PT2)), x1)}
    if training is not None:
        cost["training"] = _cost(training, x1)
    cpu = cpu_facts(threads)
    for r in rows:
        flops = cost.get(r["form"], {}).get("flops")
        on_cpu = not (r["runtime"] == "torch" and device == "cuda") and r["runtime"] != "tensorrt"
        if "p50" in r and flops and cpu["peak_gflops"] and on_cpu:  # FLOPs of the run's batch, scaled
            r["achieved_fraction"] = flops * r["batch"] / shape[0] / (r["p50"] * 1e-3) / (cpu["peak_gflops"] * 1e9)
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
        "speedups": speedups(rows),
        "cost": cost,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 2),
    }
    chart = _write(out_dir, report, entry, opts.chart)
    progress(f"appended the benchmark to {out_dir}/report.json and report.md"
             + (f"; chart {out_dir}/{chart}" if chart else ""))
    return BenchResult(str(out_dir), entry, os.fspath(out_dir / chart) if chart else None)


def _write(out_dir: Path, report: dict, entry: dict, chart: bool) -> str | None:
    """Append ``entry`` to the report and draw its chart; files are replaced only once all are written."""
    from .report import jsonable, write_reports

    benchmarks = report.setdefault("benchmarks", [])
    entry["chart"] = f"bench-{len(benchmarks) + 1}.png" if chart else None
    benchmarks.append(entry)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-", dir=out_dir))
    try:
        if chart:
            plot(jsonable(entry), tmp / entry["chart"], report["model"]["spec"])
        write_reports(report, tmp)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry["chart"]


def plot(entry: dict, path: Path, title: str) -> None:
    """A bar chart of p50 latency (whiskers to p90) per runtime/variant/batch, training beside deploy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, dict]] = {}
    for r in entry["results"]:
        if "p50" in r:
            label = r["runtime"] + ("" if r["variant"] == "fp32" else f" {r['variant']}") + f"\nbatch {r['batch']}"
            groups.setdefault(label, {})[r["form"]] = r
    labels = list(groups)
    forms = [f for f in ("training", "deploy") if any(f in g for g in groups.values())]
    width = 0.8 / max(len(forms), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels) + 1), 3.6))
    colors = {"training": "#c8a2a2", "deploy": "#3b6ea5"}
    for i, form in enumerate(forms):
        xs = [j + (i - (len(forms) - 1) / 2) * width for j in range(len(labels))]
        p50 = [groups[lb][form]["p50"] if form in groups[lb] else np.nan for lb in labels]
        p90 = [groups[lb][form]["p90"] if form in groups[lb] else np.nan for lb in labels]
        ax.bar(xs, p50, width, label=f"{form} form", color=colors[form],
               yerr=[np.zeros(len(p50)), np.subtract(p90, p50)], capsize=3)
    for j, lb in enumerate(labels):
        g = groups[lb]
        if "training" in g and "deploy" in g:
            top = max(g["training"]["p90"], g["deploy"]["p90"])
            ax.annotate(f"{g['training']['p50'] / g['deploy']['p50']:.2f}x", (j, top), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("latency p50 (ms), whisker to p90")
    where = "torch on CUDA, " if entry["device"] == "cuda" else ""
    ax.set_title(f"{title}: {where}{entry['threads']} CPU thread(s)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
