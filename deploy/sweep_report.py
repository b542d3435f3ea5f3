"""What ``deploy sweep`` records and writes: the fields of a job's record, failure classes, ``OUT/sweep.md``
and ``OUT/sweep.png``.

A record is one JSON line of ``OUT/results.jsonl``. Its fields from a job's ``report.json`` and the
peer's ``peer.json`` are untrusted input (a job runs the user's model code): every value is
type-checked and strings are capped here (:func:`report_fields`, :func:`peer_fields`,
:func:`bench_fields`), and a value of the wrong type is left out.

A target's cell is the job's status when the supervisor killed it (timeout, killed, oom), else
whether every stage of that target's format in the report passed (``written`` when none failed but some
were written and not run here, as Core ML off macOS), else the job's status (a run that stopped before
exporting). A failure's *class* is its first line with what is particular to one
model replaced (:func:`failure_class`): the model's name, paths, numbers, module paths of the model
(``blocks.3.attn``, ``s2.b1.conv2.bn`` -> ``<node>``, not ``aten.conv2d.default``) and digits after
an underscore (``batch_norm_12`` -> ``batch_norm_N``), so the same failure on many models counts
once, with example models.
"""

from __future__ import annotations

import logging
import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RESULTS", "TABLE", "CHART", "STATUSES", "report_fields", "peer_fields", "bench_fields", "cell",
           "failure_class", "summary", "markdown", "write_table", "write_chart", "summary_lines", "job_line"]

log = logging.getLogger(__name__)

RESULTS, TABLE, CHART = "results.jsonl", "sweep.md", "sweep.png"
STATUSES = ("pass", "fail", "timeout", "killed", "oom")
_KILLED = ("timeout", "killed", "oom")
_CAP = 500  # characters kept of a string from a job's files


# ------------------------------------------------------------------------------------------- records

def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _str(v, cap: int = _CAP) -> str:
    return v[:cap] if isinstance(v, str) else ""


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _batchnorms(ops) -> int | None:
    if not isinstance(ops, dict):
        return None
    return sum(_int(v) or 0 for k, v in ops.items() if isinstance(k, str) and "batch_norm" in k)


def report_fields(report: dict, targets: Sequence[str]) -> dict:
    """The fields a record takes from a convert run's ``report.json``: the stages, each target's status,
    BatchNorms before and after, leftovers (sites left unfused), conversion seconds, parameters."""
    stages = []
    for s in report.get("stages") if isinstance(report.get("stages"), list) else []:
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            v, e = _dict(s.get("verification")), _dict(s.get("export"))
            stages.append({"name": _str(s["name"], 80), "format": _str(e.get("format"), 40),
                           "precision": _str(e.get("precision"), 16), "passed": v.get("passed") is True,
                           "reason": _str(v.get("reason")), "max_rel": _num(v.get("max_rel")),
                           "not_run": bool(v.get("not_run")) and not e.get("error")})
    out: dict = {}
    if stages:
        out["stages"] = stages
        out["target_status"] = {}
        for t in targets:
            mine = [s for s in stages if s["format"] == t and s["name"] != "training"]
            if mine:
                out["target_status"][t] = ("pass" if all(s["passed"] for s in mine) else
                                           "written" if all(s["passed"] or s["not_run"] for s in mine) else "fail")
    rep = _dict(report.get("reparameterize"))
    for key, ops in (("batchnorms_before", rep.get("ops_before")), ("batchnorms_after", rep.get("ops_after"))):
        if (n := _batchnorms(ops)) is not None:
            out[key] = n
    if isinstance(rep.get("left_unfused"), list):
        out["leftovers"] = len(rep["left_unfused"])
    if (total := _num(_dict(report.get("timings")).get("total"))) is not None:
        out["convert_seconds"] = round(total, 2)
    if (params := _int(_dict(report.get("model")).get("params"))) is not None:
        out["params"] = params
    return out


def peer_fields(found: dict, process_status: str, line: str, seconds: float) -> dict:
    """The peer path's result: the process's status when it did not end by itself, else what peer.json says."""
    if process_status != "pass":
        return {"status": process_status, "error": line, "seconds": seconds}
    out = {"status": found.get("status") if found.get("status") in ("pass", "fail") else "fail",
           "max_rel": _num(found.get("max_rel")), "seconds": seconds}
    for key in ("export_seconds", "baseline_seconds"):
        if (v := _num(found.get(key))) is not None:
            out[key] = v
    for key in ("error", "baseline_error"):
        if _str(found.get(key)):
            out[key] = _str(found.get(key))
    if not found:
        out["error"] = "the peer process wrote no peer.json"
    return out


