"""``deploy tune``: choose the deploy form for this machine by measuring it, under an accuracy bound.

A *candidate* is one way to run the model here: a runtime, a precision, a set of passes and a thread
count. :func:`tune` does, within ``budget_s`` seconds:

1. **Plan** (:func:`plan`): the product of the asked runtimes, precisions, pass sets and thread counts,
   pruned with the reason where a runtime is not installed or needs a device this machine lacks, where
   its target cannot make or run a precision (``Target.precisions`` / ``Target.hints``), or where this
   CPU cannot run it natively (``Target.native``: e.g. fp16 on a CPU without fp16 arithmetic).
2. **Convert** once per pass set (``deploy convert`` into ``OUT/forms/<passes>``, every rewrite proven in
   float64; ``--precision int8`` when an int8 candidate is planned, which also makes the fp32 artifacts,
   and ``fp16`` once more when an fp16 candidate survived the plan). A pass set that rewrites nothing
   beyond the default set is pruned: its forms are the default's.
3. **Judge** every candidate's artifact on its runtime on held-out samples (the model's own, or seeded
   inputs; never calibration data) with the accuracy guard of ``deploy.tasks.judge``: the accuracy drop
   against the fp32 training model when there are labels, else top-1 agreement (and SQNR for outputs
   that are not class scores). A candidate that fails the bound is never chosen, however fast.
4. **Screen** the eligible candidates with a short measurement (each runtime and thread count in its
   own process, candidates interleaved call by call, ``runtimes.bench``), then **drop** those clearly
   slower than the best one (:func:`clearly_slower`: a candidate whose *fastest* call took longer than
   the best candidate's 90th-percentile call cannot be the best on this noisy machine), and **measure**
   the rest in full, in ``rounds`` interleaved rounds: each round runs every runtime-and-threads process once,
   in an order that rotates and reverses from round to round, so that drift and other load hit every candidate
   alike. Most of the variation on a small model is between processes (thread placement, clock, load at that
   moment), not between the calls of one process: one long measurement gives a precise median of one lucky or
   unlucky process; five short ones show the spread. The peer baseline is measured in the same rounds: for a timm
   model, timm's own ``reparameterize_model`` exported by ``torch.onnx.export`` and run on ONNX Runtime with
   default settings; for other models the training form exported the same way.
5. **Rank** (:func:`rank`) by the median over the rounds of each round's p50 (``objective="latency"``), or of
   each round's milliseconds per sample (``"throughput"``). Each such median has a distribution-free interval
   (:func:`median_interval`: order statistics of the round values, 93.75 % for five rounds). A candidate is
   **better** than another (:func:`better`) when its interval lies entirely below the other's and, for latency,
   its p90 interval does not lie entirely above the other's: a lower median bought with a clearly worse tail
   (a thread pool that stalls one call in six) is not better. The candidates no other one is better than are a
   **tie** when there are several (:func:`tied`): the data cannot order them, so the choice among them is the
   tie-break :data:`TIE_BREAK` (fewer threads, then the smaller accuracy drop or higher agreement, then the
   lower p90, then the lower median), and the report says so. Then write ``OUT/best/`` (the
   chosen artifact and ``deploy.json``), ``OUT/tune.json``, ``OUT/report.md`` and ``OUT/pareto.png`` (latency
   against accuracy delta, with its Pareto front).

When the budget runs out, the search stops where it is: the best candidate measured so far is chosen
and the report says the search was cut short. When no candidate meets the bound,
:class:`TuneResult` has no choice, the table is still written, and the closest candidate is named.
The clock and the measurement are parameters (``clock``, ``measure``) so that the search can be tested
with scripted numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path

import numpy as np

from exporters import targets as registry
from runtimes.bench import BenchJob, BenchSettings
from runtimes.core import MissingDependency, first_line

from . import sources
from .ranking import (CUDA, PASS_SETS, TIE_BREAK, Candidate, better, clearly_slower, closest, median_interval, rank,
                      slower_int8, summarize_rounds, target_of, tied)
from .tasks import Guard, judge
from .tune_report import write_outputs
from .record import PipelineError
from .resources import check_threads, read_npz

__all__ = ["TuneOptions", "TuneResult", "Candidate", "tune", "plan", "clearly_slower", "rank", "better", "tied",
           "median_interval", "summarize_rounds", "PASS_SETS", "SCREEN", "FULL", "ROUNDS", "TIE_BREAK"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

CUDA_VARIANTS = {"fp32": ("fp32", "channels_last"), "fp16": ("fp16",)}  # runtimes.bench's CUDA variants
PEER_SESSION = {"optimization": "all"}  # ONNX Runtime's own defaults: every graph optimization, spinning on
SCREEN = BenchSettings(warmup_iters=2, warmup_ms=50.0, min_iters=10, min_ms=300.0)
FULL = BenchSettings(warmup_iters=5, warmup_ms=100.0, min_iters=20, min_ms=300.0)  # one round of the full measurement
ROUNDS = 5  # full rounds: five round values give the range of them a 93.75 % interval of their median


@dataclass
class TuneOptions:
    """What ``deploy tune`` takes; see ``deploy tune --help``."""

    model: str = sources.DEFAULT_MODEL
    runtimes: Sequence[str] | None = None  # default: every registered runtime (those that cannot run here pruned)
    precisions: Sequence[str] = ("fp32", "fp16", "bf16", "int8")
    passes: Sequence[str] = ("default",)
    threads: Sequence[int] | None = None  # default: the CPUs this process may use
    batch: int = 1
    objective: str = "latency"  # or "throughput"
    max_drop: float = 1.0
    min_agreement: float | None = None
    budget_s: float = 600.0
    calibration: str | None = None
    out: str | None = None
    force: bool = False
    convert: object | None = None  # deploy.pipeline.ConvertOptions with the model options (checkpoint, shape, ...)
    screen: BenchSettings = field(default_factory=lambda: replace(SCREEN))
    full: BenchSettings = field(default_factory=lambda: replace(FULL))  # one round
    rounds: int = ROUNDS
    command: str | None = None


@dataclass
class TuneResult:
    out_dir: str
    candidates: list[Candidate]
    chosen: Candidate | None
    peer: dict
    cut_short: bool
    seconds: float
    eligibility: str  # how candidates were judged, in words
    closest: Candidate | None = None  # when nothing is eligible: the one nearest the bound
    manifest: dict | None = None
    tie: list[Candidate] = field(default_factory=list)  # tied(): the candidates the data cannot order, chosen first


def _noop(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ plan



def plan(opts: TuneOptions, cpu: dict, threads: Sequence[int]) -> list[Candidate]:
    """Every candidate of ``opts``: those that can run here are ``planned``, the rest ``pruned`` with the reason."""
    runtimes = list(opts.runtimes) if opts.runtimes else [*registry.runtimes(), CUDA]  # those missing pruned
    out = []
    for runtime, precision, passes, n in product(runtimes, opts.precisions, opts.passes, threads):
        for variant in CUDA_VARIANTS.get(precision, ()) if runtime == CUDA else (precision,):
            c = Candidate(runtime, variant, passes, n)
            c.reason = _why_not_cuda(variant) if runtime == CUDA else _why_not(runtime, precision, cpu)
            c.status = "pruned" if c.reason else "planned"
            out.append(c)
    return out


def _why_not_cuda(variant: str) -> str:
    import torch

    return "" if torch.cuda.is_available() else f"torch on CUDA ({variant}) needs a CUDA GPU; torch sees none here"


def _why_not(runtime: str, precision: str, cpu: dict) -> str:
    try:
        target = target_of(runtime)
    except KeyError as e:
        return first_line(e)
    try:
        registry.check_available(target, f"the {runtime} runtime")
    except MissingDependency as e:
        return str(e).rstrip(".")
    if target.not_run_here():
        return target.not_run_here()
    if precision not in target.precisions and precision not in target.hints:
        return f"the {target.label} target makes {', '.join(target.precisions + target.hints)}, not {precision}"
    return target.native(precision, cpu)


def check_options(opts: TuneOptions) -> None:
    """Refuse bad options before any work."""
    unknown = [p for p in opts.passes if p not in PASS_SETS]
    if unknown:
        raise PipelineError(f"unknown pass set(s) {', '.join(unknown)}; choose from {', '.join(PASS_SETS)}")
    known = [*registry.runtimes(), CUDA]
    bad = [r for r in opts.runtimes or () if r not in known]
    if bad:
        raise PipelineError(f"unknown runtime(s) {', '.join(bad)}; known runtimes: {', '.join(known)}")
    precisions = {p for t in registry.all_targets() for p in (*t.precisions, *t.hints)}
    bad = [p for p in opts.precisions if p not in precisions]
    if bad:
        raise PipelineError(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(sorted(precisions))}")
    if opts.objective not in ("latency", "throughput"):
        raise PipelineError(f"unknown objective {opts.objective!r}; choose latency or throughput")
    if opts.batch < 1 or opts.budget_s <= 0 or any(n < 1 for n in opts.threads or ()):
        raise PipelineError("--batch and --threads need positive integers and --budget-s a positive number of "
                            "seconds")
    if opts.rounds < 1:
        raise PipelineError(f"rounds={opts.rounds}: the full measurement needs at least 1 round (5 give a 93.75 % "
                            "interval of the median); pass rounds >= 1")
    check_threads(opts.threads)


# ------------------------------------------------------------------------------------------- the search

class Budget:
    def __init__(self, seconds: float, clock: Callable[[], float]):
        self.seconds, self.clock, self.start, self.cut = seconds, clock, clock(), False

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def spent(self) -> bool:
        if self.left() <= 0:
            self.cut = True
        return self.cut


def _measure_isolated(job: BenchJob) -> list[dict]:
    """Time ``job`` in a fresh Python process (its job and result files in a temporary folder)."""
    import tempfile

    from runtimes.bench import run_isolated

    with tempfile.TemporaryDirectory(prefix="deploy-tune-") as work:
        return run_isolated(job, work)["rows"]


def search(candidates: list[Candidate], jobs: Callable[[list[Candidate], BenchSettings], list[BenchJob]],
           measure: Callable[[BenchJob], list[dict]], opts: TuneOptions, budget: Budget,
           progress: Progress, peer: BenchJob | None = None) -> list[dict]:
    """Screen, drop and measure the eligible candidates in rounds (in place); see the module docstring. ``peer``, a
    job measured in the same rounds; its rows (one a round) are returned."""
    todo = [c for c in candidates if c.eligible and c.status == "planned"]
    if todo:
        progress(f"screening {len(todo)} eligible candidate(s), each runtime and thread count in its own process ...")
    for job in jobs(todo, opts.screen):
        if budget.spent():
            break
        progress(f"screening {', '.join(job.forms)} ...")
        for c, row in _rows(job, todo, measure):
            c.screen = row
            progress(f"  {c.name}: p50 {row['p50']:.3f} ms (p90 {row['p90']:.3f}, {row['iters']} calls)")
    for c, why in clearly_slower(candidates, opts.objective):
        c.status, c.reason = "dropped", why
    todo = [c for c in candidates if c.eligible and c.status == "planned"]
    round_jobs = jobs(todo, opts.full) + ([peer] if peer is not None else []) if todo and not budget.cut else []
    if round_jobs:
        progress(f"measuring {len(todo)} candidate(s){' and the peer baseline' if peer else ''} in {opts.rounds} "
                 f"interleaved rounds of {len(round_jobs)} process(es) ...")
    rounds: dict[int, list[dict]] = {id(c): [] for c in todo}
    peer_rows: list[dict] = []
    for r in range(opts.rounds if round_jobs else 0):
        for job in _round_order(round_jobs, r):
            if budget.spent():
                break
            if job is peer:
                peer_rows += [row for row in measure(job) if row.get("form") == "peer" and "p50" in row]
                if peer_rows:
                    progress(f"  round {r + 1}/{opts.rounds} peer baseline: p50 {peer_rows[-1]['p50']:.3f} ms")
                continue
            done = _rows(job, todo, measure)
            for c, row in done:
                rounds[id(c)].append(row)
            if done:
                progress(f"  round {r + 1}/{opts.rounds} " + ", ".join(f"{c.name}: p50 {row['p50']:.3f} ms"
                                                                        for c, row in done))
        if budget.cut:
            break
    for c in todo:
        if rounds[id(c)] and c.status == "planned":
            c.stats, c.status = summarize_rounds(rounds[id(c)]), "measured"
        elif c.status == "planned":
            c.status, c.reason = "cut", "the budget ran out before it was measured in full"
    for c in candidates:
        if c.status == "planned" and c.eligible:
            c.status, c.reason = "cut", "the budget ran out before it was measured in full"
    return peer_rows


def _rows(job: BenchJob, todo: list[Candidate], measure) -> list[tuple[Candidate, dict]]:
    """``measure(job)``'s rows with their candidates; a candidate that could not be measured is marked failed."""
    by_form = {c.name: c for c in todo}
    out = []
    for row in measure(job):
        c = by_form.get(row["form"].replace("{variant}", row.get("variant", "")))
        if c is None or c.status == "failed":
            continue
        if "p50" not in row:
            c.status, c.reason = "failed", row.get("error", "not measured")
            continue
        out.append((c, row))
    return out


