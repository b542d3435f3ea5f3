"""The ``deploy`` command line (also ``python -m deploy``).

    deploy                                    convert the built-in trained default (repvgg_digits)
    deploy convert MODEL [options]            load -> capture -> passes -> .pt2 -> exporters -> verify -> reports
    deploy verify DIR                         re-run the verification of a convert output directory
    deploy inspect MODEL_OR_ARTIFACT          ops, convolutions, parameters, FLOPs, mergeable branches
    deploy bench DIR_OR_MODEL [options]       latency of the artifacts on their runtimes (and of the training form)
    deploy tune MODEL_OR_DIR [options]        choose runtime, precision, passes and threads by measuring them
    deploy sweep MODEL... [options]           convert a catalogue of models, each in its own process: a table
    deploy doctor DIR [--stage NAME]          where a stage of a convert run loses accuracy or fails
    deploy zoo                                list the built-in models

``deploy MODEL [options]`` (no command) is ``deploy convert MODEL [options]``. Exit status: 0 when
every stage passes, 1 when a stage failed verification or export (the report names it) or, with
``--strict-plain``, when the deploy graph keeps something that could have merged, 2 for bad
input (one sentence naming the problem and the fix), 130 after Ctrl-C and 143 after SIGTERM (the
partial output removed either way). Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
import warnings

COMMANDS = ("convert", "verify", "inspect", "bench", "tune", "detect", "zoo", "sweep", "doctor")
EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


LARGEST = 2**31 - 1  # the largest dimension, class count or batch the runtimes take (int32 sizes)
MAX_ITERS = 100_000  # runtimes.bench's cap on measured calls per form
MAX_MS = 3_600_000.0  # an hour of warm-up or measurement per form


def _positive_ints(what: str, example: str):
    """An argparse type: comma- (or x-) separated positive integers up to :data:`LARGEST`, e.g. ``1,3,224,224``."""
    def parse(text: str) -> tuple[int, ...]:
        parts = [v.strip() for v in text.replace("x", ",").split(",")]
        if "" in parts:
            raise argparse.ArgumentTypeError(f"{what} {text!r} has an empty entry; write it like {example}.")
        try:
            values = tuple(int(v) for v in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must look like {example}, got {text!r}.") from None
        if min(values) < 1:
            raise argparse.ArgumentTypeError(f"{what} must be positive integers (each >= 1), got {text!r}.")
        if max(values) > LARGEST:
            raise argparse.ArgumentTypeError(f"{what} must be integers up to {LARGEST}, got {text!r}.")
        return values
    return parse


def _at_least(minimum: int, maximum: int = LARGEST):
    """An argparse type: an integer in ``minimum..maximum`` (argparse names the option in its message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}.")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be an integer <= {maximum}, got {text!r}.")
        return value
    return parse


