"""``deploy tune``'s ranking: interleaved rounds, the interval of a median, ties and their tie-break, and the Pareto
front of ``pareto.png``.

Every timing is scripted (``tests.test_tune.Scripted`` rows, one per round): the tests know which candidate is
consistently faster and which one had a lucky round, and check that luck does not win.
"""

from __future__ import annotations

import numpy as np
import pytest

from deploy.tune import Budget, TuneResult, better, median_interval, rank, search, summarize_rounds, tied
from deploy.tune_report import candidate_table, pareto_figure, pareto_front, table_notes
from runtimes.bench import BenchJob
from tests.conftest import main_in_process
from tests.test_tune import Clock, Scripted, by_runtime, cand, options, timing


def rounds(*p50s: float, p90: float | None = None) -> list[dict]:
    """One scripted row a round."""
    return [timing(p, p90=p90 if p90 is not None else round(p * 1.1, 6)) for p in p50s]


def measured(precision: str = "fp32", p50s=(1.0,) * 5, p90: float | None = None, **kw):
    """A candidate measured in full in the scripted rounds ``p50s``."""
    c = cand(precision=precision, status="measured", **kw)
    c.stats = summarize_rounds(rounds(*p50s, p90=p90))
    return c


# ------------------------------------------------------------------------------------- the interval of a median

def test_median_interval_is_the_order_statistics_with_their_binomial_coverage():
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, 0.9375)  # 1 - 2 / 2**5
    low, high, coverage = median_interval([float(v) for v in range(9, 0, -1)])
    assert (low, high) == (2.0, 8.0) and coverage == pytest.approx(1 - 2 * (1 + 9) / 2 ** 9)  # 2nd and 8th of 9
    assert median_interval([2.0, 1.0, 3.0]) == (1.0, 3.0, 0.75)  # too few for 90 %: the range, and what it covers
    assert median_interval([4.0]) == (4.0, 4.0, 0.0)
    with pytest.raises(ValueError):
        median_interval([])


@pytest.mark.parametrize("n", [5, 9])
def test_median_interval_covers_the_true_median_as_often_as_it_says(n):
    # skewed round values (a long right tail, like latencies): the stated coverage holds whatever the distribution
    rng = np.random.default_rng(0)
    trials = rng.lognormal(0.0, 0.8, size=(20000, n))
    hits = 0
    for row in trials:
        low, high, coverage = median_interval(row)
        hits += low <= 1.0 <= high  # the lognormal(0, s) median is exp(0) = 1
    assert hits / len(trials) == pytest.approx(coverage, abs=0.01)


def test_summarize_rounds_takes_the_median_of_each_rounds_statistics_and_keeps_the_rounds():
    rows = [timing(p, p90=2 * p, mean=1.5 * p) for p in (1.0, 3.0, 2.0, 5.0, 4.0)]
    s = summarize_rounds(rows)
    assert (s["p50"], s["p90"], s["mean"]) == (3.0, 6.0, 4.5)
    assert s["throughput"] == pytest.approx(1000 / 4.5) and s["iters"] == 5 * 20
    assert s["p50_ci"] == [1.0, 5.0] and s["ci_level"] == 0.9375
    assert s["throughput_ci"] == pytest.approx([1000 / 7.5, 1000 / 1.5])
    assert (s["min"], s["max"]) == (0.95, 10.0)  # the extremes over every round
    assert [r["p50"] for r in s["rounds"]] == [1.0, 3.0, 2.0, 5.0, 4.0]


# ------------------------------------------------------------------------------------------ luck does not win

def test_a_lucky_round_does_not_win_against_a_consistently_faster_narrow_candidate():
    lucky, steady = cand(precision="bf16"), cand(precision="fp32")
    opts = options()
    measure = Scripted(opts, screen={lucky.name: timing(0.60, p90=2.0, fastest=0.5),
                                     steady.name: timing(1.00, p90=1.1, fastest=0.95)},
                       full={lucky.name: rounds(0.60, 1.30, 1.35, 1.40, 1.45, p90=2.0),  # one lucky round, wide
                             steady.name: rounds(1.00, 1.02, 1.01, 1.03, 1.04, p90=1.1)})  # slightly faster, narrow
    lines: list[str] = []
    search([lucky, steady], by_runtime, measure, opts, Budget(600, Clock()), lines.append)
    # one measurement (round 1's p50 alone, or the screening p50) would have chosen the lucky one
    assert lucky.screen["p50"] < steady.screen["p50"] and lucky.stats["rounds"][0]["p50"] < steady.stats["p50"]
    assert (lucky.stats["p50"], steady.stats["p50"]) == (1.35, 1.02)
    assert lucky.stats["p50_ci"] == [0.60, 1.45] and steady.stats["p50_ci"] == [1.00, 1.04]
    # the intervals overlap: a tie, which the steady one wins (same threads and accuracy; lower p90) ...
    assert tied([lucky, steady]) == [steady, lucky]
    assert rank([lucky, steady]) == [steady, lucky]
    # ... and without the tie-break (equal p90s) on its median: never the lucky one
    lucky.stats["p90"] = steady.stats["p90"] = 1.1
    assert rank([lucky, steady])[0] is steady
    assert "measuring 2 candidate(s) in 5 interleaved rounds of 1 process(es) ..." in lines
    assert sum(line.startswith("  round ") for line in lines) == 5


