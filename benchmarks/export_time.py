"""Export time per format for zoo models, deploy (plain) form.

    python benchmarks/export_time.py                      # repvgg_a0 and yolov7_tiny_rep, every format
    python benchmarks/export_time.py --models repvgg_a0 --formats onnx tflite --precision fp16

For each model: build it from ``deploy.zoo``, reparameterize it with ``fusers.reparameterize``
(or, if the compiler is not importable, just capture it with ``torch.export``), then time each
exporter on the plain module. OpenVINO and TensorRT are converted from the ONNX artifact, so their
times exclude the ONNX export. A format whose package (or GPU) is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from exporters import ExportError, MissingDependency, export  # noqa: E402

DEFAULT_MODELS = ("repvgg_a0", "yolov7_tiny_rep")
FORMATS = ("onnx", "openvino", "tflite", "tensorrt")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "tflite": ".tflite", "tensorrt": ".engine"}


def plain_model(name: str, seed: int = 0):
    """(training model, plain deploy module, example input, seconds to reparameterize, how)."""
    from deploy import zoo

    torch.manual_seed(seed)
    model = zoo.create(name)
    if hasattr(zoo, "randomize_batchnorm"):
        zoo.randomize_batchnorm(model, seed)
    model.eval()
    x = torch.randn(*zoo.input_shape(name))
    start = time.perf_counter()
    try:
        from fusers import reparameterize
    except ImportError:
        plain = torch.export.export(model, (x,), strict=False).module()
        how = "torch.export only (fusers.reparameterize not importable)"
    else:
        plain = reparameterize(model, (x,))
        how = "fusers.reparameterize"
    return model, plain, x, time.perf_counter() - start, how


def time_exports(plain, x, folder: Path, formats, precision: str) -> list[tuple[str, str, str]]:
    """Rows of (format, seconds or '-', outcome)."""
    rows, onnx_art = [], None
    for fmt in formats:
        path = folder / f"model{SUFFIX[fmt]}"
        options = {} if fmt == "onnx" else {"precision": precision}
        source = plain
        if fmt in ("openvino", "tensorrt"):
            if onnx_art is None:
                rows.append((fmt, "-", "skipped: needs the ONNX export"))
                continue
            source = onnx_art
        start = time.perf_counter()
        try:
            art = export(fmt, source, path, args=(x,) if fmt in ("onnx", "tflite") else None, **options)
        except MissingDependency as e:
            rows.append((fmt, "-", f"skipped: {e}"))
            continue
        except ExportError as e:
            rows.append((fmt, f"{time.perf_counter() - start:.2f}", f"FAILED: {e}"))
            continue
        seconds = time.perf_counter() - start
        if fmt == "onnx":
            onnx_art = art
        size = sum(os.path.getsize(p) for p in (art.path, art.metadata.get("bin")) if p and os.path.isfile(p))
        rows.append((fmt, f"{seconds:.2f}", f"{art.precision}, {size / 1e6:.1f} MB, {os.path.basename(art.path)}"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                        help="precision of the OpenVINO / TFLite / TensorRT artifacts (ONNX is fp32)")
    parser.add_argument("--out", type=Path, default=None, help="keep the artifacts here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads while exporting")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = ["onnx"] + [f for f in args.formats if f != "onnx"] if "onnx" in args.formats else args.formats
    print(f"# export time, {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for name in args.models:
            _, plain, x, reparam_s, how = plain_model(name)
            print(f"\n## {name}  input {tuple(x.shape)}  plain model by {how} in {reparam_s:.2f} s")
            print(f"{'format':<10} {'seconds':>8}  result")
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            for fmt, seconds, outcome in time_exports(plain, x, folder, formats, args.precision):
                print(f"{fmt:<10} {seconds:>8}  {outcome}")
                failed |= outcome.startswith("FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
