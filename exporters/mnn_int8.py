"""INT8 MNN: MNN's offline quantization tool (``quantized.out`` / ``_tools.mnnquant``) on the fp32 ``.mnn``.

The tool reads a JSON config and a folder of calibration samples. Samples are written as MNN's "sequence"
input: one folder per calibration batch (``Int8Options.batches()``, at the artifact's batch), holding
``<input name>.txt`` (the values, whitespace-separated) and ``input.json`` (the shape); ``batch_size`` 1 makes
every folder one step (with a larger ``batch_size`` MNN's EMA loop keeps only the last folder of each batch).
Only ``Int8Options.calibration`` is written, never the evaluation samples.

What comes out: convolutions with int8 weights (symmetric, ``s_c = max|W_c| / 127``, one scale per output
channel: MNN has no per-tensor weight option) and int8 inputs and outputs (symmetric activations,
``q = clamp(round(x / s), -127, 127)``), int8 tensors between them, and float only where an op has no int8
kernel; the record's ``metadata["int8"]`` counts them from the written file.

Methods (``Int8Options.method``) onto MNN's ``feature_quantize_method``; MNN has no other ones:

- ``minmax`` -> ``EMA``: MNN turns the model into a fake-quantized one and runs the calibration batches through
  it, each activation range an exponential moving average of the batches' extremes (not the extremes of all
  samples), with Winograd-aware ranges for 3x3 convolutions. It is MNN's recommended method.
- ``entropy`` -> ``KL``: TensorRT's KL-divergence threshold over a histogram of each activation.
  MNN 3.6.1's KL path crashed (SIGSEGV) on ``repvgg_digits``; a crash is reported as a failed stage.
- ``percentile``: refused (MNN has no percentile method).
- ``options.extra["mnn_method"]`` picks one of ``EMA``, ``KL``, ``ADMM`` (an iterative search of each
  activation's scale that minimizes its quantization error) directly.

``exclude``: layers named as the plain model's graph nodes (``conv2d_3``: the ONNX exporter's node
``node_conv2d_3`` writes tensor ``conv2d_3``, and MNN names an op by its ONNX output tensor), go to
``skip_quant_op_names``; the written file is checked, and a layer the tool quantized anyway
(its EMA method does not read that list) makes the quantization fail rather than claim a float layer.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from runtimes.core import Artifact, ExportError, require_installed

from .int8 import Int8Options, check_calibration
from .mnn import (CONV_TYPES, EXTRA, describe_mnn, dump_json, int8_summary, last_message, nonfinite_scales,
                  run_tool)

__all__ = ["quantize_mnn", "METHODS"]

log = logging.getLogger(__name__)

METHODS = {"minmax": "EMA", "entropy": "KL"}  # ours -> MNN's feature_quantize_method
MNN_METHODS = ("EMA", "KL", "ADMM")


def _method(options: Int8Options) -> str:
    chosen = options.extra.get("mnn_method")
    if chosen is not None:
        if chosen not in MNN_METHODS:
            raise ExportError(f"MNN's quantization tool has no method {chosen!r}; choose one of "
                              f"{', '.join(MNN_METHODS)}.")
        return chosen
    if options.method not in METHODS:
        raise ExportError(f"MNN's quantization tool has no {options.method} calibration (it offers EMA, KL and "
                          "ADMM); use --int8-method minmax (MNN's EMA) or entropy (MNN's KL).")
    return METHODS[options.method]


def _write_samples(folder: Path, name: str, options: Int8Options) -> int:
    count = 0
    for i, batch in enumerate(options.batches()):
        sample = folder / f"{i:06d}"
        sample.mkdir()
        np.savetxt(sample / f"{name}.txt", batch.reshape(1, -1), fmt="%.9g")
        (sample / "input.json").write_text(json.dumps({"inputs": [{"name": name, "shape": list(batch.shape)}]}))
        count += 1
    return count


def _check(src: Artifact, options: Int8Options) -> str:
    name = check_calibration(src, options)
    if not options.per_channel:
        raise ExportError("MNN's quantization tool always gives each output channel its own weight scale; "
                          "drop --per-tensor for the mnn target.")
    return name


def quantize_mnn(src: Artifact | str | os.PathLike, path, options: Int8Options, module=None,
                 args=None) -> Artifact:
    """Write an INT8 copy of the fp32 MNN model ``src`` at ``path``, calibrated on ``options.calibration`` with
    MNN's quantization tool; see the module docstring. ``module`` and ``args`` are unused."""
    require_installed("MNN", EXTRA, "INT8 quantization of MNN models")
    src = src if isinstance(src, Artifact) else describe_mnn(src)
    if src.precision != "fp32":
        raise ExportError(f"MNN INT8 quantization expects an fp32 MNN model, got {src.precision} {src.path}.")
    name = _check(src, options)
    method = _method(options)
    fp32 = dump_json(src.path)
    convs = [op.get("name", "?") for op in fp32["oplists"] if op.get("type") in CONV_TYPES]
    unknown = [layer for layer in options.exclude if layer not in convs]
    if unknown:
        raise ValueError(f"cannot keep {', '.join(map(repr, unknown))} in float: {src.path} has no such layer; its "
                         f"quantizable layers are {', '.join(convs)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with tempfile.TemporaryDirectory(prefix="mnn-int8-") as tmp:
            samples = Path(tmp) / "samples"
            samples.mkdir()
            steps = _write_samples(samples, name, options)
            config = {"path": str(samples) + "/", "used_sample_num": steps, "input_type": "sequence",
                      "feature_quantize_method": method, "weight_quantize_method": "MAX_ABS",
                      "feature_clamp_value": 127, "weight_clamp_value": 127, "quant_bits": 8, "batch_size": 1,
                      "skip_quant_op_names": list(options.exclude), "debug": False}
            if "mnn_winograd" in options.extra:  # EMA's Winograd-aware int8 ranges for 3x3 convolutions (default on)
                config["winogradOpt"] = bool(options.extra["mnn_winograd"])
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            what = f"MNN's INT8 quantization of {src.path} ({method})"
            text = run_tool("mnnquant", ["quantized.out", os.path.abspath(src.path), os.path.abspath(partial),
                                         str(Path(tmp) / "config.json")], what, cwd=tmp)
            if not partial.is_file() or partial.stat().st_size == 0:
                said = last_message(text)
                raise ExportError(f"{what} wrote no model" + (f"; it said '{said}'." if said else "."))
        model = dump_json(partial)
        broken = nonfinite_scales(model)
        if broken:
            raise ExportError(f"MNN's {method} quantization gave {', '.join(broken[:3])} a NaN or infinite scale (its "
                              "calibration range is empty: its outputs were the same on every calibration sample); "
                              "calibrate on data that exercises it (--calibration).")
        summary = int8_summary(model)
        quantized_anyway = [layer for layer in options.exclude if layer not in summary["float_convolutions"]]
        if quantized_anyway:
            raise ExportError(f"MNN's {method} quantization ran {', '.join(quantized_anyway)} in int8 although it "
                              "was asked to keep it in float; use options.extra['mnn_method'] = 'ADMM' or 'KL' to "
                              "keep layers in float.")
        if summary["int8_convolutions"] == 0:
            raise ExportError(f"MNN's {method} quantization of {src.path} left every convolution in float.")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    art = describe_mnn(path, precision="int8", parent=src.path, template=src)
    art.metadata.update({k: v for k, v in src.metadata.items() if k not in ("fp16_weights",)})
    art.metadata["int8"] = {
        "tool": "MNN quantized.out (_tools.mnnquant)", "method": options.method, "mnn_method": method,
        "weights": "int8 symmetric, per output channel (MAX_ABS)", "activations": "int8 symmetric",
        "per_channel": True, "calibration_samples": int(len(options.calibration)), "calibration_steps": steps,
        "excluded": list(options.exclude), **summary}
    mapped = {"EMA": "MNN's EMA (moving average of each batch's extremes)", "KL": "MNN's KL (entropy)",
              "ADMM": "MNN's ADMM"}[method]
    art.note(f"INT8 by MNN's quantization tool: {options.method} ranges as {mapped}, from "
             f"{len(options.calibration)} calibration samples; {summary['int8_convolutions']} of "
             f"{summary['convolutions']} convolutions in int8 (int8 weights per channel, int8 activations)"
             + (f", kept in float: {', '.join(options.exclude)}" if options.exclude else ""))
    log.info("quantized %s to INT8 with MNN (%s)", path, method)
    return art