def bench_fields(report: dict) -> dict:
    """p50 latency in ms per runtime of the deploy form at the first batch size, from the last benchmark."""
    runs = report.get("benchmarks")
    last = _dict(runs[-1]) if isinstance(runs, list) and runs else {}
    p50: dict[str, float] = {}
    for r in last.get("results") if isinstance(last.get("results"), list) else []:
        r = _dict(r)
        if r.get("form") == "deploy" and isinstance(r.get("runtime"), str) and _num(r.get("p50")) is not None:
            p50.setdefault(_str(r["runtime"], 40), round(_num(r["p50"]), 4))
    return {"p50_ms": p50}


def cell(record: dict, target: str) -> str:
    """The status of ``target`` in ``record`` (see the module docstring)."""
    status = record.get("status", "fail")
    if status in _KILLED:
        return status
    return _dict(record.get("target_status")).get(target) or status


def _cell_text(record: dict, target: str) -> str:
    """:func:`cell` with the largest max rel error of the target's stages, when the report has one."""
    errors = [s["max_rel"] for s in record.get("stages") or [] if isinstance(s, dict) and s.get("format") == target
              and _num(s.get("max_rel")) is not None]
    return cell(record, target) + (f" ({max(errors):.1e})" if errors else "")


def job_line(k: int, n: int, record: dict) -> str:
    """``[k/n] spec: pass (12.3 s)``, with the precision when it is not fp32 and the failure's first line."""
    precision = record.get("precision")
    what = record["spec"] + (f" ({precision})" if precision != "fp32" else "")
    tail = f": {record['first_line']}" if record.get("first_line") else ""
    peer = _dict(record.get("peer")).get("status")
    return (f"[{k}/{n}] {what}: {record['status']} ({record.get('seconds', 0):.1f} s)"
            + (f"; peer {peer}" if peer else "") + tail)


# ------------------------------------------------------------------------------------------ classes

def failure_class(line: str, spec: str = "") -> str:
    """``line`` with what is particular to one model replaced (see the module docstring)."""
    text = re.sub(r"^deploy [a-z]+: error: ", "", line.strip())
    if text.startswith("killed by signal"):  # signal 9 and signal 11 are different failures
        return text
    name = spec.split(":", 1)[-1]
    for variant in sorted({spec, name, name.replace("/", "_"), spec.replace(":", "_")} - {""}, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.]){re.escape(variant)}(?!\w)", "<model>", text)
    text = re.sub(r"(?:[A-Za-z]:)?(?:/[^\s:,;'\"()]+)+", "<path>", text)
    text = re.sub(r"\b0x[0-9a-fA-F]+\b", "<addr>", text)
    text = re.sub(r"[-+]?(?<![\w.])(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)\b", "<num>", text)
    text = re.sub(r"(?<![A-Za-z])\d+", "N", text)
    text = re.sub(r"(?<![\w.])[A-Za-z_]\w*(?:\.\w+)+", _node, text)
    return re.sub(r"\s+", " ", text)[:160]


_LIBRARIES = ("aten", "torch", "prims", "onnx", "ai", "numpy", "np", "timm", "torchvision", "operator", "builtins",
              "fusers", "deploy", "exporters", "runtimes")
_SUFFIXES = ("onnx", "pt2", "xml", "bin", "tflite", "engine", "json", "md", "npz", "py", "pt", "pth", "png", "txt")


def _node(match: re.Match) -> str:
    """A module path of one model (``blocks.N.attn``, ``s2.b1.conv2.bn``) -> ``<node>``; a library's qualified
    name (``aten.conv2d.default``) and a file name (``model.deploy.pt2``) stay."""
    parts = match.group(0).split(".")
    if parts[0] in _LIBRARIES or parts[-1] in _SUFFIXES or ("N" not in parts and len(parts) < 3):
        return match.group(0)
    return "<node>"


# ------------------------------------------------------------------------------------------ summary

def _columns(records: Sequence[dict]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((t, r.get("precision", "")) for r in records for t in r.get("targets", [])))


def _by_model(records: Sequence[dict]) -> dict[str, list[dict]]:
    models: dict[str, list[dict]] = {}
    for r in records:
        models.setdefault(r["spec"], []).append(r)
    return models


def _peer(rs: Sequence[dict]) -> dict:
    return next((r["peer"] for r in rs if isinstance(r.get("peer"), dict)), {})


