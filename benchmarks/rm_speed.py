"""Is the RM operation's plain form faster than the residual deploy form on this CPU?

    python benchmarks/rm_speed.py [--models resnet18,resnet50] [--size 224] [--threads 2]

For each torchvision ResNet (random weights, batch 1): the residual deploy form (default passes)
and the RM plain form (default passes + "rm") are exported to ONNX and OpenVINO IR, and timed on
ONNX Runtime and OpenVINO CPU, interleaved in the same run (one runtime at a time, so their thread
pools do not compete). Prints p50 latencies, the ratio residual/RM (> 1: RM is faster), FLOPs and
parameters of both forms. Whether RM pays here is a finding, not a target: its carried channels
widen every conv of a block (x5 in a bottleneck's 3x3).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import fusers
from deploy.inspect import inspect_module
from exporters import export
from runtimes import open_runner
from runtimes.bench import interleaved_p50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    import torchvision

    print(f"{'model':<10}{'form':<10}{'params M':>10}{'GFLOPs':>8}{'ORT p50 ms':>12}{'OV p50 ms':>11}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(1, 3, args.size, args.size)
        forms = {"residual": fusers.reparameterize(model, (x,)),
                 "rm": fusers.reparameterize(model, (x,), passes=(*fusers.DEFAULT_PASSES, "rm"))}
        with tempfile.TemporaryDirectory() as tmp:
            arts = {}
            for form, gm in forms.items():
                onnx = export("onnx", gm, Path(tmp) / f"{form}.onnx", args=(x,), simplify=False)
                arts[form] = (onnx, export("openvino", onnx, Path(tmp) / f"{form}.xml"))
            feed = {"input0": x.numpy()}
            ort = [open_runner(arts[f][0], threads=args.threads, allow_spinning=False) for f in forms]
            ov = [open_runner(arts[f][1], threads=args.threads) for f in forms]
            results = {}
            for kind, runners in (("ort", ort), ("ov", ov)):
                for r in runners:
                    r.activate()
                results[kind] = interleaved_p50(runners, feed, 3, args.iters)
                for r in runners:
                    r.deactivate()
        for i, (form, gm) in enumerate(forms.items()):
            params = sum(p.numel() for p in gm.parameters()) / 1e6
            gflops = inspect_module(gm, (x,)).flops / 1e9
            print(f"{name:<10}{form:<10}{params:>10.1f}{gflops:>8.2f}{results['ort'][i]:>12.1f}"
                  f"{results['ov'][i]:>11.1f}")
        print(f"{name:<10}{'ratio':<10}{'':>18}{results['ort'][0] / results['ort'][1]:>12.2f}"
              f"{results['ov'][0] / results['ov'][1]:>11.2f}   (residual / RM; > 1 means RM is faster)")


if __name__ == "__main__":
    main()