def test_a_consistently_faster_candidate_wins_alone_and_the_verdict_says_so():
    fast = measured("int8", (0.60, 0.62, 0.61, 0.63, 0.64))
    slow = measured("fp32", (1.00, 1.02, 1.01, 1.03, 1.04))
    assert tied([slow, fast]) == [] and rank([slow, fast]) == [fast, slow]
    assert better(fast, slow) and not better(slow, fast)
    notes = table_notes([slow, fast], fast)
    assert notes[1] == (f"No tie: {fast.name} is the only candidate measured in full that no other one beats (with a "
                        "p50 interval entirely below its own, without a p90 interval entirely above).")
    assert not any(line.startswith("TIE") for line in notes)


def test_a_lower_median_with_a_clearly_worse_tail_is_a_tie_that_the_narrow_candidate_wins():
    # the rounds measured here (repvgg_digits, 2 loaded cores): LiteRT int8 at 2 threads, p50 0.019 ms in every
    # round but p90 0.088 ms; ONNX Runtime int8, p50 0.039 ms, p90 0.044 ms; ONNX Runtime fp32 a little slower
    bimodal = cand(runtime="tflite", precision="int8", status="measured")
    bimodal.stats = summarize_rounds([timing(p, p90=q) for p, q in zip((0.0189, 0.0193, 0.0189, 0.0189, 0.0189),
                                                                        (0.0883, 0.0892, 0.0882, 0.0884, 0.0886))])
    narrow = cand(precision="int8", status="measured")
    narrow.stats = summarize_rounds([timing(p, p90=q) for p, q in zip((0.0387, 0.0395, 0.0389, 0.0389, 0.0388),
                                                                       (0.0436, 0.0450, 0.0440, 0.0441, 0.0438))])
    slower = cand(precision="fp32", status="measured")  # beaten by narrow: higher median, tail no better
    slower.stats = summarize_rounds([timing(p, p90=q) for p, q in zip((0.0450, 0.0458, 0.0453, 0.0451, 0.0449),
                                                                       (0.0465, 0.0476, 0.0471, 0.0468, 0.0467))])
    assert bimodal.stats["p50_ci"][1] < narrow.stats["p50_ci"][0]  # the medians alone would order them ...
    assert not better(bimodal, narrow) and not better(narrow, bimodal)  # ... the tails say otherwise
    assert better(narrow, slower) and not better(bimodal, slower)  # bimodal's tail is clearly worse than slower's
    assert tied([bimodal, slower, narrow]) == [narrow, bimodal]  # slower: beaten by narrow, so not in the tie
    assert rank([bimodal, slower, narrow]) == [narrow, bimodal, slower]
    verdict = table_notes([bimodal, slower, narrow], narrow)[1]
    assert verdict.startswith(f"TIE: no candidate beats {narrow.name}, {bimodal.name} ")
    assert f"(lowest p50: {bimodal.name}; lowest p90: {narrow.name})" in verdict