def _round_order(jobs: list[BenchJob], r: int) -> list[BenchJob]:
    """Round ``r``'s order: rotated by ``r``, reversed every other round, so each process runs after each other one
    and at each place in a round about equally often (as ``runtimes.bench`` interleaves calls)."""
    k = r % len(jobs)
    order = jobs[k:] + jobs[:k]
    return order[::-1] if r % 2 else order


# ------------------------------------------------------------------------------------------- orchestration

TUNE_REPORT = "tune.json"


def _out_dir(opts: TuneOptions, name: str) -> tuple[Path, bool]:
    out = Path(opts.out) if opts.out else Path("runs") / f"tune-{name}"
    if not out.exists():
        return out, False
    if not (out / TUNE_REPORT).is_file() and any(out.iterdir()):
        raise PipelineError(f"output directory {out} exists and was not written by deploy tune (no {TUNE_REPORT}); "
                            "refusing to replace it: choose another --out")
    if opts.out and not opts.force and any(out.iterdir()):
        raise PipelineError(f"output directory {out} already exists; pass --force to replace it or choose another "
                            "--out")
    return out, True


def _stage_for(result, c: Candidate):
    """The stage of a convert run that candidate ``c`` runs: its int8 or fp16 stage, else the target's main one."""
    from .forms import main_stage

    target = target_of(c.runtime)
    if c.precision in target.hints or c.precision == "fp32" or c.runtime == CUDA:
        return main_stage([s for s in result.stages if s.precision == "fp32"], target.name)
    same = [s for s in result.stages if s.format == target.name and s.precision == c.precision]
    return (sorted(same, key=lambda s: not s.export.main) or [None])[0]