def _seed(text: str) -> int:
    """An argparse type: a seed torch's generators take (0 up to 2**63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{2**63 - 1}, got {text!r}.")
    return value


def _opset(text: str) -> int:
    """An argparse type: an ONNX opset the exporter can write (MIN_OPSET up to what the installed onnx defines)."""
    from exporters.onnx import MIN_OPSET, max_opset
    from runtimes.core import MissingDependency

    try:
        newest = max_opset()
    except MissingDependency:  # no onnx: the onnx target says so when it is asked for
        newest = None
    valid = f"{MIN_OPSET}..{newest}" if newest else f">= {MIN_OPSET}"
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < MIN_OPSET or (newest and value > newest):
        raise argparse.ArgumentTypeError(f"{text!r} is not an ONNX opset the exporter can write: choose one in "
                                         f"{valid} (default 18).")
    return value


_shape = _positive_ints("input shape", "1,3,224,224")
_batches = _positive_ints("batch sizes", "1,8")
_thread_counts = _positive_ints("thread counts", "1,2")


def _passes(text: str) -> tuple[str, ...]:
    import fusers

    out: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if name:
            out.extend(fusers.DEFAULT_PASSES if name == "default" else [name])
    return tuple(out)


def _targets(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "none":
        return ()
    names = tuple(t.strip().lower() for t in text.split(","))
    if not any(names):
        raise argparse.ArgumentTypeError(f"{text!r} names no target; list formats like onnx,openvino, or write none "
                                         "to make only the plain model")
    if "" in names:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry; list formats like onnx,openvino")
    return names


def _runtimes(text: str) -> tuple[str, ...]:
    names = tuple(r.strip().lower() for r in text.split(","))
    if "" in names:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty entry; write a comma-separated list like "
                                         "onnxruntime,openvino")
    return names


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}.")
    return value


def _width(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (e.g. 0.5), got {text!r}.")
    return value


def _milliseconds(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_MS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_MS:.0f} ms (an hour), got {text!r}.")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in 0..1 (e.g. 0.98), got {text!r}.")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}.")
    return value


def _stds(text: str) -> tuple[float, ...]:
    values = _floats(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"a standard deviation divides the pixels: each must be > 0, got {text!r}.")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.485,0.456,0.406, got {text!r}.")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="log what every library step does")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the result")


_TRUST_HELP = ("load files that hold pickled Python objects (a whole pickled model such as a YOLOv7 checkpoint, a "
               "--checkpoint with objects beyond tensors, a .pt2 that would unpickle): loading them runs code from "
               "them, so only pass this for files from a source you trust")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH", help="state dict to load strictly (also nested under "
                   "state_dict/model/ema; 'module.' prefixes stripped)")
    p.add_argument("--checkpoint-key", metavar="KEY", help="entry of the checkpoint that holds the weights")
    p.add_argument("--code-path", metavar="DIR", action="append", default=[],
                   help="add DIR to sys.path to unpickle a whole-model checkpoint (e.g. a YOLOv7 checkout)")
    p.add_argument("--num-classes", type=_at_least(1), metavar="N", help="classifier classes for "
                   "zoo/timm/torchvision models (to match a checkpoint)")
    p.add_argument("--width", type=_width, help="zoo width multiplier (default: the published width)")
    p.add_argument("--input-shape", type=_shape, metavar="N,C,H,W",
                   help="example input shape (default: the model's, e.g. 1,3,224,224)")
    p.add_argument("--eval", dest="allow_train_mode", action="store_true",
                   help="convert a model that arrives in train mode in eval mode (its BatchNorm running "
                   "statistics are used)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs and random weights (default 0)")
    p.add_argument("--trust-pickle", action="store_true", help=_TRUST_HELP)


def _parser() -> argparse.ArgumentParser:
    import fusers

    from exporters import targets as registry

    from .int8 import DEFAULT_MIN_SQNR as DEFAULT_SQNR
    from .int8 import UNLABELLED_AGREEMENT as UNLABELLED
    from .pipeline import default_targets, target_names
    from .sources import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog="deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reparameterize multi-branch networks into plain deploy networks, export them and verify "
                    "every artifact on its own runtime.",
        epilog="With no command, 'deploy [MODEL] [options]' runs 'deploy convert'. Plain 'deploy' converts the "
               f"built-in trained default ({DEFAULT_MODEL}) into runs/{DEFAULT_MODEL}.")
    sub = p.add_subparsers(dest="command", metavar="{convert,verify,inspect,bench,tune,detect,zoo,sweep,doctor}")

    c = sub.add_parser("convert", help="convert a model into verified artifacts",
                       description="load -> capture -> passes -> plain model (DIR/model.deploy.pt2) -> exporters "
                       "-> verification of every stage -> DIR/report.json, DIR/report.md")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"zoo name, timm:NAME, torchvision:NAME, path/to/file.py:FACTORY, or a checkpoint holding a "
                   f"whole pickled model (default {DEFAULT_MODEL}, trained weights shipped)")
    _model_args(c)
    c.add_argument("--targets", type=_targets, default=None, metavar="LIST",
                   help=f"comma-separated formats from {','.join(target_names())}, or none (default "
                   f"{','.join(default_targets())})")
    c.add_argument("--precision", choices=sorted({p for t in registry.all_targets() for p in t.precisions}),
                   default="fp32",
                   help="artifact precision (the .pt2 and the main ONNX file stay fp32; default fp32)")
    c.add_argument("--dynamic", action="store_true", help="dynamic batch dimension where the format allows it")
    c.add_argument("--passes", type=_passes, default=None, metavar="LIST",
                   help=f"comma-separated passes; 'default' expands to {','.join(fusers.DEFAULT_PASSES)}")
    c.add_argument("--inputs", metavar="NPZ", help="real samples: an .npz with one input array (N, ...) and "
                   "optionally integer 'labels' (N,) for accuracy checks")
    c.add_argument("--rtol", type=_positive_float, help="relative tolerance (default by precision: fp32 1e-5, "
                   "fp16 1e-2)")
    c.add_argument("--atol", type=_positive_float, default=0.0, help="absolute tolerance (default 0)")
    c.add_argument("--opset", type=_opset, default=18, help="ONNX opset, from 17 up to the newest the installed "
                   "onnx defines (default 18)")
    q = c.add_argument_group("INT8 (--precision int8)", "calibrated INT8 artifacts beside the fp32 ones, judged by "
                             "an accuracy guard on held-out samples (never the calibration ones)")
    q.add_argument("--calibration", metavar="PATH", help="calibration data: an .npz of inputs, a folder of images, or "
                   "'seeded' (random inputs; default: the model's shipped training split, seeded for random weights)")
    q.add_argument("--calibration-size", type=_at_least(1, 100_000), default=128, metavar="N",
                   help="calibration samples used (default 128)")
    q.add_argument("--int8-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="how activation ranges are calibrated (default minmax)")
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per output "
                   "channel)")
    q.add_argument("--max-drop", type=_positive_float, default=1.0, metavar="POINTS",
                   help="largest accuracy drop of an INT8 artifact, in points, with labelled samples (default 1.0)")
    q.add_argument("--min-agreement", type=_fraction, metavar="F", help="least top-1 agreement of an INT8 artifact "
                   f"with the fp32 model (0..1; default {UNLABELLED} without labels)")
    q.add_argument("--min-sqnr", type=_finite, metavar="DB", help="least output SQNR in dB of an INT8 artifact "
                   f"(default {DEFAULT_SQNR:g} dB where neither accuracy nor agreement applies)")
    q.add_argument("--int8-fallback", choices=("off", "auto"), default="auto", help="auto: keep the most sensitive "
                   "layers in float until the drop is within half of --max-drop (default auto)")
    q.add_argument("--weight-rounding", choices=("nearest", "mse"), default="nearest", help="mse: choose each "
                   "output channel's int8 weight grid by an MSE search over clipping ranges, kept where that raises "
                   "the held-out INT8 SQNR (default nearest)")
    q.add_argument("--bias-correction", choices=("auto", "off"), default="auto", help="auto: subtract the mean "
                   "error of the int8-rounded weights from each layer's bias where that raises the held-out INT8 "
                   "SQNR (default auto)")
    q.add_argument("--mean", type=_floats, metavar="LIST", help="per-channel mean for a folder of calibration "
                   "images (default: the model's, else ImageNet's)")
    q.add_argument("--std", type=_stds, metavar="LIST", help="per-channel std for a folder of calibration images")
    d = c.add_argument_group("detection (--nms)", "YOLO-style detectors: NMS inside the ONNX and OpenVINO artifacts "
                             "(model.nms.onnx, model.nms.xml), verified by matching boxes; other stages apply the "
                             "same NMS on the host")
    d.add_argument("--nms", action="store_true", help="append decode + NMS: outputs num_dets, boxes (xyxy), scores, "
                   "classes per image")
    d.add_argument("--conf", type=_fraction, default=0.25, help="score threshold, 0..1 (default 0.25)")
    d.add_argument("--iou", type=_fraction, default=0.45, help="IoU threshold of NMS, 0..1 (default 0.45)")
    d.add_argument("--max-det", type=_at_least(1, 100_000), default=300, metavar="N",
                   help="detections per image at most (default 300)")
    d.add_argument("--classes-agnostic", action="store_true", help="one NMS over all classes (default: per class)")
    c.add_argument("--strict-plain", action="store_true", help="exit 1 when the deploy graph keeps anything that "
                   "could have merged (a BatchNorm, a sum of parallel linear branches, an in-place write); the "
                   "run is written either way and report.md lists them")
    c.add_argument("--out", metavar="DIR", help="output directory (default runs/<model>, which replaces an earlier "
                   "run there unless someone added files to it)")
    c.add_argument("--force", action="store_true", help="replace an existing --out directory written by deploy")
    _common(c)

    v = sub.add_parser("verify", help="re-run the verification of a convert output directory")
    v.add_argument("dir", metavar="DIR", help="output directory of deploy convert")
    v.add_argument("--rtol", type=_positive_float, help="relative tolerance (default: the run's)")
    v.add_argument("--atol", type=_positive_float, help="absolute tolerance (default: the run's)")
    v.add_argument("--allow-changed", action="store_true", help="verify files whose sha256 differs from the "
                   "report as they are now (without it a changed file fails its stage: it is not the artifact that "
                   "was verified)")
    v.add_argument("--trust-pickle", action="store_true", help="load a changed .pt2, or one that would unpickle "
                   "(this runs code from it): only for files from a source you trust")
    _common(v)

    i = sub.add_parser("inspect", help="op summary of a model or an artifact (.pt2, .onnx, .xml, .tflite)")
    i.add_argument("target", metavar="MODEL_OR_ARTIFACT")
    _model_args(i)
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    _common(i)

    b = sub.add_parser("bench", help="measure the artifacts' latency on their runtimes",
                       description="time each verified artifact of a deploy convert run on its runtime (a MODEL is "
                       "converted first); results are appended to DIR/report.json and report.md with a chart")
    b.add_argument("target", nargs="?", default=DEFAULT_MODEL, metavar="DIR_OR_MODEL",
                   help=f"output directory of deploy convert, or a MODEL to convert first (default {DEFAULT_MODEL})")
    b.add_argument("--runtimes", type=_runtimes, metavar="LIST",
                   help=f"comma-separated from {','.join(registry.runtimes())} (default: every runtime the run has a "
                   "verified artifact for)")
    b.add_argument("--threads", type=_at_least(1), metavar="N", help="threads per runtime (default: the CPUs this "
                   "process may use)")
    b.add_argument("--batch", type=_batches, default=(1,), metavar="LIST", help="batch sizes, e.g. 1,8 (default 1)")
    b.add_argument("--warmup-ms", type=_milliseconds, default=200.0, help="warm-up time per form (default 200)")
    b.add_argument("--warmup-iters", type=_at_least(0, MAX_ITERS), default=5,
                   help="warm-up calls per form, at least (default 5)")
    b.add_argument("--min-ms", type=_milliseconds, default=2000.0,
                   help="measured time per form, at least (default 2000)")
    b.add_argument("--min-iters", type=_at_least(2, MAX_ITERS), default=20,
                   help="measured calls per form, at least (default 20)")
    b.add_argument("--compare-train", action="store_true", help="also export the training form the same way and "
                   "time it interleaved with the deploy form: the speed-up of reparameterization")
    b.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="device of the torch runtime; on cuda it times fp32, fp16 and channels-last with CUDA events")
    b.add_argument("--isolation", choices=("subprocess", "none"), default="subprocess",
                   help="time each runtime in its own process (default) or all in this one")
    b.add_argument("--no-chart", dest="chart", action="store_false", help="do not draw bench-N.png")
    b.add_argument("--model", metavar="MODEL", help="the training model of a run directory DIR, as deploy convert was "
                   "given it (with --checkpoint, --code-path, ...): for --compare-train, other batch sizes and the "
                   "training form's cost model; a run directory's report never chooses code to run, so only a "
                   "built-in model (zoo, timm:, torchvision:) is reloaded from it")
    _model_args(b)
    b.add_argument("--out", metavar="DIR", help="where to convert a MODEL (default runs/<model>)")
    b.add_argument("--force", action="store_true", help="replace an existing --out directory written by deploy")
    b.add_argument("--allow-changed", action="store_true", help="time artifacts whose sha256 differs from the "
                   "run's report (refused without it: they are not the artifacts that were verified)")
    _common(b)

    t = sub.add_parser("tune", help="choose the deploy form for this machine by measuring it",
                       description="convert, judge and time every candidate (runtime x precision x passes x threads) "
                       "under an accuracy bound; write OUT/best/ with deploy.json, OUT/report.md, OUT/pareto.png")
    t.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL_OR_DIR",
                   help=f"what convert takes, or a deploy convert output directory of a zoo, timm or torchvision model "
                   f"(that model, at the run's input shape; default {DEFAULT_MODEL})")
    t.add_argument("--runtimes", type=_runtimes, metavar="LIST", help="comma-separated runtimes (default: every "
                   "runtime; those this machine cannot run are pruned, saying why)")
    t.add_argument("--precisions", type=_runtimes, default=("fp32", "fp16", "bf16", "int8"), metavar="LIST",
                   help="comma-separated precisions (default fp32,fp16,bf16,int8)")
    t.add_argument("--passes", dest="pass_sets", type=_runtimes, default=("default",), metavar="LIST",
                   help="comma-separated pass sets from default, default+rm, default+equalize, default+grow "
                        "(default: default)")
    t.add_argument("--threads", type=_thread_counts, metavar="LIST", help="thread counts, e.g. 1,2 (default: the CPUs "
                   "this process may use)")
    t.add_argument("--batch", type=_at_least(1), default=1, help="batch size (default 1)")
    t.add_argument("--objective", choices=("latency", "throughput"), default="latency",
                   help="rank by p50 latency or by samples per second (default latency)")
    t.add_argument("--max-drop", type=_positive_float, default=1.0, metavar="POINTS",
                   help="largest accuracy drop against the fp32 training model, with labels (default 1.0)")
    t.add_argument("--min-agreement", type=_fraction, metavar="F", help="least top-1 agreement with the fp32 "
                   "training model (default 0.9 without labels)")
    t.add_argument("--budget-s", type=_positive_float, default=600.0, metavar="S",
                   help="time for the whole search; when it runs out the best so far is chosen (default 600)")
    t.add_argument("--calibration", metavar="PATH", help="INT8 calibration data (as for convert)")
    _model_args(t)
    t.add_argument("--out", metavar="DIR", help="output directory (default runs/tune-<model>)")
    t.add_argument("--force", action="store_true", help="replace an existing --out directory written by deploy tune")
    _common(t)

    d = sub.add_parser("detect", help="run a converted detector on images and draw its boxes",
                       description="run the verified artifact of a detector's deploy convert run (the one ending in "
                       "NMS when there is one, else NMS on the host) on an image or a folder of images; draw the "
                       "boxes, labels and scores into PNGs")
    d.add_argument("dir", metavar="DIR", help="output directory of deploy convert on a detector")
    d.add_argument("images", metavar="IMAGE_OR_FOLDER", help="an image (PNG, JPEG, BMP, ...) or a folder of them; "
                   "each is resized to the model's input (aspect ratio not kept) and scaled to [0, 1]")
    d.add_argument("--runtime", help="the runtime to run (default: the first with a verified artifact)")
    d.add_argument("--out", metavar="PNG_OR_DIR", help="the PNG for one image (default <image>.detections.png), "
                   "a folder for a folder (default <folder>.detections)")
    d.add_argument("--force", action="store_true", help="replace an existing --out")
    _common(d)

    z = sub.add_parser("zoo", help="list the built-in models")
    _common(z)
    _sweep_parser(sub)
    _doctor_parser(sub)
    p.set_defaults(commands=sub.choices)
    return p


def _params(text: str) -> int:
    from .sweep import parse_count

    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sweep_parser(sub) -> None:
    w = sub.add_parser("sweep", help="convert a catalogue of models and tabulate what passes",
                       description="run deploy convert on every model and precision in its own process (with a "
                       "timeout and a memory cap), beside the peer path (the same model through torch.onnx.export "
                       "and ONNX Runtime); OUT/results.jsonl (one line per job), OUT/sweep.md, OUT/sweep.png. A "
                       "rerun into the same OUT runs only the jobs not recorded there",
                       epilog="Exit status: 0 when every job ran, even if some failed (the table is the result); 2 "
                       "for bad input (no models, a pattern matching nothing, a bad option, an OUT that is not a "
                       "sweep directory, a Ray cluster that cannot be reached); 130 after Ctrl-C (the finished jobs "
                       "stay in the table; rerun to go on).")
    w.add_argument("models", nargs="*", metavar="MODEL", help="what deploy convert takes, or timm:PATTERN / "
                   "torchvision:PATTERN (fnmatch wildcards, quoted: 'timm:resnet*')")
    w.add_argument("--list", dest="list_file", metavar="FILE", help="a file of models, one a line (# comments)")
    w.add_argument("--sample", type=_at_least(1), metavar="N", help="N models of each pattern, drawn with --seed "
                   "(default: every match)")
    w.add_argument("--seed", type=_seed, default=0, help="seed of the --sample draw (default 0; the conversions use "
                   "convert's default seed)")
    w.add_argument("--max-params", type=_params, metavar="P", help="only pattern models with at most P parameters, "
                   "counted on the meta device (e.g. 25M)")
    w.add_argument("--targets", type=_targets, default=("onnx",), metavar="LIST", help="targets of every job (default "
                   "onnx)")
    w.add_argument("--precisions", type=_runtimes, default=("fp32",), metavar="LIST",
                   help="comma-separated precisions, one job each (default fp32)")
    w.add_argument("--bench", action="store_true", help="deploy bench every converted run (p50 per runtime in the "
                   "record)")
    w.add_argument("--compare-export", action="store_true", help="also time timm's reparameterize_model + "
                   "torch.export.export in the peer process (the baseline column)")
    w.add_argument("--out", metavar="DIR", default="runs/sweep", help="sweep directory (default runs/sweep)")
    w.add_argument("--timeout", type=_positive_float, default=900.0, metavar="S",
                   help="seconds per job process before it is killed (default 900)")
    w.add_argument("--memory", type=_positive_float, metavar="GB", help="resident memory per job (its whole process "
                   "group) before it is killed (default: 80%% of the available memory over the workers)")
    w.add_argument("--workers", type=_at_least(1), metavar="N", help="jobs at once on this machine (default 1)")
    w.add_argument("--rerun-failed", action="store_true", help="also rerun the jobs recorded as not passing")
    w.add_argument("--ray", metavar="auto|ADDRESS", help="run the jobs as Ray tasks on an existing cluster (HOST:PORT "
                   "of its head, or auto); needs pip install 'reparam-deploy[ray]'")
    _common(w)


def _doctor_parser(sub) -> None:
    from .doctor import CHECK_TIMEOUT, MAX_CHECKS, SAMPLES

    o = sub.add_parser("doctor", help="say where a stage of a convert run loses accuracy or fails",
                       description="diagnose the stages of a deploy convert output directory that failed or changed "
                       "(or --stage): an fp32 stage that disagrees -> the first tensor where it diverges from the "
                       "plain graph; an INT8 stage -> the per-layer table and the float scope; an export or runtime "
                       "failure -> the smallest failing ONNX subgraph, written to DIR/doctor/reduced.onnx",
                       epilog="Exit status: 0 when the diagnosis ran (the table is the result), 2 for bad input.")
    o.add_argument("dir", metavar="DIR", help="output directory of deploy convert")
    o.add_argument("--stage", metavar="NAME", help="the stage to diagnose (default: every stage that failed or "
                   "whose files changed since conversion)")
    o.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    o.add_argument("--out", metavar="DIR", help="where a reduced subgraph is written (default DIR/doctor)")
    o.add_argument("--samples", type=_at_least(0, 100_000), default=SAMPLES, metavar="N",
                   help=f"held-out samples compared besides the seeded input (default {SAMPLES})")
    o.add_argument("--max-checks", type=_at_least(1, 10_000), default=MAX_CHECKS, metavar="N",
                   help=f"runtime checks of a reduction, at most (default {MAX_CHECKS})")
    o.add_argument("--check-timeout", type=_width, default=CHECK_TIMEOUT, metavar="S",
                   help=f"seconds of one runtime check before it counts as a hang (default {CHECK_TIMEOUT:g})")
    o.add_argument("--trust-pickle", action="store_true", help=_TRUST_HELP)
    _common(o)


# ----------------------------------------------------------------------------------------------- output

class _Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self, quiet: bool):
        self.quiet, self.start = quiet, time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)
    if not verbose:
        for noisy in ("py.warnings", "torch", "onnxscript", "onnx_ir", "absl", "tensorflow", "litert_torch",
                      "ai_edge_quantizer", "runtimes.compare", "nncf", "torch.utils.cpp_extension"):  # the result table says what compare warns
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")


def _quiet_native_logs() -> None:
    """TensorFlow / LiteRT C++ logging (oneDNN notices, XNNPACK delegate lines) off unless already configured."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _stage_lines(stages) -> str:
    from .report import stage_table, text_table

    return text_table(*stage_table(stages))


