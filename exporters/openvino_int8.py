"""INT8 OpenVINO IR through NNCF post-training quantization of the fp32 IR: :func:`quantize_openvino`.

``nncf.quantize`` runs the calibration inputs through the fp32 IR on the CPU plugin (fp32 inference)
and rewrites it:

- activations: a ``FakeQuantize`` (256 levels, one range per tensor; per channel at a depthwise
  convolution's input, NNCF's choice for CPUs) on the inputs of every quantizable op
  (Convolution, GroupConvolution, MatMul, Add, pooling, ...), over a range
  ``[a, b]`` read by the estimator ``method`` maps to (below); the CPU plugin fuses each into the
  next op's u8/i8 kernel;
- weights: symmetric int8 with ``s = max|W| / 127``, one scale per output channel (``per_channel``,
  NNCF's default for OpenVINO; ``s_c = max|W_c| / 127``) or one per tensor
  (``AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(
  per_channel=False))``). NNCF folds each weight ``FakeQuantize`` into an int8 constant:
  ``Constant(i8) -> Convert(f32) -> Multiply(s)``, so the ``.bin`` holds int8 weights and the scale
  constant has shape ``(C_out, 1, 1, 1)`` per channel, ``()`` per tensor (:func:`int8_weights`);
- biases: fast bias correction (NNCF's default) shifts each quantized layer's bias by the mean
  output error quantization causes on the calibration inputs;
- preset ``performance`` (NNCF's default for CNNs): symmetric activations too;
  ``options.extra["preset"] = "mixed"`` makes activations asymmetric.

Range estimators for activations (weights always use their own min/max):

========== ===========================================================================================
minmax     ``RangeEstimatorParametersSet.MINMAX``: the smallest and largest value over all calibration
           inputs (NNCF's own default for per-tensor activations is ``MEAN_MINMAX``, the mean of the
           per-batch extremes; "minmax" here means what it means for ONNX Runtime's MinMax calibrator)
percentile ``MEAN_QUANTILE`` with outlier probability ``1 - p / 100``: the ``(100 - p)`` and ``p``
           quantiles of each calibration batch, averaged over the batches
entropy    NNCF has no KL-divergence estimator; ``HISTOGRAM`` is the closest: the range minimising the
           L2 quantization error over a histogram of the activations (PyTorch's HistogramObserver
           search). ``metadata["int8"]["range_estimator"]`` says which was used
========== ===========================================================================================

Layer names: the IR is converted from this project's ONNX file, whose node for the plain graph's
``conv2d_3`` is ``node_conv2d_3``. OpenVINO splits a Conv (Gemm) with a bias into a Convolution
(MatMul) named ``node_conv2d_3/WithoutBiases`` and an Add named ``node_conv2d_3`` (the model's last
Add takes the output's name, e.g. ``output0``); without a bias the Convolution keeps
``node_conv2d_3``. :func:`layer_names` maps ``conv2d_3`` to the op's friendly name by dropping the
``/WithoutBiases`` suffix and the ``node_`` prefix; ``exclude`` goes to ``nncf.IgnoredScope`` as
friendly names (an excluded op gets neither an input nor a weight quantizer).

NNCF's calibration ``subset_size`` counts dataset items: here one item is one batch of the IR's
static batch (``Int8Options.batches``), so ``subset_size`` is the number of batches.

:func:`quantize_openvino_with_accuracy_control`: ``nncf.quantize_with_accuracy_control`` quantizes,
validates on labelled (or reference-labelled) held-out inputs, and reverts the layers that cost
the most accuracy to float, one group at a time, until the top-1 metric is within ``max_drop``
points of the fp32 IR's (NNCF's ``DropType.ABSOLUTE`` on a metric in ``[0, 1]``: points / 100).

NNCF logs to its own stdout handler and draws rich progress bars; while it runs here both are set
aside, so the command line owns the terminal: its warnings become the artifact's notes (e.g. the
HISTOGRAM estimator falling back to MINMAX at a per-channel activation quantizer), its other
records go to this module's logger at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from runtimes.core import Artifact, ExportError, first_line, require

from .int8 import Int8Options
from .openvino import describe_openvino

__all__ = ["quantize_openvino", "quantize_openvino_with_accuracy_control", "layer_names", "int8_weights",
           "LAYER_TYPES"]

log = logging.getLogger(__name__)
_EXTRA = "openvino"

LAYER_TYPES = ("Convolution", "GroupConvolution", "MatMul")
_PASS_THROUGH = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Convert")  # between a weight and its layer
_ESTIMATORS = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}


def _ov():
    return require("openvino", _EXTRA, "OpenVINO INT8 quantization")


def _nncf():
    return require("nncf", _EXTRA, "OpenVINO INT8 quantization")  # its telemetry is off: core.telemetry_off


# ------------------------------------------------------------------------------------------------- names

def _model(model_or_path):
    if isinstance(model_or_path, (str, os.PathLike, Artifact)):
        path = model_or_path.path if isinstance(model_or_path, Artifact) else os.fspath(model_or_path)
        return _ov().Core().read_model(path)
    return model_or_path


def _layer_name(friendly: str) -> str:
    return friendly.removesuffix("/WithoutBiases").removeprefix("node_")


def layer_names(model_or_path) -> dict[str, str]:
    """``{layer name: friendly name}`` of the Convolution, GroupConvolution and MatMul ops of an IR (an
    ``ov.Model``, a path or an artifact): ``"conv2d_3" -> "node_conv2d_3/WithoutBiases"``. A name two ops
    would share (an IR not converted from this project's ONNX files) stays the friendly name."""
    ops = [op for op in _model(model_or_path).get_ordered_ops() if op.get_type_name() in LAYER_TYPES]
    names = [_layer_name(op.get_friendly_name()) for op in ops]
    count = Counter(names)
    return {(name if count[name] == 1 else op.get_friendly_name()): op.get_friendly_name()
            for name, op in zip(names, ops)}


def _friendly(exclude, names: dict[str, str]) -> list[str]:
    """The friendly names of the ``exclude`` layers (layer names, or friendly names themselves)."""
    friendly = set(names.values())
    unknown = [e for e in exclude if e not in names and e not in friendly]
    if unknown:
        raise ValueError(f"cannot exclude unknown layer(s) {', '.join(unknown)} from OpenVINO INT8 quantization; "
                         f"the IR's layers are {', '.join(names) or 'none'}")
    return [names.get(e, e) for e in exclude]


def _source(node):
    return node.input(0).get_source_output().get_node()


def _is_int8_constant(node) -> bool:
    while node.get_type_name() in ("Convert", "Subtract"):
        node = _source(node)
    return node.get_type_name() == "Constant" and node.get_output_element_type(0).get_type_name() in ("i8", "u8")


def _shape(port) -> tuple[int, ...]:
    return tuple(port.get_partial_shape().to_shape())


def _weights(op) -> tuple[str, tuple[int, ...] | None]:
    """What feeds ``op``'s second input: ``("int8", scale shape)`` (``Constant(i8) -> Convert -> Multiply(scale)``,
    or a FakeQuantize on a constant), ``("float", None)`` (a float constant) or ``("activation", None)``."""
    node = op.input(1).get_source_output().get_node()
    while node.get_type_name() in _PASS_THROUGH and not _is_int8_constant(node):
        node = _source(node)
    kind = node.get_type_name()
    if kind == "Constant":
        return "float", None
    if kind == "FakeQuantize" and _weights_of(node) == "Constant":  # NNCF with compress_weights off
        return "int8", _shape(node.input(1))
    if kind == "Multiply":
        for i in range(2):
            if _is_int8_constant(node.input(i).get_source_output().get_node()):
                return "int8", _shape(node.input(1 - i))
    return "activation", None


def _weights_of(fake_quantize) -> str:
    node = _source(fake_quantize)
    while node.get_type_name() in _PASS_THROUGH:
        node = _source(node)
    return node.get_type_name()


def int8_weights(model_or_path) -> dict[str, tuple[int, ...] | None]:
    """``{layer name: shape of its int8 weight scale, or None when its weights are float}`` for the layers of
    :func:`layer_names` with constant weights. Per channel the scale has one value per output channel:
    ``(C_out, 1, 1, 1)`` for a Convolution, ``(groups, C_out / groups, 1, 1, 1)`` for a GroupConvolution,
    ``(N, 1)`` for a MatMul; per tensor it is a scalar, ``()``."""
    model = _model(model_or_path)
    names = {friendly: name for name, friendly in layer_names(model).items()}
    out = {}
    for op in model.get_ordered_ops():
        if op.get_friendly_name() in names and op.get_type_name() in LAYER_TYPES:
            kind, scale = _weights(op)
            if kind != "activation":
                out[names[op.get_friendly_name()]] = scale
    return out


def _count(model, kind: str) -> int:
    return sum(op.get_type_name() == kind for op in model.get_ordered_ops())


# ------------------------------------------------------------------------------------------ quiet NNCF

class _Collect(logging.Handler):
    """Keeps NNCF's warnings (they become the artifact's notes) and passes its other records to this module's
    logger at DEBUG."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip()
        if record.levelno >= logging.WARNING:
            self.warnings.append(message)
        else:
            log.debug("nncf: %s", message)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[list[str]]:
    """While NNCF runs: its records collected instead of printed (its own stdout handler set aside; the list of
    its warnings is yielded) and its rich progress bars off (the global rich console made quiet); both restored
    afterwards."""
    import rich

    logger = logging.getLogger("nncf")
    saved = logger.handlers[:], logger.propagate
    collect = _Collect()
    console = rich.get_console()
    quiet = console.quiet
    logger.handlers, logger.propagate = [collect], False
    console.quiet = True
    try:
        yield collect.warnings
    finally:
        logger.handlers, logger.propagate = saved
        console.quiet = quiet


# ------------------------------------------------------------------------------------------- quantize

def _estimator(options: Int8Options):
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    params = getattr(RangeEstimatorParametersSet, _ESTIMATORS[options.method])
    if options.method == "percentile":
        params = replace(params, min=replace(params.min, quantile_outlier_prob=1 - options.percentile / 100),
                         max=replace(params.max, quantile_outlier_prob=1 - options.percentile / 100))
    return params


def _advanced(nncf, options: Int8Options, overflow_fix: str = "first_layer_only"):
    from nncf.quantization.advanced_parameters import OverflowFix, QuantizationParameters

    return nncf.AdvancedQuantizationParameters(
        activations_range_estimator_params=_estimator(options), overflow_fix=OverflowFix(overflow_fix),
        weights_quantization_params=QuantizationParameters(per_channel=options.per_channel))


def overflow_fixes(options: Int8Options) -> tuple[str, ...]:
    """The NNCF overflow-fix settings to try. On a CPU without an int8 dot product (no VNNI / AMX) the CPU plugin
    sums u8 x s8 pairs in saturating int16 (``vpmaddubsw``), which full 8-bit weights can overflow; NNCF's default
    fixes the first layer only, ``enable`` uses 7-bit weights everywhere (safe, but coarser). There both are made
    and the one whose output is closer to the fp32 IR's on the calibration inputs is kept (it depends on the
    network: -3.8 against 19.3 dB SQNR for one, 20.3 against 13.4 dB for RepVGG-A0). ``options.extra
    ["overflow_fix"]`` chooses one."""
    from runtimes.hardware import cpu_facts

    if options.extra.get("overflow_fix"):
        return (options.extra["overflow_fix"],)
    return ("first_layer_only",) if cpu_facts()["low_precision"]["int8_native"] else ("first_layer_only", "enable")


def _closest(ov, fp32, candidates: dict, batches: list) -> tuple[str, dict]:
    """The overflow-fix setting whose quantized model's outputs on ``batches`` have the highest SQNR against the
    fp32 model's, and every setting's SQNR."""
    from runtimes.int8 import sqnr_db

    core = ov.Core()

    def outputs(model):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.concatenate([np.asarray(compiled(b)[0]).reshape(len(b), -1) for b in batches])

    ref = outputs(fp32)
    sqnr = {name: float(sqnr_db(ref, outputs(q))) for name, q in candidates.items()}
    return max(sqnr, key=sqnr.get), sqnr


def _preset(nncf, options: Int8Options):
    name = options.extra.get("preset", "performance")
    try:
        return name, nncf.QuantizationPreset(name)
    except ValueError as e:
        raise ExportError(f"unknown NNCF preset {name!r} in Int8Options.extra; choose performance or mixed.") from e


class _Job(NamedTuple):
    """One quantization, checked: the fp32 model read from ``src_path``, the ``options`` at the IR's batch and the
    friendly names of the excluded layers (``ignored``)."""

    ov: Any
    model: Any
    src_path: str
    src_art: Artifact | None
    path: Path
    options: Int8Options
    ignored: list[str]


def _prepare(src, path, options: Int8Options) -> _Job:
    ov = _ov()
    src_art = src if isinstance(src, Artifact) else None
    src_path = src.path if src_art is not None else os.fspath(src)
    if src_art is not None and src_art.precision != "fp32":
        raise ExportError(f"OpenVINO INT8 quantization starts from an fp32 IR, got {src_art.precision} {src_path}.")
    if not src_path.endswith(".xml"):
        raise ExportError(f"OpenVINO INT8 quantization reads an OpenVINO IR (.xml), got {src_path}.")
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"OpenVINO IR paths end in .xml, got {path}.")
    model = ov.Core().read_model(src_path)
    if len(model.inputs) != 1:
        raise ExportError(f"OpenVINO INT8 calibration feeds one input; {src_path} has {len(model.inputs)}.")
    dims = list(model.inputs[0].get_partial_shape())
    want = tuple(d.get_length() if d.is_static else None for d in dims)
    got = options.calibration.shape
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want[1:], got[1:])):
        raise ExportError(f"calibration inputs of shape {got[1:]} per sample do not fit {src_path}'s input "
                          f"{want}; give samples of the model's input shape.")
    if want[0] is not None and want[0] != options.batch:
        options = replace(options, batch=want[0])
    ignored = _friendly(options.exclude, layer_names(model))
    every = {_layer_name(op.get_friendly_name()): op.get_friendly_name() for op in model.get_ordered_ops()}
    ignored += [every[n] for n in options.kept_in_float(every)[len(options.exclude):] if every[n] not in ignored]
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_suffix(".bin")):
        if stale.exists():
            stale.unlink()
    return _Job(ov, model, src_path, src_art, path, options, ignored)


def _save(job: _Job, nncf, quantized, preset: str, warnings: list[str]) -> Artifact:
    ov, path, src_path, options, ignored = job.ov, job.path, job.src_path, job.options, job.ignored
    ov.save_model(quantized, os.fspath(path), compress_to_fp16=False)
    art = describe_openvino(path, precision="int8", parent=src_path, template=job.src_art)
    weights = int8_weights(quantized)
    float_layers = [name for name, scale in weights.items() if scale is None]
    art.metadata.update(
        source="openvino", compress_to_fp16=False, inference_precision_hint="f32",
        exporter=f"nncf {nncf.__version__}, openvino {ov.__version__}",
        int8={"tool": f"nncf {nncf.__version__}", "preset": preset, "per_channel": options.per_channel,
              "method": options.method, "range_estimator": _ESTIMATORS[options.method],
              **({"percentile": options.percentile} if options.method == "percentile" else {}),
              "calibration_samples": len(options.calibration), "batch": options.batch,
              "fake_quantize": _count(quantized, "FakeQuantize"),
              "int8_weight_layers": len(weights) - len(float_layers), "float_layers": float_layers,
              "excluded": list(options.exclude), "ignored_scope": list(ignored),
              "float_scope": list(ignored[len(options.exclude):])})
    for message in dict.fromkeys(warnings):
        art.note(f"NNCF: {message}")
    if options.method == "entropy":
        art.note("NNCF has no entropy (KL) range estimator: activations use its HISTOGRAM estimator (the range "
                 "minimising the L2 quantization error)")
    art.note(f"NNCF {nncf.__version__} INT8 ({preset} preset, {'per-channel' if options.per_channel else 'per-tensor'}"
             f" weights, {_ESTIMATORS[options.method]} activation ranges, {len(options.calibration)} calibration "
             f"samples): {_count(quantized, 'FakeQuantize')} FakeQuantize, {len(weights) - len(float_layers)} of "
             f"{len(weights)} layers with int8 weights; run with INFERENCE_PRECISION_HINT=f32")
    log.info("quantized %s -> %s with NNCF", src_path, path)
    return art


def quantize_openvino(src, path, options: Int8Options, module=None, args=None) -> Artifact:
    """Quantize the fp32 OpenVINO IR ``src`` (an :class:`Artifact` or ``.xml`` path) with NNCF into an int8 IR at
    ``path`` (``.xml``; int8 weights in the ``.bin`` beside it), calibrated on ``options.calibration``.
    ``module``/``args`` are unused (the IR is quantized, not the torch module)."""
    nncf = _nncf()
    job = _prepare(src, path, options)
    preset_name, preset = _preset(nncf, job.options)
    batches = list(job.options.batches())
    made = {}
    try:
        with _quiet_nncf() as warnings:
            for fix in overflow_fixes(job.options):
                made[fix] = nncf.quantize(
                    job.model, nncf.Dataset(batches), preset=preset, subset_size=len(batches),
                    ignored_scope=nncf.IgnoredScope(names=job.ignored) if job.ignored else None,
                    advanced_parameters=_advanced(nncf, job.options, fix))
    except Exception as e:
        raise ExportError(f"NNCF could not quantize {job.src_path}: {first_line(e)}") from e
    chosen, sqnr = next(iter(made)), {}
    if len(made) > 1:
        chosen, sqnr = _closest(job.ov, job.model, made, batches[:8])
    art = _save(job, nncf, made[chosen], preset_name, warnings)
    art.metadata["int8"]["overflow_fix"] = {"chosen": chosen, "sqnr_db": sqnr}
    if sqnr:
        art.note(f"this CPU has no int8 dot product: NNCF overflow fix {chosen!r} kept (output SQNR on the "
                 f"calibration inputs: {', '.join(f'{k} {v:.1f} dB' for k, v in sqnr.items())})")
    return art


# ---------------------------------------------------------------------------------- accuracy control

def _top1(compiled, x: np.ndarray) -> np.ndarray:
    return np.asarray(compiled(x)[0]).reshape(len(x), -1).argmax(1)


def _items(x: np.ndarray, targets: np.ndarray, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(inputs, targets)`` in batches of ``batch``; the last one padded with its last row, target -1 (not
    counted)."""
    out = []
    for i in range(0, len(x), batch):
        xs, ts = x[i:i + batch], targets[i:i + batch]
        pad = batch - len(xs)
        if pad:
            xs = np.concatenate([xs, np.repeat(xs[-1:], pad, axis=0)])
            ts = np.concatenate([ts, np.full(pad, -1, dtype=ts.dtype)])
        out.append((np.ascontiguousarray(xs, dtype=np.float32), ts))
    return out


