"""Latency measurement on real runtimes: warm-up, interleaved forms, statistics, isolated runtimes.

``measure({form: call}, ...)`` times zero-argument calls. Each form is first warmed up until it
has run ``warmup_iters`` times *and* for ``warmup_ms``; then the forms are called in turn, one
call each per round, until every form has run ``min_iters`` times *and* for ``min_ms`` in total.
Interleaving makes the forms share the machine's state (clock, caches, other load), so the ratio
of two forms is stable on a noisy machine even when their absolute times are not. The order
rotates every round and every other round is reversed, so each form runs right after each other
one equally often (a form that follows another finds the cache filled with the other's weights).

Runtimes are not interleaved with each other: their thread pools spin between calls and steal a
small machine's cores from the next runtime (measured here: ONNX Runtime's deploy forms looked
slower than their training forms when timed beside OpenVINO in one process). ``run_job`` measures
the forms of *one* runtime; ``run_isolated`` runs it in a fresh Python process
(``python -m runtimes.bench JOB.json RESULT.json``) so no other runtime is loaded beside it. ONNX
Runtime sessions are also made with intra-op spinning off, so the training and deploy sessions of
one job do not disturb each other either.

On CUDA the torch runtime times with CUDA events around each call after a synchronisation, in
three variants: fp32, fp16 (weights and input cast to half) and channels-last (fp32).

**Busy machines.** Every measured row records the 1-minute load average just before and just
after its measurement (``load_before``, ``load_after``; ``os.getloadavg``) and a list
``unreliable`` of reasons not to trust it (empty when none), from ``unreliable``:

- the spread: p90 / p50 above ``MAX_SPREAD`` (1.5) means one call in ten took half as long again
  as the median, so the median alone misrepresents the calls;
- the load: a load average above the usable CPUs (``LOAD_PER_CPU`` x ``usable_cpus()``). The load
  counts the benchmark's own threads too (up to ``threads`` of them, fewer in a 1-minute average of
  a short run), so the load of *other* work is at least ``load - threads``; when that exceeds the
  ``cpus - threads`` CPUs the benchmark leaves free, which is ``load > cpus``, other work certainly
  took CPUs the benchmark wanted. The rule never flags the benchmark's own load, and it misses
  lighter contention, which the spread usually shows. The load average is the whole machine's (a
  container may see its host's), so a process pinned to fewer CPUs than the machine has may be
  flagged for work on CPUs it does not use.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from .hardware import usable_cpus

__all__ = ["Stats", "BenchSettings", "BenchJob", "measure", "stats_of", "run_job", "run_isolated", "wall_timer",
           "ISOLATION", "MAX_SPREAD", "LOAD_PER_CPU", "load_average", "unreliable"]

log = logging.getLogger(__name__)

ISOLATION = ("subprocess", "none")
MAX_SPREAD = 1.5  # p90 / p50 above this flags a row: its calls' times vary too much for the median to stand for them
LOAD_PER_CPU = 1.0  # a 1-minute load average above this many per usable CPU flags a row (see the module docstring)


@dataclass
class Stats:
    """Latency statistics of one form, in milliseconds; ``throughput`` in samples per second."""

    iters: int
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    batch: int = 1
    throughput: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def stats_of(times_ms, batch: int = 1) -> Stats:
    """Percentiles (linear interpolation), mean, sample standard deviation and throughput of ``times_ms``."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings to summarize")
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    mean = float(t.mean())
    return Stats(iters=int(t.size), p50=float(p50), p90=float(p90), p99=float(p99), mean=mean,
                 std=float(t.std(ddof=1)) if t.size > 1 else 0.0, min=float(t.min()), max=float(t.max()),
                 batch=batch, throughput=batch * 1e3 / mean if mean > 0 else float("inf"))


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable tasks), or None where the system does not report one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not a Unix system
        return None


def unreliable(row: Mapping, cpus: int) -> list[str]:
    """Why the timings of ``row`` (with ``p50``, ``p90`` and optionally ``load_before`` / ``load_after``) may not be
    trusted on a machine with ``cpus`` usable CPUs; empty when neither the spread nor the load says so."""
    reasons = []
    if row["p50"] > 0 and row["p90"] / row["p50"] > MAX_SPREAD:
        reasons.append(f"p90/p50 {row['p90'] / row['p50']:.2f} > {MAX_SPREAD}")
    loads = [v for v in (row.get("load_before"), row.get("load_after")) if v is not None]
    if loads and max(loads) > LOAD_PER_CPU * cpus:
        reasons.append(f"load {max(loads):.1f} on {cpus} CPUs")
    return reasons