def _judge_all(candidates: list[Candidate], runs: dict, guard: Guard, progress: Progress) -> None:
    """Run each planned candidate's artifact on the held-out samples and apply the accuracy bound (threads do not
    change the numbers: one judgement per runtime, precision and pass set)."""
    from .verification import run_batched

    done: dict[tuple, tuple] = {}
    for c in candidates:
        if c.status != "planned":
            continue
        key = (c.runtime, c.precision, c.passes)
        if key not in done:
            done[key] = _judge_one(c, runs[c.passes if c.precision != "fp16" else f"{c.passes}+fp16"], guard,
                                   run_batched)
            progress(f"judged {c.runtime} {c.precision} {c.passes}: " + (done[key][0].get("reason") or "eligible"))
        c.metrics, c.path, c.size, failure = done[key]
        if failure:
            c.status, c.reason = "failed", failure
        elif not c.metrics["passed"]:
            c.status, c.reason = "ineligible", c.metrics["reason"]


def _judge_one(c: Candidate, run, guard: Guard, run_batched) -> tuple[dict, str | None, int | None, str]:
    root = Path(run.out_dir)
    stage = _stage_for(run, c)
    if stage is None or stage.export.error:
        return {}, None, None, stage.reason if stage else f"the convert run made no {c.precision} artifact"
    if stage.format != "pt2" and not stage.passed and stage.precision != "int8":
        return {}, None, None, f"its artifact did not verify: {stage.reason}"
    art = stage.export.artifact_in(root)
    vdir = root / "verify"
    d = read_npz(vdir / "samples.npz")
    x, labels = d["input0"], d.get("labels")
    reference = list(read_npz(vdir / "samples_reference.npz").values())
    batch = art.inputs[0].shape[0] if art.inputs and isinstance(art.inputs[0].shape[0], int) else 1
    try:
        if c.runtime == CUDA:
            outs = _run_cuda(art.path, c.precision, x, batch)
        else:
            with target_of(c.runtime).open(art, precision=c.precision) as runner:
                outs = run_batched(runner, x, batch)
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is a failed candidate
        return {}, None, None, f"{type(e).__name__}: {first_line(e)}"
    verdict = judge(outs, reference, labels, guard)
    return ({**verdict.metrics, "passed": verdict.passed, "reason": verdict.reason}, art.path,
            stage.files.size, "")


