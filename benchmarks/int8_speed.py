"""How much faster is the calibrated INT8 deploy form than the fp32 one, on ONNX Runtime and OpenVINO CPU?

    python benchmarks/int8_speed.py [--models repvgg_a0,mobileone_s0,yolov7_tiny_rep] [--threads N]
                                    [--min-ms 2000] [--input-shape 1,3,224,224] [--work DIR]

For each zoo model (random weights, randomized BatchNorm statistics): ``deploy convert MODEL
--precision int8 --targets onnx,openvino`` (``deploy.pipeline.convert``; calibration on seeded
inputs, the accuracy guard on held-out seeded inputs), then ``deploy bench`` on both runtimes
(``deploy.bench.bench``): each runtime in its own process, the fp32 deploy artifact and its INT8
artifact interleaved call by call, batch 1. Prints per model and runtime the p50 of both, the
speed-up fp32 / INT8 (> 1: INT8 is faster), the guard's numbers (output SQNR against the training
model, top-1 agreement where the first output is a class score; a detector is judged by SQNR
>= 20 dB), and the median speed-up per runtime. An INT8 artifact that fails the guard is not
timed; its row says why.

ONNX Runtime's INT8 gain needs graph optimization level "all" (it fuses the QDQ pairs into
integer kernels; the bench's ONNX Runtime options use it, with intra-op spinning off). What
the CPU offers INT8 (VNNI / AMX, or int8 widened to int16 multiplies) decides how large the gain
can be: it is in the bench entry's hardware facts, ``entry["hardware"]["cpu"]["low_precision"]``,
and printed above the table. Threads default to every CPU this process may use.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from deploy.bench import BenchOptions, bench
from deploy.pipeline import ConvertOptions, convert
from exporters import targets as registry
from runtimes.bench import BenchSettings
from runtimes.hardware import usable_cpus

MODELS = ("repvgg_a0", "mobileone_s0", "yolov7_tiny_rep")
RUNTIMES = ("onnxruntime", "openvino")


def _progress(model: str):
    return lambda message: print(f"[{model}] {message}", file=sys.stderr, flush=True)


def guard_of(stages, runtime: str) -> dict:
    """The INT8 stage of ``runtime``'s target: passed, SQNR, agreement and the reason it failed."""
    target = registry.by_runtime(runtime).name
    q = next((s for s in stages if s.precision == "int8" and s.format == target), None)
    if q is None:
        return {"passed": False, "reason": "no INT8 stage made"}
    v = q.verification
    return {"passed": q.passed, "sqnr_db": v.sqnr_db, "agreement": v.int8.get("agreement"), "reason": q.reason}


def measure(model: str, args, settings: BenchSettings, work: Path) -> dict:
    progress = _progress(model)
    start = time.perf_counter()
    conv = convert(ConvertOptions(model=model, precision="int8", targets=("onnx", "openvino"), out=str(work / model),
                                  force=True, input_shape=args.input_shape), progress=progress)
    converted = time.perf_counter() - start
    guards = {r: guard_of(conv.stages, r) for r in RUNTIMES}
    entry = bench(BenchOptions(str(conv.out_dir), runtimes=RUNTIMES, threads=args.threads, settings=settings,
                               chart=False), progress=progress).entry
    progress(f"converted in {converted:.0f} s, benchmarked in {entry['seconds']:.0f} s")
    p50 = {(r["runtime"], r["form"]): r["p50"] for r in entry["results"] if "p50" in r}
    errors = [f"{r['runtime']} {r['form']}: {r['error']}" for r in entry["results"] if "error" in r]
    notes = [n for n in entry["notes"] if "did not pass" not in n]  # the guard's failures have their own line
    return {"model": model, "shape": conv.record.inputs.shape, "guards": guards, "p50": p50,
            "speedups": {s["runtime"]: s["speedup"] for s in entry["int8_speedups"]},
            "errors": errors + notes, "hardware": entry["hardware"]["cpu"], "threads": entry["threads"]}


def _num(value, fmt: str, width: int) -> str:
    return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=None, help="default: every CPU this process may use")
    ap.add_argument("--min-ms", type=float, default=2000.0)
    ap.add_argument("--min-iters", type=int, default=20)
    ap.add_argument("--input-shape", type=lambda s: tuple(int(d) for d in s.split(",")), default=None,
                    help="one input shape for every model, e.g. 1,3,224,224 (default: each model's own)")
    ap.add_argument("--work", default=None, help="keep the run directories here (default: a temporary folder)")
    args = ap.parse_args()
    args.threads = args.threads or usable_cpus()
    settings = BenchSettings(warmup_iters=5, warmup_ms=300, min_iters=args.min_iters, min_ms=args.min_ms)
    started = time.perf_counter()
    results, failed = [], []
    with tempfile.TemporaryDirectory(prefix="int8-speed-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            print(f"measuring {model} ...", file=sys.stderr, flush=True)
            try:
                results.append(measure(model, args, settings, work))
            except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others' numbers
                failed.append(f"{model}: {type(e).__name__}: {e}")
                print(f"[{model}] FAILED: {e}", file=sys.stderr, flush=True)
    if results:
        cpu = results[0]["hardware"]
        low = cpu["low_precision"]
        print(f"CPU {cpu['model']}, {results[0]['threads']} thread(s); int8: {', '.join(low['int8']) or 'none found'}"
              f" (native dot products: {'yes' if low['int8_native'] else 'no'}); "
              f"bf16: {', '.join(low['bf16']) or 'none'}")
    print("batch 1; p50 in ms; speed-up = fp32 p50 / int8 p50 (> 1: INT8 faster), measured interleaved in one process "
          "per runtime; guard on held-out seeded inputs")
    print(f"{'model':<17} {'shape':<14} {'runtime':<12} {'fp32 p50':>9} {'int8 p50':>9} {'speed-up':>9} "
          f"{'SQNR dB':>8} {'agree':>7} {'guard':>6}")
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        for runtime in RUNTIMES:
            g, up = r["guards"][runtime], r["speedups"].get(runtime)
            agree = f"{100 * g['agreement']:6.1f}%" if g.get("agreement") is not None else f"{'-':>7}"
            print(f"{r['model']:<17} {shape:<14} {runtime:<12} {_num(r['p50'].get((runtime, 'deploy')), '.3f', 9)} "
                  f"{_num(r['p50'].get((runtime, 'int8')), '.3f', 9)} "
                  f"{(f'{up:.2f}x' if up is not None else '-'):>9} {_num(g.get('sqnr_db'), '.1f', 8)} {agree} "
                  f"{'pass' if g['passed'] else 'FAIL':>6}")
        for runtime in RUNTIMES:
            if not r["guards"][runtime]["passed"]:
                print(f"{'':<17} {runtime} INT8 not timed: {r['guards'][runtime]['reason']}")
        for e in r["errors"]:
            print(f"{'':<17} note: {e}")
    medians = {rt: [r["speedups"][rt] for r in results if rt in r["speedups"]] for rt in RUNTIMES}
    print("median speed-up: " + "; ".join(
        f"{rt} {statistics.median(v):.2f}x over {len(v)} model(s)" if v else f"{rt} none measured"
        for rt, v in medians.items()) + f"  (total {time.perf_counter() - started:.0f} s)")
    for f in failed:
        print(f"FAILED {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
