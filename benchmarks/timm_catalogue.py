"""The timm catalogue: ``deploy sweep`` over a seeded sample of timm's models, and what it says.

    python benchmarks/timm_catalogue.py                          # 150 models of at most 25M parameters, seed 2026
    python benchmarks/timm_catalogue.py --sample 5 --workers 2   # a quick check
    python benchmarks/timm_catalogue.py --summary-only           # the summary of the runs already in --out

Runs ``deploy sweep 'timm:*' --sample N --seed S --max-params P --targets onnx --compare-export --workers W
--out OUT`` (a rerun into the same OUT goes on where an interrupted one stopped; ``--rerun-failed`` retries the
failures), then prints: models converted and verified, peer-only models (``torch.onnx.export`` + ONNX Runtime works
and ours does not), BatchNorms before and after, and the median conversion time against the baseline that
``--compare-export`` times in the peer process: ``timm.utils.reparameterize_model`` + ``torch.export.export``.
The two are not the same work: a conversion also proves the rewrites, exports ONNX and verifies every artifact on
its runtime; the baseline reparameterizes by timm's own per-block code and captures, nothing more. Each model is
converted at its own default input size (``pretrained_cfg['input_size']``). 150 models take hours on a 2-core
machine: run it where it may take them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.sweep import load_results  # noqa: E402
from deploy.sweep_report import summary  # noqa: E402


def run(args) -> int:
    command = [sys.executable, "-m", "deploy", "sweep", "timm:*", "--sample", str(args.sample), "--seed",
               str(args.seed), "--max-params", args.max_params, "--targets", "onnx", "--workers", str(args.workers),
               "--timeout", str(args.timeout), "--out", args.out]
    if args.compare_export:
        command.append("--compare-export")
    if args.rerun_failed:
        command.append("--rerun-failed")
    print("$ " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)


def report(out: str) -> None:
    records = list(load_results(Path(out)).values())
    if not records:
        print(f"no records in {out}/results.jsonl")
        return
    s = summary(records)
    print(f"\n{s['models']} model(s) in {out}")
    print(f"converted and verified: {s['converted']} of {s['models']}")
    print(f"peer path (torch.onnx.export + ONNX Runtime) works: {s['peer_works']} of {s['models']}; peer-only: "
          f"{len(s['peer_only'])}" + (f" ({', '.join(s['peer_only'])})" if s["peer_only"] else ""))
    print(f"BatchNorms: {s['batchnorms_before']} before -> {s['batchnorms_after']} after")
    median = s["median_convert_seconds"]
    print("median conversion (deploy convert, report total, passing jobs): "
          + (f"{median:.1f} s" if median is not None else "-"))
    pairs = [(r["convert_seconds"], r["peer"]["baseline_seconds"]) for r in records
             if isinstance(r.get("convert_seconds"), (int, float))
             and isinstance((r.get("peer") or {}).get("baseline_seconds"), (int, float))
             and r["peer"]["baseline_seconds"] > 0]
    if pairs:
        print(f"median baseline (timm reparameterize_model + torch.export.export): "
              f"{statistics.median(b for _, b in pairs):.1f} s; median ratio ours / baseline over {len(pairs)} "
              f"model(s): {statistics.median(c / b for c, b in pairs):.1f}x")
    for c, n, examples in s["failure_classes"][:10]:
        print(f"  {n} x {c} (e.g. {', '.join(examples)})")
    print(f"table: {out}/sweep.md")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", type=int, default=150, help="models drawn from timm:* (default 150)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the draw (default 2026)")
    p.add_argument("--max-params", default="25M", help="largest parameter count drawn (default 25M)")
    p.add_argument("--workers", type=int, default=1, help="conversions at once (default 1)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job (default 900)")
    p.add_argument("--out", default="runs/timm_catalogue", help="sweep directory (default runs/timm_catalogue)")
    p.add_argument("--no-compare-export", dest="compare_export", action="store_false",
                   help="do not time the baseline (timm reparameterize_model + torch.export.export)")
    p.add_argument("--rerun-failed", action="store_true", help="retry the jobs recorded as failed")
    p.add_argument("--summary-only", action="store_true", help="print the summary of --out without running")
    args = p.parse_args()
    rc = 0 if args.summary_only else run(args)
    if Path(args.out, "results.jsonl").is_file():
        report(args.out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