def test_overlapping_intervals_are_reported_as_a_tie_in_the_table_and_the_verdict():
    a = measured("int8", (1.00, 1.10, 1.05, 0.98, 1.20), p90=1.6)  # the lowest median, 1.05 in [0.98, 1.20]
    b = measured("fp32", (1.08, 1.15, 1.12, 1.30, 1.10), p90=1.2)  # 1.12 in [1.08, 1.30]: overlaps a's
    c = measured("fp16", (1.50, 1.60, 1.55, 1.52, 1.58))  # [1.50, 1.60]: clearly slower
    assert tied([a, b, c]) == [b, a]  # the tie-break: same threads and accuracy, b's p90 is lower
    assert rank([a, b, c]) == [b, a, c]
    headers, rows = candidate_table([c, a, b], chosen=b)
    assert headers[1] == "candidate (runtime precision passes xTHREADS)" and headers[3] == "p50 interval"
    by_name = {r[1]: r for r in rows}
    assert [r[1] for r in rows] == [b.name, a.name, c.name] and [r[0] for r in rows] == ["1", "2", "3"]
    assert (by_name[b.name][-1], by_name[a.name][-1], by_name[c.name][-1]) == ("CHOSEN (TIE)", "measured (TIE)",
                                                                               "measured")
    assert (by_name[a.name][2], by_name[a.name][3]) == ("1.050", "0.980–1.200")
    legend, verdict = table_notes([c, a, b], b)
    assert legend.startswith("xN: N threads") and "5 interleaved round(s)" in legend and "93.75 %" in legend
    assert verdict == (f"TIE: no candidate beats {b.name}, {a.name} (with a p50 interval entirely below its own, "
                       "without a p90 interval entirely above), so these measurements cannot order them (lowest p50: "
                       f"{a.name}; lowest p90: {b.name}). Tie-break: fewer threads, then smaller accuracy drop "
                       "(with labels) or higher top-1 agreement, then lower p90, then lower median; "
                       f"chosen: {b.name}.")
    peer = {"form": "training form", "stats": summarize_rounds(rounds(2.24, 2.20, 2.30, 2.25, 2.40, p90=2.4))}
    assert table_notes([c, a, b], b, peer=peer)[2] == (
        "Peer baseline (training form, in the same rounds): p50 2.250 ms (2.200–2.400), p90 2.400 ms; the chosen "
        "form is 2.01x its speed at p50, 2.00x at p90.")  # b: p50 1.12, p90 1.2


@pytest.mark.parametrize("winner, loser", [
    # fewer threads wins a tie even with the higher median
    (dict(threads=1, p50s=(1.06,) * 4 + (1.00,)), dict(threads=2, p50s=(1.00,) * 4 + (1.06,))),
    # then the smaller accuracy drop
    (dict(drop=0.0, p50s=(1.06,) * 4 + (1.00,)), dict(drop=0.5, p50s=(1.00,) * 4 + (1.06,))),
    # then (without labels) the higher agreement
    (dict(agreement=0.99, p50s=(1.06,) * 4 + (1.00,)), dict(agreement=0.97, p50s=(1.00,) * 4 + (1.06,))),
])
def test_the_tie_break_order(winner, loser):
    made = []
    for spec, precision in ((winner, "fp32"), (loser, "int8")):
        c = measured(precision, spec["p50s"], threads=spec.get("threads", 2))
        c.metrics.pop("drop")
        c.metrics.update({k: spec[k] for k in ("drop", "agreement") if k in spec})
        made.append(c)
    w, lo = made
    assert w.stats["p50"] > lo.stats["p50"]  # the loser has the lower median
    assert rank([lo, w]) == [w, lo] and tied([lo, w]) == [w, lo]


def test_the_throughput_objective_compares_the_intervals_of_milliseconds_per_sample():
    # p50s far apart (no latency tie), but the means (samples/s) overlap round for round
    a = cand(precision="int8", status="measured")
    a.stats = summarize_rounds([timing(1.0, mean=m) for m in (1.0, 1.5, 1.1, 1.2, 1.05)])
    b = cand(precision="fp32", status="measured")
    b.stats = summarize_rounds([timing(2.0, mean=m) for m in (1.3, 1.35, 1.4, 1.32, 1.38)])
    assert tied([a, b], "latency") == []
    assert tied([a, b], "throughput") == [a, b]  # same threads and accuracy: a's p90 (1.1) is the lower
    headers, rows = candidate_table([a, b], a, "throughput")
    assert headers[3] == "samples/s interval" and rows[0][3] == f"{1000 / 1.5:.1f}–{1000 / 1.0:.1f}"


# ------------------------------------------------------------------------------------------------- the rounds

def _job(runtime: str, form: str, opts) -> BenchJob:
    return BenchJob(runtime, {form: f"{form}.onnx"}, [1, 3, 8, 8], settings=opts.full)


