"""The ``deploy`` command line (also ``python -m deploy``).

    deploy                         reparameterize the default zoo model and print what each pass did
    deploy reparam MODEL [...]     the same for any zoo model
    deploy zoo                     list the built-in models
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

import fusers
from deploy import zoo

DEFAULT_MODEL = "repvgg_a0"


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must look like 1,3,224,224, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return shape


def _passes(text: str) -> tuple[str, ...]:
    out = []
    for name in text.split(","):
        out.extend(fusers.DEFAULT_PASSES if name == "default" else [name])
    return tuple(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy", description="Reparameterize multi-branch networks into plain "
                                "deploy networks, proven exact in float64.")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("reparam", help="reparameterize a zoo model and report every pass")
    r.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"zoo model name (default {DEFAULT_MODEL})")
    r.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (default: the model's)")
    r.add_argument("--passes", type=_passes, default=None, help="comma-separated passes; 'default' expands to "
                   f"{','.join(fusers.DEFAULT_PASSES)}")
    r.add_argument("--width", type=float, default=1.0, help="zoo width multiplier (default 1.0)")
    r.add_argument("--seed", type=int, default=0, help="seed for weights, BatchNorm statistics and inputs")
    r.add_argument("-v", "--verbose", action="store_true", help="log every pass")
    sub.add_parser("zoo", help="list the built-in models")
    return p


def cmd_zoo() -> int:
    for name in zoo.names():
        print(f"{name:<18} {' x '.join(map(str, zoo.input_shape(name)[1:])):<12} {zoo.describe(name)}")
    return 0


def cmd_reparam(args) -> int:
    torch.manual_seed(args.seed)
    print(f"building {args.model} (width {args.width}, random weights, seeded BatchNorm statistics)")
    model = zoo.randomize_batchnorm(zoo.create(args.model, width=args.width), seed=args.seed).eval()
    shape = args.input_shape or zoo.input_shape(args.model)
    x = torch.randn(*shape)
    print(f"capturing and rewriting at input {tuple(shape)}; every pass is checked in float64 ...")
    start = time.perf_counter()
    deploy = fusers.reparameterize(model, (x,), passes=args.passes, seed=args.seed)
    report = deploy.reparam_report
    print(f"done in {time.perf_counter() - start:.1f} s "
          f"(capture {report.seconds['capture']:.1f} s, passes {report.seconds['passes']:.1f} s, "
          f"verify {report.seconds.get('verify', 0):.1f} s)\n")
    print(report.summary())
    ok = report.float64_error <= 1e-9 and (report.float32_error or 0) <= 1e-4
    print("\nresult: " + ("exact (float64) and within float32 rounding" if ok else "MISMATCH"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "zoo":
            return cmd_zoo()
        if args.command is None:
            args = _parser().parse_args(["reparam", *(argv or [])])
        return cmd_reparam(args)
    except (fusers.CaptureError, fusers.InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
