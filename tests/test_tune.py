"""``deploy tune``: the plan, the rules (screening drop, eligibility, ranking, budget) and the whole search.

The fast tests drive :func:`deploy.tune.search` with hand-built candidates, scripted measurements and a
fake clock, so every number they assert is known. The e2e tests run the real search: the default model
through the command line (the chosen artifact reloaded and run on the shipped held-out digits), a bound
nothing can meet, and torchvision's resnet18 with two pass sets.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest

from deploy import tune as tune_mod
from deploy.int8 import Guard
from deploy.record import PipelineError
from deploy.tune import (Budget, Candidate, TuneOptions, check_options, clearly_slower, closest, plan, rank,
                         search, slower_int8)
from exporters import targets as registry
from runtimes.bench import BenchJob, BenchSettings
from runtimes.core import MissingDependency
from tests.conftest import main_in_process

SCREEN = BenchSettings(warmup_iters=1, warmup_ms=0.0, min_iters=5, min_ms=20.0)
FULL = BenchSettings(warmup_iters=2, warmup_ms=0.0, min_iters=10, min_ms=100.0)


def timing(p50: float, p90: float | None = None, fastest: float | None = None, *, mean: float | None = None,
           batch: int = 1) -> dict:
    """A measurement row's statistics (ms); throughput from the mean, as runtimes.bench computes it."""
    p90 = round(p50 * 1.1, 6) if p90 is None else p90
    fastest = round(p50 * 0.95, 6) if fastest is None else fastest
    mean = p50 if mean is None else mean
    return {"p50": p50, "p90": p90, "p99": p90, "mean": mean, "std": 0.0, "min": fastest, "max": p90,
            "batch": batch, "throughput": batch * 1000.0 / mean, "iters": 20}


def cand(runtime: str = "onnxruntime", precision: str = "fp32", passes: str = "default", threads: int = 2, *,
         passed: bool = True, status: str = "planned", screen: dict | None = None,
         stats: dict | None = None) -> Candidate:
    c = Candidate(runtime, precision, passes, threads, status=status,
                  metrics={"passed": passed, "reason": "" if passed else "accuracy 90.00% is 9.00 points below",
                           "drop": 0.0 if passed else 9.0})
    c.screen, c.stats = screen, stats
    return c


class Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Scripted:
    """``measure(job)``: rows from scripted tables (screening and full), ``cost`` seconds on ``clock`` per call. A
    table entry that is a list gives its rows in turn, one per call (one per round of the full measurement)."""

    def __init__(self, opts: TuneOptions, screen: dict, full: dict, clock: Clock | None = None, cost: float = 0.0):
        self.opts, self.tables, self.clock, self.cost = opts, {"screen": screen, "full": full}, clock, cost
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, job: BenchJob) -> list[dict]:
        phase = "screen" if job.settings is self.opts.screen else "full"
        assert job.settings is (self.opts.screen if phase == "screen" else self.opts.full)
        self.calls.append((phase, sorted(job.forms)))
        if self.clock is not None:
            self.clock.t += self.cost
        table = self.tables[phase]
        rows = {f: table[f].pop(0) if isinstance(table[f], list) else table[f] for f in job.forms}
        return [{"form": f, "variant": "fp32", **row} if "error" not in row else {"form": f, **row}
                for f, row in rows.items()]


