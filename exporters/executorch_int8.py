"""INT8 ExecuTorch through XNNPACK's PT2E quantizer: :func:`quantize_executorch`.

The plain torch module is quantized, not the fp32 ``.pte`` (the fp32 artifact gives the names and the
parent): ExecuTorch's ``XNNPACKQuantizer`` annotates the graph, torchao's ``prepare_pt2e`` inserts
observers, the calibration inputs (``Int8Options.calibration``, never the evaluation samples) run through
it, ``convert_pt2e`` turns the observers into quantize/dequantize pairs, and the XNNPACK partitioner
lowers each dequantize -> op -> quantize pattern to one int8 XNNPACK kernel (``exporters.executorch.
write_program``). Inputs and outputs stay float32: the program quantizes after the input and
dequantizes before the output.

The numbers are XNNPACK's symmetric config: int8 weights, ``z = 0``, ``q`` in ``[-127, 127]``, one scale
per output channel (``per_channel``) or per tensor; activations affine int8 per tensor over the range the
observer of ``method`` reads (``exporters.pt2e``); biases int32 at ``s_in * s_w`` (XNNPACK computes them
from the float bias). Which ops become int8 is the quantizer's choice: conv (+ReLU), linear (+ReLU),
add (+ReLU), mul (+ReLU), cat and adaptive average pooling, with the ops that only move values (max-pool,
flatten, reshape) sharing their input's range. ``exclude`` names plain-graph nodes (``"conv2d_3"``) no
pattern may take (the quantizer's filter function), so they compute in float.
``metadata["int8"]["ops"]`` counts, in the quantized graph before lowering, the ops that read a
dequantized input (``int8``) and the rest (``float``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from runtimes.core import Artifact, ExportError, first_line, require

from ._torch import recaptured
from .executorch import EXTRA, describe_pte, write_program
from .int8 import Int8Options
from .pt2e import activation_observer, adjust_weights, calibrate, check_exclude, int8_note, int8_record, plain_args

__all__ = ["quantize_executorch", "int8_ops"]

log = logging.getLogger(__name__)

_QDQ = ("quantize_per_tensor", "quantize_per_channel", "dequantize_per_tensor", "dequantize_per_channel")


def _quantizer(options: Int8Options, kept: Sequence[str]):
    """XNNPACK's static symmetric quantizer, its activation observer from ``options.method``, that leaves the
    nodes named in ``kept`` alone."""
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)

    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    excluded = frozenset(kept)

    class _Quantizer(XNNPACKQuantizer):
        def annotate(self, model):  # its cat pattern does not ask the filter: marked annotated-with-nothing first
            for node in model.graph.nodes:
                if node.name in excluded:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
            return super().annotate(model)

    base = get_symmetric_quantization_config(is_per_channel=options.per_channel, is_dynamic=False)
    act = dataclasses.replace(base.input_activation, observer_or_fake_quant_ctr=activation_observer(options))
    quantizer = _Quantizer().set_global(dataclasses.replace(base, input_activation=act, output_activation=act))
    if excluded:
        quantizer.set_filter_function(lambda node: node.name not in excluded)
    return quantizer


def int8_ops(gm) -> dict[str, dict[str, int]]:
    """The compute ops of a quantized (``convert_pt2e``) graph by what they compute in: ``int8`` when an input
    comes from a dequantize and the output goes to a quantize (XNNPACK runs the pattern on int8 tensors), directly
    or through the one activation fused into it (conv -> relu -> quantize, which counts as int8 too), else
    ``float``."""
    def kind(node) -> str:
        return getattr(node.target, "__name__", str(node.target)).split(".")[0]

    def dequantized(node) -> bool:
        return any(getattr(a, "op", "") == "call_function" and kind(a).startswith("dequantize")
                   for a in node.all_input_nodes)

    def quantized(node) -> bool:
        return bool(node.users) and all(kind(u).startswith("quantize") for u in node.users)

    def fused(node) -> bool:  # a lone activation between an int8 op and its quantize
        return (len(node.all_input_nodes) == 1 and len(node.all_input_nodes[0].users) == 1
                and dequantized(node.all_input_nodes[0]) and quantized(node))

    out: dict[str, Counter] = {"int8": Counter(), "float": Counter()}
    for node in gm.graph.nodes:
        if node.op != "call_function" or kind(node) in _QDQ or kind(node) == "getitem":
            continue
        into_activation = len(node.users) == 1 and fused(next(iter(node.users)))
        int8 = (dequantized(node) and (quantized(node) or into_activation)) or fused(node)
        out["int8" if int8 else "float"][kind(node)] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def _batches(options: Int8Options, arg):
    import torch

    for part in options.batches():
        if tuple(part.shape[1:]) != tuple(arg.shape[1:]):
            raise ValueError(f"calibration samples have shape {tuple(part.shape[1:])}; the ExecuTorch program takes "
                             f"{tuple(arg.shape[1:])}.")
        yield torch.from_numpy(part)


def quantize_executorch(src: Artifact, path, options: Int8Options, module=None, args=None) -> Artifact:
    """An INT8 ExecuTorch program at ``path`` made from the plain ``module`` (traced on ``args``) with the
    calibration of ``options``; ``src`` is the fp32 ``.pte`` artifact (names, parent). See the module
    docstring."""
    executorch = require("executorch", EXTRA, "ExecuTorch int8 quantization")
    require("torchao", EXTRA, "ExecuTorch int8 quantization")
    import torch

    args = plain_args(module, args, "ExecuTorch", "a .pte program cannot be calibrated")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    gm = recaptured(module, args)  # XNNPACK's annotators read every weight's fake value (``meta["val"]``)
    check_exclude(gm, options.exclude)
    adjusted = adjust_weights(gm, options)
    kept = options.kept_in_float(n.name for n in gm.graph.nodes)
    converted, samples = calibrate(gm, _quantizer(options, kept), _batches(options, args[0]), fold_quantize=True)
    ops = int8_ops(converted)
    try:
        ep = torch.export.export(converted, args, strict=False)
    except Exception as e:
        raise ExportError(f"torch.export cannot capture the quantized model for ExecuTorch: {first_line(e)}") from e
    delegated, backends, portable = write_program(ep, path)
    art = describe_pte(path, input_names=src.input_names, output_names=src.output_names, precision="int8",
                       parent=src.path)
    left = {k: v for k, v in portable.items() if k.startswith(("quantize", "dequantize"))}
    if left:
        log.warning("%s: %d quantize/dequantize op(s) were not lowered to XNNPACK: %s", path, sum(left.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(left.items())))
    version = getattr(executorch, "__version__", "?")
    art.metadata.update(
        exporter=f"executorch {version} (XnnpackPartitioner)", delegated_calls=delegated, backends=backends,
        portable_ops=portable,
        int8=int8_record(options, f"executorch {version} XNNPACKQuantizer, torchao prepare_pt2e/convert_pt2e", samples,
                         kept, ops, **adjusted))
    art.note(int8_note("XNNPACK PT2E", options, samples, kept, sum(ops["int8"].values()), sum(ops["float"].values()))
             + (f"; {sum(portable.values())} op(s) on the portable kernels" if portable else ""))
    log.info("quantized %s -> %s (int8, %d calibration samples)", src.path, path, samples)
    return art
