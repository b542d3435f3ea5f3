"""What ``deploy tune`` writes: ``best/`` with ``deploy.json``, ``tune.json``, ``report.md`` and ``pareto.png``.

``deploy.json`` is the manifest of the chosen form: runtime, precision, passes, threads, batch, the input,
the runner to open it with, the expected p50 and accuracy on this machine, the hardware facts and the
commands that reproduce it. ``candidate_table`` gives the rows the command line and report.md show,
``table_notes`` the legend and the verdict (a tie, and how it was broken) printed under it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from exporters import targets as registry

from .report import jsonable, markdown_table

__all__ = ["write_outputs", "candidate_table", "table_notes", "pruned_lines", "pareto_front", "pareto_figure",
           "MANIFEST"]

MANIFEST = "deploy.json"


def _ms(stats: dict | None, key: str) -> str:
    return f"{stats[key]:.3f}" if stats and key in stats else "-"


def _accuracy(m: dict) -> str:
    if "drop" in m:
        return f"{0.0 - m['drop'] + 0.0:+.2f}"  # no "-0.00"
    return "-"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _interval(s: dict | None, objective: str) -> str:
    key, fmt = ("p50_ci", "{:.3f}") if objective == "latency" else ("throughput_ci", "{:.1f}")
    if not s or key not in s:
        return "-"
    return "–".join(fmt.format(v) for v in s[key])


def candidate_table(candidates: Sequence, chosen=None,
                    objective: str = "latency") -> tuple[list[str], list[list[str]]]:
    """Headers and rows: every candidate, ranked ones first (best first by ``objective``: the tie in tie-break
    order, then the others), then the rest with their status. ``table_notes`` explains the columns."""
    from .ranking import rank, tied

    ci = "p50 interval" if objective == "latency" else "samples/s interval"
    headers = ["#", "candidate (runtime precision passes xTHREADS)", "p50 ms", ci, "p90 ms", "samples/s",
               "Δ acc (points)", "agreement", "max rel err", "size", "status"]
    ranked = rank(candidates, objective)
    tie = tied(candidates, objective)
    order = ranked + [c for c in candidates if all(c is not r for r in ranked) and c.status != "pruned"]
    rows = []
    for i, c in enumerate(order, 1):
        s, m = c.best_stats(), c.metrics
        status = "CHOSEN" if c is chosen else c.status + (" (screening only)" if c.stats is None and s else "")
        if any(c is t for t in tie):
            status += " (TIE)"
        place = str(i) if any(c is r for r in ranked) else "-"
        rows.append([place, c.name, _ms(s, "p50"), _interval(c.stats, objective), _ms(s, "p90"),
                     f"{s['throughput']:.1f}" if s else "-", _accuracy(m), _pct(m.get("agreement")),
                     f"{m['max_rel']:.2e}" if "max_rel" in m else "-",
                     f"{c.size / 1e6:.2f} MB" if c.size else "-", status + (f": {c.reason}" if c.reason and
                                                                               c is not chosen else "")])
    return headers, rows


def table_notes(candidates: Sequence, chosen=None, objective: str = "latency", peer: dict | None = None) -> list[str]:
    """The legend of ``candidate_table``, the verdict (a tie, and how it was broken) and the peer baseline beside
    the chosen candidate."""
    from .ranking import TIE_BREAK, objective_value, tied

    full = [c.stats for c in candidates if c.stats and "rounds" in c.stats]
    rounds = max((len(s["rounds"]) for s in full), default=0)
    level = max((s["ci_level"] for s in full if len(s["rounds"]) == rounds), default=0.0)
    what = "p50" if objective == "latency" else "samples/s"
    beats = ("a p50 interval entirely below its own, without a p90 interval entirely above" if objective == "latency"
             else "a samples/s interval entirely above its own")
    lines = ["xN: N threads (the runtime's intra-op threads). Measured in full: p50, p90 and samples/s are medians "
             f"over {rounds} interleaved round(s) of each round's value (every runtime and thread count in its own "
             f"process, one process a round); '{what} interval' brackets that median with {100 * level:.2f} % "
             "confidence (the rounds' order statistics, whatever their distribution). 'screening only': one short "
             "measurement."]
    tie = tied(candidates, objective)
    if tie:
        lowest = min(tie, key=lambda c: objective_value(c.stats, objective))
        tail = min(tie, key=lambda c: c.stats["p90"])
        lines.append(f"TIE: no candidate beats {', '.join(c.name for c in tie)} (with {beats}), so these measurements "
                     f"cannot order them (lowest {what}: {lowest.name}; lowest p90: {tail.name}). Tie-break: "
                     + ", then ".join(TIE_BREAK) + (f"; chosen: {tie[0].name}." if chosen is tie[0] else "."))
    elif chosen is not None and chosen.stats and len(full) > 1:
        lines.append(f"No tie: {chosen.name} is the only candidate measured in full that no other one beats (with "
                     f"{beats}).")
    phones = registry.phone_note([c.runtime for c in candidates if c.best_stats()])
    lines += [phones] if phones else []
    ps, cs = (peer or {}).get("stats"), chosen.best_stats() if chosen is not None else None
    if ps and cs:
        lines.append(f"Peer baseline ({peer.get('form')}, in the same rounds): p50 {ps['p50']:.3f} ms "
                     f"({_interval(ps, 'latency')}), p90 {ps['p90']:.3f} ms; the chosen form is "
                     f"{ps['p50'] / cs['p50']:.2f}x its speed at p50, {ps['p90'] / cs['p90']:.2f}x at p90.")
    return lines


def pruned_lines(candidates: Sequence) -> list[str]:
    """One line per runtime and reason of the pruned candidates: "tensorrt fp32, int8: why"."""
    groups: dict[tuple, list[str]] = {}
    for c in candidates:
        if c.status == "pruned":
            what = groups.setdefault((c.runtime, c.reason), [])
            label = c.precision if c.passes == "default" or "rewrote nothing" not in c.reason else c.passes
            if label not in what:
                what.append(label)
    return [f"{runtime} {', '.join(what)}: {reason}" for (runtime, reason), what in groups.items()]


def _convert_command(result, c, opts, shape) -> str:
    from .ranking import PASS_SETS, target_of

    target = target_of(c.runtime)
    args = ["deploy", "convert", opts.model, "--input-shape", ",".join(map(str, shape))]
    if PASS_SETS[c.passes]:
        args += ["--passes", ",".join(PASS_SETS[c.passes])]
    if target.name != "pt2":
        args += ["--targets", target.name]
    if c.precision in ("int8", "fp16"):
        args += ["--precision", c.precision]
    if c.precision == "int8" and opts.calibration:
        args += ["--calibration", opts.calibration]
    return " ".join(shlex.quote(a) for a in args)


def _manifest(result, c, opts, loaded, shape, cpu, files: list[str]) -> dict:
    from .ranking import target_of

    target = target_of(c.runtime)
    s, m, peer = c.best_stats(), c.metrics, result.peer
    peer_p50 = (peer.get("stats") or {}).get("p50")
    return {
        "model": opts.model, "runtime": c.runtime, "precision": c.precision, "passes": c.passes,
        "threads": c.threads, "batch": shape[0], "artifact": files[0], "files": files,
        "input": {"shape": list(shape), "dtype": "float32"},
        "runner": {"class": target.runner, "options": {**target.runner_options(c.precision), **target.bench_options,
                                                       "threads": c.threads}},
        "expected": {"p50_ms": s["p50"], "p90_ms": s["p90"], "throughput": s["throughput"],
                     "p50_interval_ms": s.get("p50_ci"), "interval_confidence": s.get("ci_level"),
                     "measured": f"in full, {len(s['rounds'])} rounds" if c.stats else
                     "screening only (the budget ran out)",
                     "tie": [t.name for t in result.tie],
                     **{k: m[k] for k in ("accuracy", "reference_accuracy", "drop", "agreement", "sqnr_db", "max_rel")
                        if k in m}},
        "eligibility": result.eligibility,
        "peer": {"form": peer.get("form"), "p50_ms": peer_p50,
                 "speedup": peer_p50 / s["p50"] if peer_p50 else None,
                 "speedup_p90": peer["stats"]["p90"] / s["p90"] if peer_p50 else None},
        "hardware": cpu,
        "reproduce": {"tune": opts.command or "(library call)",
                      "convert": _convert_command(result, c, opts, shape)},
        "weights": loaded.weights,
    }


def write_outputs(folder: Path, result, opts, loaded, shape, cpu) -> dict | None:
    """Write every output into ``folder`` (the tune directory before it is committed); the manifest, if chosen."""
    from .ranking import TIE_BREAK, target_of

    root = Path(folder)
    manifest = None
    c = result.chosen
    if c is not None:
        best = root / "best"
        best.mkdir()
        target = target_of(c.runtime)
        from runtimes.core import Artifact

        files = [f for f in target.files(Artifact(c.path, target.name, [], [])) if os.path.exists(f)]
        copied = []
        for f in files:
            shutil.copy2(f, best / os.path.basename(f))
            copied.append(os.path.basename(f))
        manifest = _manifest(result, c, opts, loaded, shape, cpu, copied)
        (best / MANIFEST).write_text(json.dumps(jsonable(manifest), indent=2) + "\n")
    chart = _pareto(root / "pareto.png", result)
    record = {"model": opts.model, "command": opts.command, "objective": opts.objective,
              "bound": {"max_drop": opts.max_drop, "min_agreement": opts.min_agreement},
              "eligibility": result.eligibility, "budget_s": opts.budget_s, "cut_short": result.cut_short,
              "seconds": round(result.seconds, 2), "hardware": cpu, "peer": result.peer,
              "rounds": opts.rounds, "tie_break": list(TIE_BREAK), "tie": [t.name for t in result.tie],
              "chosen": c.name if c else None, "closest": result.closest.name if result.closest else None,
              "candidates": [_relative(x.to_dict(), root) for x in result.candidates], "chart": chart}
    (root / "tune.json").write_text(json.dumps(jsonable(record), indent=2) + "\n")
    (root / "report.md").write_text(_markdown(result, opts, cpu, chart, manifest))
    return manifest


def _relative(d: dict, root: Path) -> dict:
    if d.get("path"):
        d["path"] = os.path.relpath(d["path"], root)
    return d


def _markdown(result, opts, cpu, chart, manifest) -> str:
    c = result.chosen
    lines = [f"# deploy tune: {opts.model}", ""]
    if c is not None:
        lines += [f"**Chosen: {c.name}** (p50 {c.best_stats()['p50']:.3f} ms"
                  + (f", {manifest['peer']['speedup']:.2f}x the peer baseline" if manifest["peer"]["speedup"] else "")
                  + f"); artifact and manifest in `best/` ({manifest['artifact']}, {MANIFEST}).", ""]
    else:
        closest = result.closest
        lines += ["**No candidate meets the accuracy bound**" + (
            f"; the closest is {closest.name}: {closest.metrics.get('reason') or closest.reason}" if closest else "")
            + ".", ""]
    if result.cut_short:
        lines += [f"The search was cut short by the budget ({opts.budget_s:g} s): the best candidate measured so far "
                  "was chosen; candidates marked 'cut' were not measured in full.", ""]
    peer = result.peer
    stats = peer.get("stats")
    lines += [f"- objective: {opts.objective}; bound: accuracy drop <= {opts.max_drop:g} points"
              + (f", top-1 agreement >= {opts.min_agreement:g}" if opts.min_agreement is not None else "")
              + f"; eligibility judged by {result.eligibility}",
              f"- peer baseline: {peer.get('form')} on {peer.get('runtime', 'ONNX Runtime')}: "
              + (f"p50 {stats['p50']:.3f} ms (interval {_interval(stats, 'latency')})" if stats else
                 f"not measured ({peer.get('error', 'no candidate was measured in full')})")
              + (f", agreement {_pct(peer['metrics'].get('agreement'))}" if peer.get("metrics") else ""),
              f"- CPU: {cpu['model']}, {cpu['usable_cpus']} usable CPUs; int8 "
              f"{', '.join(cpu['low_precision']['int8']) or 'none'}; bf16 {', '.join(cpu['low_precision']['bf16']) or 'none'}",
              f"- screening rule: a candidate whose fastest screening call is slower than the best candidate's 90th "
              f"percentile call is dropped; the rest are measured in full: {opts.rounds} rounds, each running every "
              f"runtime and thread count (and the peer) in its own process, in an order that rotates every round; in "
              f"a process at least {opts.full.min_iters} calls and {opts.full.min_ms:.0f} ms per candidate, "
              "interleaved call by call with the other candidates of the same runtime and threads",
              f"- {result.seconds:.0f} s in all", ""]
    lines += ["## Candidates", "", markdown_table(*candidate_table(result.candidates, c, opts.objective)), ""]
    lines += [*table_notes(result.candidates, c, opts.objective, result.peer), ""]
    pruned = pruned_lines(result.candidates)
    if pruned:
        lines += ["Pruned before any measurement:", ""] + [f"- {line}" for line in pruned] + [""]
    if chart:
        lines += [f"![latency against accuracy]({chart})", ""]
    if manifest:
        lines += ["## Reproduce", "", f"- this search: `{manifest['reproduce']['tune']}`",
                  f"- the chosen artifact: `{manifest['reproduce']['convert']}`", ""]
    return "\n".join(lines)


def pareto_front(points: Sequence[tuple]) -> list[tuple]:
    """The ``(candidate, latency, accuracy)`` points of eligible candidates that no other eligible one beats on both
    (lower latency, higher accuracy), by latency: each one more accurate than every faster one."""
    front, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p[1], -p[2])):
        if point[0].eligible and point[2] > best:
            front.append(point)
            best = point[2]
    return front


def pareto_figure(result):
    """Latency (log) against accuracy delta (points, or agreement without labels) of the measured candidates, with
    each p50's interval, the Pareto front as a staircase (extended to the slowest point: what lies below and right
    of it is beaten) and the peer's p50; a matplotlib Figure, or None without matplotlib or points."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    stats = [(c, c.best_stats()) for c in result.candidates if c.best_stats() and c.metrics]
    if not stats:
        return None
    labelled = all("drop" in c.metrics for c, _ in stats)
    y = (lambda c: -c.metrics["drop"]) if labelled else (lambda c: 100 * c.metrics.get("agreement", math.nan))
    points = [(c, s["p50"], y(c)) for c, s in stats]
    front = pareto_front(points)
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_xscale("log")
    for (c, x, acc), (_, s) in zip(points, stats):
        color = "#2a7d2a" if c is result.chosen else ("#3b6ea5" if c.eligible else "#b04a4a")
        ax.scatter([x], [acc], color=color, s=36, zorder=3)
        if "p50_ci" in s:
            ax.hlines(acc, *s["p50_ci"], color=color, linewidth=1, zorder=3)
        if any(c is f[0] for f in front) or c is result.chosen:  # only these are labelled: the rest crowd the plot
            ax.annotate(c.name, (x, acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if front:
        xs, ys = [x for _, x, _ in front], [acc for _, _, acc in front]
        slowest = max(x for _, x, _ in points)
        if slowest > xs[-1]:
            xs, ys = xs + [slowest], ys + [ys[-1]]
        ax.plot(xs, ys, drawstyle="steps-post", color="#888888", linestyle="--", linewidth=1, zorder=2,
                label="Pareto front")
    peer = (result.peer.get("stats") or {}).get("p50")
    if peer:
        ax.axvline(peer, color="#c8a2a2", linewidth=1, label=f"peer baseline p50 {peer:.3f} ms")
    ax.set_xlabel("latency p50 (ms, log scale; bars: its interval)")
    ax.set_ylabel("accuracy delta vs fp32 (points)" if labelled else "top-1 agreement with fp32 (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("deploy tune: green chosen, blue eligible, red fails the bound", fontsize=9)
    fig.tight_layout()
    return fig


def _pareto(path: Path, result) -> str | None:
    fig = pareto_figure(result)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return path.name
