"""The job of ``deploy sweep`` (:func:`run_job`, run in a pool thread or as a Ray task) and the peer path.

A job runs ``python -m deploy convert SPEC --targets T --precision P --out JOB_DIR/convert`` in its
own process group (a new session), stdout and stderr saved as ``JOB_DIR/convert.stdout.txt`` /
``.stderr.txt``. :func:`run_process` polls the group: past the timeout, or when the resident memory
of every process in the group (``/proc/PID/stat``; an address-space limit would break torch's large
virtual reservations) passes the cap, it kills the whole group; a group still alive when its job
ends is killed too. ``report.json`` of the run is untrusted input: :func:`read_report` caps its
size and returns a dict or nothing, and :mod:`deploy.sweep_report` type-checks every field it takes.

The *peer path* (``python -m deploy.sweep_jobs peer SPEC --out DIR``) is what a user without this
project does with the same training model (built by :mod:`deploy.sources` with the same seed, in
eval mode): ``torch.onnx.export(model, (x,), path)`` with torch's defaults, ONNX Runtime on a seeded
input, the largest error relative to the output's scale (``runtimes.core.max_rel_error``) against
torch's output; at most ``1e-3`` counts as working. With ``--compare-export`` it also times the
baseline of a user who reparameterizes: ``timm.utils.reparameterize_model`` then
``torch.export.export``. It writes ``DIR/peer.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtimes.core import first_line

from . import sweep_report

__all__ = ["Job", "JobInterrupted", "Outcome", "job_key", "job_name", "run_job", "run_process", "group_rss",
           "stop_jobs", "clear_stop", "job_environment", "kill_group", "failure_line", "read_report", "peer",
           "PEER_RTOL"]

log = logging.getLogger(__name__)

REPORT_CAP = 32 << 20  # bytes of a job's report.json read at most
LOG_CAP = 4 << 20  # bytes of a job's stdout / stderr searched for its failure line
POLL_S = 0.25
PEER_RTOL = 1e-3  # the peer path works when its ONNX file is this close to torch, relative to the output's scale
ROOT = Path(__file__).resolve().parents[1]  # this checkout, put first on the jobs' PYTHONPATH
_ERROR_LINE = re.compile(r"deploy [a-z]+: (error|interrupted|terminated)")


class JobInterrupted(Exception):
    """The sweep is stopping: a job's process was killed and its result is not recorded."""


@dataclass(frozen=True)
class Job:
    """One ``deploy convert`` run (and the peer path when ``peer``); plain data, so that Ray can ship it."""

    spec: str
    targets: tuple[str, ...]
    precision: str
    job_dir: str  # absolute
    cwd: str  # the driver's directory: a relative file spec is relative to it
    peer: bool = True
    compare_export: bool = False
    bench: bool = False
    timeout: float = 900.0
    memory: int | None = None  # bytes of resident memory of the job's process group
    params: int | None = None
    threads: int | None = None  # CPU threads of each job process (OMP_NUM_THREADS ...); None: the library defaults

    @property
    def key(self) -> str:
        return job_key(self.spec, self.targets, self.precision)


def job_key(spec: str, targets: Sequence[str], precision: str) -> str:
    return f"{spec}|{','.join(targets)}|{precision}"


def job_name(spec: str, targets: Sequence[str], precision: str) -> str:
    """A folder name for a job: the spec made safe, its precision, and a digest that keeps distinct jobs apart."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._-")[:60] or "model"
    return f"{slug}-{precision}-{hashlib.sha1(job_key(spec, targets, precision).encode()).hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------ processes

class _Groups:
    """The process groups of the jobs running in this process, so that a stopping sweep can kill them all."""

    def __init__(self):
        self.lock, self.pgids, self.stopping = threading.Lock(), set(), threading.Event()

    def add(self, pgid: int) -> None:
        with self.lock:
            self.pgids.add(pgid)

    def discard(self, pgid: int) -> None:
        with self.lock:
            self.pgids.discard(pgid)

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            for pgid in list(self.pgids):
                kill_group(pgid)


_GROUPS = _Groups()


def clear_stop() -> None:
    """Let jobs run again in this process after :func:`stop_jobs` (a new sweep)."""
    _GROUPS.stopping.clear()


def stop_jobs() -> None:
    """Kill the process group of every job running in this process; the jobs raise :class:`JobInterrupted`."""
    _GROUPS.stop()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in group ``pgid``, read from ``/proc/PID/stat`` (0 where there is none)."""
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ... rss (24th)
            if int(fields[2]) == pgid:
                total += int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass
class Outcome:
    status: str  # pass, fail, timeout, killed, oom
    exit_code: int | None
    seconds: float
    note: str = ""  # why the supervisor killed it
    peak_rss: int = 0


