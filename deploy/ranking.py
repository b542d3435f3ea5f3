"""The candidates of ``deploy tune`` and the rules that order them: what is measured, its interval, when one
candidate is better than another, the tie and its tie-break. ``deploy.tune`` runs the search and
``deploy.tune_report`` writes it up; both read this module, which imports neither.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import fusers
from exporters import targets as registry

__all__ = ["Candidate", "PASS_SETS", "CUDA", "CONFIDENCE", "TIE_BREAK", "target_of", "objective_value",
           "clearly_slower", "median_interval", "summarize_rounds", "better", "tied", "rank", "closest"]

PASS_SETS = {"default": None, "default+rm": [*fusers.DEFAULT_PASSES, "rm"],
             "default+equalize": [*fusers.DEFAULT_PASSES, "equalize"],
             "default+grow": [p if p != "merge_sequence" else "merge_sequence_grow" for p in fusers.DEFAULT_PASSES]}
CUDA = "torch-cuda"  # the plain model (model.deploy.pt2) run by torch on a CUDA GPU, timed with CUDA events
CONFIDENCE = 0.9  # the least coverage asked of a median's interval (five rounds: their range, 93.75 %)
TIE_BREAK = ("fewer threads", "smaller accuracy drop (with labels) or higher top-1 agreement", "lower p90",
             "lower median")


@dataclass
class Candidate:
    """One way to run the model here, and what became of it."""

    runtime: str
    precision: str
    passes: str
    threads: int
    status: str = "planned"  # planned, pruned, ineligible, dropped, cut, failed, measured
    reason: str = ""
    path: str | None = None  # its artifact, inside the tune directory
    size: int | None = None
    metrics: dict = field(default_factory=dict)  # the accuracy guard's numbers
    screen: dict | None = None  # statistics of the short measurement
    stats: dict | None = None  # statistics of the full measurement (summarize_rounds: medians over the rounds)

    @property
    def name(self) -> str:
        return f"{self.runtime} {self.precision} {self.passes} x{self.threads}"

    @property
    def eligible(self) -> bool:
        return self.status in ("measured", "dropped", "cut", "planned") and bool(self.metrics.get("passed"))

    def best_stats(self) -> dict | None:
        return self.stats or self.screen

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def target_of(runtime: str):
    """The target whose artifact a candidate of ``runtime`` runs (the plain ``.pt2`` for torch on CUDA)."""
    return registry.get("pt2") if runtime == CUDA else registry.by_runtime(runtime)


def objective_value(stats: dict, objective: str) -> float:
    """What is minimized: p50 ms, or ms per sample for throughput."""
    return stats["p50"] if objective == "latency" else 1000.0 / max(stats["throughput"], 1e-12)


def clearly_slower(candidates: Sequence[Candidate], objective: str = "latency") -> list[tuple[Candidate, str]]:
    """The screened eligible candidates that cannot be the best: whose fastest call took longer than the best
    candidate's 90th-percentile call (per sample for throughput). On a noisy machine a p50 difference within
    the spread of calls is not a verdict; a candidate whose best call loses to most of the leader's calls is."""
    screened = [c for c in candidates if c.screen and c.eligible]
    if len(screened) < 2:
        return []
    scale = lambda c: 1.0 if objective == "latency" else 1.0 / c.screen["batch"]  # noqa: E731
    best = min(screened, key=lambda c: objective_value(c.screen, objective))
    bar = best.screen["p90"] * scale(best)
    return [(c, f"fastest screening call {c.screen['min'] * scale(c):.3f} ms > the best candidate's ({best.name}) "
                f"p90 {bar:.3f} ms") for c in screened if c is not best and c.screen["min"] * scale(c) > bar]


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free interval of the median of ``values``' distribution: ``(low, high, coverage)``.

    The k-th smallest and k-th largest of n values bracket the median with probability 1 - 2 P(Bin(n, 1/2) < k),
    whatever the distribution; k is the largest whose coverage is at least ``confidence``. Fewer than five values
    cannot reach 90 %: their range is given, with its (lower) coverage.
    """
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values to bracket")
    coverage = lambda k: 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2 ** n  # noqa: E731
    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return x[k - 1], x[n - k], max(coverage(k), 0.0)


def summarize_rounds(rows: Sequence[dict]) -> dict:
    """A candidate's full statistics from its rounds' rows (``runtimes.bench`` rows, one per round): the median over
    the rounds of p50, p90, p99, mean and samples/s, the extremes, the calls in all, the intervals of the p50, p90
    and samples/s medians (:func:`median_interval`), and the rounds themselves."""
    med = lambda k: float(statistics.median(r[k] for r in rows))  # noqa: E731
    p50_lo, p50_hi, level = median_interval([r["p50"] for r in rows])
    p90_lo, p90_hi, _ = median_interval([r["p90"] for r in rows])
    thr_lo, thr_hi, _ = median_interval([r["throughput"] for r in rows])
    return {"p50": med("p50"), "p90": med("p90"), "p99": med("p99"), "mean": med("mean"),
            "min": min(r["min"] for r in rows), "max": max(r["max"] for r in rows), "batch": rows[0]["batch"],
            "throughput": med("throughput"), "iters": sum(r["iters"] for r in rows),
            "p50_ci": [p50_lo, p50_hi], "p90_ci": [p90_lo, p90_hi], "throughput_ci": [thr_lo, thr_hi],
            "ci_level": level,
            "rounds": [dict(r) for r in rows]}


def _interval(stats: dict, objective: str) -> tuple[float, float]:
    """The interval of ``objective_value``: of the p50 (ms), or of the ms per sample; a single point without rounds."""
    if objective == "latency" and "p50_ci" in stats:
        return tuple(stats["p50_ci"])
    if objective == "throughput" and "throughput_ci" in stats:
        low, high = stats["throughput_ci"]
        return 1000.0 / max(high, 1e-12), 1000.0 / max(low, 1e-12)
    k = objective_value(stats, objective)
    return k, k


def _tie_break(c: Candidate, objective: str) -> tuple:
    """TIE_BREAK: fewer threads, smaller drop or higher agreement, lower p90, lower median."""
    m = c.metrics
    return c.threads, m.get("drop", 0.0), -m.get("agreement", 0.0), c.stats["p90"], objective_value(c.stats, objective)


def _timed(candidates: Sequence[Candidate], objective: str = "latency") -> list[Candidate]:
    slower = {id(c) for c, _ in slower_int8(candidates, objective)}
    return [c for c in candidates if c.eligible and c.best_stats() and c.status != "dropped" and id(c) not in slower]


def slower_int8(candidates: Sequence[Candidate], objective: str = "latency") -> list[tuple[Candidate, str]]:
    """The eligible INT8 candidates no faster than a float form (fp32, fp16, bf16) of the same runtime, with why:
    an INT8 placement is kept only when it pays for its accuracy risk in speed, so these are never chosen."""
    timed = [c for c in candidates if c.eligible and c.best_stats() and c.status != "dropped"]
    out = []
    for c in (c for c in timed if c.precision == "int8"):
        floats = [d for d in timed if d.runtime == c.runtime and d.precision != "int8"]
        best = min(floats, key=lambda d: objective_value(d.best_stats(), objective), default=None)
        if best is not None and objective_value(c.best_stats(), objective) >= objective_value(best.best_stats(),
                                                                                                   objective):
            out.append((c, f"INT8 is not faster than {best.name} on {c.runtime} ({_ms(c, objective)} vs "
                           f"{_ms(best, objective)}): never chosen"))
    return out


def _ms(c: Candidate, objective: str) -> str:
    return f"{objective_value(c.best_stats(), objective):.3f} ms" + ("" if objective == "latency" else " per sample")


def better(x: Candidate, y: Candidate, objective: str = "latency") -> bool:
    """``x`` is better than ``y``: its interval lies entirely below ``y``'s and, for latency, its p90 interval does
    not lie entirely above ``y``'s (a lower median with a clearly worse tail is not better, nor worse: a tie)."""
    if _interval(x.stats, objective)[1] >= _interval(y.stats, objective)[0]:
        return False
    x90, y90 = (x.stats.get("p90_ci") or [x.stats["p90"]] * 2), (y.stats.get("p90_ci") or [y.stats["p90"]] * 2)
    return objective == "throughput" or x90[0] <= y90[1]


