"""Compile-time benchmark: capture, passes and verification time, and peak memory.

    python benchmarks/compile_time.py [--models repvgg_a0,repvgg_b1g2,mobileone_s0,yolov7_tiny_rep]

Each model runs in a fresh subprocess so peak memory (ru_maxrss) is its own. Memory is reported
above the process's baseline (libraries loaded by a warm-up run on a tiny model, the model built),
and as a multiple of the model's fp32 weight size (parameters and buffers). Target (issue 2): a RepVGG-B1-size model captured, rewritten and verified in under
15 s, with peak memory under 4x its fp32 weight size above the baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT = "repvgg_a0,repvgg_b1g2,mobileone_s0,yolov7_tiny_rep"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(name: str) -> dict:
    import torch

    import fusers
    from deploy import zoo

    torch.manual_seed(0)
    # warm-up on a tiny model: loads torch.export's code once, so the baseline is the ready interpreter
    fusers.reparameterize(zoo.create("repvgg_a0", width=0.0625), (torch.randn(1, 3, 32, 32),))
    model = zoo.randomize_batchnorm(zoo.create(name)).eval()
    x = torch.randn(*zoo.input_shape(name))
    weights_mb = sum(t.numel() * 4 for t in list(model.parameters()) + list(model.buffers())) / 2**20
    baseline = _current_rss_mb()
    start = time.perf_counter()
    deploy = fusers.reparameterize(model, (x,))
    total = time.perf_counter() - start
    r = deploy.reparam_report
    peak = _rss_mb() - baseline
    return {"model": name, "capture_s": r.seconds["capture"], "passes_s": r.seconds["passes"],
            "verify_s": r.seconds.get("verify", 0.0), "total_s": total, "weights_mb": weights_mb,
            "peak_above_baseline_mb": peak, "peak_x_weights": peak / weights_mb, "f64_error": r.float64_error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print(f"{'model':<18}{'capture s':>10}{'passes s':>10}{'verify s':>10}{'total s':>9}{'weights MB':>12}"
          f"{'peak MB':>9}{'peak/w':>8}{'f64 err':>10}")
    for name in args.models.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{m['model']:<18}{m['capture_s']:>10.2f}{m['passes_s']:>10.2f}{m['verify_s']:>10.2f}{m['total_s']:>9.2f}"
              f"{m['weights_mb']:>12.1f}{m['peak_above_baseline_mb']:>9.0f}{m['peak_x_weights']:>8.2f}"
              f"{m['f64_error']:>10.1e}")


if __name__ == "__main__":
    main()