def _verdict(stages, failures: list[str]) -> str:
    n = len(stages) - 1
    unrun = sum(1 for s in stages[1:] if s.verification.not_run and not s.export.error)
    tail = f"; {unrun} written, not run here" if unrun else ""
    if failures:
        return f"{len(failures)} of {n} stage(s) FAILED{tail}"
    return ("the stage passes" if n - unrun == 1 else f"all {n - unrun} stages pass") + tail


def _int8_lines(q: dict) -> str:
    """INT8 summary after the stage table: calibration, equalize, fallbacks, the five worst layers."""
    from .report import fallback_note

    lines = [f"\nINT8: calibrated on {q['calibration']['source']}; judged on {q['evaluation']}"]
    eq = q.get("equalize") or {}
    if "sqnr_db" in eq:
        lines.append(f"equalize {'applied' if eq['chosen'] else 'not applied'}: INT8 output SQNR "
                     f"{eq['sqnr_db']['default']:.2f} dB without, {eq['sqnr_db']['equalize']:.2f} dB with")
    wr = q.get("weight_rounding") or {}
    if "sqnr_db" in wr:
        lines.append(f"MSE weight rounding {'applied' if wr['chosen'] else 'not applied'}: INT8 output SQNR "
                     f"{wr['sqnr_db']['nearest']:.2f} dB nearest, {wr['sqnr_db']['mse']:.2f} dB MSE")
    elif wr.get("reason"):
        lines.append(f"MSE weight rounding not applied: {wr['reason']}")
    bc = q.get("bias_correction") or {}
    if "sqnr_db" in bc:
        lines.append(f"bias correction {'applied' if bc['chosen'] else 'not applied'}: INT8 output SQNR "
                     f"{bc['sqnr_db']['without']:.2f} dB without, {bc['sqnr_db']['with']:.2f} dB with")
    decode = [s["name"] for s in q.get("float_scope", []) if s.get("op") != "layer"]
    if decode:
        lines.append(f"float scope: {len(decode)} op(s) after the last conv of each output kept in float (decode: "
                     f"{', '.join(decode[:6])}{' ...' if len(decode) > 6 else ''})")
    for f in q.get("fallbacks", []):
        lines.append(f"fallback {f['stage']}: {fallback_note(f).removeprefix('--int8-fallback auto: ')}")
    layers = [r for r in q.get("layers", []) if "name" in r][:5]
    if layers:
        lines.append("worst layers (ONNX Runtime QDQ vs fp32; dB lost in the layer, output SQNR, weight max/median "
                     "per channel):")
        lines += [f"  {r['name']:<14} {r['lost_db']:6.1f} dB lost  {r['sqnr_out_db']:6.1f} dB  max/median "
                  f"{(r.get('weights') or {}).get('max_median_ratio', float('nan')):.1f}" for r in layers]
    return "\n".join(lines)