def summary(records: Sequence[dict]) -> dict:
    """Numbers of a sweep: pass counts per target and precision, models converted and verified, the peer path,
    peer-only models, BatchNorm totals, median seconds, failure classes with example models."""
    rates = {f"{t} {p}": [sum(cell(r, t) == "pass" for r in records if t in r.get("targets", [])
                              and r.get("precision") == p),
                          sum(t in r.get("targets", []) and r.get("precision") == p for r in records)]
             for t, p in _columns(records)}
    written = {f"{t} {p}": n for t, p in _columns(records)
               if (n := sum(cell(r, t) == "written" for r in records if r.get("precision") == p))}
    models = _by_model(records)
    ours = {s: all(r["status"] == "pass" for r in rs) for s, rs in models.items()}
    peer = {s: _peer(rs).get("status") for s, rs in models.items()}
    first = [rs[0] for rs in models.values()]
    classes: dict[str, list[str]] = {}
    for r in records:
        if r["status"] != "pass":
            classes.setdefault(failure_class(r.get("first_line") or r["status"], r["spec"]), []).append(r["spec"])
    convert = [r["convert_seconds"] for r in records
               if r["status"] == "pass" and _num(r.get("convert_seconds")) is not None]
    baseline = [b for rs in models.values() if (b := _num(_peer(rs).get("baseline_seconds"))) is not None]
    return {
        "models": len(models), "jobs": len(records), "pass_rates": rates, "written": written,
        "converted": sum(ours.values()), "peer_works": sum(v == "pass" for v in peer.values()),
        "peer_only": [s for s in models if peer[s] == "pass" and not ours[s]],
        "ours_only": [s for s in models if ours[s] and peer[s] not in (None, "pass")],
        "batchnorms_before": sum(_int(r.get("batchnorms_before")) or 0 for r in first),
        "batchnorms_after": sum(_int(r.get("batchnorms_after")) or 0 for r in first),
        "median_convert_seconds": statistics.median(convert) if convert else None,
        "median_baseline_seconds": statistics.median(baseline) if baseline else None,
        "failure_classes": sorted(([c, len(ss), list(dict.fromkeys(ss))[:3]] for c, ss in classes.items()),
                                  key=lambda x: (-x[1], x[0])),
    }


def summary_lines(records: Sequence[dict]) -> list[str]:
    """The summary in a few lines for the terminal."""
    s = summary(records)
    lines = [f"{k}: {ok}/{n} pass" + (f", {s['written'][k]} written, not run here" if k in s["written"] else "")
             for k, (ok, n) in s["pass_rates"].items()]
    lines.append(f"converted and verified: {s['converted']} of {s['models']} model(s); peer path "
                 f"(torch.onnx.export + ONNX Runtime) works on {s['peer_works']}; peer-only: {len(s['peer_only'])}"
                 + (f" ({', '.join(s['peer_only'][:10])}{', ...' if len(s['peer_only']) > 10 else ''})"
                    if s["peer_only"] else ""))
    lines.append(f"BatchNorms: {s['batchnorms_before']} before -> {s['batchnorms_after']} after")
    for c, n, examples in s["failure_classes"][:5]:
        lines.append(f"{n} x {c} (e.g. {', '.join(examples)})")
    return lines


# --------------------------------------------------------------------------------------------- files

def _md(text) -> str:
    text = "".join(c if c.isprintable() else " " for c in str(text))
    return text.replace("|", "\\|").replace("`", "'")


def _p50(record: dict) -> str:
    p50 = _dict(_dict(record.get("bench")).get("p50_ms"))
    return ", ".join(f"{rt} {ms:.3g}" for rt, ms in p50.items() if _num(ms) is not None) or "-"


def _seconds(v) -> str:
    return f"{v:.1f}" if _num(v) is not None else "-"