def wall_timer(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def _cuda_timer():
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timer(call):
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return timer


@dataclass
class BenchSettings:
    """How long to warm up and to measure (see the module docstring)."""

    warmup_iters: int = 5
    warmup_ms: float = 200.0
    min_iters: int = 20
    min_ms: float = 2000.0
    max_iters: int = 100_000

    def __post_init__(self):
        if self.min_iters < 2 or self.warmup_iters < 0 or self.warmup_ms < 0 or self.min_ms < 0:
            raise ValueError("benchmark settings need min_iters >= 2 and non-negative warm-up and durations")


def measure(calls: Mapping[str, Callable[[], object]], settings: BenchSettings | None = None, *,
            timer: Callable[[Callable[[], object]], float] = wall_timer, batch: int = 1) -> dict[str, Stats]:
    """Time each zero-argument call of ``calls``, interleaved; ``{form: Stats}``."""
    s = settings or BenchSettings()
    for call in calls.values():
        done, spent = 0, 0.0
        while done < s.warmup_iters or spent < s.warmup_ms:
            spent += timer(call)
            done += 1
    times: dict[str, list[float]] = {name: [] for name in calls}
    totals = dict.fromkeys(calls, 0.0)
    order = list(calls)
    for n in range(1, s.max_iters + 1):
        k = n % len(order)
        seq = order[k:] + order[:k]
        for name in reversed(seq) if n % 2 else seq:
            ms = timer(calls[name])
            times[name].append(ms)
            totals[name] += ms
        if n >= s.min_iters and min(totals.values()) >= s.min_ms:
            break
    return {name: stats_of(t, batch) for name, t in times.items()}


def _measured_rows(calls: Mapping[str, Callable[[], object]], settings: BenchSettings, variant: Callable[[str], str],
                   *, timer: Callable[[Callable[[], object]], float], batch: int) -> list[dict]:
    """``measure(calls)`` as result rows, each with the load average before and after and its ``unreliable`` reasons."""
    if not calls:
        return []
    before = load_average()
    stats = measure(calls, settings, timer=timer, batch=batch)
    after, cpus = load_average(), usable_cpus()
    rows = []
    for form, st in stats.items():
        row = {"form": form, "variant": variant(form), **st.to_dict(), "load_before": before, "load_after": after}
        row["unreliable"] = unreliable(row, cpus)
        if row["unreliable"]:
            log.info("%s %s timing may be unreliable: %s", form, row["variant"], "; ".join(row["unreliable"]))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- jobs

@dataclass
class BenchJob:
    """The forms of one model on one runtime: ``forms`` maps a form name to its file for that runtime.

    ``runner`` and ``runner_options`` say how to open a file (the caller takes them from the
    format's target, so this module needs no table of runtimes); ``precision`` is the artifacts'
    precision; ``device`` is "cpu" or "cuda" (torch only: CUDA events, three variants).
    ``input_shape`` includes the batch. ``variants`` gives a form its own precision and runner options
    (an INT8 artifact timed beside the fp32 one).
    """

    runtime: str
    forms: dict[str, str]
    input_shape: list[int]
    runner: str = "runtimes.torch_runner:TorchRunner"  # "module:Class" of the runner
    runner_options: dict = field(default_factory=dict)  # keyword arguments for it (besides threads)
    note: dict = field(default_factory=dict)  # how the runtime was set up, for the report
    threads: int | None = None
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    settings: BenchSettings = field(default_factory=BenchSettings)
    variants: dict[str, dict] = field(default_factory=dict)  # form -> {"precision", "runner_options"} overrides

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BenchJob:
        d = dict(d)
        d["settings"] = BenchSettings(**d.get("settings", {}))
        return cls(**d)


def _runner(job: BenchJob, path: str, form: str = ""):
    """The runner ``job`` names (``"module:Class"``), made with the job's options (and ``form``'s) for timing."""
    import importlib

    module, _, name = job.runner.partition(":")
    cls = getattr(importlib.import_module(module), name)
    options = {**job.runner_options, **job.variants.get(form, {}).get("runner_options", {})}
    if job.threads is not None:
        options["threads"] = job.threads
    return cls(path, **options)


def _variant(job: BenchJob, form: str) -> str:
    return job.variants.get(form, {}).get("precision", job.precision)


def run_job(job: BenchJob) -> dict:
    """Measure every form of ``job`` in this process: ``{"rows": [...], "settings": {...}}``.

    Each row: form, variant (fp32 / fp16 / channels_last), statistics; a form that cannot be
    loaded or run gets a row with ``error`` instead, and the others are still measured.
    """
    x = np.random.default_rng(job.seed).standard_normal(job.input_shape).astype(np.float32)
    batch = int(job.input_shape[0])
    if job.device == "cuda":
        return _run_torch_cuda(job, x)
    rows, calls, runners = [], {}, []
    try:
        for form, path in job.forms.items():
            try:
                runner = _runner(job, path, form).activate()
                runners.append(runner)
                feed = [x]
                runner.infer(feed)  # checks the feed once; timed calls skip the check
                calls[form] = (lambda r=runner, f=feed: r.infer(f, check=False))
            except Exception as e:  # one form failing does not stop the others
                rows.append({"form": form, "variant": _variant(job, form), "error": f"{type(e).__name__}: {e}"})
        effective = {getattr(r, "effective_precision", None) for r in runners} - {None}
        # wall_timer is looked up at call time (not bound as a default), so a test can script the clock
        rows += _measured_rows(calls, job.settings, lambda form: _variant(job, form), timer=wall_timer, batch=batch)
    finally:
        for r in runners:
            r.deactivate()
    settings = {"threads": job.threads, "usable_cpus": usable_cpus(), **job.note}
    if effective:
        settings["effective_precision"] = sorted(effective)
    return {"rows": rows, "settings": settings}


def _run_torch_cuda(job: BenchJob, x: np.ndarray) -> dict:
    import torch

    from .safe_load import load_program

    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU; bench on cpu instead")
    rows = []
    modules = {}
    for form, path in job.forms.items():
        try:
            trust = bool(job.runner_options.get("trust_pickle", False))
            modules[form] = load_program(path, trust_pickle=trust).module().to("cuda")
        except Exception as e:
            rows.append({"form": form, "variant": "fp32", "error": f"{type(e).__name__}: {e}"})
    timer = _cuda_timer()
    variants = {"fp32": (torch.float32, torch.contiguous_format), "fp16": (torch.float16, torch.contiguous_format),
                "channels_last": (torch.float32, torch.channels_last)}
    for variant, (dtype, fmt) in variants.items():
        calls = {}
        for form, module in modules.items():
            m = module.to(dtype=dtype)
            xin = torch.from_numpy(x).to("cuda", dtype)
            if fmt is torch.channels_last and xin.dim() == 4:
                m, xin = m.to(memory_format=fmt), xin.contiguous(memory_format=fmt)

            def call(m=m, xin=xin):
                with torch.inference_mode():
                    return m(xin)
            try:
                call()
                calls[form] = call
            except Exception as e:
                rows.append({"form": form, "variant": variant, "error": f"{type(e).__name__}: {e}"})
        rows += _measured_rows(calls, job.settings, lambda _, v=variant: v, timer=timer, batch=int(x.shape[0]))
    props = torch.cuda.get_device_properties(0)
    return {"rows": rows, "settings": {"device": props.name, "timer": "CUDA events after synchronize",
                                       "tf32": torch.backends.cuda.matmul.allow_tf32}}


def run_isolated(job: BenchJob, workdir: str) -> dict:
    """``run_job(job)`` in a fresh Python process, so no other runtime's threads run beside it."""
    job_path, result_path = os.path.join(workdir, f"job-{job.runtime}.json"), \
        os.path.join(workdir, f"result-{job.runtime}.json")
    with open(job_path, "w") as f:
        json.dump(job.to_dict(), f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    proc = subprocess.run([sys.executable, "-m", "runtimes.bench", job_path, result_path], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0 or not os.path.exists(result_path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the {job.runtime} benchmark process failed (exit {proc.returncode}): {tail[0]}")
    with open(result_path) as f:
        return json.load(f)


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m runtimes.bench JOB.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = BenchJob.from_dict(json.load(f))
    result = run_job(job)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


def interleaved_p50(runners, feed, warmup: int = 3, iters: int = 20) -> list[float]:
    """Median latency in milliseconds of each (active) runner on ``feed``, calls interleaved (no minimum time)."""
    calls = {i: (lambda r=r: r.infer(feed, check=False)) for i, r in enumerate(runners)}
    stats = measure(calls, BenchSettings(warmup_iters=warmup, warmup_ms=0, min_iters=iters, min_ms=0,
                                         max_iters=iters))
    return [stats[i].p50 for i in range(len(runners))]


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