def _failures(stages) -> list[str]:
    return [f"FAILED {s.name} ({s.path or 'not written'}): {s.reason}" for s in stages
            if s.failed and s.name != "training"]


_INT8_FLAGS = (("--calibration", "calibration", None), ("--calibration-size", "calibration_size", 128),
               ("--int8-method", "int8_method", "minmax"), ("--per-tensor", "per_tensor", False),
               ("--max-drop", "max_drop", 1.0), ("--min-agreement", "min_agreement", None),
               ("--min-sqnr", "min_sqnr", None), ("--int8-fallback", "int8_fallback", "auto"),
               ("--bias-correction", "bias_correction", "auto"), ("--weight-rounding", "weight_rounding", "nearest"),
               ("--mean", "mean", None), ("--std", "std", None))


_NMS_FLAGS = (("--conf", "conf", 0.25), ("--iou", "iou", 0.45), ("--max-det", "max_det", 300),
              ("--classes-agnostic", "classes_agnostic", False))


def cmd_convert(args) -> int:
    from .pipeline import ConvertOptions, NmsOptions, convert

    command = "deploy " + " ".join(shlex.quote(a) for a in args.argv) if args.argv else "deploy"
    opts = ConvertOptions(
        model=args.model, checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, code_path=args.code_path,
        num_classes=args.num_classes, width=args.width, input_shape=args.input_shape, targets=args.targets,
        precision=args.precision, dynamic=args.dynamic, passes=args.passes, inputs=args.inputs, rtol=args.rtol,
        atol=args.atol, out=args.out, force=args.force, allow_train_mode=args.allow_train_mode, seed=args.seed,
        opset=args.opset, command=command, trust_pickle=args.trust_pickle, calibration=args.calibration,
        calibration_size=args.calibration_size, int8_method=args.int8_method, per_tensor=args.per_tensor,
        max_drop=args.max_drop, min_agreement=args.min_agreement, min_sqnr=args.min_sqnr,
        int8_fallback=args.int8_fallback, bias_correction=args.bias_correction,
        weight_rounding=args.weight_rounding, mean=args.mean, std=args.std,
        nms=NmsOptions(args.conf, args.iou, args.max_det, args.classes_agnostic) if args.nms else None)
    for flags, needs, on in ((_INT8_FLAGS, "--precision int8", args.precision == "int8"),
                             (_NMS_FLAGS, "--nms", args.nms)):
        given = [flag for flag, dest, default in flags if getattr(args, dest) != default]
        if given and not on:
            raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {needs} only: add "
                             f"{needs} or drop {'it' if len(given) == 1 else 'them'}")
    result = convert(opts, progress=_Progress(args.quiet))
    print(_stage_lines(result.stages))
    report = result.report
    samples = report["inputs"].get("samples")
    training = result.stages[0]
    if samples and samples["labels"] and training.verification.accuracy is not None:
        print(f"\ntask check on {samples['count']} held-out samples: training-form accuracy "
              f"{100 * training.verification.accuracy:.2f}%; every stage's accuracy and agreement are in the table")
    if report.get("int8"):
        print(_int8_lines(report["int8"]))
    failures = _failures(result.stages)
    for line in failures:
        print(line)
    left = report["reparameterize"].get("left_unfused") or []
    if left:
        print(f"\nleft unfused: {len(left)}" + "".join(f"\n  {x['kind']} {x['site']}: {x['reason']}" for x in left[:10])
              + (f"\n  ... {len(left) - 10} more in report.md" if len(left) > 10 else ""))
    print(f"\n{_verdict(result.stages, failures)}; report: {os.path.join(result.out_dir, 'report.md')} "
          f"({report['timings']['total']:.1f} s)")
    if left and args.strict_plain:
        print(f"--strict-plain: {len(left)} site(s) left unfused (listed above); the deploy graph is not plain")
        return EXIT_FAILED
    return EXIT_OK if result.passed else EXIT_FAILED


