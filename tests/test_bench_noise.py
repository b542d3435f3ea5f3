"""Benchmark honesty on a busy machine: the load average is recorded with each timing, and a row whose
spread (p90 / p50) or load says it cannot be trusted is flagged beside its numbers."""

from __future__ import annotations

import json
import os

import pytest

import runtimes.bench as harness
from deploy.bench import reliability
from deploy.report import bench_table
from runtimes.bench import MAX_SPREAD, BenchJob, BenchSettings, run_job, unreliable
from tests.conftest import main_in_process


@pytest.mark.parametrize("p90, loads, cpus, reasons", [
    (1.2, (0.4, 0.6), 2, []),  # quiet and tight
    (1.5, (0.4, 0.6), 2, []),  # the threshold itself is not above it
    (2.31, (0.4, 0.6), 2, [f"p90/p50 2.31 > {MAX_SPREAD}"]),  # one call in ten well over the median
    (1.2, (0.5, 3.1), 2, ["load 3.1 on 2 CPUs"]),  # the higher of before and after counts
    (1.2, (2.0, 2.0), 2, []),  # a bench using every CPU makes this load itself: not flagged
    (1.2, (5.0, 5.0), 8, []),  # the same load on a bigger machine leaves CPUs free
    (3.0, (4.0, 4.2), 2, [f"p90/p50 3.00 > {MAX_SPREAD}", "load 4.2 on 2 CPUs"]),
    (3.0, (None, None), 2, [f"p90/p50 3.00 > {MAX_SPREAD}"]),  # no load average on this system: spread only
])
def test_unreliable_names_each_reason_with_its_figures(p90, loads, cpus, reasons):
    row = {"p50": 1.0, "p90": p90, "load_before": loads[0], "load_after": loads[1]}
    assert unreliable(row, cpus) == reasons


class EchoRunner:
    """A runner whose calls return the file name it was made with, so a scripted timer knows which form it times."""

    def __init__(self, path: str, threads: int | None = None):
        self.path = path

    def activate(self):
        return self

    def infer(self, feed, check: bool = True):
        return self.path

    def deactivate(self):
        pass


def _scripted_timer(calls: dict):
    """Times from a script: "tight" takes 1.0 or 1.1 ms; "wide" 1.0 ms except every fourth call, 3.0 ms."""
    def timer(call):
        name = call()
        calls[name] = calls.get(name, 0) + 1
        if name == "tight":
            return 1.0 + 0.1 * (calls[name] % 2)
        return 3.0 if calls[name] % 4 == 0 else 1.0
    return timer


@pytest.fixture
def scripted(monkeypatch):
    """Run jobs of two scripted forms on a 2-CPU machine whose 1-minute load averages are given per test."""
    monkeypatch.setattr(harness, "wall_timer", _scripted_timer({}))
    monkeypatch.setattr(harness, "usable_cpus", lambda: 2)

    def run(*loads: float) -> dict:
        readings = iter(loads)
        monkeypatch.setattr(os, "getloadavg", lambda: (next(readings), 0.0, 0.0))
        job = BenchJob("fake", {"deploy": "tight", "training": "wide"}, [1, 3, 8, 8],
                       runner=f"{__name__}:EchoRunner", threads=2,
                       settings=BenchSettings(warmup_iters=1, warmup_ms=0, min_iters=20, min_ms=0))
        result = run_job(job)
        return {r["form"]: r for r in json.loads(json.dumps(result["rows"]))}  # as run_isolated hands them back
    return run


def test_a_quiet_tight_row_passes_and_a_wide_one_is_flagged_with_its_spread(scripted):
    rows = scripted(0.4, 0.6)
    tight, wide = rows["deploy"], rows["training"]
    assert (tight["p50"], tight["p90"]) == (pytest.approx(1.05), pytest.approx(1.1))
    assert tight["unreliable"] == [] and (tight["load_before"], tight["load_after"]) == (0.4, 0.6)
    assert wide["p50"] == 1.0 and wide["p90"] == 3.0
    assert wide["unreliable"] == [f"p90/p50 3.00 > {MAX_SPREAD}"]


def test_a_run_on_a_loaded_machine_flags_every_row_with_the_load(scripted):
    rows = scripted(1.2, 3.1)  # the load rose past the 2 CPUs during the measurement
    assert rows["deploy"]["unreliable"] == ["load 3.1 on 2 CPUs"]
    assert rows["training"]["unreliable"] == [f"p90/p50 3.00 > {MAX_SPREAD}", "load 3.1 on 2 CPUs"]
    assert all((r["load_before"], r["load_after"]) == (1.2, 3.1) for r in rows.values())


def test_the_table_shows_the_verdict_beside_the_numbers_and_the_entry_sums_it_up():
    rows = [{"runtime": "onnxruntime", "variant": "fp32", "batch": 1, "form": "deploy", "p50": 1.0, "p90": 1.1,
             "p99": 1.2, "mean": 1.0, "std": 0.1, "throughput": 1000.0, "load_before": 0.3, "load_after": 0.5,
             "unreliable": []},
            {"runtime": "torch", "variant": "fp32", "batch": 1, "form": "deploy", "p50": 150.0, "p90": 340.0,
             "p99": 400.0, "mean": 180.0, "std": 60.0, "throughput": 5.6, "load_before": 3.1, "load_after": 4.0,
             "unreliable": ["p90/p50 2.27 > 1.5", "load 4.0 on 2 CPUs"]},
            {"runtime": "openvino", "variant": "fp32", "batch": 1, "form": "deploy", "p50": 1.0, "p90": 1.1,
             "p99": 1.2, "mean": 1.0, "std": 0.1, "throughput": 1000.0}]  # recorded before the check existed
    headers, table = bench_table({"results": rows, "speedups": []})
    col = headers.index("reliability")
    assert [t[col] for t in table] == ["ok", "UNRELIABLE: p90/p50 2.27 > 1.5; load 4.0 on 2 CPUs", "-"]
    summary, notes = reliability(rows, cpus=2, threads=2)
    assert (summary["load_min"], summary["load_max"], summary["flagged"]) == (0.3, 4.0, 1)
    assert summary["max_spread"] == MAX_SPREAD and summary["load_limit"] == 2
    assert len(notes) == 1 and notes[0].startswith("1 of 3 timings are flagged unreliable")
    assert reliability(rows[:1], cpus=2, threads=2)[1] == []


@pytest.mark.e2e
def test_bench_on_a_loaded_machine_says_so_in_the_table_report_json_and_report_md(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from runtimes.hardware import usable_cpus

    cpus = usable_cpus()
    load = cpus + 1.5
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    rc, out, err = main_in_process(capsys, "bench", "repvgg_digits", "--runtimes", "onnxruntime", "--out",
                                   str(tmp_path / "run"), "--threads", "1", "--isolation", "none", "--min-ms", "20",
                                   "--min-iters", "5", "--warmup-ms", "0", "--no-chart")
    assert rc == 0, err[-2000:]
    reason = f"load {load:.1f} on {cpus} CPUs"
    assert "UNRELIABLE: " in out and reason in out and "flagged unreliable" in out  # table and note
    entry = json.loads((tmp_path / "run" / "report.json").read_text())["benchmarks"][0]
    row = entry["results"][0]
    assert row["load_before"] == row["load_after"] == load and reason in row["unreliable"]
    assert entry["reliability"]["load_max"] == load and entry["reliability"]["usable_cpus"] == cpus
    md = (tmp_path / "run" / "report.md").read_text()
    assert reason in md and f"{load:.2f} to {load:.2f} on {cpus} usable CPUs" in md
