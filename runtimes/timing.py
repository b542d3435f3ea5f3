"""Interleaved latency measurement: forms of one model timed in turn, so they share machine state.

A ratio of two forms measured this way is stable on a noisy machine; an absolute time is not.
Time runtimes one at a time (not interleaved with each other): their thread pools spin between
calls and would steal each other's cores.
"""

from __future__ import annotations

import statistics
import time

__all__ = ["interleaved_p50"]


def interleaved_p50(runners, feed, warmup: int = 3, iters: int = 20) -> list[float]:
    """Median latency in milliseconds of each (active) runner on ``feed``, calls interleaved."""
    for r in runners:
        for _ in range(warmup):
            r.infer(feed, check=False)
    times = [[] for _ in runners]
    for _ in range(iters):
        for i, r in enumerate(runners):
            start = time.perf_counter()
            r.infer(feed, check=False)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]