def markdown(records: Sequence[dict]) -> str:
    """``OUT/sweep.md``: a row per model, then the summary and the failure classes."""
    columns, models, s = _columns(records), _by_model(records), summary(records)
    baseline = any(_num(_peer(rs).get("baseline_seconds")) is not None for rs in models.values())
    bench = any(_dict(r.get("bench")).get("p50_ms") for r in records)
    head = (["model", "params"] + [f"{t} {p}" for t, p in columns] + ["peer", "BN before → after", "leftovers",
                                                                       "convert s"]
            + (["baseline s"] if baseline else []) + (["p50 ms"] if bench else []) + ["job s"])
    rows = []
    for spec, rs in models.items():
        by = {(t, r.get("precision")): _cell_text(r, t) for r in rs for t in r.get("targets", [])}
        peer, first = _peer(rs), rs[0]
        params = next((_int(r.get("params")) for r in rs if _int(r.get("params")) is not None), None)
        bn = (f"{first['batchnorms_before']} → {first['batchnorms_after']}"
              if _int(first.get("batchnorms_before")) is not None and _int(first.get("batchnorms_after")) is not None
              else "-")
        rows.append([spec, f"{params / 1e6:.2f}M" if params is not None else "-"]
                    + [by.get(c, "-") for c in columns]
                    + [(peer.get("status", "-") + (f" ({peer['max_rel']:.1e})" if _num(peer.get("max_rel")) is not None
                                                   else "")),
                       bn, str(first.get("leftovers", "-")),
                       " / ".join(_seconds(r.get("convert_seconds")) for r in rs)]
                    + ([_seconds(peer.get("baseline_seconds"))] if baseline else [])
                    + ([" / ".join(_p50(r) for r in rs)] if bench else [])
                    + [" / ".join(_seconds(r.get("seconds")) for r in rs)])
    out = [f"# deploy sweep: {s['models']} model(s), {s['jobs']} job(s)", "",
           f"Written {time.strftime('%Y-%m-%d %H:%M:%S %z')}. A cell is pass, fail, written (not run here), timeout, "
           "killed or oom, with the largest max rel error of the target's stages against the training model (judged "
           "by deploy convert's tolerance, 1e-5 for fp32); peer is torch.onnx.export with torch's defaults run on "
           "ONNX Runtime (its max rel error against torch; it works at most 1e-3); seconds per precision.", "",
           _table(head, rows), "",
           "## Summary", ""]
    out.append(_table(["target", "pass", "rate", "written, not run here"],
                      [[k, f"{ok}/{n}", f"{100 * ok / n:.0f}%" if n else "-", s["written"].get(k, 0)]
                       for k, (ok, n) in s["pass_rates"].items()]))
    med = s["median_convert_seconds"]
    out += ["", f"- converted and verified: {s['converted']} of {s['models']} model(s)",
            f"- peer path works: {s['peer_works']} of {s['models']}; peer-only (peer works, ours does not): "
            f"{len(s['peer_only'])}" + (f": {', '.join(s['peer_only'])}" if s["peer_only"] else ""),
            f"- ours-only (ours works, the peer path does not): {len(s['ours_only'])}"
            + (f": {', '.join(s['ours_only'])}" if s["ours_only"] else ""),
            f"- BatchNorms: {s['batchnorms_before']} before → {s['batchnorms_after']} after",
            f"- median conversion: {_seconds(med)} s" + (
                f"; median baseline (timm reparameterize_model + torch.export.export): "
                f"{_seconds(s['median_baseline_seconds'])} s" if s["median_baseline_seconds"] is not None else "")]
    if s["failure_classes"]:
        out += ["", "## Failure classes", "", _table(["count", "class", "example models"],
                                                     [[n, c, ", ".join(ex)] for c, n, ex in s["failure_classes"]])]
        failed = [[r["spec"], r.get("precision", ""), r["status"], r.get("first_line", "")] for r in records
                  if r["status"] != "pass"]
        out += ["", "## Failures", "", _table(["model", "precision", "status", "first line"], failed)]
    return "\n".join(out) + "\n"


def _table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows])


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_table(out_dir: str | os.PathLike, records: Sequence[dict]) -> Path:
    """Write ``OUT/sweep.md`` (replaced whole: an interrupted write leaves the previous table)."""
    path = Path(out_dir) / TABLE
    _replace(path, lambda p: p.write_text(markdown(records), encoding="utf-8"))
    return path


def write_chart(out_dir: str | os.PathLike, records: Sequence[dict]) -> str | None:
    """``OUT/sweep.png``: pass rate per target and precision, and a histogram of conversion seconds; None without
    records or without matplotlib (one log line)."""
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so there is no sweep.png; pip install 'reparam-deploy[bench]'")
        return None
    s = summary(records)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(s["pass_rates"])
    bars = left.bar(labels, [100 * ok / n if n else 0 for ok, n in s["pass_rates"].values()], color="tab:green",
                    width=0.6)
    left.bar_label(bars, labels=[f"{ok}/{n}" for ok, n in s["pass_rates"].values()])
    left.set_xlim(-0.8, max(len(labels), 2) - 0.2)
    left.set_ylim(0, 100)
    left.set_ylabel("pass rate (%)")
    left.set_title(f"{s['converted']} of {s['models']} model(s) converted and verified")
    left.tick_params(axis="x", rotation=30)
    seconds = [r["convert_seconds"] for r in records if _num(r.get("convert_seconds")) is not None]
    if seconds:
        right.hist(seconds, bins=min(30, max(5, len(seconds) // 3)), color="tab:blue")
    right.set_xlabel("conversion seconds (deploy convert, report total)")
    right.set_ylabel("jobs")
    right.yaxis.get_major_locator().set_params(integer=True)
    right.set_title("conversion time")
    fig.tight_layout()
    path = Path(out_dir) / CHART
    _replace(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return str(path)