def cmd_verify(args) -> int:
    from .pipeline import verify

    result = verify(args.dir, rtol=args.rtol, atol=args.atol, progress=_Progress(args.quiet),
                    allow_changed=args.allow_changed, trust_pickle=args.trust_pickle)
    print(_stage_lines(result.stages))
    failures = _failures(result.stages)
    for line in failures:
        print(line)
    for problem in result.reference:
        print(f"FAILED the recorded reference: {problem}; the stages are judged by these files: rerun deploy convert, "
              "or pass --allow-changed to verify with them as they are")
    for note in result.notes:
        print(f"note: {note}")
    changed = [s.name for s in result.stages if s.verification.changed]
    if changed:
        print(f"changed since convert (sha256 differs): {', '.join(changed)}; "
              + ("verified again as they are now (--allow-changed)" if args.allow_changed else
                 "a changed file is not the artifact that was verified: rerun deploy convert, or pass "
                 "--allow-changed to verify the files as they are now"))
    tol = result.tolerance
    verdict = _verdict(result.stages, failures) + ("; the recorded reference FAILED its check" if result.reference
                                                   else "")
    print(f"\n{verdict} (rtol {tol['rtol'] or 'by precision'}, atol {tol['atol']}; {result.seconds:.1f} s)")
    return EXIT_OK if result.passed else EXIT_FAILED