def _run_cuda(path: str, variant: str, x: np.ndarray, batch: int) -> list[np.ndarray]:
    """The plain model on CUDA in ``variant`` (fp32, fp16, channels_last), outputs back in float32."""
    import torch

    from runtimes.compare import flatten
    from runtimes.safe_load import load_program

    dtype = torch.float16 if variant == "fp16" else torch.float32
    fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    module = load_program(path).module().to("cuda", dtype)
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xin = torch.from_numpy(x[i:i + batch]).to("cuda", dtype)
            if xin.dim() == 4:
                module, xin = module.to(memory_format=fmt), xin.contiguous(memory_format=fmt)
            chunks.append([o.float() for o in flatten(module(xin))])
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def _peer(model, loaded, shape, folder: Path, samples, guard: Guard, progress: Progress) -> dict:
    """The form a user of the peers would ship, exported with ``torch.onnx.export``'s defaults: timm's
    ``reparameterize_model`` for a timm model, else the training form. ``{"form", "path", "metrics"}``."""
    import copy

    import torch

    from runtimes.onnxruntime_runner import OnnxRuntimeRunner

    from .verification import run_batched

    form = "training form"
    module = copy.deepcopy(model).eval()
    if loaded.kind == "timm":
        from timm.utils import reparameterize_model

        module, form = reparameterize_model(module), "timm.utils.reparameterize_model"
    path = folder / "peer.onnx"
    progress(f"exporting the peer baseline ({form}, torch.onnx.export defaults) ...")
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines: the CLI owns stdout
            torch.onnx.export(module, (torch.zeros(*shape),), os.fspath(path))
        x, labels, reference = samples
        with OnnxRuntimeRunner(os.fspath(path)) as runner:
            outs = run_batched(runner, x, shape[0])
    except Exception as e:  # noqa: BLE001 - the comparison is lost, not the search
        log.info("peer baseline failed", exc_info=True)
        return {"form": form, "error": f"{type(e).__name__}: {first_line(e)}"}
    verdict = judge(outs, reference, labels, guard)
    return {"form": form, "runtime": "onnxruntime fp32, default session options (all graph optimizations, "
            "intra-op spinning on, all cores)", "path": path.name,
            "metrics": {**verdict.metrics, "passed": verdict.passed}}


