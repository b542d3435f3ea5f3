"""What ``deploy tune`` writes: ``best/`` with ``deploy.json``, ``tune.json``, ``report.md`` and ``pareto.png``.

``deploy.json`` is the manifest of the chosen form: runtime, precision, passes, threads, batch, the input,
the runner to open it with, the expected p50 and accuracy on this machine, the hardware facts and the
commands that reproduce it. ``candidate_table`` gives the rows the command line and report.md show.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from .report import jsonable, markdown_table

__all__ = ["write_outputs", "candidate_table", "pruned_lines", "MANIFEST"]

MANIFEST = "deploy.json"


def _ms(stats: dict | None, key: str) -> str:
    return f"{stats[key]:.3f}" if stats and key in stats else "-"


def _accuracy(m: dict) -> str:
    if "drop" in m:
        return f"{0.0 - m['drop'] + 0.0:+.2f}"  # no "-0.00"
    return "-"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def candidate_table(candidates: Sequence, chosen=None,
                    objective: str = "latency") -> tuple[list[str], list[list[str]]]:
    """Headers and rows: every candidate, ranked ones first (best first by ``objective``), then the rest with their
    status."""
    from .tune import rank

    headers = ["#", "candidate", "p50 ms", "p90 ms", "samples/s", "Δ acc (points)", "agreement", "max rel err",
               "size", "status"]
    ranked = rank(candidates, objective)
    order = ranked + [c for c in candidates if c not in ranked and c.status != "pruned"]
    rows = []
    for i, c in enumerate(order, 1):
        s, m = c.best_stats(), c.metrics
        status = "CHOSEN" if c is chosen else c.status + (" (screening only)" if c.stats is None and s else "")
        rows.append([str(i) if c in ranked else "-", c.name, _ms(s, "p50"), _ms(s, "p90"),
                     f"{s['throughput']:.1f}" if s else "-", _accuracy(m), _pct(m.get("agreement")),
                     f"{m['max_rel']:.2e}" if "max_rel" in m else "-",
                     f"{c.size / 1e6:.2f} MB" if c.size else "-", status + (f": {c.reason}" if c.reason and
                                                                               c is not chosen else "")])
    return headers, rows


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
    from .tune import PASS_SETS, _target

    target = _target(c.runtime)
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
    from .tune import _target

    target = _target(c.runtime)
    s, m, peer = c.best_stats(), c.metrics, result.peer
    peer_p50 = (peer.get("stats") or {}).get("p50")
    return {
        "model": opts.model, "runtime": c.runtime, "precision": c.precision, "passes": c.passes,
        "threads": c.threads, "batch": shape[0], "artifact": files[0], "files": files,
        "input": {"shape": list(shape), "dtype": "float32"},
        "runner": {"class": target.runner, "options": {**target.runner_options(c.precision), **target.bench_options,
                                                       "threads": c.threads}},
        "expected": {"p50_ms": s["p50"], "p90_ms": s["p90"], "throughput": s["throughput"],
                     "measured": "in full" if c.stats else "screening only (the budget ran out)",
                     **{k: m[k] for k in ("accuracy", "reference_accuracy", "drop", "agreement", "sqnr_db", "max_rel")
                        if k in m}},
        "eligibility": result.eligibility,
        "peer": {"form": peer.get("form"), "p50_ms": peer_p50,
                 "speedup": peer_p50 / s["p50"] if peer_p50 else None},
        "hardware": cpu,
        "reproduce": {"tune": opts.command or "(library call)",
                      "convert": _convert_command(result, c, opts, shape)},
        "weights": loaded.weights,
    }


def write_outputs(folder: Path, result, opts, loaded, shape, cpu) -> dict | None:
    """Write every output into ``folder`` (the tune directory before it is committed); the manifest, if chosen."""
    from .tune import _target

    root = Path(folder)
    manifest = None
    c = result.chosen
    if c is not None:
        best = root / "best"
        best.mkdir()
        target = _target(c.runtime)
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
              + (f"p50 {stats['p50']:.3f} ms" if stats else f"not measured ({peer.get('error', 'no timing')})")
              + (f", agreement {_pct(peer['metrics'].get('agreement'))}" if peer.get("metrics") else ""),
              f"- CPU: {cpu['model']}, {cpu['usable_cpus']} usable CPUs; int8 "
              f"{', '.join(cpu['low_precision']['int8']) or 'none'}; bf16 {', '.join(cpu['low_precision']['bf16']) or 'none'}",
              f"- screening rule: a candidate whose fastest screening call is slower than the best candidate's 90th "
              f"percentile call is dropped; the rest are measured in full (at least {opts.full.min_iters} calls and "
              f"{opts.full.min_ms:.0f} ms, interleaved with the other candidates of the same runtime and threads)",
              f"- {result.seconds:.0f} s in all", ""]
    lines += ["## Candidates", "", markdown_table(*candidate_table(result.candidates, c, opts.objective)), ""]
    pruned = pruned_lines(result.candidates)
    if pruned:
        lines += ["Pruned before any measurement:", ""] + [f"- {line}" for line in pruned] + [""]
    if chart:
        lines += [f"![latency against accuracy]({chart})", ""]
    if manifest:
        lines += ["## Reproduce", "", f"- this search: `{manifest['reproduce']['tune']}`",
                  f"- the chosen artifact: `{manifest['reproduce']['convert']}`", ""]
    return "\n".join(lines)


def _pareto(path: Path, result) -> str | None:
    """Latency (log) against accuracy delta (points, or agreement without labels) of the measured candidates."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    points = [(c, c.best_stats()) for c in result.candidates if c.best_stats() and c.metrics]
    if not points:
        return None
    labelled = all("drop" in c.metrics for c, _ in points)
    y = (lambda c: -c.metrics["drop"]) if labelled else (lambda c: 100 * c.metrics.get("agreement", math.nan))
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_xscale("log")
    front, best = [], -math.inf  # the eligible candidates no other one beats on both latency and accuracy
    for c, s in sorted(points, key=lambda p: p[1]["p50"]):
        if c.eligible and y(c) > best:
            front.append(c)
            best = y(c)
    for c, s in points:
        color = "#2a7d2a" if c is result.chosen else ("#3b6ea5" if c.eligible else "#b04a4a")
        ax.scatter([s["p50"]], [y(c)], color=color, s=36, zorder=3)
        if c in front or c is result.chosen:  # only these are labelled: the rest crowd the plot
            ax.annotate(c.name, (s["p50"], y(c)), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.plot([c.best_stats()["p50"] for c in front], [y(c) for c in front], color="#888888", linestyle="--",
            linewidth=1, zorder=2, label="Pareto front")
    peer = (result.peer.get("stats") or {}).get("p50")
    if peer:
        ax.axvline(peer, color="#c8a2a2", linewidth=1, label=f"peer baseline p50 {peer:.2f} ms")
    ax.set_xlabel("latency p50 (ms, log scale)")
    ax.set_ylabel("accuracy delta vs fp32 (points)" if labelled else "top-1 agreement with fp32 (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("deploy tune: green chosen, blue eligible, red fails the bound", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name