def cmd_detect(args) -> int:
    from .detection import detect_images
    from .report import text_table

    stage, found, names = detect_images(args.dir, args.images, runtime=args.runtime, out=args.out,
                                        force=args.force, progress=_Progress(args.quiet))
    for f in found:
        rows = [[names[int(c)] if int(c) < len(names) else str(int(c)), f"{float(sc):.3f}",
                 ", ".join(f"{v:.1f}" for v in b)] for b, sc, c in zip(f.boxes, f.scores, f.classes)]
        print(f"{f.image}: {len(rows)} detection(s) -> {f.picture}")
        if rows:
            print(text_table(["class", "score", "box x0, y0, x1, y1"], rows))
    print(f"\n{stage.name} ({stage.path}) on {len(found)} image(s)")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from exporters import targets as registry

    from .inspect import inspect_path, inspect_source

    target = args.target
    if registry.by_suffix(target) is not None:
        summary = inspect_path(target, trust_pickle=args.trust_pickle)
    else:
        summary = inspect_source(target, args.input_shape, checkpoint=args.checkpoint,
                                 checkpoint_key=args.checkpoint_key, code_path=args.code_path,
                                 num_classes=args.num_classes, width=args.width,
                                 allow_train_mode=args.allow_train_mode, seed=args.seed,
                                 trust_pickle=args.trust_pickle)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.summary())
    return EXIT_OK