def _jobs(shape, batch: int):
    def make(todo: list[Candidate], settings: BenchSettings) -> list[BenchJob]:
        groups: dict[tuple, list[Candidate]] = {}
        for c in todo:
            groups.setdefault((c.runtime, c.threads), []).append(c)
        jobs = []
        for (runtime, threads), cs in groups.items():
            target = target_of(runtime)
            if runtime == CUDA:  # one form, timed by runtimes.bench in every CUDA variant: rows name the variant
                for passes in sorted({c.passes for c in cs}):
                    path = next(c.path for c in cs if c.passes == passes)
                    jobs.append(BenchJob("torch", {f"{CUDA} {{variant}} {passes} x{threads}": path},
                                         [batch, *shape[1:]], runner=target.runner, device="cuda",
                                         settings=settings))
                continue
            jobs.append(BenchJob(runtime, {c.name: c.path for c in cs}, [batch, *shape[1:]], runner=target.runner,
                                 runner_options=dict(target.bench_options), note=target.bench_note, threads=threads,
                                 settings=settings,
                                 variants={c.name: {"precision": c.precision,
                                                    "runner_options": target.runner_options(c.precision)}
                                           for c in cs}))
        return jobs
    return make


def tune(opts: TuneOptions, progress: Progress | None = None, *, clock: Callable[[], float] = time.monotonic,
         measure: Callable[[BenchJob], list[dict]] | None = None) -> TuneResult:
    """Search the candidates of ``opts`` on this machine; see the module docstring."""
    from runtimes.hardware import cpu_facts, usable_cpus

    from .calibration import seeded_eval, seeded_eval_count
    from .pipeline import ConvertOptions, convert, default_name
    from .record import RunDirectory

    progress = progress or _noop
    check_options(opts)
    if os.path.isdir(opts.model):
        opts = _from_run(opts)
    budget = Budget(opts.budget_s, clock)
    base = opts.convert or ConvertOptions()
    threads = sorted(set(opts.threads or [usable_cpus()]))
    progress("planning: which runtimes, precisions and thread counts this machine can run ...")
    cpu = cpu_facts(max(threads))
    candidates = plan(opts, cpu, threads)
    if not any(c.status == "planned" for c in candidates):
        raise PipelineError("no candidate can run on this machine: " + "; ".join(
            sorted({f"{c.runtime} {c.precision}: {c.reason}" for c in candidates})))
    out_dir, replaces = _out_dir(opts, default_name(opts.model))
    progress(f"loading {opts.model} ...")
    loaded = sources.load_model(opts.model, checkpoint=base.checkpoint, checkpoint_key=base.checkpoint_key,
                                code_path=base.code_path, num_classes=base.num_classes, width=base.width,
                                allow_train_mode=base.allow_train_mode, seed=base.seed,
                                trust_pickle=base.trust_pickle)
    shape = tuple(base.input_shape or loaded.input_shape or ())
    if not shape:
        raise PipelineError(f"{opts.model} has no default input shape; pass --input-shape, e.g. 1,3,224,224")
    shape = (opts.batch, *shape[1:])
    guard = Guard(max_drop=opts.max_drop, min_agreement=opts.min_agreement)
    pruned = sum(c.status == "pruned" for c in candidates)
    progress(f"{len(candidates)} candidates, {pruned} pruned before any work; budget {opts.budget_s:.0f} s")

    with RunDirectory(out_dir, replaces) as run:
        inputs = base.inputs or loaded.samples
        if inputs is None:
            inputs = os.fspath(run.tmp / "heldout.npz")
            np.savez(inputs, input0=seeded_eval(shape, seeded_eval_count(shape), base.seed))
        eligibility = ("accuracy drop against the fp32 training model on labelled held-out samples"
                       if _has_labels(inputs) else "top-1 agreement (or SQNR) with the fp32 training model on "
                       "held-out inputs without labels")
        runs = {}
        for passes in opts.passes:
            int8 = any(c.precision == "int8" and c.status == "planned" for c in candidates)
            for precision in ("int8" if int8 else "fp32", "fp16"):  # an int8 run makes the fp32 artifacts too
                mine = [c for c in candidates if c.passes == passes and c.status == "planned"
                        and (c.precision == "fp16") == (precision == "fp16")]
                if not mine:
                    continue
                key = passes + ("+fp16" if precision == "fp16" else "")
                if budget.spent():
                    for c in mine:
                        c.status, c.reason = "cut", "the budget ran out before its conversion"
                    continue
                targets = sorted({target_of(c.runtime).name for c in mine} - {"pt2"})
                progress(f"converting with passes {passes} ({precision}; targets {', '.join(targets) or 'pt2'}) ...")
                conv = replace(base, model=opts.model, passes=PASS_SETS[passes], targets=targets, precision=precision,
                               input_shape=shape, inputs=inputs, out=os.fspath(run.tmp / "forms" / key), force=False,
                               calibration=opts.calibration, command=None)
                runs[key] = convert(conv, progress=lambda m: progress(f"  {m}"))
        if not runs:
            raise PipelineError(f"--budget-s {opts.budget_s:g} ran out before the first conversion; give more time")
        _same_as_default(candidates, runs)
        progress(f"judging {sum(c.status == 'planned' for c in candidates)} candidate(s) on the held-out samples "
                 "(starting each runtime) ...")
        _judge_all(candidates, runs, guard, progress)
        verify = Path(next(iter(runs.values())).out_dir) / "verify"  # every run verified on the same samples
        d = read_npz(verify / "samples.npz")
        held_out = (d["input0"], d.get("labels"), list(read_npz(verify / "samples_reference.npz").values()))
        peer = _peer(loaded.model, loaded, shape, run.tmp, held_out, guard, progress)
        measure = measure or _measure_isolated
        peer_job = BenchJob("onnxruntime", {"peer": os.fspath(run.tmp / peer["path"])}, list(shape),
                            runner=target_of("onnxruntime").runner, runner_options=PEER_SESSION, threads=None,
                            settings=opts.full) if "path" in peer else None
        peer_rows = search(candidates, _jobs(shape, opts.batch), measure, opts, budget, progress, peer=peer_job)
        if peer_job is not None:
            peer["stats"] = summarize_rounds(peer_rows) if peer_rows else None
        for c, why in slower_int8(candidates, opts.objective):
            c.reason = why
        ranked = rank(candidates, opts.objective)
        chosen = ranked[0] if ranked else None
        result = TuneResult(os.fspath(out_dir), candidates, chosen, peer, budget.cut, budget.clock() - budget.start,
                            eligibility, closest=None if chosen else closest(candidates),
                            tie=tied(candidates, opts.objective))
        result.manifest = write_outputs(run.tmp, result, opts, loaded, shape, cpu)
        run.commit()
    for c in candidates:  # the artifacts now live in the output directory
        if c.path:
            c.path = os.fspath(out_dir / os.path.relpath(c.path, run.tmp))
    return result


