"""Conversion time: ``fusers.reparameterize`` against timm's ``reparameterize_model`` + ``torch.export``.

    python benchmarks/conversion_time.py [--models repvgg_a0,mobileone_s0,repvgg_b1,fastvit_t8] [--reps 3]

For each timm model (``pretrained=False``, randomized BatchNorm statistics, eval mode, batch 1 at its
default input size: 224x224, fastvit 256x256), in one process:

- baseline: ``torch.export.export(timm.utils.reparameterize_model(copy, inplace=True), (x,))`` on a fresh
  ``copy.deepcopy`` of the model (the copy is made outside the timed region);
- ours: ``fusers.reparameterize(model, (x,))`` (capture, passes under the float64 proof, float32 verify).

Each is warmed up once, then the two alternate ``--reps`` times; the medians and the ratio ours / baseline
are printed (target: <= 3x), the capture alone against the baseline (the recording of the training graph,
which has every branch, before any rewrite; ``torch.export`` where the recording refuses, as the last column
says), with ours split by phase from ``report.seconds`` (capture, passes with the proof's forward passes,
verify) and the spatial size the rewrites were proven on.
The CPU and the load average are printed first: the machine is shared, so compare ratios of one run, not
seconds across runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fusers, not an installed one

MODELS = ("repvgg_a0", "mobileone_s0", "repvgg_b1", "fastvit_t8")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import timm

    from deploy import zoo

    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(timm.create_model(name, pretrained=False), seed=0).eval()
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
    return model, torch.randn(1, *size, generator=torch.Generator().manual_seed(0))


def baseline(model: torch.nn.Module, x: torch.Tensor) -> float:
    from timm.utils.model import reparameterize_model

    twin = copy.deepcopy(model)
    start = time.perf_counter()
    torch.export.export(reparameterize_model(twin, inplace=True), (x,))
    return time.perf_counter() - start


def ours(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, dict, str]:
    import fusers

    start = time.perf_counter()
    deploy = fusers.reparameterize(model, (x,))
    seconds = time.perf_counter() - start
    report = deploy.reparam_report
    assert report.float64_error <= 1e-9, report.summary()
    return seconds, dict(report.seconds), str(getattr(report, "proof_shape", "") or ""), report.capture


def measure(name: str, reps: int) -> dict:
    model, x = build(name)
    baseline(model, x)  # warm-up: the first call of each loads code and fills caches
    ours(model, x)
    base, mine, phases, proof, how = [], [], [], "", ""
    for _ in range(reps):
        base.append(baseline(model, x))
        seconds, parts, proof, how = ours(model, x)
        mine.append(seconds)
        phases.append(parts)
    keys = sorted({k for p in phases for k in p})
    return {"model": name, "shape": tuple(x.shape), "baseline": statistics.median(base),
            "ours": statistics.median(mine),
            "ratio": statistics.median(m / b for m, b in zip(mine, base)),
            "capture_ratio": statistics.median(p.get("capture", 0.0) / b for p, b in zip(phases, base)),
            "phases": {k: statistics.median(p.get(k, 0.0) for p in phases) for k in keys}, "proof": proof,
            "capture": how}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(f"cpu: {_cpu()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    for name in args.models.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.reps))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; medians of {args.reps} interleaved "
          "runs; ratio: median of the per-run ratios ours / baseline")
    print("capture: of the training graph (recorded, or torch.export), the floor of the ratio before any rewrite "
          "or proof")
    print(f"{'model':<14}{'input':>18}{'baseline s':>12}{'ours s':>9}{'ratio':>8}{'capture':>9}   ours by phase (s)")
    for r in rows:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        proof = f"; proven at {r['proof']}" if r["proof"] else ""
        print(f"{r['model']:<14}{str(r['shape']):>18}{r['baseline']:>12.2f}{r['ours']:>9.2f}{r['ratio']:>7.2f}x"
              f"{r['capture_ratio']:>8.2f}x   "
              f"{phases}{proof}; captured by {r['capture']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
