"""Run reports: ``report.json`` (machine-readable) and ``report.md`` (the same, as tables a person reads).

The report is the JSON of a :class:`deploy.record.RunRecord`; this module only writes and renders it.
``stage_table`` gives the rows of the stage table that both ``report.md`` and the command line's
final table show.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_reports", "to_markdown", "stage_table", "int8_markdown", "bench_table", "text_table", "markdown_table", "human_size",
           "jsonable"]


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings ("inf", "nan"), tuples as lists: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def human_size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v, fmt: str = ".2e") -> str:
    """A number as text; ``None`` as "-", a non-finite float as "inf" / "nan" (report.json stores them as
    those strings)."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, fmt) if math.isfinite(v) else str(float(v))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _stages(stages: Sequence) -> list:
    from .record import StageRecord

    return [StageRecord.from_dict(s) if isinstance(s, dict) else s for s in stages]


def stage_table(stages: Sequence, *, files: bool = True) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: stage, format, file, size, precision, max rel error, [samples error, accuracy,
    agreement, judged by (with int8 stages: the INT8 guard's measures, not max rel)], pass/fail. ``stages`` are
    StageRecords or their dicts."""
    stages = _stages(stages)
    task = any(s.verification.accuracy is not None for s in stages)
    agree = task or any(s.verification.agreement is not None for s in stages)
    samples = any(s.verification.samples_max_rel is not None for s in stages)
    sqnr = any(s.verification.sqnr_db is not None for s in stages)
    nms = any(s.verification.detection.get("nms") for s in stages)
    boxes = any("map50" in s.verification.detection for s in stages)
    reference = stages[0].verification.accuracy if stages else None
    headers = ["stage", "format"] + (["file"] if files else []) + ["size", "precision", "max rel error"]
    headers += (["samples max rel"] if samples else []) + (["SQNR dB"] if sqnr else [])
    headers += (["accuracy"] if task else []) + (["Δ points"] if task and sqnr else []) + (["agreement"] if agree
                                                                                             else [])
    headers += (["NMS"] if nms else []) + (["mAP@.5", "mAP@.5:.95"] if boxes else [])
    judged = any(s.verification.int8 for s in stages)  # int8 stages are judged by the guard, not by max rel
    headers += (["judged by"] if judged else []) + ["result"]
    rows = []
    for s in stages:
        v = s.verification
        changed = " (changed)" if v.changed else ""
        result = ("reference" if s.name == "training" else "written, not run" if v.not_run and not s.export.error
                  else ("pass" if v.passed else "FAIL") + changed)
        row = [s.name, s.format] + ([s.path or "-"] if files else [])
        row += [human_size(s.files.size), s.precision, "-" if s.name == "training" else _num(v.max_rel)]
        row += [_num(v.samples_max_rel)] if samples else []
        row += [_num(v.sqnr_db, ".1f")] if sqnr else []
        row += [_pct(v.accuracy)] if task else []
        if task and sqnr:
            row += ["-" if v.accuracy is None or reference is None or s.name == "training"
                    else f"{100 * (v.accuracy - reference):+.2f}"]
        row += [_pct(v.agreement)] if agree else []
        row += [v.detection.get("nms", "-")] if nms else []
        row += [_num(v.detection.get("map50"), ".4f"), _num(v.detection.get("map50_95"), ".4f")] if boxes else []
        if judged:
            row += ["-" if s.name == "training" else
                    ", ".join(v.int8.get("judged_by", ["INT8 guard"])) if v.int8 else "max rel error"]
        rows.append(row + [result])
    return headers, rows


def fallback_note(f: dict) -> str:
    """One sentence on what a fallback kept and whether it met its aim (report.md, stage notes, the command line)."""
    n, drop = len(f["kept_in_float"]), f.get("drop")
    kept = f"{n} layer(s) kept in float ({', '.join(f['kept_in_float'])})" if n else "no layer kept in float"
    met = (f["passed"] and (drop is None or drop <= f.get("aim_points", math.inf) + 1e-9))
    lat = f.get("latency_ms", {})
    slower = bool(n and lat.get("fp32") and lat.get("int8_fallback") and lat["int8_fallback"] >= lat["fp32"])
    return (f"--int8-fallback auto: {kept}" + (f", drop {drop:.2f} points" if drop is not None else "")
            + ("" if met else "; the bound is still not met" if not f["passed"] else
               f"; the aim of {f.get('aim_points', 0):g} points is not met (the best form tried is kept)")
            + (f"; this mixed form is not faster than fp32 ({lat['int8_fallback']:.3f} vs {lat['fp32']:.3f} ms, a "
               "rough median): deploy tune will not choose it, deploy bench times it" if slower else ""))


def bench_table(entry: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a benchmark entry: one row per runtime, variant, batch and form."""
    speedup = {(s["runtime"], s["variant"], s["batch"]): s["speedup"] for s in entry["speedups"]}
    int8 = {(s["runtime"], s["batch"]): s["speedup"] for s in entry.get("int8_speedups", [])}
    nms = {(s["runtime"], s["batch"]): s["share"] for s in entry.get("nms_shares", [])}
    headers = ["runtime", "variant", "batch", "form", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms",
               "samples/s", "% of peak", "speed-up", "reliability"]
    rows = []
    for r in entry["results"]:
        key = (r["runtime"], r["variant"], r["batch"])
        if "p50" not in r:
            rows.append([r["runtime"], r["variant"], str(r["batch"]), r["form"], f"FAILED: {r['error']}"]
                        + ["-"] * 8)
            continue
        frac = r.get("achieved_fraction")
        rows.append([r["runtime"], r["variant"], str(r["batch"]), r["form"]]
                    + [f"{r[k]:.3f}" for k in ("p50", "p90", "p99", "mean", "std")]
                    + [f"{r['throughput']:.1f}", "-" if frac is None else f"{100 * frac:.1f}",
                       f"{speedup[key]:.2f}x" if r["form"] == "deploy" and key in speedup else
                       f"{int8[key[0], key[2]]:.2f}x vs fp32" if r["form"] == "int8" and (key[0], key[2]) in int8
                       else f"NMS {100 * nms[key[0], key[2]]:.0f}% of it" if r["form"] == "nms"
                       and (key[0], key[2]) in nms else "", _reliability(r)])
    return headers, rows


def _reliability(row: dict) -> str:
    """A timed row's verdict: "ok", "UNRELIABLE: <reasons>", or "-" for a benchmark recorded before the check."""
    if "unreliable" not in row:
        return "-"
    return f"UNRELIABLE: {'; '.join(row['unreliable'])}" if row["unreliable"] else "ok"


def _bench_markdown(i: int, entry: dict) -> list[str]:
    cpu, settings = entry["hardware"]["cpu"], entry["settings"]
    peak = f"{cpu['peak_gflops']:.0f} GFLOP/s" if cpu.get("peak_gflops") else "unknown (no clock readable)"
    lines = [f"## Benchmark {i} ({entry['created']})", "",
             f"- command: `{entry.get('command') or '(library call)'}`",
             f"- CPU: {cpu['model']} ({cpu['machine']}), {cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical "
             f"CPUs, {cpu.get('physical_cores') or '?'} physical cores, {entry['threads']} thread(s) used; SIMD "
             f"{', '.join(cpu['simd']) or 'none found'}; clock {cpu.get('clock_mhz') or '?'} MHz "
             f"({cpu['clock_source']})",
             *([f"- low precision: int8 {', '.join(cpu['low_precision']['int8']) or 'none found'}; bf16 "
                f"{', '.join(cpu['low_precision']['bf16']) or 'none found'}"] if cpu.get("low_precision") else []),
             f"- estimated fp32 peak of {entry['threads']} thread(s): {peak} = cores x clock x {cpu['fp32_lanes']} "
             "lanes x 2 (FMA) x 2 FMA units; '% of peak' = FLOPs / p50 / peak"]
    for g in entry["hardware"]["gpus"]:
        lines.append(f"- GPU {g['index']}: {g['name']} (compute {g['capability']}, {g['memory_gib']} GiB), driver "
                     f"{g['driver'] or '?'}, CUDA {g['cuda_runtime']}")
    lines += [f"- isolation: {entry['isolation']}",
              f"- warm-up: {settings['warmup_iters']} calls and {settings['warmup_ms']:.0f} ms; then at least "
              f"{settings['min_iters']} calls and {settings['min_ms']:.0f} ms per form"]
    checks = entry.get("reliability")
    if checks:
        load = ("not reported by this system" if checks["load_max"] is None
                else f"{checks['load_min']:.2f} to {checks['load_max']:.2f}")
        lines.append(f"- machine load (1-minute average, before and after each measurement): {load} on "
                     f"{checks['usable_cpus']} usable CPUs; a row is flagged UNRELIABLE when p90/p50 > "
                     f"{checks['max_spread']} or the load > {checks['load_limit']:g} ({checks['flagged']} flagged)")
    lines.append("")
    lines += [markdown_table(*bench_table(entry)), ""]
    if entry.get("chart"):
        lines += [f"![latency per runtime]({entry['chart']})", ""]
    cost = entry.get("cost", {})
    if cost:
        forms = [f for f in ("training", "deploy") if f in cost]
        keys = [("FLOPs", "flops"), ("parameters", "params"), ("memory access (bytes)", "memory_access"),
                ("element-wise ops", "elementwise"), ("forks / parallel paths", None), ("ops", "ops"),
                ("convolutions", "convolutions"), ("BatchNorms", "batchnorms"), ("mergeable branch groups",
                                                                                 "branch_groups")]
        rows = [[label] + [f"{cost[f]['forks']} / {cost[f]['fork_branches']}" if key is None
                           else f"{cost[f][key]:,}" for f in forms] for label, key in keys]
        lines += ["Cost model (per op in report.json, `cost.<form>.layers`):", "",
                  markdown_table(["", *[f"{f} form" for f in forms]], rows), ""]
        top = sorted(cost["deploy"]["layers"], key=lambda r: -r["bytes"])[:8]
        lines += ["Deploy-form ops with the most memory access:", "", markdown_table(
            ["op", "module", "FLOPs", "params", "bytes"],
            [[r["op"], r["module"] or "-", f"{r['flops']:,}", f"{r['params']:,}", f"{r['bytes']:,}"] for r in top]),
            ""]
    if entry.get("notes"):
        lines += [f"- {n}" for n in entry["notes"]] + [""]
    return lines


def int8_markdown(q: dict, stages) -> list[str]:
    """The INT8 section of report.md: calibration, the guard, equalize, the per-layer table and fallbacks."""
    g = q["guard"]
    bounds = [f"accuracy drop <= {g['max_drop']:g} points (with labels)"]
    bounds += [f"top-1 agreement >= {100 * g['min_agreement']:.2f}%"] if g.get("min_agreement") is not None else [
        "top-1 agreement >= 90% without labels"]
    bounds += [f"output SQNR >= {g['min_sqnr']:g} dB"] if g.get("min_sqnr") is not None else []
    lines = ["## INT8", "",
             f"- calibration: {q['calibration']['source']}; activation ranges {q['method']}; weights "
             f"{'per output channel' if q['per_channel'] else 'per tensor'}",
             f"- accuracy guard on {q['evaluation']}: {'; '.join(bounds)}. Every INT8 stage is compared with the "
             "training model (the fp32 stages match it to 1e-5): SQNR = 10 log10(sum ref^2 / sum (ref - int8)^2), "
             "worst output; Δ points = accuracy minus the training model's."]
    eq = q.get("equalize") or {}
    if eq:
        lines.append("- equalize (exact cross-layer range equalization): " + (
            f"{'applied' if eq['chosen'] else 'not applied'}: ONNX Runtime INT8 output SQNR "
            f"{eq['sqnr_db']['default']:.2f} dB without, {eq['sqnr_db']['equalize']:.2f} dB with "
            f"({eq.get('pairs', '?')} conv pairs)" if "sqnr_db" in eq else eq.get("reason", "")))
    wr = q.get("weight_rounding") or {}
    if wr.get("method") == "mse":
        lines.append("- weight rounding (`--weight-rounding mse`: each output channel's int8 grid from an MSE search "
                     "over clipping ranges; ONNX Runtime, TFLite, ExecuTorch): " + (
                         f"{'applied' if wr['chosen'] else 'not applied'}: ONNX Runtime INT8 output SQNR "
                         f"{wr['sqnr_db']['nearest']:.2f} dB nearest, {wr['sqnr_db']['mse']:.2f} dB MSE "
                         f"({wr['layers']} layers clipped)" if "sqnr_db" in wr else wr.get("reason", "")))
    bc = q.get("bias_correction") or {}
    if bc:
        lines.append("- bias correction (per output channel, the mean error of the int8-rounded weights on the "
                     "calibration data, subtracted from the bias; ONNX Runtime, TFLite, ExecuTorch): " + (
                         f"{'applied' if bc['chosen'] else 'not applied'}: ONNX Runtime INT8 output SQNR "
                         f"{bc['sqnr_db']['without']:.2f} dB without, {bc['sqnr_db']['with']:.2f} dB with "
                         f"({bc['layers']} layers)" if "sqnr_db" in bc else bc.get("reason", "")))
    scope = q.get("float_scope") or []
    if scope:
        lines.append(f"- float scope ({len(scope)} op(s) kept in float in every INT8 form that has them): "
                     + "; ".join(f"`{s['name']}` ({s['op']}): {s['why']}" for s in scope))
    for f in q.get("fallbacks", []):
        lat = f.get("latency_ms", {})
        cost = (f"; latency {lat['int8']:.3f} -> {lat['int8_fallback']:.3f} ms (rough median)"
                if lat.get("int8") and lat.get("int8_fallback") else "")
        lines.append(f"- fallback ({f['stage']}): {fallback_note(f).removeprefix('--int8-fallback auto: ')}" + cost)
    lines.append("")
    layers = [r for r in q.get("layers", []) if "name" in r]
    if layers:
        lines += ["Per-layer errors of the ONNX Runtime QDQ model against the fp32 ONNX model on the held-out "
                  "samples, worst first (dB lost = SQNR at the layer's input minus at its output); weight "
                  "statistics of the merged kernel (per output channel |w| max: min / median / max, max/median, "
                  "Pearson kurtosis, 3 for a Gaussian):", ""]
        rows = []
        for r in layers[:5]:
            w = r.get("weights") or {}
            rows.append([r["name"], r.get("op", "-"), _num(r.get("sqnr_out_db"), ".1f"), _num(r.get("lost_db"), ".1f"),
                         str(w.get("channels", "-")),
                         " / ".join(_num(w.get(k), ".3g") for k in ("channel_absmax_min", "channel_absmax_median",
                                                                    "channel_absmax_max")),
                         _num(w.get("max_median_ratio"), ".1f"), _num(w.get("kurtosis"), ".1f")])
        lines += [markdown_table(["layer", "op", "SQNR out dB", "dB lost", "channels", "|w| per channel",
                                  "max/median", "kurtosis"], rows), "",
                  f"All {len(layers)} layers are in report.json (`int8.layers`).", ""]
    return lines


def detection_markdown(d: dict, stages) -> list[str]:
    """The Detection section: NMS settings, where NMS ran, box matching, mAP, pictures."""
    n = d["nms"]
    where = ("inside `model.nms.onnx` / `model.nms.xml` (stages `*-nms`); every other stage ends before NMS and "
             "the same NMS runs on the host" if d.get("in_artifact") else "on the host for every stage (run "
             "`deploy convert --nms` to put it inside the ONNX and OpenVINO artifacts)")
    lines = ["## Detection", "",
             f"- NMS: score = objectness x class probability > {n['conf']:g}, IoU > {n['iou']:g} suppresses, at most "
             f"{n['max_det']} per image, {'class-agnostic' if n['agnostic'] else 'per class (multi-label)'}; "
             f"{where}.",
             "- stages ending in NMS are compared with the host NMS of the training model's outputs by matching "
             "boxes (same class, IoU >= 0.99, score within 1e-3); a detection in one and not the other passes only "
             "when a threshold decision within tolerance explains it (reported as borderline)."]
    if any("map50" in s.verification.detection for s in stages):
        lines.append("- mAP@0.5 and mAP@0.5:0.95 on the held-out ground truth (pycocotools), at these NMS settings.")
    for s in stages:
        if s.verification.detection.get("summary"):
            lines.append(f"- {s.name}: {s.verification.detection['summary']}")
    lines.append("")
    fuse = d.get("own_fuse") or {}
    if fuse.get("error"):
        lines += [f"The model's own `fuse()` form did not export to ONNX: {fuse['error']}", ""]
    elif fuse:
        ops = sorted(set(fuse["ours"]) | set(fuse["fuse"]))
        lines += [f"ONNX nodes: ours ({fuse['file']}) {fuse['ours_nodes']}, the model's own `fuse()` form exported "
                  f"the same way {fuse['fuse_nodes']}:", "",
                  markdown_table(["op", "ours", "own fuse()"], [[op, str(fuse["ours"].get(op, 0)),
                                                                 str(fuse["fuse"].get(op, 0))] for op in ops]), ""]
    pictures = d.get("pictures") or {}
    if pictures:
        lines += ["The first held-out image with each stage's detections:", "",
                  markdown_table(list(pictures), [[f"![{name}]({path})" for name, path in pictures.items()]]), ""]
    return lines


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def to_markdown(report: dict) -> str:
    """``report.md``: summary, stages, task accuracy, passes and refusals, inputs, versions, timings."""
    model, inputs, rep = report["model"], report["inputs"], report["reparameterize"]
    tol = report.get("tolerance", {})
    stages = _stages(report["stages"])
    verdict = "all stages pass" if report["passed"] else f"FAILED: {', '.join(report['failed'])}"
    unrun = [s.name for s in stages if s.verification.not_run and not s.export.error]
    verdict += f" ({', '.join(unrun)}: written, not run here)" if unrun else ""
    lines = [f"# deploy report: {model['spec']}", "",
             f"**Result: {verdict}.**", "",
             f"- model: `{model['spec']}` ({model['kind']}, {model['class']}, {model['params']:,} parameters"
             + (f" + {model['buffers']:,} in buffers)" if model.get("buffers") else ")"),
             f"- weights: {model['weights']}",
             f"- input: {'x'.join(map(str, inputs['shape']))} float32"
             + (f" (verified at {'x'.join(map(str, inputs['verified_shape']))})"
                if inputs["verified_shape"] != inputs["shape"] else ""),
             f"- targets: {', '.join(report['options']['targets']) or 'none'}; precision "
             f"{report['options']['precision']}; dynamic batch: {'yes' if report['options']['dynamic'] else 'no'}",
             f"- tolerance: max|a - b| <= rtol * max|a| + atol with rtol "
             f"{tol['rtol'] if tol.get('rtol') is not None else 'by precision (fp32 1e-05, fp16 1e-02, bf16 3e-02)'}"
             f", atol {tol.get('atol', 0)}",
             f"- command: `{report.get('command') or '(library call)'}`", ""]
    headers, rows = stage_table(stages)
    lines += ["## Stages", "", "Every stage runs on its own runtime and is compared with the training model on "
              "the same inputs (error = max |a - b| / max |a| per output, worst output).", "",
              markdown_table(headers, rows), ""]
    failed = [s for s in stages if s.failed and s.name != "training"]
    if failed:
        lines += ["Failures:", ""] + [f"- **{s.name}** ({s.path or 'not written'}): {s.reason}" for s in failed] + [""]
    unrun = [s for s in stages if s.verification.not_run and not s.export.error]
    if unrun:
        lines += ["Written, not run (never counted as verified):", ""] + [
            f"- **{s.name}** ({s.path}): {s.verification.not_run}" for s in unrun] + [""]
    detail = [[s.name, s.parent or "-", _num(s.verification.max_abs), _num(s.verification.max_rel),
               _num(s.verification.parent_max_rel), _num(s.verification.cosine, ".8f"), _num(s.export.seconds, ".2f"),
               _num(s.verification.seconds, ".2f")] for s in stages if s.name != "training"]
    lines += ["### Errors and timings", "", markdown_table(
        ["stage", "made from", "max abs", "max rel", "max rel vs parent", "min cosine", "export s", "verify s"],
        detail), ""]
    if report.get("int8"):
        lines += int8_markdown(report["int8"], stages)
    if report.get("detection"):
        lines += detection_markdown(report["detection"], stages)
    samples = inputs.get("samples")
    if samples:
        lines += ["## Inputs", "", f"- seeded: {'x'.join(map(str, inputs['verified_shape']))}, "
                  f"{inputs['seeded']['distribution']}, seed {inputs['seeded']['seed']}",
                  f"- samples: {samples['count']} from `{samples['path']}`"
                  + (" (shipped with the model)" if samples.get("shipped_with_model") else "")
                  + (" with labels (task-level verification)" if samples["labels"] else ""), ""]
    merged = rep["merged"]
    lines += ["## Reparameterization", "",
              f"{merged['branch_groups_merged']} branch groups ({merged['branches_merged']} branches) merged, "
              f"{merged['batchnorms_folded']} BatchNorms folded; convolutions {merged['convolutions_before']} -> "
              f"{merged['convolutions_after']}; MACs {merged['macs_before']:,} -> {merged['macs_after']:,}; "
              f"parameters {rep['params_before']:,} -> {rep['params_after']:,}; float64 max rel error "
              f"{_num(rep['float64_error'])} (vs the captured graph), float32 {_num(rep['float32_error'])} "
              "(vs the training model)." + _proof_note(rep.get("proof", "float64"))
              + (f" The {rep['tolerance_note']}." if isinstance(rep.get("tolerance_note"), str)
                 and rep["tolerance_note"] else ""), "",
              markdown_table(["pass", "round", "rewrites", "refused", "rolled back", "f64 rel err", "seconds"],
                             [[p["name"], p["round"], p["rewrites"], p["refused"], p["rolled_back"],
                               _num(p["max_rel_error"]), _num(p["seconds"], ".2f")] for p in rep["passes"]]), ""]
    if rep["refusals"]:
        lines += ["Refused rewrites (left as they are):", ""]
        lines += [f"- `{r['site']}` ({r.get('pass', '?')}, {r.get('code', '?')}): {r['reason']}"
                  for r in rep["refusals"][:50]]
        if len(rep["refusals"]) > 50:
            lines.append(f"- ... {len(rep['refusals']) - 50} more in report.json")
        lines.append("")
    left = rep.get("left_unfused") or []
    lines += [f"Left unfused: {len(left)}" + (" (the deploy graph keeps no BatchNorm, unmerged parallel branches or "
                                               "in-place write)" if not left else ":"), ""]
    lines += [f"- {x['kind']} `{x['site']}`: {x['reason']}" for x in left[:50]]
    if len(left) > 50:
        lines.append(f"- ... {len(left) - 50} more in report.json")
    lines += [""] if left else []
    before, after = rep["ops_before"], rep["ops_after"]
    changed = [f"{k} {before.get(k, 0)} -> {after.get(k, 0)}" for k in sorted(set(before) | set(after))
               if before.get(k, 0) != after.get(k, 0)]
    lines += ["Ops changed: " + (", ".join(changed) or "none"), ""]
    for i, entry in enumerate(report.get("benchmarks", []), 1):
        lines += _bench_markdown(i, entry)
    notes = report.get("notes", []) + [f"{s.name}: {n}" for s in stages for n in s.notes]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Versions", "", markdown_table(["package", "version"],
                                                [[k, v or "not installed"] for k, v in report["versions"].items()]),
              "", "## Timings (s)", "", markdown_table(["step", "seconds"],
                                                       [[k, f"{v:.2f}"] for k, v in report["timings"].items()]), ""]
    return "\n".join(lines)


def write_reports(report: dict, out_dir: str | os.PathLike) -> tuple[str, str]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    with open(json_path, "w") as f:
        json.dump(jsonable(report), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(to_markdown(jsonable(report)))
    return str(json_path), str(md_path)


def _proof_note(proof) -> str:
    """Where the rewrites could not be checked in float64, say how they were (``Report.proof``)."""
    return "" if proof == "float64" else f" Rewrites were checked in {proof}, not float64."