def _from_run(opts: TuneOptions) -> TuneOptions:
    """``opts`` for the model a ``deploy convert`` run directory was made from, at its input shape. A run directory
    never chooses code to run: only a built-in source (``pipeline.recorded_source``) is taken from its record, with
    a ``--checkpoint`` of this command line when the run had one; a model file must be typed as MODEL."""
    from .pipeline import ConvertOptions, recorded_source, reload_command
    from .record import load_record

    record = load_record(opts.model)
    base = opts.convert or ConvertOptions()
    had_checkpoint = bool(record.load.get("checkpoint"))
    source = recorded_source(replace(record, load={k: v for k, v in record.load.items() if k != "checkpoint"})) \
        if base.checkpoint or not had_checkpoint else None
    if source is None or base.code_path:
        spec = record.load.get("spec")
        raise PipelineError(f"{opts.model} was converted from {spec!r}, which is not reloaded from its report (a run "
                            f"directory never chooses code to run, and a checkpoint or code path must come from "
                            f"your command line); tune the model itself: {reload_command(record, 'deploy tune')} "
                            f"--input-shape {','.join(map(str, record.inputs.shape))}")
    base = replace(base, num_classes=source.num_classes, width=source.width, seed=source.seed,
                   input_shape=tuple(record.inputs.shape))
    return replace(opts, model=source.model, convert=base)


def _has_labels(path: str) -> bool:
    return "labels" in read_npz(path, "--inputs file")


def _same_as_default(candidates: list[Candidate], runs: dict) -> None:
    """Prune a pass set whose passes rewrote nothing the default set did not: its forms are the default's."""
    if "default" not in runs:
        return
    base = runs["default"].report["reparameterize"]["ops_after"]
    for key, run in runs.items():
        passes = key.split("+fp16")[0]
        if passes != "default" and run.report["reparameterize"]["ops_after"] == base and \
                _rewrites(run) == _rewrites(runs["default"]):
            for c in candidates:
                if c.passes == passes and c.status == "planned":
                    c.status, c.reason = "pruned", f"{passes} rewrote nothing beyond the default passes"


def _rewrites(run) -> int:
    return sum(p["rewrites"] for p in run.report["reparameterize"]["passes"])
