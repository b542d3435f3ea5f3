"""The phone runtimes (ExecuTorch, ncnn, MNN) against ONNX Runtime on this x86 CPU, in one run.

    python benchmarks/phone_runtimes.py [--models repvgg_digits,yolo_shapes] [--threads 1] [--min-ms 1000]
                                        [--work DIR]

For each shipped model: ``deploy convert MODEL --targets onnx,executorch,ncnn,mnn`` (the detector with ``--nms``:
host NMS for these formats), then ``deploy bench`` on ONNX Runtime and the three phone runtimes
(``deploy.bench.bench``: each runtime in its own process, batch 1, ``--threads`` threads). Prints per model and
runtime the p50 and p90, the ratio p50 / ONNX Runtime's p50 (< 1: faster than ONNX Runtime here), the stage's
verification (max relative error against the training model, and held-out accuracy or mAP@0.5), and the bench's
reliability verdict. Runtimes whose package is missing are left out with the extra to install.

These are x86 numbers, taken through each runtime's Python binding: they compare the runtimes on this machine
and say nothing of how fast an ARM phone runs them. The machine is shared: read the ratios of one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from deploy.bench import BenchOptions, bench
from deploy.detection import NmsOptions
from deploy.pipeline import ConvertOptions, convert
from exporters import targets as registry
from runtimes.bench import BenchSettings

MODELS = ("repvgg_digits", "yolo_shapes")
PHONE = ("executorch", "ncnn", "mnn")  # target names; their runtimes are registered under the same names


def _available(names) -> tuple[list[str], list[str]]:
    have, missing = [], []
    for name in names:
        try:
            registry.check_available(registry.get(name), "the phone runtime benchmark")
            have.append(name)
        except Exception as e:  # noqa: BLE001 - a missing package is a line of the output, not a failure
            missing.append(f"{name}: {e}")
    return have, missing


def measure(model: str, targets: list[str], args, settings: BenchSettings, work: Path) -> dict:
    progress = lambda m: print(f"[{model}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    detector = model.startswith("yolo")
    conv = convert(ConvertOptions(model=model, targets=("onnx", *targets), out=str(work / model), force=True,
                                  nms=NmsOptions() if detector else None), progress=progress)
    stages = {s.name: s for s in conv.stages}
    runtimes = ["onnxruntime", *(registry.get(t).runtime for t in targets)]
    entry = bench(BenchOptions(str(conv.out_dir), runtimes=runtimes, threads=args.threads, settings=settings,
                               chart=False), progress=progress).entry
    rows = {r["runtime"]: r for r in entry["results"] if r["form"] == "deploy"}
    out = []
    for target, runtime in zip(("onnx", *targets), runtimes):
        s, r = stages.get(target), rows.get(runtime, {})
        v = s.verification if s else None
        task = ((v.detection or {}).get("map50") if detector else v.accuracy) if v else None
        out.append({"runtime": runtime, "p50": r.get("p50"), "p90": r.get("p90"), "error": r.get("error"),
                    "max_rel": v.max_rel if v else None, "task": task, "passed": bool(s and s.passed),
                    "reliable": not r.get("unreliable")})
    return {"model": model, "detector": detector, "rows": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=1, help="threads of every runtime (default 1, as on a phone core)")
    ap.add_argument("--min-ms", type=float, default=1000.0)
    ap.add_argument("--min-iters", type=int, default=50)
    ap.add_argument("--work", default=None, help="keep the run directories here (default: a temporary folder)")
    args = ap.parse_args()
    targets, missing = _available(PHONE)
    for m in missing:
        print(f"left out: {m}")
    settings = BenchSettings(warmup_iters=10, warmup_ms=200, min_iters=args.min_iters, min_ms=args.min_ms)
    started, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="phone-runtimes-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            results.append(measure(model, targets, args, settings, work))
    print(f"batch 1, {args.threads} thread(s), x86 CPU (not a phone); p50 / p90 in ms; ratio = p50 / ONNX Runtime's "
          "p50 in the same run")
    print(f"{'model':<15} {'runtime':<12} {'p50':>8} {'p90':>8} {'ratio':>7} {'max rel':>9} {'task':>9} "
          f"{'verified':>9} timing")
    for res in results:
        ort = next((r["p50"] for r in res["rows"] if r["runtime"] == "onnxruntime"), None)
        for r in res["rows"]:
            if r["p50"] is None:
                print(f"{res['model']:<15} {r['runtime']:<12} not timed: {r['error'] or 'no artifact'}")
                continue
            ratio = f"{r['p50'] / ort:.2f}x" if ort else "-"
            task = "-" if r["task"] is None else (f"{r['task']:.4f}" if res["detector"] else f"{100 * r['task']:.2f}%")
            rel = "-" if r["max_rel"] is None else f"{r['max_rel']:.1e}"
            print(f"{res['model']:<15} {r['runtime']:<12} {r['p50']:8.3f} {r['p90']:8.3f} {ratio:>7} {rel:>9} "
                  f"{task:>9} {'yes' if r['passed'] else 'NO':>9} {'ok' if r['reliable'] else 'UNRELIABLE'}")
    print(f"(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