def tied(candidates: Sequence[Candidate], objective: str = "latency") -> list[Candidate]:
    """The candidates measured in full that no other one is :func:`better` than, in tie-break order
    (:data:`TIE_BREAK`), when there are several; empty when one stands alone. (There is always one: ``better``
    needs a lower interval, so the candidate with the lowest interval start has none better.)"""
    full = [c for c in _timed(candidates, objective) if c.stats]
    front = [y for y in full if not any(better(x, y, objective) for x in full if x is not y)]
    return sorted(front, key=lambda c: _tie_break(c, objective)) if len(front) > 1 else []


def rank(candidates: Sequence[Candidate], objective: str = "latency") -> list[Candidate]:
    """The eligible measured candidates, best first: the tie (:func:`tied`) in tie-break order, then the others by
    their median (full statistics where measured, ahead of those with screening ones only)."""
    tie = tied(candidates, objective)
    rest = [c for c in _timed(candidates, objective) if all(c is not t for t in tie)]
    return tie + sorted(rest, key=lambda c: (c.stats is None, objective_value(c.best_stats(), objective)))


def closest(candidates: Sequence[Candidate]) -> Candidate | None:
    """The judged candidate nearest the bound: smallest accuracy drop, else highest agreement, else SQNR."""
    judged = [c for c in candidates if c.metrics]
    key = lambda c: (c.metrics.get("drop", 0.0), -c.metrics.get("agreement", 0.0),  # noqa: E731
                     -_finite(c.metrics.get("sqnr_db")))
    return min(judged, key=key, default=None)


def _finite(v) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else (1e9 if v else -1e9)