def run_process(argv: Sequence[str], *, cwd: str, log_prefix: Path, timeout: float, memory: int | None,
                env: dict[str, str] | None = None) -> Outcome:
    """Run ``argv`` in a new process group with stdout / stderr in ``LOG_PREFIX.stdout.txt`` / ``.stderr.txt``,
    killing the group past ``timeout`` seconds or ``memory`` resident bytes; :class:`JobInterrupted` when the
    sweep stops meanwhile. The group is killed on the way out whatever happens."""
    started = time.monotonic()
    with open(f"{log_prefix}.stdout.txt", "wb") as out, open(f"{log_prefix}.stderr.txt", "wb") as err:
        try:
            proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        except OSError as e:
            return Outcome("fail", None, 0.0, f"could not start {argv[0]}: {e}")
        _GROUPS.add(proc.pid)
        status, note, peak = "", "", 0
        try:
            while proc.poll() is None:
                if _GROUPS.stopping.is_set():
                    raise JobInterrupted(f"{' '.join(argv[:5])} stopped")
                if time.monotonic() - started > timeout:
                    status, note = "timeout", f"no result after {timeout:g} s (--timeout); killed"
                    break
                peak = max(peak, group_rss(proc.pid))
                if memory and peak > memory:
                    status, note = "oom", (f"resident memory {peak / 2**30:.1f} GB over the --memory cap of "
                                           f"{memory / 2**30:.1f} GB; killed")
                    break
                try:
                    proc.wait(POLL_S)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            kill_group(proc.pid)  # the job's helpers too, and the job itself when it is still running
            proc.wait()
            _GROUPS.discard(proc.pid)
    if _GROUPS.stopping.is_set():  # killed by stop_jobs between two polls: not a result either
        raise JobInterrupted(f"{' '.join(argv[:5])} stopped")
    code = proc.returncode
    if not status:
        status = "pass" if code == 0 else "killed" if code < 0 else "fail"
        if code < 0:
            note = f"killed by signal {-code} ({_signal_name(-code)})"
    return Outcome(status, code, round(time.monotonic() - started, 2), note, peak)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def _tail(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            return f.read(LOG_CAP).decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def failure_line(outcome: Outcome, log_prefix: Path) -> str:
    """The first line that says why a job did not pass: the supervisor's note, the ``deploy convert: error: ...``
    sentence, the first ``FAILED`` stage line, else the last line of stderr (a traceback's) or the exit code."""
    if outcome.status == "pass":
        return ""
    if outcome.note:
        return outcome.note
    err, out = _tail(Path(f"{log_prefix}.stderr.txt")), _tail(Path(f"{log_prefix}.stdout.txt"))
    for line in err:
        if _ERROR_LINE.match(line):
            return line.strip()[:500]
    for line in out:
        if line.startswith("FAILED ") or line.startswith("--strict-plain"):
            return line.strip()[:500]
    last = next((ln.strip() for ln in reversed(err) if ln.strip()), "")
    return last[:500] or f"exit code {outcome.exit_code}"


# ------------------------------------------------------------------------------------------------ jobs

def job_environment(threads: int | None = None) -> dict[str, str]:
    """This process's environment with this checkout first on ``PYTHONPATH`` (the jobs import what it imports)
    and, with ``threads``, each job's thread pools that size: jobs running side by side with a pool as large as the
    machine each would oversubscribe its cores (measured here: a 17 s conversion took 150 s beside another)."""
    env = dict(os.environ)
    if (ROOT / "deploy" / "__init__.py").is_file():  # this checkout first, as the driver imports it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if threads:
        env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return env


def run_job(job: Job) -> dict:
    """Run one job (``deploy convert``, then ``deploy bench`` with ``job.bench``, and the peer path with
    ``job.peer``) and return its record; the same function runs in a pool thread or as a Ray task."""
    jd = Path(job.job_dir)
    if jd.exists():  # a previous try of this job (--rerun-failed, or a sweep interrupted while it ran)
        shutil.rmtree(jd)
    jd.mkdir(parents=True)
    cwd = job.cwd if os.path.isdir(job.cwd) else str(jd)
    env, python = job_environment(job.threads), sys.executable
    argv = [python, "-m", "deploy", "convert", job.spec, "--targets", ",".join(job.targets), "--precision",
            job.precision, "--out", str(jd / "convert")]
    ours = run_process(argv, cwd=cwd, log_prefix=jd / "convert", timeout=job.timeout, memory=job.memory, env=env)
    record = {"key": job.key, "spec": job.spec, "targets": list(job.targets), "precision": job.precision,
              "status": ours.status, "exit_code": ours.exit_code, "seconds": ours.seconds,
              "first_line": failure_line(ours, jd / "convert"), "peak_rss": ours.peak_rss, "params": job.params,
              "job_dir": str(jd), "host": socket.gethostname()}
    report = read_report(jd / "convert" / "report.json")
    record.update(sweep_report.report_fields(report, job.targets))
    if job.bench and ours.status == "pass":
        bench = run_process([python, "-m", "deploy", "bench", str(jd / "convert"), "--no-chart", "-q"], cwd=cwd,
                            log_prefix=jd / "bench", timeout=job.timeout, memory=job.memory, env=env)
        record["bench"] = {**sweep_report.bench_fields(read_report(jd / "convert" / "report.json")),
                           "seconds": bench.seconds}
        if bench.status != "pass":
            record["bench"]["error"] = failure_line(bench, jd / "bench")
    if job.peer:
        argv = [python, "-m", "deploy.sweep_jobs", "peer", job.spec, "--out", str(jd / "peer")]
        done = run_process(argv + (["--compare-export"] if job.compare_export else []), cwd=cwd,
                           log_prefix=jd / "peer", timeout=job.timeout, memory=job.memory, env=env)
        record["peer"] = sweep_report.peer_fields(read_report(jd / "peer" / "peer.json"), done.status,
                                                  failure_line(done, jd / "peer"), done.seconds)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def read_report(path: Path) -> dict:
    """A JSON object written by a job, or {} when absent, too large (over REPORT_CAP) or not an object."""
    try:
        if path.stat().st_size > REPORT_CAP:
            log.warning("%s is over %d MB; not read", path, REPORT_CAP >> 20)
            return {}
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------- peer path

def peer(spec: str, out: Path, *, seed: int = 0, compare_export: bool = False, found: dict | None = None) -> dict:
    """The peer path on ``spec`` (see the module docstring), its files in ``out``; ``found`` (returned) says how
    far it got: ``step`` is the step that raised, if one did."""
    import torch

    from runtimes.core import max_rel_error, output_leaves, require

    from .sources import load_model

    found = {} if found is None else found
    found.update(status="fail", step="load", max_rel=None, rtol=PEER_RTOL)
    loaded = load_model(spec, seed=seed)  # the model deploy convert gets: same weights, eval mode
    model, shape = loaded.model, loaded.input_shape or (1, 3, 224, 224)
    found.update(step="torch", input_shape=list(shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    reference = [t.numpy() for t in output_leaves(model, (x,))]
    found["step"] = "torch.onnx.export"
    started = time.perf_counter()
    torch.onnx.export(model, (x,), str(out / "model.onnx"))
    found.update(export_seconds=round(time.perf_counter() - started, 3), step="onnxruntime")
    ort = require("onnxruntime", "onnx", "the peer path")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = session.get_inputs()
    if len(feeds) != 1:
        raise ValueError(f"the exported ONNX file takes {len(feeds)} inputs, the model one")
    error = float(max_rel_error(reference, session.run(None, {feeds[0].name: x.numpy()})))
    found.update(step="", max_rel=error if error == error and error != float("inf") else None,
                 status="pass" if error <= PEER_RTOL else "fail")
    if found["status"] == "fail":
        found["error"] = f"ONNX Runtime output max rel error {error:.2e} > {PEER_RTOL:g}"
    if compare_export:
        try:
            reparameterize = require("timm", "models", "--compare-export").utils.reparameterize_model
            started = time.perf_counter()
            torch.export.export(reparameterize(model), (x,))
            found["baseline_seconds"] = round(time.perf_counter() - started, 3)
        except Exception as e:  # noqa: BLE001 - the baseline failing is a number we do not have, not a crash
            found["baseline_error"] = f"{type(e).__name__}: {first_line(e)}"[:500]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deploy.sweep_jobs peer SPEC --out DIR [--seed 0] [--compare-export]``: write DIR/peer.json."""
    p = argparse.ArgumentParser(prog="python -m deploy.sweep_jobs", description="the peer path of deploy sweep")
    p.add_argument("command", choices=("peer",))
    p.add_argument("spec")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-export", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found: dict = {}
    started = time.perf_counter()
    try:
        peer(args.spec, out, seed=args.seed, compare_export=args.compare_export, found=found)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        found.update(status="fail", error=f"{found.get('step') or 'peer'} failed: {type(e).__name__}: "
                     f"{first_line(e)}"[:500])
        log.debug("peer path of %s", args.spec, exc_info=True)
    found["seconds"] = round(time.perf_counter() - started, 3)
    tmp = out / "peer.json.tmp"
    tmp.write_text(json.dumps(found, default=str))
    os.replace(tmp, out / "peer.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
