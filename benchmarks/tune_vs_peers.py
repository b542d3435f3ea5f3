"""How much faster is the form ``deploy tune`` chooses than the form a user of the peers would ship?

    python benchmarks/tune_vs_peers.py [--models timm:repvgg_a0,timm:mobileone_s0,yolov7_tiny_rep]
                                       [--budget-s 600] [--threads N] [--work DIR]

For each model: ``deploy tune MODEL --runtimes onnxruntime,openvino --precisions fp32,bf16,int8 --passes default``
(``deploy.tune.tune``, threads default: every CPU this process may use; batch 1; the CPU decides which precisions
survive the plan). The tune measures the peer baseline beside its candidates in the same run: for a timm model,
``timm.utils.reparameterize_model`` exported with ``torch.onnx.export`` defaults and run on ONNX Runtime with
default session options; for a zoo model, its training form exported the same way. Prints per model the
peer's p50, the chosen form and its p50, the ratios peer / chosen at p50 and at p90 (> 1: the chosen form is
faster; both are medians over the same interleaved rounds), and both forms' accuracy against the fp32 training
model on held-out inputs: accuracy drop with labels, else top-1 agreement, and the output SQNR (a detector has
neither labels nor class scores: SQNR only). Then each model's candidate table as ``deploy tune`` prints it, with
its legend and verdict (a tie, and how it was broken).

Every model here has random weights (nothing is downloaded); ``deploy.sources.load_model`` seeds them, so
the peer's model and the candidates' are the same network. The peer runs with ONNX Runtime's default session
options (every graph optimization, intra-op spinning on, all cores).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from deploy.report import text_table
from deploy.tune import TuneOptions, tune
from deploy.tune_report import candidate_table, pruned_lines, table_notes
from runtimes.hardware import usable_cpus

MODELS = ("timm:repvgg_a0", "timm:mobileone_s0", "yolov7_tiny_rep")
RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")


def _accuracy(metrics: dict | None) -> str:
    """Accuracy against the fp32 training model, in words: drop (labels), agreement, SQNR."""
    if not metrics:
        return "-"
    parts = []
    if "drop" in metrics:
        parts.append(f"acc {100 * metrics['accuracy']:.2f}% ({0.0 - metrics['drop'] + 0.0:+.2f} pts)")
    elif "agreement" in metrics:
        parts.append(f"agree {100 * metrics['agreement']:.2f}% ({100 * metrics['agreement'] - 100 + 0.0:+.2f} pts)")
    sqnr = metrics.get("sqnr_db")
    if sqnr is not None:
        parts.append(f"SQNR {sqnr:.1f} dB" if math.isfinite(sqnr) else "SQNR inf")
    return ", ".join(parts)


def run(model: str, args, work: Path) -> dict:
    progress = lambda m: print(f"[{model}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    name = model.replace(":", "_")
    result = tune(TuneOptions(model=model, runtimes=RUNTIMES, precisions=PRECISIONS, passes=("default",),
                              threads=[args.threads], budget_s=args.budget_s, out=str(work / name), force=True),
                  progress=progress)
    peer, c = result.peer, result.chosen
    peer_p50, peer_p90 = ((peer.get("stats") or {}).get(k) for k in ("p50", "p90"))
    chosen_p50, chosen_p90 = (c.best_stats()[k] for k in ("p50", "p90")) if c else (None, None)
    return {"model": model, "peer_form": peer.get("form"), "peer_p50": peer_p50, "peer_error": peer.get("error"),
            "peer_metrics": peer.get("metrics"), "chosen": c.name if c else None, "chosen_p50": chosen_p50,
            "chosen_metrics": c.metrics if c else None, "measured": "in full" if c and c.stats else "screening",
            "ratio": peer_p50 / chosen_p50 if peer_p50 and chosen_p50 else None,
            "ratio_p90": peer_p90 / chosen_p90 if peer_p90 and chosen_p90 else None, "cut": result.cut_short,
            "seconds": result.seconds, "closest": result.closest.name if result.closest else None,
            "table": "\n".join([text_table(*candidate_table(result.candidates, c)),
                                *table_notes(result.candidates, c, peer=peer)]),
            "pruned": pruned_lines(result.candidates)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    ap.add_argument("--budget-s", type=float, default=600.0, help="deploy tune's budget per model (default 600)")
    ap.add_argument("--threads", type=int, default=None, help="default: every CPU this process may use")
    ap.add_argument("--work", default=None, help="keep the tune directories here (default: a temporary folder)")
    args = ap.parse_args()
    args.threads = args.threads or usable_cpus()
    started = time.perf_counter()
    results, failed = [], []
    with tempfile.TemporaryDirectory(prefix="tune-vs-peers-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            print(f"tuning {model} ...", file=sys.stderr, flush=True)
            try:
                results.append(run(model, args, work))
            except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others' numbers
                failed.append(f"{model}: {type(e).__name__}: {e}")
                print(f"[{model}] FAILED: {e}", file=sys.stderr, flush=True)
    from runtimes.hardware import cpu_facts

    cpu = cpu_facts(args.threads)
    print(f"CPU {cpu['model']}, {args.threads} thread(s); int8: {', '.join(cpu['low_precision']['int8']) or 'none'}; "
          f"bf16: {', '.join(cpu['low_precision']['bf16']) or 'none'}")
    print(f"deploy tune --runtimes {','.join(RUNTIMES)} --precisions {','.join(PRECISIONS)} --passes default "
          f"--threads {args.threads} --budget-s {args.budget_s:g}; batch 1; p50 in ms; ratio = peer / chosen at p50 "
          "and at p90 (> 1: the chosen form is faster), medians over the same interleaved rounds; accuracy against "
          "the fp32 training model on held-out inputs")
    rows = []
    for r in results:
        rows.append([r["model"], r["peer_form"] or "-",
                     f"{r['peer_p50']:.3f}" if r["peer_p50"] else "-", r["chosen"] or "none eligible",
                     f"{r['chosen_p50']:.3f}" if r["chosen_p50"] else "-",
                     f"{r['ratio']:.2f}x" if r["ratio"] else "-",
                     f"{r['ratio_p90']:.2f}x" if r["ratio_p90"] else "-", _accuracy(r["chosen_metrics"]),
                     _accuracy(r["peer_metrics"]), f"{r['seconds']:.0f}" + (" (cut)" if r["cut"] else "")])
    print(text_table(["model", "peer form", "peer p50", "chosen", "chosen p50", "ratio", "ratio p90", "chosen vs fp32",
                      "peer vs fp32", "tune s"], rows))
    for r in results:
        if r["peer_error"]:
            print(f"{r['model']}: the peer baseline failed: {r['peer_error']}")
        if r["chosen"] is None:
            print(f"{r['model']}: no candidate met the bound; closest {r['closest']}")
        elif r["measured"] != "in full":
            print(f"{r['model']}: the chosen form was measured in screening only (the budget ran out)")
    for r in results:
        print(f"\n{r['model']}:\n{r['table']}")
        if r["pruned"]:
            print("pruned: " + "; ".join(r["pruned"]))
    ratios = [r["ratio"] for r in results if r["ratio"]]
    if ratios:
        print(f"\ngeometric mean ratio {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x over "
              f"{len(ratios)} model(s) (total {time.perf_counter() - started:.0f} s)")
    for f in failed:
        print(f"FAILED {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
