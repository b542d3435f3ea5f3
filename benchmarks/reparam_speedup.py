"""Speed-up of reparameterization, and our deploy forms against timm's own, on ONNX Runtime and OpenVINO.

    python benchmarks/reparam_speedup.py [--models timm:repvgg_a0,...] [--threads 2] [--min-ms 2000]

For each model: the training form, our deploy form (``fusers.reparameterize``) and, for timm
models, timm's deploy form (``timm.utils.reparameterize_model``) are exported to ONNX the same
way (``exporters.export``, onnxsim verified) and to OpenVINO from that ONNX, then timed with the
``deploy bench`` harness (``runtimes.bench``): batch 1, fp32, the three forms interleaved call by
call, each runtime in its own process (ONNX Runtime with intra-op spinning off). Prints p50 of
each form, the speed-up training / ours, and ours / timm (<= 1.00 means ours is at least as fast),
with the op counts of both deploy forms where they differ. Random weights with randomized
BatchNorm statistics (timing does not depend on the values). The zoo's yolov7_tiny_rep has no
timm form: only its speed-up is printed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

import fusers
from deploy import sources
from exporters import export
from runtimes.bench import BenchJob, BenchSettings, run_isolated

MODELS = ("timm:repvgg_a0", "timm:mobileone_s0", "yolov7_tiny_rep", "timm:fastvit_t8", "timm:repvit_m0_9")


def _structure(path: str) -> tuple[Counter, list]:
    """Op counts, and every node's type and attributes with the weight shapes (to tell identical graphs)."""
    import onnx

    graph = onnx.load(path).graph
    nodes = [(n.op_type, [str(a) for a in n.attribute]) for n in graph.node]
    return Counter(n.op_type for n in graph.node), [nodes, sorted(tuple(i.dims) for i in graph.initializer)]


def forms_of(spec: str, model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    forms = {"training": model, "ours": fusers.reparameterize(model, (x,))}
    if spec.startswith("timm:"):
        from timm.utils.model import reparameterize_model

        forms["timm"] = reparameterize_model(copy.deepcopy(model)).eval()
    return forms


def measure(spec: str, threads: int, settings: BenchSettings, work: Path) -> dict:
    loaded = sources.load_model(spec)
    shape = list(loaded.input_shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    forms = forms_of(spec, loaded.model, x)
    files: dict[str, dict[str, str]] = {"onnxruntime": {}, "openvino": {}}
    for name, module in forms.items():
        onnx = export("onnx", module, work / f"{name}.onnx", args=(x,))
        files["onnxruntime"][name] = onnx.path
        files["openvino"][name] = export("openvino", onnx, work / f"{name}.xml").path
    if "timm" in forms:  # the control: a second session of the very same file measures the noise floor
        files["onnxruntime"]["timm copy"] = files["onnxruntime"]["timm"]
        files["openvino"]["timm copy"] = files["openvino"]["timm"]
    out = {"spec": spec, "shape": shape, "structure": {n: _structure(p) for n, p in files["onnxruntime"].items()}}
    for runtime, paths in files.items():
        job = BenchJob(runtime, paths, shape, threads=threads, settings=settings)
        rows = run_isolated(job, str(work))["rows"]
        failed = [r for r in rows if "error" in r]
        if failed:
            raise RuntimeError(f"{spec} on {runtime}: {failed[0]['form']} failed: {failed[0]['error']}")
        out[runtime] = {r["form"]: r["p50"] for r in rows}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-ms", type=float, default=2000.0)
    ap.add_argument("--min-iters", type=int, default=20)
    args = ap.parse_args()
    settings = BenchSettings(warmup_iters=5, warmup_ms=300, min_iters=args.min_iters, min_ms=args.min_ms)
    header = (f"{'model':<20} {'runtime':<12} {'train p50':>10} {'ours p50':>9} {'timm p50':>9} "
              f"{'train/ours':>10} {'ours/timm':>9} {'noise':>6}")
    results = []
    for spec in args.models.split(","):
        print(f"measuring {spec} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results.append(measure(spec, args.threads, settings, Path(tmp)))
    print(f"batch 1, fp32, {args.threads} threads; p50 in ms; ours/timm <= 1.00: ours at least as fast; noise: "
          "|p50 of a second session of timm's file / timm's p50 - 1|")
    print(header)
    for r in results:
        for runtime in ("onnxruntime", "openvino"):
            p = r[runtime]
            timm = f"{p['timm']:9.3f}" if "timm" in p else f"{'-':>9}"
            ratio = f"{p['ours'] / p['timm']:9.2f}" if "timm" in p else f"{'-':>9}"
            noise = f"{abs(p['timm copy'] / p['timm'] - 1):6.1%}" if "timm" in p else f"{'-':>6}"
            print(f"{r['spec']:<20} {runtime:<12} {p['training']:10.3f} {p['ours']:9.3f} {timm} "
                  f"{p['training'] / p['ours']:9.2f}x {ratio} {noise}")
        st = r["structure"]
        if "timm" in st:
            (ours, ours_graph), (timm, timm_graph) = st["ours"], st["timm"]
            diff = {k: (ours[k], timm[k]) for k in set(ours) | set(timm) if ours[k] != timm[k]}
            same = "identical" if ours_graph == timm_graph else "same op counts, different attributes or weights"
            print(f"{'':<20} ONNX graphs ours vs timm: " + (", ".join(f"{k} {a} vs {b}" for k, (a, b) in
                                                                    sorted(diff.items())) or same))
    return 0


if __name__ == "__main__":
    sys.exit(main())
