"""What the PT2E quantizers share (litert-torch's for TFLite, XNNPACK's for ExecuTorch): observers, the layers
kept in float, calibration.

Both follow torchao's PT2E flow on the plain graph: a quantizer annotates it, ``prepare_pt2e`` inserts
observers, the calibration inputs run through it, ``convert_pt2e`` turns the observers into
quantize/dequantize pairs that the format's converter folds into int8 kernels. Both quantizers read
activation ranges with an observer made here from ``Int8Options.method`` (:func:`activation_observer`),
with the ``eps = 2^-12`` floor both configs use:

========== ============================================================================
minmax     ``MinMaxObserver``: the smallest and largest value seen
entropy    ``HistogramObserver`` (both quantizers' default): the range minimising the L2
           quantization error over a 2048-bin histogram; no KL-divergence observer exists
           in torchao's PT2E, so "entropy" is this L2 search, not TensorRT's KL method
percentile ``PercentileObserver`` (:func:`percentile_observer`): the same histogram,
           its range clipped to the ``(100 - p)`` and ``p`` percentiles
========== ============================================================================
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from runtimes.core import eval_mode

from .int8 import Int8Options

__all__ = ["OBSERVERS", "EPS", "percentile_observer", "activation_observer", "adjust_weights", "unshare_constants",
           "int8_record", "int8_note", "plain_args", "check_exclude", "calibrate"]

OBSERVERS = {"minmax": "MinMaxObserver", "entropy": "HistogramObserver (L2 error search, not KL)",
             "percentile": "PercentileObserver (histogram percentiles)"}
EPS = 2 ** -12  # the smallest scale both quantizers' observers give


@functools.cache
def percentile_observer() -> type:
    """The ``PercentileObserver`` class, defined on first use (torchao is imported only then)."""
    import torch
    from torchao.quantization.pt2e.observer import HistogramObserver

    class PercentileObserver(HistogramObserver):
        """``HistogramObserver``'s histogram, its range clipped to the ``(100 - p)`` and ``p`` percentiles
        (the bin edges at those cumulative fractions) instead of the L2 search."""

        def __init__(self, percentile: float = 99.999, **kwargs):
            super().__init__(**kwargs)
            self.percentile = float(percentile)

        def calculate_qparams(self):
            if self.min_val == float("inf"):  # never ran: the base class warns and returns defaults
                return super().calculate_qparams()
            cdf = torch.cumsum(self.histogram, 0) / torch.sum(self.histogram)
            width = (self.max_val - self.min_val) / self.bins
            q = self.percentile / 100.0
            hi = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp(max=self.bins - 1))
            lo = int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=cdf.dtype)).clamp(max=hi))
            return self._calculate_qparams(self.min_val + width * lo, self.min_val + width * (hi + 1))

    return PercentileObserver


def activation_observer(options: Int8Options):
    """The activation observer constructor ``options.method`` names (see the module docstring)."""
    from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver

    if options.method == "minmax":
        return MinMaxObserver.with_args(eps=EPS)
    if options.method == "entropy":
        return HistogramObserver.with_args(eps=EPS)
    return percentile_observer().with_args(eps=EPS, percentile=options.percentile)


def adjust_weights(gm, options: Int8Options) -> dict[str, int]:
    """The INT8 form's own weights in the graph ``gm`` it quantizes: the layers' weights clamped to the clipping
    ``--weight-rounding mse`` chose, their biases corrected (``exporters.bias_correction``), layers kept in float
    left exact. Returns how many layers were changed each way, for :func:`int8_record`."""
    from .bias_correction import apply_to_graph as correct_biases
    from .weight_rounding import apply_to_graph as clip_weights

    unshare_constants(gm)  # one layer's correction must not change another's tensor

    return {"bias_corrected": correct_biases(gm, options.bias_fixes()),
            "weights_clipped": clip_weights(gm, options.clip_fixes())}


def int8_record(options: Int8Options, tool: str, samples: int, kept: Sequence[str], ops: dict, **extra) -> dict:
    """``metadata["int8"]`` of a PT2E-quantized artifact: the tool, the observers, the calibration, the layers
    kept in float (``exclude``, then the float scope), ``extra`` (what :func:`adjust_weights` changed, ...) and
    the ops by what they compute in."""
    return {"tool": tool, "method": options.method,
            "observer": {"activations": OBSERVERS[options.method],
                         "weights": "PerChannelMinMaxObserver" if options.per_channel else "MinMaxObserver"},
            "percentile": options.percentile if options.method == "percentile" else None,
            "per_channel": options.per_channel, "calibration_samples": samples, "exclude": list(options.exclude),
            "float_scope": [n for n in kept if n not in options.exclude], **extra, "ops": ops}


def int8_note(label: str, options: Int8Options, samples: int, kept: Sequence[str], int8_ops: int,
              float_ops: int) -> str:
    """The one-line note of a PT2E-quantized artifact (``label``: the quantizer, e.g. ``XNNPACK PT2E``)."""
    return (f"int8 ({label}: {'per-channel' if options.per_channel else 'per-tensor'} weights, "
            f"{OBSERVERS[options.method]} activations, {samples} calibration samples): "
            f"{int8_ops} int8 ops, {float_ops} float op(s)"
            + (f" ({', '.join(options.exclude)} kept in float)" if options.exclude else "")
            + (f"; {len(kept) - len(options.exclude)} op(s) of the float scope (decode) kept in float"
               if len(kept) > len(options.exclude) else ""))


def plain_args(module, args, fmt: str, why: str) -> tuple:
    """``args`` as a tuple of one example input; ValueError when the plain ``module`` or its input is missing
    (``why``: why ``fmt`` cannot be calibrated from its file) or when it takes several inputs."""
    from ._torch import as_args

    if module is None or not args:
        raise ValueError(f"{fmt} int8 is quantized from the plain torch module: pass module= and args= ({why}).")
    args = as_args(args)
    if len(args) != 1:
        raise ValueError(f"{fmt} int8 calibration feeds one input; the model takes {len(args)}.")
    return args


def check_exclude(gm, exclude: Sequence[str]) -> None:
    """Refuse layers to keep in float that the plain graph ``gm`` does not have, naming the ones it has."""
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"cannot keep {', '.join(unknown)} in float: the plain graph has no such node; its layers "
                         f"are {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}.")


def unshare_constants(gm) -> int:
    """Give every reader of a constant its own attribute and ``get_attr`` node (the same storage): the plain graph
    reads equal tensors once (``fusers.graph.share_identical_weights``: timm's zero-initialized SE biases). A PT2E
    quantizer skips an op whose weight or bias node another op's pattern already annotated, leaving that conv in
    float between int8 neighbours (RegNetY's SE convs: XNNPACK then refused the program), and a bias correction
    or weight clip of one layer would replace the tensor of every layer sharing it. Returns how many readers got
    their own."""
    import torch

    from fusers.graph import add_tensor, fetch_attr

    added = 0
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and len(n.users) > 1]:
        value = fetch_attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        for user in list(node.users)[1:]:
            name = add_tensor(gm, node.target, value, parameter=isinstance(value, torch.nn.Parameter))
            with gm.graph.inserting_before(user):
                own = gm.graph.get_attr(name)
            own.meta.update(node.meta)
            user.replace_input_with(node, own)
            added += 1
    if added:
        gm.recompile()
    return added


def calibrate(gm, quantizer, batches: Iterable, *, fold_quantize: bool = False):
    """``gm`` with quantize/dequantize pairs where ``quantizer`` annotates it, its observers fed ``batches``
    (torch tensors); returns it and the number of calibration samples. ``gm`` has been through
    :func:`adjust_weights`, which gives every layer its own constants (:func:`unshare_constants`: the quantizer
    annotates each op's own weight and bias nodes). ``fold_quantize`` stores the quantized weights as int8
    constants (else a float weight and its quantize op, for converters that fold them)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    samples = 0
    with torch.no_grad(), eval_mode(gm):
        prepared = prepare_pt2e(gm, quantizer)
        for x in batches:
            prepared(x)
            samples += len(x)
        return convert_pt2e(prepared, fold_quantize=fold_quantize), samples