def by_runtime(todo: list[Candidate], settings: BenchSettings) -> list[BenchJob]:
    """One job per runtime and thread count (the grouping deploy tune uses)."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in todo:
        groups.setdefault((c.runtime, c.threads), []).append(c)
    return [BenchJob(r, {c.name: f"{c.name}.onnx" for c in cs}, [1, 3, 8, 8], threads=n, settings=settings)
            for (r, n), cs in groups.items()]


def one_each(todo: list[Candidate], settings: BenchSettings) -> list[BenchJob]:
    """One job per candidate, so that the budget can run out between any two of them."""
    return [BenchJob(c.runtime, {c.name: f"{c.name}.onnx"}, [1, 3, 8, 8], threads=c.threads, settings=settings)
            for c in todo]


def options(**kw) -> TuneOptions:
    return TuneOptions(screen=BenchSettings(min_iters=5), full=BenchSettings(min_iters=20), **kw)


# ------------------------------------------------------------------------------------------------ rank

def test_rank_by_latency_is_p50_order_and_by_throughput_is_samples_per_second():
    # a: lowest p50 but a long tail (mean 3 ms -> 333/s); b: p50 1.5, mean 1.6 (625/s); c: 2 ms flat (500/s)
    a = cand(precision="fp32", stats=timing(1.0, mean=3.0))
    b = cand(precision="int8", stats=timing(1.5, mean=1.6))
    c = cand(runtime="openvino", stats=timing(2.0))
    assert rank([c, b, a], "latency") == [a, c]  # b: INT8 slower than a, the fp32 form of its runtime
    assert rank([c, b, a], "throughput") == [b, c, a]
    assert [round(x.stats["throughput"]) for x in rank([a, b, c], "throughput")] == [625, 500, 333]


def test_an_int8_form_no_faster_than_its_runtimes_float_form_is_never_chosen():
    fp32 = cand(precision="fp32", stats=timing(1.0))
    int8 = cand(precision="int8", stats=timing(1.2))  # the fastest candidate of all would be ...
    other = cand(runtime="openvino", stats=timing(1.1))
    assert rank([int8, other, fp32]) == [fp32, other]
    (slow, why), = slower_int8([int8, other, fp32])
    assert slow is int8 and why.startswith("INT8 is not faster than onnxruntime fp32") and "1.200 ms vs 1.000 ms" in why
    faster = cand(precision="int8", stats=timing(0.5))
    assert rank([faster, other, fp32])[0] is faster and slower_int8([faster, other, fp32]) == []
    alone = cand(runtime="tflite", precision="int8", stats=timing(3.0))  # no float form of tflite measured
    assert rank([alone, fp32]) == [fp32, alone]


def test_rank_puts_full_measurements_first_and_leaves_out_dropped_ineligible_failed_and_untimed():
    measured_slow = cand(precision="fp32", status="measured", screen=timing(3.1), stats=timing(3.0))
    measured_fast = cand(precision="int8", status="measured", screen=timing(2.1), stats=timing(2.0))
    screening_only = cand(runtime="openvino", status="cut", screen=timing(0.5))  # fastest, but not measured in full
    dropped = cand(runtime="openvino", precision="int8", status="dropped", screen=timing(0.4))
    ineligible = cand(runtime="openvino", precision="bf16", passed=False, status="ineligible", stats=timing(0.1))
    failed = cand(runtime="tflite", status="failed", screen=timing(0.2))
    untimed = cand(runtime="tflite", precision="int8", status="cut")  # the budget ran out before its screening
    everything = [measured_slow, screening_only, dropped, ineligible, failed, untimed, measured_fast]
    assert rank(everything) == [measured_fast, measured_slow, screening_only]
    assert rank(everything, "throughput") == [measured_fast, measured_slow, screening_only]
    assert rank([dropped, ineligible, failed, untimed]) == []


# ------------------------------------------------------------------------------------- the screening drop

def test_clearly_slower_drops_only_a_candidate_whose_fastest_call_loses_to_the_leaders_p90():
    leader = cand(precision="int8", screen=timing(1.0, p90=1.2, fastest=0.9))
    slower = cand(precision="fp32", screen=timing(1.4, p90=1.6, fastest=1.25))  # its best call > leader's p90
    within = cand(runtime="openvino", screen=timing(1.3, p90=1.5, fastest=1.15))  # 30% slower p50, spreads overlap
    at_bar = cand(runtime="openvino", precision="int8", screen=timing(1.3, p90=1.5, fastest=1.2))  # equal: kept
    out = clearly_slower([slower, leader, within, at_bar])
    assert [c for c, _ in out] == [slower]
    assert out[0][1] == ("fastest screening call 1.250 ms > the best candidate's (onnxruntime int8 default x2) "
                         "p90 1.200 ms")


def test_clearly_slower_takes_its_leader_from_eligible_candidates_only():
    # a candidate that fails the bound is fastest by far; were it the leader, both others would be dropped
    fails = cand(precision="int8", passed=False, status="ineligible", screen=timing(0.1, p90=0.12, fastest=0.09))
    a = cand(precision="fp32", screen=timing(1.0, p90=1.2, fastest=0.9))
    b = cand(runtime="openvino", screen=timing(1.1, p90=1.3, fastest=1.0))
    assert clearly_slower([fails, a, b]) == []
    assert clearly_slower([a]) == [] and clearly_slower([fails, a]) == []  # nothing to compare with


def test_clearly_slower_for_throughput_compares_per_sample_times():
    # batch 4: leader's p90 5.0 ms per call is 1.25 ms per sample
    leader = cand(precision="int8", screen=timing(4.0, p90=5.0, fastest=3.8, batch=4))
    slower = cand(precision="fp32", screen=timing(8.0, p90=9.0, fastest=6.0, batch=4))  # 1.5 ms a sample
    within = cand(runtime="openvino", screen=timing(5.0, p90=6.0, fastest=4.8, batch=4))  # 1.2 ms a sample
    out = clearly_slower([leader, slower, within], "throughput")
    assert [c for c, _ in out] == [slower]
    assert "1.500 ms" in out[0][1] and "p90 1.250 ms" in out[0][1]


# ---------------------------------------------------------------------------------------------- search

def test_search_screens_all_drops_the_clearly_slower_and_measures_the_rest_in_full():
    a = cand(precision="fp32")
    b = cand(precision="int8")
    c = cand(precision="fp16")
    opts = options()
    measure = Scripted(opts, screen={a.name: timing(1.0, p90=1.2, fastest=0.9),
                                     b.name: timing(1.1, p90=1.3, fastest=1.0),  # within a's spread
                                     c.name: timing(2.0, p90=2.4, fastest=1.8)},  # clearly slower
                       full={a.name: timing(1.05), b.name: timing(0.98)})
    lines: list[str] = []
    search([a, b, c], by_runtime, measure, opts, Budget(600, Clock()), lines.append)
    assert opts.rounds == 5  # the full measurement: one job a round, five rounds
    assert measure.calls == [("screen", sorted([a.name, b.name, c.name]))] + [("full", sorted([a.name, b.name]))] * 5
    assert (a.status, b.status, c.status) == ("measured", "measured", "dropped")
    assert c.stats is None and c.reason.startswith("fastest screening call 1.800 ms")
    assert a.stats["p50"] == 1.05 and b.stats["p50"] == 0.98 and a.screen["p50"] == 1.0
    assert len(a.stats["rounds"]) == 5 and a.stats["p50_ci"] == [1.05, 1.05]
    # the full measurement decides, not the screening one
    assert rank([a, b, c]) == [b, a]
    assert any(line.startswith("screening ") for line in lines) and any(line.startswith("measuring ")
                                                                         for line in lines)


def test_search_never_measures_or_chooses_a_candidate_that_fails_the_bound():
    fails = cand(precision="int8", passed=False, status="ineligible")
    fails_planned = cand(runtime="openvino", precision="int8", passed=False)  # judged, failed, status not yet set
    ok = cand(precision="fp32")
    opts = options()
    fastest = timing(0.1, p90=0.12, fastest=0.09)
    measure = Scripted(opts, screen={fails.name: fastest, fails_planned.name: fastest,
                                     ok.name: timing(1.0)},
                       full={fails.name: fastest, fails_planned.name: fastest, ok.name: timing(1.0)})
    search([fails, fails_planned, ok], by_runtime, measure, opts, Budget(600, Clock()), lambda _: None)
    assert all(forms == [ok.name] for _, forms in measure.calls) and len(measure.calls) == 1 + 5  # screen + rounds
    assert (fails.status, fails_planned.status, ok.status) == ("ineligible", "planned", "measured")
    assert fails.screen is fails.stats is None and fails_planned.screen is None
    # even with timings, a candidate that fails the bound is never ranked
    fails.stats = fails_planned.stats = fastest
    assert rank([fails, fails_planned, ok]) == [ok]


def test_search_marks_a_candidate_that_cannot_be_measured_as_failed():
    a, broken = cand(precision="fp32"), cand(precision="int8")
    opts = options()
    measure = Scripted(opts, screen={a.name: timing(1.0), broken.name: {"error": "RuntimeError: no kernel"}},
                       full={a.name: timing(1.0)})
    search([a, broken], by_runtime, measure, opts, Budget(600, Clock()), lambda _: None)
    assert (broken.status, broken.reason) == ("failed", "RuntimeError: no kernel")
    assert measure.calls[1] == ("full", [a.name]) and rank([a, broken]) == [a]


def test_budget_counts_from_its_creation_on_its_clock():
    clock = Clock()
    budget = Budget(30, clock)
    clock.t += 12
    assert budget.left() == 18 and not budget.spent() and not budget.cut
    clock.t += 18
    assert budget.left() == 0 and budget.spent() and budget.cut
    clock.t -= 20  # once cut, it stays cut
    assert budget.spent()


def test_search_stops_when_the_budget_is_spent_and_ranks_the_best_so_far():
    # 10 s a measurement call, budget 45 s: three screening calls (30 s), two of round 1's calls (50 s), then cut
    clock = Clock()
    a, b, c = cand(precision="fp32"), cand(precision="int8"), cand(runtime="openvino")
    opts = options()
    measure = Scripted(opts, screen={a.name: timing(1.0, p90=1.3, fastest=0.9),
                                     b.name: timing(1.1, p90=1.3, fastest=0.95),
                                     c.name: timing(0.8, p90=1.0, fastest=0.7)},  # the leader; drops nobody
                       full={a.name: timing(1.2), b.name: timing(1.0), c.name: timing(0.5)},
                       clock=clock, cost=10.0)
    budget = Budget(45, clock)
    search([a, b, c], one_each, measure, opts, budget, lambda _: None)
    assert [phase for phase, _ in measure.calls] == ["screen"] * 3 + ["full"] * 2
    assert budget.cut and clock.t == 150.0
    assert (a.status, b.status, c.status) == ("measured", "measured", "cut")
    assert c.reason == "the budget ran out before it was measured in full" and c.stats is None
    assert len(a.stats["rounds"]) == len(b.stats["rounds"]) == 1  # measured in full in the one round it had
    # c had the fastest screening p50, but a full measurement outranks a screening one
    assert rank([a, b, c]) == [b, a, c]


def test_search_cut_during_screening_ranks_the_screened_and_leaves_the_rest_unranked():
    clock = Clock()
    a, b, c = cand(precision="fp32"), cand(precision="int8"), cand(runtime="openvino")
    opts = options()
    measure = Scripted(opts, screen={a.name: timing(1.0), b.name: timing(0.9), c.name: timing(0.1)},
                       full={}, clock=clock, cost=10.0)
    budget = Budget(15, clock)  # two screening calls (at 0 s and 10 s); the third finds it spent
    search([a, b, c], one_each, measure, opts, budget, lambda _: None)
    assert measure.calls == [("screen", [a.name]), ("screen", [b.name])]
    assert budget.cut and {x.status for x in (a, b, c)} == {"cut"}
    assert c.screen is None and a.stats is b.stats is None
    assert rank([a, b, c]) == [b, a]


# ------------------------------------------------------------------------------------------------ plan

CPU_PLAIN = {"simd": ["avx2"], "low_precision": {"int8": [], "bf16": [], "int8_native": False}}
CPU_BF16 = {"simd": ["avx512f", "avx512_bf16"], "low_precision": {"int8": ["VNNI"], "bf16": ["AVX-512 bf16"]}}


def _need(*runtimes: str) -> None:
    for r in runtimes:
        try:
            registry.check_available(registry.by_runtime(r))
        except MissingDependency as e:
            pytest.skip(str(e))


def test_plan_is_the_product_and_prunes_what_this_cpu_or_target_cannot_run_with_the_reason():
    _need("onnxruntime", "openvino")
    opts = options(runtimes=["onnxruntime", "openvino"], precisions=["fp32", "fp16", "bf16", "int8"],
                   passes=["default", "default+rm"])
    out = plan(opts, CPU_PLAIN, [1, 2])
    assert len(out) == 2 * 4 * 2 * 2
    planned = sorted({(c.runtime, c.precision) for c in out if c.status == "planned"})
    assert planned == [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "int8")]
    assert all(not c.reason for c in out if c.status == "planned")
    reasons = {(c.runtime, c.precision): c.reason for c in out if c.status == "pruned"}
    assert len([c for c in out if c.status == "pruned"]) == 4 * 2 * 2  # every pass set and thread count
    assert "no fp16 convolution kernels" in reasons[("onnxruntime", "fp16")]
    assert reasons[("onnxruntime", "bf16")] == "the ONNX target makes fp32, fp16, int8, not bf16"
    assert reasons[("openvino", "fp16")].startswith("this CPU has no fp16 arithmetic")
    assert reasons[("openvino", "bf16")].startswith("this CPU has no bf16 instructions")


def test_plan_keeps_bf16_on_a_cpu_with_bf16_instructions():
    _need("openvino")
    out = plan(options(runtimes=["openvino"], precisions=["bf16", "fp16"]), CPU_BF16, [4])
    assert [(c.precision, c.status, c.threads) for c in out] == [("bf16", "planned", 4), ("fp16", "pruned", 4)]


def test_plan_prunes_a_runtime_that_is_not_installed(monkeypatch):
    _need("onnxruntime")
    monkeypatch.setitem(sys.modules, "openvino", None)  # an import known to fail
    out = plan(options(runtimes=["onnxruntime", "openvino"], precisions=["fp32", "int8"]), CPU_BF16, [2])
    assert [(c.runtime, c.status) for c in out] == [("onnxruntime", "planned")] * 2 + [("openvino", "pruned")] * 2
    assert {c.reason for c in out if c.runtime == "openvino"} == {
        "Python package 'openvino' (needed for the openvino runtime) is not installed; install it with "
        "pip install 'reparam-deploy[openvino]'"}


@pytest.mark.parametrize("field, value, message", [
    ("passes", ["default", "default+nope"], "unknown pass set(s) default+nope; choose from default, default+rm, "
                                            "default+equalize"),
    ("runtimes", ["onnxruntime", "onnxrt"], "unknown runtime(s) onnxrt; known runtimes: "),
    ("precisions", ["fp32", "fp8"], "unknown precision(s) fp8; choose from "),
    ("objective", "speed", "unknown objective 'speed'; choose latency or throughput"),
    ("batch", 0, "--batch and --threads need positive integers"),
    ("threads", [2, 0], "--batch and --threads need positive integers"),
    ("budget_s", 0.0, "--budget-s a positive number of seconds"),
])
def test_check_options_refuses_before_any_work(field, value, message, tmp_path):
    opts = options(**{field: value}, out=str(tmp_path / "t"))
    with pytest.raises(PipelineError) as e:
        check_options(opts)
    assert str(e.value).startswith(message) or message in str(e.value)
    with pytest.raises(PipelineError):
        tune_mod.tune(opts)
    assert not (tmp_path / "t").exists()


def test_check_options_accepts_every_known_name():
    check_options(options(runtimes=registry.runtimes(), passes=list(tune_mod.PASS_SETS),
                          precisions=["fp32", "fp16", "bf16", "int8"], objective="throughput", threads=[1, 2]))


def test_tune_refuses_when_every_candidate_is_pruned(tmp_path):
    _need("onnxruntime")
    with pytest.raises(PipelineError) as e:
        tune_mod.tune(options(runtimes=["onnxruntime"], precisions=["fp16"], out=str(tmp_path / "t")))
    assert str(e.value).startswith("no candidate can run on this machine: onnxruntime fp16: ONNX Runtime's CPU "
                                   "provider has no fp16 convolution kernels")
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------------------------- closest

def _judged(name: str, **metrics) -> Candidate:
    c = Candidate("onnxruntime", name, "default", 1, status="ineligible")
    c.metrics = {"passed": False, **metrics}
    return c


def test_closest_is_the_smallest_drop_then_the_highest_agreement_then_the_highest_sqnr():
    big = _judged("a", drop=3.0, agreement=0.99, sqnr_db=40.0)
    small = _judged("b", drop=0.5, agreement=0.97, sqnr_db=20.0)
    small_agrees = _judged("c", drop=0.5, agreement=0.98, sqnr_db=10.0)
    assert closest([big, small, small_agrees]) is small_agrees
    # without labels: agreement, then SQNR (an infinite SQNR is the nearest; a missing one the farthest)
    low, high = _judged("d", agreement=0.8, sqnr_db=30.0), _judged("e", agreement=0.9, sqnr_db=5.0)
    assert closest([low, high]) is high
    exact, none, finite = _judged("f", sqnr_db=float("inf")), _judged("g", sqnr_db=None), _judged("h", sqnr_db=25.0)
    assert closest([none, finite, exact]) is exact and closest([none, finite]) is finite
    # a candidate never judged (pruned, or its artifact failed) is not a candidate for closest
    assert closest([Candidate("openvino", "fp16", "default", 1, status="pruned", reason="no fp16")]) is None


# ----------------------------------------------------------------------------------------------- end to end

@pytest.fixture
def short_measurements(monkeypatch):
    """Short screening and full measurements for every TuneOptions made during the test (the CLI's too)."""
    monkeypatch.setattr(tune_mod, "SCREEN", SCREEN)
    monkeypatch.setattr(tune_mod, "FULL", FULL)


def _not_faster_int8(candidates: list[dict]) -> set[str]:
    """The INT8 candidates whose recorded p50 is not below the best float form of the same runtime (never chosen)."""
    timed = [c for c in candidates if c["status"] != "dropped" and c["metrics"].get("passed")
             and (c["stats"] or c["screen"])]
    p50 = {c["name"]: (c["stats"] or c["screen"])["p50"] for c in timed}
    return {c["name"] for c in timed if c["precision"] == "int8"
            and any(p50[d["name"]] <= p50[c["name"]] for d in timed
                    if d["runtime"] == c["runtime"] and d["precision"] != "int8")}


def _expected_choice(candidates: list[dict]) -> tuple[dict, list[dict]]:
    """The choice and the tie re-derived from recorded rounds alone (latency): p50 and p90 = the medians of the five
    rounds' values, their intervals = their ranges (93.75 %); x beats y when x's p50 range lies below y's and x's p90
    range does not lie above y's; the tie = those nothing beats, ordered by threads, drop, agreement, p90, p50. An
    INT8 form not faster than its runtime's float form is not a candidate."""
    slower = _not_faster_int8(candidates)
    measured = [c for c in candidates if c["status"] == "measured" and c["name"] not in slower]
    for c in measured:
        p50s, p90s = [r["p50"] for r in c["stats"]["rounds"]], [r["p90"] for r in c["stats"]["rounds"]]
        assert len(p50s) == 5 and c["stats"]["p50"] == float(np.median(p50s))
        assert c["stats"]["p50_ci"] == [min(p50s), max(p50s)] and c["stats"]["ci_level"] == 0.9375
        assert c["stats"]["p90_ci"] == [min(p90s), max(p90s)]

    def beats(x: dict, y: dict) -> bool:
        return x["stats"]["p50_ci"][1] < y["stats"]["p50_ci"][0] and x["stats"]["p90_ci"][0] <= y["stats"]["p90_ci"][1]

    front = [y for y in measured if not any(beats(x, y) for x in measured if x is not y)]
    if len(front) == 1:
        return front[0], []
    front.sort(key=lambda c: (c["threads"], c["metrics"].get("drop", 0.0), -c["metrics"].get("agreement", 0.0),
                              c["stats"]["p90"], c["stats"]["p50"]))
    return front[0], front


def _table_row(report: str, name: str) -> str:
    rows = [ln for ln in report.splitlines() if ln.startswith("|") and f"| {name} |" in ln]
    assert len(rows) == 1, (name, report)
    return rows[0]


@pytest.mark.e2e
def test_tune_the_default_model_writes_a_best_form_that_reproduces_its_accuracy(tmp_path, capsys,
                                                                                short_measurements):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from deploy.verification import run_batched
    from deploy.zoo.digits import load_test_split
    from runtimes import open_runner
    from runtimes.hardware import usable_cpus

    out = tmp_path / "tune"
    rc, stdout, err = main_in_process(capsys, "tune", "--runtimes", "onnxruntime,openvino", "--precisions",
                                      "fp32,bf16,int8", "--budget-s", "240", "--out", str(out), "-q")
    assert rc == 0, err
    manifest = json.loads((out / "best" / "deploy.json").read_text())
    record = json.loads((out / "tune.json").read_text())
    assert record["chosen"] == f"{manifest['runtime']} {manifest['precision']} default x{usable_cpus()}"
    assert (manifest["passes"], manifest["threads"], manifest["batch"]) == ("default", usable_cpus(), 1)
    assert manifest["runtime"] in ("onnxruntime", "openvino") and manifest["precision"] in ("fp32", "bf16", "int8")
    assert manifest["hardware"]["usable_cpus"] == usable_cpus() and manifest["hardware"]["model"]
    convert = manifest["reproduce"]["convert"]
    assert convert.startswith("deploy convert repvgg_digits --input-shape 1,1,8,8 --targets ")
    assert ("--precision int8" in convert) == (manifest["precision"] == "int8")
    assert f"chosen: {record['chosen']}, p50 {manifest['expected']['p50_ms']:.3f} ms" in stdout
    # the choice is the ranking of the recorded numbers: the lowest p50 of the eligible, fully measured ones
    by_name = {c["name"]: c for c in record["candidates"]}
    chosen = by_name[record["chosen"]]
    assert chosen["status"] == "measured" and chosen["metrics"]["passed"]
    assert manifest["expected"]["p50_ms"] == chosen["stats"]["p50"] > 0
    expected, tie = _expected_choice(record["candidates"])
    assert record["chosen"] == expected["name"] and record["tie"] == [c["name"] for c in tie]
    for name in _not_faster_int8(record["candidates"]):
        assert "INT8 is not faster than" in by_name[name]["reason"]
    assert len(record["peer"]["stats"]["rounds"]) == 5  # the peer measured in the same rounds
    for c in record["candidates"]:
        if c["status"] == "dropped":  # the rule, on the recorded screening numbers
            leader = min((x for x in record["candidates"] if x["screen"] and x["metrics"].get("passed")),
                         key=lambda x: x["screen"]["p50"])
            assert c["screen"]["min"] > leader["screen"]["p90"]
        if c["status"] in ("measured", "dropped"):
            assert c["metrics"]["passed"] and c["metrics"]["drop"] <= 1.0
    assert record["peer"]["stats"]["p50"] > 0 and record["peer"]["form"] == "training form"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert f"**Chosen: {record['chosen']}**" in report
    assert _table_row(report, record["chosen"]).endswith("| CHOSEN (TIE) |" if tie else "| CHOSEN |")

    # judged on the shipped held-out digits (never the calibration split) ...
    x, labels = load_test_split()
    with np.load(out / "forms" / "default" / "verify" / "samples.npz") as d:
        assert np.array_equal(d["input0"], x) and np.array_equal(d["labels"], labels)
    # ... and the chosen artifact, reloaded as the manifest says, reproduces the expected accuracy on them
    artifact = out / "best" / manifest["artifact"]
    assert all((out / "best" / f).is_file() for f in manifest["files"])
    with open_runner(str(artifact), **manifest["runner"]["options"]) as runner:
        assert f"{type(runner).__module__}:{type(runner).__name__}" == manifest["runner"]["class"]
        outs = run_batched(runner, x, manifest["batch"])
    accuracy = float(np.mean(outs[0].argmax(1) == labels))
    assert accuracy == manifest["expected"]["accuracy"]
    assert 100 * (manifest["expected"]["reference_accuracy"] - accuracy) == pytest.approx(
        manifest["expected"]["drop"], abs=1e-9)
    assert accuracy > 0.9  # the shipped model is trained


@pytest.mark.e2e
def test_tune_with_a_bound_nothing_meets_exits_1_and_names_the_closest(tmp_path, capsys, monkeypatch,
                                                                       short_measurements):
    pytest.importorskip("onnxruntime")
    # an SQNR bound of 1e9 dB: no float computation meets it, every candidate is judged on real outputs
    monkeypatch.setattr(tune_mod, "Guard", functools.partial(Guard, min_sqnr=1e9))
    out = tmp_path / "tune"
    rc, stdout, err = main_in_process(capsys, "tune", "--runtimes", "onnxruntime", "--precisions", "fp32,int8",
                                      "--budget-s", "240", "--out", str(out), "-q")
    assert rc == 1, err
    record = json.loads((out / "tune.json").read_text())
    assert record["chosen"] is None and not (out / "best").exists()
    judged = [c for c in record["candidates"] if c["metrics"]]
    assert sorted(c["name"].split()[1] for c in judged) == ["fp32", "int8"]
    assert all(c["status"] == "ineligible" and c["screen"] is None and c["stats"] is None for c in judged)
    expected = min(judged, key=lambda c: (c["metrics"].get("drop", 0.0), -c["metrics"].get("agreement", 0.0),
                                          -c["metrics"]["sqnr_db"]))
    assert record["closest"] == expected["name"]
    sentences = [ln for ln in stdout.splitlines() if ln.startswith("no candidate meets the accuracy bound")]
    assert len(sentences) == 1
    assert sentences[0].startswith(f"no candidate meets the accuracy bound; the closest is {expected['name']} "
                                   "(output SQNR ")
    assert "< 1e+09 dB" in sentences[0] and sentences[0].endswith(f"report: {out / 'report.md'}")
    assert "chosen:" not in stdout
    report = (out / "report.md").read_text()
    assert f"**No candidate meets the accuracy bound**; the closest is {expected['name']}: " in report


@pytest.mark.e2e
def test_tune_resnet18_two_pass_sets_chooses_the_faster_measured_form(tmp_path, short_measurements):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchvision")
    from deploy.pipeline import ConvertOptions

    out = tmp_path / "tune"
    result = tune_mod.tune(TuneOptions(model="torchvision:resnet18", runtimes=["onnxruntime"], precisions=["fp32"],
                                       passes=["default", "default+rm"], threads=[2], budget_s=240, out=str(out),
                                       convert=ConvertOptions(input_shape=(1, 3, 64, 64)),
                                       screen=SCREEN, full=FULL))
    default, rm = result.candidates
    assert (default.passes, rm.passes) == ("default", "default+rm")
    assert not result.cut_short and result.chosen is not None
    record = json.loads((out / "tune.json").read_text())
    report = (out / "report.md").read_text()
    timed = [c for c in (default, rm) if c.status != "pruned"]
    for c in (default, rm):
        if c.status == "pruned":  # rm found nothing to rewrite beyond the default passes
            assert c.reason == "default+rm rewrote nothing beyond the default passes"
            continue
        assert c.status in ("measured", "dropped") and c.metrics["passed"], (c.status, c.reason)
        p50 = c.best_stats()["p50"]
        assert f"| {p50:.3f} |" in _table_row(report, c.name)
        saved = next(x for x in record["candidates"] if x["name"] == c.name)
        assert (saved["stats"] or saved["screen"])["p50"] == p50
    measured = [c for c in timed if c.status == "measured"]
    assert result.chosen in measured
    expected, tie = _expected_choice(record["candidates"])
    assert result.chosen.name == expected["name"] and [c.name for c in result.tie] == [c["name"] for c in tie]
    for c in timed:
        if c.status == "dropped":  # dropped by the rule, on its recorded numbers
            assert c.screen["min"] > result.chosen.screen["p90"]
            assert c.reason.startswith(f"fastest screening call {c.screen['min']:.3f} ms")
    assert record["chosen"] == result.chosen.name
    assert (out / "best" / "deploy.json").is_file()
    assert json.loads((out / "best" / "deploy.json").read_text())["passes"] == result.chosen.passes