def test_rounds_interleave_every_process_and_the_peer_in_a_rotating_order():
    a, b, c = cand(), cand(runtime="openvino"), cand(runtime="tflite")
    opts = options()
    full = {x.name: rounds(1.0, 1.1, 1.2, 1.3, 1.4) for x in (a, b, c)}
    full["peer"] = rounds(2.0, 2.1, 2.2, 2.3, 2.4)
    measure = Scripted(opts, screen={x.name: timing(1.0) for x in (a, b, c)}, full=full)
    peer = _job("onnxruntime", "peer", opts)
    peer_rows = search([a, b, c], by_runtime, measure, opts, Budget(600, Clock()), lambda _: None, peer=peer)
    order = [forms[0] for phase, forms in measure.calls if phase == "full"]
    A, B, C, P = a.name, b.name, c.name, "peer"
    assert order == [A, B, C, P,  # round 1 as planned
                     A, P, C, B,  # round 2: rotated by one, reversed
                     C, P, A, B,  # round 3: rotated by two
                     C, B, A, P,  # round 4: rotated by three, reversed
                     A, B, C, P]  # round 5: rotated by four
    assert [r["p50"] for r in peer_rows] == [2.0, 2.1, 2.2, 2.3, 2.4]
    assert all([r["p50"] for r in x.stats["rounds"]] == [1.0, 1.1, 1.2, 1.3, 1.4] for x in (a, b, c))


def test_a_budget_spent_between_rounds_keeps_the_rounds_measured_so_far():
    clock = Clock()
    a, b = cand(), cand(runtime="openvino")
    opts = options()
    measure = Scripted(opts, screen={a.name: timing(1.0), b.name: timing(1.0)},
                       full={a.name: rounds(1.0, 1.2, 1.1), b.name: rounds(2.0, 2.2, 2.1)}, clock=clock, cost=10.0)
    budget = Budget(45, clock)  # 2 screening calls (20 s), round 1 (40 s), round 2's first call (50 s): spent
    search([a, b], by_runtime, measure, opts, budget, lambda _: None)
    assert budget.cut and [len(x.stats["rounds"]) for x in (a, b)] == [2, 1]
    assert a.stats["p50"] == 1.1 and a.stats["ci_level"] == 0.5  # the range of two rounds covers the median half
    assert (a.status, b.status) == ("measured", "measured") and rank([a, b]) == [a, b]


# ------------------------------------------------------------------------------------------------ the front

def _result(candidates, chosen) -> TuneResult:
    return TuneResult("out", candidates, chosen, {}, False, 1.0, "scripted")


def _front_line(fig):
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "Pareto front"]
    assert len(lines) == 1
    return lines[0]


def test_pareto_png_draws_its_front_as_a_staircase_through_the_front_points():
    pytest.importorskip("matplotlib")

    def point(precision, p50, drop, runtime="onnxruntime", passed=True):
        c = cand(runtime=runtime, precision=precision, status="measured" if passed else "ineligible",
                 passed=passed, stats=timing(p50))
        c.metrics["drop"] = drop
        return c

    fast_lossy = point("int8", 0.5, 0.8)
    middle = point("fp16", 1.0, 0.2)
    exact = point("fp32", 2.0, 0.0)
    beaten = point("bf16", 1.5, 0.5)  # slower and less accurate than middle
    slowest = point("fp32", 3.0, 0.3, runtime="openvino")
    fails = point("int8", 0.2, 9.0, runtime="openvino", passed=False)  # fastest, but never on the front
    cands = [slowest, beaten, fails, exact, middle, fast_lossy]
    points = [(c, c.stats["p50"], -c.metrics["drop"]) for c in cands]
    assert [p[0] for p in pareto_front(points)] == [fast_lossy, middle, exact]
    fig = pareto_figure(_result(cands, fast_lossy))
    line = _front_line(fig)
    assert line.get_drawstyle() == "steps-post"
    assert list(line.get_xdata()) == [0.5, 1.0, 2.0, 3.0]  # the front, extended to the slowest point
    assert list(line.get_ydata()) == [-0.8, -0.2, 0.0, 0.0]
    assert "Pareto front" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_a_one_point_front_is_still_drawn():
    # every candidate equally accurate (the digits: no held-out digit lost): the front is the fastest one alone
    pytest.importorskip("matplotlib")
    fast, slow = measured("int8", (0.5,) * 5), measured("fp32", (0.9,) * 5)
    line = _front_line(pareto_figure(_result([slow, fast], fast)))
    assert list(line.get_xdata()) == [0.5, 0.9] and list(line.get_ydata()) == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------- progress

def test_the_command_line_says_what_it_does_before_importing_and_planning(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    rc, _, err = main_in_process(capsys, "tune", "--runtimes", "onnxruntime", "--precisions", "fp16", "--out",
                                 str(tmp_path / "t"))
    lines = err.splitlines()
    assert rc == 2
    assert lines[0].endswith("] deploy tune: importing torch and the converters ...")
    assert lines[1].endswith("] planning: which runtimes, precisions and thread counts this machine can run ...")
    assert "no candidate can run on this machine" in lines[2]