def cmd_bench(args) -> int:
    from runtimes.bench import BenchSettings

    from .bench import BenchOptions, bench
    from .pipeline import ConvertOptions
    from .report import bench_table, text_table

    command = "deploy " + " ".join(shlex.quote(a) for a in args.argv)
    try:
        settings = BenchSettings(warmup_iters=args.warmup_iters, warmup_ms=args.warmup_ms, min_iters=args.min_iters,
                                 min_ms=args.min_ms)
    except ValueError as e:
        raise ValueError(f"{e}: fix --min-iters / --warmup-iters") from None
    conv = ConvertOptions(
        model=args.target, checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, code_path=args.code_path,
        num_classes=args.num_classes, width=args.width, input_shape=args.input_shape, out=args.out, force=args.force,
        allow_train_mode=args.allow_train_mode, seed=args.seed, command=command, trust_pickle=args.trust_pickle)
    opts = BenchOptions(args.target, model=args.model, runtimes=args.runtimes, threads=args.threads, batches=args.batch,
                        settings=settings, compare_train=args.compare_train, device=args.device,
                        isolation=args.isolation, chart=args.chart, convert=conv, command=command,
                        allow_changed=args.allow_changed, trust_pickle=args.trust_pickle)
    result = bench(opts, progress=_Progress(args.quiet))
    entry = result.entry
    print(text_table(*bench_table(entry)))
    for s in entry["speedups"]:
        print(f"{s['runtime']} {s['variant']} batch {s['batch']}: deploy form {s['speedup']:.2f}x the training "
              f"form's speed (p50 {s['training_p50']:.3f} -> {s['deploy_p50']:.3f} ms)")
    for s in entry.get("int8_speedups", []):
        print(f"{s['runtime']} batch {s['batch']}: INT8 {s['speedup']:.2f}x the fp32 deploy form's speed (p50 "
              f"{s['fp32_p50']:.3f} -> {s['int8_p50']:.3f} ms)")
    for s in entry.get("nms_shares", []):
        print(f"{s['runtime']} batch {s['batch']}: NMS takes {100 * s['share']:.0f}% of the end-to-end time (p50 "
              f"{s['deploy_p50']:.3f} ms without it, {s['nms_p50']:.3f} ms with it)")
    for note in entry["notes"]:
        print(f"note: {note}")
    failed = [r for r in entry["results"] if "error" in r]
    print(f"\nreport: {os.path.join(result.out_dir, 'report.md')}"
          + (f"; chart: {result.chart}" if result.chart else "") + f" ({entry['seconds']:.1f} s)")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_tune(args) -> int:
    progress = _Progress(args.quiet)
    progress("deploy tune: importing torch and the converters ...")  # seconds on a cold start: say so
    from .pipeline import ConvertOptions
    from .report import text_table
    from .tune import TuneOptions, tune
    from .tune_report import candidate_table, pruned_lines, table_notes

    command = "deploy " + " ".join(shlex.quote(a) for a in args.argv)
    conv = ConvertOptions(
        model=args.model, checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, code_path=args.code_path,
        num_classes=args.num_classes, width=args.width, input_shape=args.input_shape,
        allow_train_mode=args.allow_train_mode, seed=args.seed, trust_pickle=args.trust_pickle)
    opts = TuneOptions(model=args.model, runtimes=args.runtimes, precisions=args.precisions, passes=args.pass_sets,
                       threads=args.threads, batch=args.batch, objective=args.objective, max_drop=args.max_drop,
                       min_agreement=args.min_agreement, budget_s=args.budget_s, calibration=args.calibration,
                       out=args.out, force=args.force, convert=conv, command=command)
    result = tune(opts, progress=progress)
    print(text_table(*candidate_table(result.candidates, result.chosen, args.objective)))
    print("\n".join(table_notes(result.candidates, result.chosen, args.objective, result.peer)))
    pruned = pruned_lines(result.candidates)
    if pruned:
        print("\npruned before any measurement:\n" + "\n".join(f"  {p}" for p in pruned))
    peer = result.peer.get("stats")
    if result.cut_short:
        print(f"\nthe search was cut short by --budget-s {args.budget_s:g}: the best candidate measured so far is "
              "chosen")
    report = os.path.join(result.out_dir, "report.md")
    if result.chosen is None:
        closest = result.closest
        print("\nno candidate meets the accuracy bound" + (
            f"; the closest is {closest.name} ({closest.metrics.get('reason') or closest.reason})" if closest else "")
              + f"; report: {report}")
        return EXIT_FAILED
    c, s = result.chosen, result.chosen.best_stats()
    print(f"\nchosen: {c.name}, p50 {s['p50']:.3f} ms"
          + (f", {peer['p50'] / s['p50']:.2f}x the peer baseline ({result.peer['form']}, p50 {peer['p50']:.3f} ms)"
             if peer else "")
          + f"\nbest/: {os.path.join(result.out_dir, 'best')} (deploy.json); report: {report} ({result.seconds:.0f} s)")
    return EXIT_OK


