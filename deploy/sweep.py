"""``deploy sweep``: a regression table of models x targets x precisions, every conversion in its own process.

The specs (what ``deploy convert`` takes, or a pattern ``timm:PATTERN`` / ``torchvision:PATTERN``
expanded with fnmatch) become jobs, one per model and precision. A pattern's names are sorted and
drawn in the order ``random.Random(seed).sample(names, len(names))`` gives, skipping those with more
than ``max_params`` parameters (counted on the meta device: nothing allocated) until ``sample`` are
taken, so a larger sample with the same seed keeps the smaller one's models and resumes on top of it.

Each job (:mod:`deploy.sweep_jobs`) is ``deploy convert SPEC --targets T --precision P`` in its own
process group, killed past ``timeout`` seconds or over ``memory`` resident bytes, and beside the
first job of every model the *peer path*: the same training model through ``torch.onnx.export`` with
torch's defaults and ONNX Runtime, which is what a user without this project does.

Every finished job appends one JSON line to ``OUT/results.jsonl`` (flushed) and ``OUT/sweep.md`` is
rewritten (:mod:`deploy.sweep_report`), so an interrupted sweep keeps what it finished; a rerun into
the same ``OUT`` runs only the jobs missing there (``rerun_failed``: also those that did not pass).
Jobs run on a thread pool (each thread supervises one process) or as Ray tasks on an existing
cluster; the driver writes the records either way. A job's ``report.json`` is untrusted input:
size-capped, every field type-checked, nothing unpickled.
"""

from __future__ import annotations

import concurrent.futures as cf
import fnmatch
import functools
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtimes.core import first_line, require

from . import sweep_report
from .sweep_jobs import Job, JobInterrupted, clear_stop, job_environment, job_key, job_name, run_job, stop_jobs
from .sweep_report import RESULTS

__all__ = ["SweepOptions", "SweepResult", "SweepError", "Model", "run_sweep", "expand", "read_list", "parse_count",
           "is_pattern", "count_params", "plan", "load_results", "check_out", "prepare_out", "default_memory"]

log = logging.getLogger(__name__)

PATTERN_SOURCES = ("timm", "torchvision")
CONNECT_S = 3.0  # the wait for a Ray cluster's port before ray.init is tried


class SweepError(ValueError):
    """Bad sweep input: no models, a pattern matching nothing, an OUT that is not a sweep directory, a Ray cluster
    that cannot be reached. The message names the problem and the fix."""


@dataclass(frozen=True)
class Model:
    spec: str
    params: int | None = None  # counted on the meta device; None when not counted


@dataclass
class SweepOptions:
    """What ``deploy sweep`` takes; see ``deploy sweep --help``."""

    specs: Sequence[str] = ()
    list_file: str | None = None
    sample: int | None = None
    seed: int = 0
    max_params: int | None = None
    targets: Sequence[str] = ("onnx",)
    precisions: Sequence[str] = ("fp32",)
    bench: bool = False
    compare_export: bool = False
    out: str = "runs/sweep"
    timeout: float = 900.0
    memory_gb: float | None = None  # None: 80 % of the available memory shared by the workers
    workers: int | None = None  # None: 1 (with ray: the cluster's CPUs)
    rerun_failed: bool = False
    ray: str | None = None  # "auto" or HOST:PORT of an existing cluster


@dataclass
class SweepResult:
    out_dir: str
    records: list[dict]  # every record of OUT/results.jsonl, the latest per job, in the sweep's order
    ran: int
    skipped: int
    table: str
    chart: str | None = None


def parse_count(text: str) -> int:
    """``25M`` -> 25_000_000 (suffixes k, M, G; case-insensitive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise ValueError(f"expected a count like 25M, 500k or 1000000, got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(round(float(match.group(1)) * scale))


# ------------------------------------------------------------------------------------------- models

def read_list(path: str) -> list[str]:
    """The specs of a ``--list`` file: one a line, ``#`` starts a comment, blank lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"--list {path} " + ("is a directory" if p.exists() else "does not exist")
                         + "; pass a text file with one model spec a line")
    return [s for s in (ln.split("#", 1)[0].strip() for ln in p.read_text(errors="replace").splitlines()) if s]