def _validator(items) -> Callable:
    """NNCF's ``validation_fn(compiled_model, items) -> (top-1 metric, per-item metric)``."""
    def validate(compiled, data) -> tuple[float, list[float]]:
        hits, counts = [], []
        for xs, ts in data:
            keep = ts >= 0
            hits.append(float(np.sum(_top1(compiled, xs)[keep] == ts[keep])))
            counts.append(float(keep.sum()))
        return sum(hits) / max(sum(counts), 1.0), [h / max(c, 1.0) for h, c in zip(hits, counts)]

    return validate


def _metric(ov, model, items) -> float:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return _validator(items)(compiled, items)[0]


def quantize_openvino_with_accuracy_control(src, path, options: Int8Options, validation_x: np.ndarray,
                                            labels: np.ndarray | None = None, *,
                                            reference_predictions: np.ndarray | None = None, max_drop: float = 1.0,
                                            max_iterations: int = 5) -> Artifact:
    """Like :func:`quantize_openvino`, with ``nncf.quantize_with_accuracy_control``: layers go back to float, the
    costliest first, until the top-1 metric on ``validation_x`` (held out: not the calibration inputs) is at most
    ``max_drop`` accuracy points (percent) below the fp32 IR's, or ``max_iterations`` groups were reverted.

    The metric is top-1 accuracy against ``labels``; without labels, top-1 agreement with
    ``reference_predictions`` (class indices), by default the fp32 IR's own predictions.
    ``metadata["int8"]["accuracy_control"]`` records the metric, the fp32 and int8 values, the drop, and the
    layers reverted to float (those with float weights that were not in ``exclude``).
    """
    nncf = _nncf()
    job = _prepare(src, path, options)
    preset_name, preset = _preset(nncf, job.options)
    x = np.ascontiguousarray(validation_x, dtype=np.float32)
    batch = job.options.batch
    metric = "accuracy" if labels is not None else "agreement"
    if labels is None and reference_predictions is None:
        fp32 = job.ov.Core().compile_model(job.model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        reference_predictions = np.concatenate(
            [_top1(fp32, xs) for xs, _ in _items(x, np.zeros(len(x), np.int64), batch)])[:len(x)]
    targets = np.asarray(labels if labels is not None else reference_predictions).astype(np.int64).reshape(-1)
    if len(targets) != len(x):
        what = "labels" if labels is not None else "reference predictions"
        raise ValueError(f"{len(x)} validation inputs but {len(targets)} {what}; give one per input")
    items = _items(x, targets, batch)
    batches = list(job.options.batches())
    try:
        with _quiet_nncf() as warnings:
            quantized = nncf.quantize_with_accuracy_control(
                job.model, nncf.Dataset(batches), nncf.Dataset(items, lambda item: item[0]), _validator(items),
                max_drop=max_drop / 100, drop_type=nncf.DropType.ABSOLUTE, preset=preset, subset_size=len(batches),
                ignored_scope=nncf.IgnoredScope(names=job.ignored) if job.ignored else None,
                # the safe overflow fix where the CPU needs one: accuracy control reverts the layers it costs
                advanced_quantization_parameters=_advanced(nncf, job.options, overflow_fixes(job.options)[-1]),
                advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(
                    max_num_iterations=max_iterations))
    except Exception as e:
        raise ExportError(f"NNCF could not quantize {job.src_path} with accuracy control: {first_line(e)}") from e
    art = _save(job, nncf, quantized, preset_name, warnings)
    reference, reached = _metric(job.ov, job.model, items), _metric(job.ov, quantized, items)
    kept = {name for name, friendly in layer_names(job.model).items() if friendly in job.ignored}
    reverted = [name for name in art.metadata["int8"]["float_layers"] if name not in kept]
    drop = 100 * (reference - reached)
    art.metadata["int8"]["accuracy_control"] = {
        "metric": metric, "validation_samples": len(x), "max_drop_points": max_drop, "fp32": reference,
        "int8": reached, "drop_points": drop, "reverted": reverted, "passed": drop <= max_drop + 1e-9}
    art.note(f"NNCF accuracy control: top-1 {metric} {100 * reached:.2f}% vs fp32 {100 * reference:.2f}% "
             f"({drop:.2f} points, max {max_drop:g}) on {len(x)} held-out samples; "
             f"{len(reverted)} layer(s) reverted to float" + (f" ({', '.join(reverted)})" if reverted else ""),
             logging.INFO if drop <= max_drop + 1e-9 else logging.WARNING)
    return art