def cmd_sweep(args) -> int:
    from .sweep import SweepOptions, run_sweep
    from .sweep_report import job_line, summary_lines

    opts = SweepOptions(specs=args.models, list_file=args.list_file, sample=args.sample, seed=args.seed,
                        max_params=args.max_params, targets=args.targets, precisions=args.precisions,
                        bench=args.bench, compare_export=args.compare_export, out=args.out, timeout=args.timeout,
                        memory_gb=args.memory, workers=args.workers, rerun_failed=args.rerun_failed, ray=args.ray)
    try:
        result = run_sweep(opts, on_result=lambda k, n, r: print(_printable(job_line(k, n, r)), flush=True),
                           progress=_Progress(args.quiet))
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        print(f"deploy sweep: {'terminated (SIGTERM)' if terminated else 'interrupted'}; the running jobs were "
              f"killed, the finished ones are in {os.path.join(args.out, 'sweep.md')}: run the same command again "
              "to go on", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    print("\n" + "\n".join(_printable(line) for line in summary_lines(result.records)))
    print(f"\ntable: {result.table}" + (f"; chart: {result.chart}" if result.chart else "")
          + f" ({result.ran} job(s) run, {result.skipped} already recorded)")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from .doctor import doctor
    from .report import text_table

    found = doctor(args.dir, stage=args.stage, out=args.out, trust_pickle=args.trust_pickle, samples=args.samples,
                   max_checks=args.max_checks, check_timeout=args.check_timeout,
                   progress=_Progress(args.quiet))
    if args.json:
        print(json.dumps({"run": args.dir, "diagnoses": [d.to_dict() for d in found]}, indent=2, default=str))
        return EXIT_OK
    for i, d in enumerate(found):
        print(("\n" if i else "") + _printable(text_table(d.headers, [[str(c) for c in r] for r in d.rows])))
        for note in d.notes:
            print(_printable(f"note: {note}"))
        print(_printable(f"\n{d.conclusion}"))
    return EXIT_OK


def cmd_zoo(args) -> int:
    from . import zoo

    import textwrap

    from .report import text_table

    headers = ["model", "input", "weights", "description"]
    rows = [[name, "x".join(map(str, zoo.input_shape(name)[1:])), "trained" if zoo.has_weights(name) else "random"]
            for name in zoo.names()]
    columns = 100  # the description takes what the first three columns leave; continuation lines sit under it
    left = sum(max(len(h), *(len(r[i]) for r in rows)) + 2 for i, h in enumerate(headers[:3]))
    lines = []
    for row, name in zip(rows, zoo.names()):
        wrapped = textwrap.wrap(zoo.describe(name), width=max(columns - left, 30), break_on_hyphens=False)
        lines.append(row + wrapped[:1])
        lines += [["", "", "", cont] for cont in wrapped[1:]]
    print(text_table(headers, lines))
    return EXIT_OK


def _errors() -> tuple[type[BaseException], ...]:
    import fusers
    from runtimes.core import DeployError

    from .sources import SourceError

    # ValueError: a bad argument value found by a library function (unknown pass, unknown extension, ...)
    return (SourceError, DeployError, fusers.CaptureError, fusers.InputError, FileNotFoundError, ValueError)


_AT_FORK: list[bool] = []  # the at-fork reset of SIGTERM is registered once per process


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that a run removes its partial output."""


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`_Terminated` while a command runs (a second one is ignored during the cleanup).
    A process forked from this one (a library's helper) gets the default SIGTERM back, so it dies of it."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child that did not go through the at-fork reset
            _default_sigterm()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
        if not _AT_FORK:
            os.register_at_fork(after_in_child=_default_sigterm)
            _AT_FORK.append(True)
    except ValueError:  # not the main thread (deploy.cli.main called from a worker thread): signals stay as they are
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _printable(text: str) -> str:
    """``text`` safe for a terminal: bytes that are not UTF-8 (a path's) and control characters (which a crafted
    report could hold) escaped."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _os_error(e: OSError) -> str:
    """One sentence for an operating-system refusal (a read-only folder, a file where a folder should be)."""
    where = f": {e.filename}" if e.filename else ""
    return f"{(e.strerror or str(e)).lower()}{where}; check the path and its permissions"


def _parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; an unknown option is refused by its command's parser, naming the closest
    option that command has (``--precison``: did you mean --precision?)."""
    args, unknown = _parser().parse_known_args(argv)
    if unknown:
        command = args.commands[args.command]
        options = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
        word = unknown[0].split("=", 1)[0]
        guess = difflib.get_close_matches(word, options, n=1, cutoff=0.75) if word.startswith("-") else []
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        command.error(f"unrecognized argument{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["convert", *argv]
    _quiet_native_logs()
    args = _parse(argv)
    args.argv = argv
    _setup_logging(args.verbose)
    handlers = {"convert": cmd_convert, "verify": cmd_verify, "inspect": cmd_inspect, "bench": cmd_bench,
                "tune": cmd_tune, "detect": cmd_detect, "zoo": cmd_zoo, "sweep": cmd_sweep,
                "doctor": cmd_doctor}
    if hasattr(signal, "SIGXFSZ"):  # over ulimit -f a write fails with EFBIG (said in one sentence), not a core dump
        with contextlib.suppress(ValueError):  # (not the main thread: signals stay as they are)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with _sigterm_as_interrupt():
            return handlers[args.command](args)
    except BrokenPipeError:  # e.g. piped into head
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except (PermissionError, NotADirectoryError, IsADirectoryError) as e:
        print(f"deploy {args.command}: error: {_printable(_os_error(e))}.", file=sys.stderr)
        if args.verbose:
            logging.getLogger(__name__).exception("details")
        return EXIT_ERROR
    except Exception as e:
        from .resources import disk_failure, no_space_message

        interrupt = _interrupt_behind(e)
        if interrupt is not None:  # Ctrl-C or SIGTERM that a library wrapped (an import's __set_name__ error)
            return _interrupted(args.command, interrupt)
        full = disk_failure(e)  # out of disk space: exit 1, like a failed stage, and not the model's fault
        expected = full is not None or isinstance(e, _errors())
        if full is not None:
            message = no_space_message(full)
        elif expected:
            message = str(e)
        else:  # a bug of ours or of a library: one sentence, the traceback with -v
            from runtimes.core import first_line

            message = (f"internal error ({type(e).__name__}: {first_line(e).rstrip('.')}); run again with -v for "
                       "the traceback and report it")
        print(f"deploy {args.command}: error: {_printable(message.strip().rstrip('.'))}.", file=sys.stderr)
        if args.verbose:
            logging.getLogger(__name__).exception("details")
        return EXIT_ERROR if full is None and expected else EXIT_FAILED
    except KeyboardInterrupt as e:
        return _interrupted(args.command, e)


def _interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM among the causes of ``e`` (``__cause__`` / ``__context__``), if one is."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _interrupted(command: str, e: KeyboardInterrupt) -> int:
    terminated = isinstance(e, _Terminated)
    print(f"deploy {command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; nothing was written",
          file=sys.stderr)
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # 143 and 130, as a shell reports them


if __name__ == "__main__":
    sys.exit(main())