def is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _names(source: str) -> list[str]:
    if source == "timm":
        return sorted(require("timm", "models", "timm: patterns").list_models())
    return sorted(require("torchvision", "models", "torchvision: patterns").models.list_models())


@functools.lru_cache(maxsize=None)
def count_params(source: str, name: str) -> int | None:
    """Parameters of ``source:name`` built on the meta device (nothing allocated), or, for a torchvision model whose
    builder computes with tensor values (RegNet's widths) and so cannot build there, the count its default weights'
    record gives; None when neither is known (the job itself then says why the model does not build). Cached: a
    name is built once per process."""
    import warnings

    import torch

    from .sources import build_torchvision

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            if source == "timm":
                model = require("timm", "models").create_model(name, pretrained=False)
            else:
                model = build_torchvision(require("torchvision", "models"), name)
        return sum(p.numel() for p in model.parameters())
    except Exception as e:  # noqa: BLE001 - any failure to build is the job's to report
        log.info("no meta build of %s:%s: %s", source, name, first_line(e))
    if source == "torchvision":
        try:
            return int(require("torchvision", "models").models.get_model_weights(name).DEFAULT.meta["num_params"])
        except (ValueError, AttributeError, KeyError, TypeError):
            pass
    return None


def expand(specs: Sequence[str], *, sample: int | None = None, seed: int = 0,
           max_params: int | None = None) -> list[Model]:
    """The models of ``specs``: a plain spec as given (checked by :func:`deploy.sources.parse_source`), a pattern
    expanded as the module docstring says. Duplicates are dropped; :class:`SweepError` for a pattern that matches
    nothing."""
    from .sources import parse_source

    models: dict[str, Model] = {}
    for spec in specs:
        if not is_pattern(spec):
            parse_source(spec)  # a SourceError names a spec convert would refuse
            models.setdefault(spec, Model(spec))
            continue
        source, _, pattern = spec.partition(":")
        if source not in PATTERN_SOURCES or not pattern:
            raise SweepError(f"{spec!r} is a pattern, and only timm:PATTERN or torchvision:PATTERN expand (e.g. "
                             "'timm:resnet*'); name other models one by one")
        names = [n for n in _names(source) if fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise SweepError(f"{spec!r} matches no {source} model; check the pattern against {source}'s list of "
                             "models (fnmatch: * and ? wildcards, case-sensitive)")
        picked: list[Model] = []
        for name in random.Random(seed).sample(names, len(names)) if sample else names:
            if sample is not None and len(picked) >= sample:
                break
            params = count_params(source, name) if max_params is not None else None
            if params is None or max_params is None or params <= max_params:
                picked.append(Model(f"{source}:{name}", params))
        if not picked:
            raise SweepError(f"{spec!r}: none of its {len(names)} models has at most {max_params:,} parameters; "
                             "raise --max-params")
        for m in sorted(picked, key=lambda m: m.spec):
            models.setdefault(m.spec, m)
    return list(models.values())


# ---------------------------------------------------------------------------------------------- output

def check_out(out: str) -> Path:
    """:class:`SweepError` unless ``out`` is absent, an empty folder, or a sweep directory (it holds results.jsonl)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SweepError(f"--out {out} is a file, not a folder; choose another --out")
    if path.is_dir() and not (path / RESULTS).is_file() and any(path.iterdir()):
        raise SweepError(f"--out {out} holds files but no {RESULTS}, so it is not a deploy sweep directory; choose "
                         "a new or empty folder for --out")
    return path


def prepare_out(out: str) -> Path:
    """The sweep directory (:func:`check_out`), created with an empty results.jsonl."""
    path = check_out(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / RESULTS).touch()
    return path


def load_results(out_dir: Path) -> dict[str, dict]:
    """``{key: latest record}`` of ``OUT/results.jsonl``; a line that is not a record (a write cut short) is
    skipped with a warning."""
    found: dict[str, dict] = {}
    with open(out_dir / RESULTS, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("key"), str)
                    and isinstance(record.get("spec"), str) and record.get("status") in sweep_report.STATUSES):
                if line.strip():
                    log.warning("%s line %d is not a sweep record; skipped", out_dir / RESULTS, n)
                continue
            found[record["key"]] = record
    return found


def _append(out_dir: Path, record: dict) -> None:
    with open(out_dir / RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def default_memory(workers: int) -> int | None:
    """80 % of the memory this process can still take, shared by ``workers``; None when unknown."""
    from .resources import available_memory

    found = available_memory()
    return int(0.8 * found[0] / max(workers, 1)) if found else None


# ----------------------------------------------------------------------------------------------- sweep

def plan(models: Sequence[Model], opts: SweepOptions, done: dict[str, dict], out_dir: Path,
         memory: int | None, threads: int | None = None) -> list[Job]:
    """The jobs still to run; the peer path goes with the first job of a model that has no peer result kept."""
    rerun = {k for k, r in done.items() if opts.rerun_failed and r["status"] != "pass"}
    peer_done = {r["spec"] for k, r in done.items() if k not in rerun and isinstance(r.get("peer"), dict)}
    jobs = []
    for m in models:
        for precision in opts.precisions:
            key = job_key(m.spec, opts.targets, precision)
            if key in done and key not in rerun:
                continue
            jobs.append(Job(m.spec, tuple(opts.targets), precision,
                            str((out_dir / "jobs" / job_name(m.spec, opts.targets, precision)).resolve()),
                            os.getcwd(), m.spec not in peer_done, opts.compare_export, opts.bench, opts.timeout,
                            memory, m.params, threads))
            peer_done.add(m.spec)
    return jobs


def _check(opts: SweepOptions) -> None:
    from .forms import check_targets

    if not opts.targets:
        raise SweepError("--targets names no target; list formats like onnx,openvino")
    for precision in opts.precisions:
        check_targets(list(opts.targets), precision)
    if not opts.timeout > 0 or (opts.memory_gb is not None and not opts.memory_gb > 0):
        raise SweepError("--timeout and --memory must be > 0")
    if opts.ray and opts.workers:
        raise SweepError("--workers sizes the local pool; with --ray the cluster's CPUs set how many jobs run at "
                         "once: drop --workers")


def run_sweep(opts: SweepOptions, on_result: Callable[[int, int, dict], None] | None = None,
              progress: Callable[[str], None] | None = None) -> SweepResult:
    """Run the sweep ``opts`` describes; ``on_result(k, n, record)`` after each finished job (in this thread).
    On KeyboardInterrupt the running jobs are killed (not recorded), the table is written and it is re-raised."""
    say = progress or (lambda _: None)
    specs = list(opts.specs) + (read_list(opts.list_file) if opts.list_file else [])
    if not specs:
        raise SweepError("no models to sweep; name them (e.g. repvgg_a0 'timm:resnet*') or pass --list FILE")
    if (opts.sample or opts.max_params) and not any(is_pattern(s) for s in specs):
        raise SweepError("--sample and --max-params apply to patterns (timm:PATTERN, torchvision:PATTERN) and no "
                         "spec is one; drop them or name a pattern")
    _check(opts)
    check_out(opts.out)
    ray = _connect(opts.ray) if opts.ray else None
    try:
        say(f"expanding {len(specs)} spec(s)" + (" (counting parameters on the meta device)" if opts.max_params
                                                 else ""))
        models = expand(specs, sample=opts.sample, seed=opts.seed, max_params=opts.max_params)
        return _sweep(opts, models, prepare_out(opts.out), ray, on_result, say)
    finally:
        if ray is not None:
            ray.shutdown()


def _sweep(opts: SweepOptions, models: Sequence[Model], out_dir: Path, ray, on_result, say) -> SweepResult:
    done = load_results(out_dir)
    order = [job_key(m.spec, opts.targets, p) for m in models for p in opts.precisions]
    workers = opts.workers or (int(ray.cluster_resources().get("CPU", 1)) if ray else 1)
    memory = int(opts.memory_gb * 2**30) if opts.memory_gb else default_memory(workers)
    threads = 1 if ray else max(1, (os.cpu_count() or 1) // workers)  # a Ray task asks for one CPU
    jobs = plan(models, opts, done, out_dir, memory, threads)
    result = SweepResult(str(out_dir), [], len(jobs), len(order) - len(jobs), str(out_dir / sweep_report.TABLE))
    say(f"{len(jobs)} job(s) to run, {result.skipped} already in {out_dir / RESULTS}; "
        + (f"Ray cluster {opts.ray}" if ray else f"{workers} worker(s)")
        + (f", at most {memory / 2**30:.1f} GB each" if memory else "") + f", timeout {opts.timeout:g} s")
    count = iter(range(1, len(jobs) + 1))

    def finished(record: dict) -> None:
        _append(out_dir, record)
        done[record["key"]] = record
        sweep_report.write_table(out_dir, _ordered(done, order))
        if on_result:
            on_result(next(count), len(jobs), record)

    sweep_report.write_table(out_dir, _ordered(done, order))
    try:
        if ray is not None:
            _run_ray(ray, jobs, finished)
        else:
            _run_pool(jobs, workers, finished)
    finally:  # also after Ctrl-C: the table and chart of what finished
        result.records = _ordered(done, order)
        sweep_report.write_table(out_dir, result.records)
        result.chart = sweep_report.write_chart(out_dir, result.records)
    return result


def _ordered(done: dict[str, dict], order: Sequence[str]) -> list[dict]:
    """The records in the sweep's order, then those of earlier sweeps into the same OUT."""
    known = set(order)
    return [done[k] for k in order if k in done] + [r for k, r in done.items() if k not in known]


def _failed_record(job: Job, line: str) -> dict:
    return {"key": job.key, "spec": job.spec, "targets": list(job.targets), "precision": job.precision,
            "status": "fail", "exit_code": None, "seconds": 0.0, "first_line": line, "params": job.params,
            "job_dir": job.job_dir, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _guarded(job: Job) -> dict:
    try:
        return run_job(job)
    except JobInterrupted:
        raise
    except Exception as e:  # noqa: BLE001 - a job that cannot even be set up is a failed job, not a crash
        log.warning("job %s: %s", job.key, e, exc_info=True)
        return _failed_record(job, f"sweep error: {type(e).__name__}: {first_line(e)}")


def _run_pool(jobs: Sequence[Job], workers: int, finished: Callable[[dict], None]) -> None:
    clear_stop()
    pool = cf.ThreadPoolExecutor(max(1, min(workers, len(jobs) or 1)), thread_name_prefix="sweep")
    try:
        for future in cf.as_completed([pool.submit(_guarded, job) for job in jobs]):
            finished(future.result())
    except BaseException:
        stop_jobs()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------- ray

def _connect(address: str):
    """``ray`` connected to the cluster at ``address`` ("auto" or HOST:PORT); :class:`SweepError` when it cannot
    be reached within :data:`CONNECT_S` (ray.init itself would wait minutes for a dead address)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # the tool makes no network call of its own
    ray = require("ray", "ray", "--ray")
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if target:
        host, sep, port = target.split("://")[-1].rpartition(":")
        if not (sep and host and port.isdigit()):
            raise SweepError(f"--ray {address!r} is not auto or HOST:PORT (e.g. 10.0.0.5:6379)")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_S).close()
        except OSError as e:
            raise SweepError(f"no Ray cluster answers at {target} ({e.strerror or e}); start one with 'ray start "
                             "--head' there, or pass the address 'ray start' printed") from e
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": job_environment().get("PYTHONPATH", "")}})
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError: all say "cannot connect"
        raise SweepError(f"cannot connect to the Ray cluster at {address} ({first_line(e)}); start one with "
                         "'ray start --head', or pass its HOST:PORT") from e
    return ray


def _run_ray(ray, jobs: Sequence[Job], finished: Callable[[dict], None]) -> None:
    task = ray.remote(num_cpus=1, max_retries=0)(run_job)
    pending = {task.remote(job): job for job in jobs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a task that died (its worker killed, say) is a failed job
                    record = _failed_record(job, f"Ray task failed: {type(e).__name__}: {first_line(e)}")
                finished(record)
    except BaseException:
        for ref in pending:  # a running task gets KeyboardInterrupt and kills its job's process group
            ray.cancel(ref)
        raise
