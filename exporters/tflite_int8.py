"""Full-integer (int8) TFLite through litert-torch's PT2E quantizer: :func:`quantize_tflite`.

The plain torch module is quantized, not the fp32 ``.tflite`` file (the fp32 artifact gives the
names, the layout and the parent): torchao's ``prepare_pt2e`` inserts observers where litert-torch's
``PT2EQuantizer`` annotates the graph, the calibration inputs run through it, ``convert_pt2e``
turns the observers into quantize/dequantize pairs, and ``litert_torch.convert(..., quant_config=
QuantConfig(pt2e_quantizer=...))`` (the converter's ``STATIC`` QDQ mode) folds the pairs into int8
TFLite kernels.

The numbers (``q = clamp(round(x / s) + z, -128, 127)``, ``x ~ s * (q - z)``):

- weights: symmetric int8, ``z = 0``, ``q`` in ``[-127, 127]``, ``s = max(max|W| / 127, 2^-12)``
  per output channel (``per_channel``: ``W_c``) or per tensor; read with min/max observers (the floor
  ``2^-12`` is litert-torch's observer ``eps``, for activations too);
- activations: affine per tensor, ``s = (b - a) / 255``, ``z = -128 - round(a / s)``, over a range
  ``[a, b]`` (holding 0) read from the calibration inputs by the observer ``method`` maps to
  (``exporters.pt2e``: minmax, entropy = the L2 histogram search, percentile);
- biases: int32 at scale ``s_in * s_w`` (the converter computes them from the float bias).

Which ops become int8 is the quantizer's choice: conv (+ReLU), linear, add (+ReLU), mul (+ReLU), cat,
max-pool, adaptive average pool / mean, sigmoid and softmax (fixed ``1/256`` scale). Its add, mul,
cat and pool patterns find nodes by the ``source_fn_stack`` metadata, which non-strict
``torch.export`` no longer writes, so :func:`mark_sources` writes it from the aten op (otherwise
every residual add would compute in float between a DEQUANTIZE and a QUANTIZE). An op no pattern
covers (hardswish, GELU, ...) sits between the dequantize of its input and the quantize of the next
pattern's input: the converter gives it an int8 kernel where TFLite has one (HARD_SWISH), else it
computes in float. ``metadata["int8"]["ops"]`` counts the ops of each kind.

The converter runs in strict QDQ mode (:func:`_qdq_mode`): it quantizes exactly the ops between
quantize/dequantize pairs and keeps float32 inputs and outputs, with a QUANTIZE op after the input
and a DEQUANTIZE op before the output. Its default mode also quantizes float ops it can carry ranges
through and makes the edges int8 tensors; ``options.extra["io"] = "int8"`` selects it (the LiteRT
runner then quantizes and dequantizes with the edge tensors' scale and zero point), without
``exclude``.

``exclude``: the named nodes of the plain graph (``"conv2d_3"``) are marked annotated-with-nothing
before the quantizer annotates, so no pattern takes them and they compute in float (DEQUANTIZE ->
CONV_2D float -> QUANTIZE). litert-torch's own ``set_module_name`` cannot do it: it refuses a None
config ("quantization_config == None is not supported yet") and matches module paths of
``nn_module_stack``, not graph nodes (a fused conv carries its BatchNorm's path). A conv and the ReLU
fused with it form one pattern: excluding the conv keeps the ReLU in float too; excluding the ReLU
alone leaves the conv int8 and the converter folds the ReLU into it (a clamp of its int8 output).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from runtimes.core import Artifact, ExportError, require, set_training

from ._torch import recaptured
from .int8 import Int8Options
from .legalize import legalize_for_tflite
from .pt2e import activation_observer, adjust_weights, calibrate, check_exclude, int8_note, int8_record, plain_args
from .tflite import EXTRA, describe_tflite, legalize_error, quiet_litert

__all__ = ["quantize_tflite", "mark_sources", "op_summary"]

log = logging.getLogger(__name__)



def _config(options: Int8Options):
    """litert-torch's symmetric static config, its activation observer replaced according to ``options.method``."""
    import dataclasses

    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config

    base = get_symmetric_quantization_config(is_per_channel=options.per_channel, is_dynamic=False)
    act = dataclasses.replace(base.input_activation, observer_or_fake_quant_ctr=activation_observer(options))
    return dataclasses.replace(base, input_activation=act, output_activation=act)


def _quantizer(options: Int8Options, kept: Sequence[str]):
    """A ``PT2EQuantizer`` with the config of ``options`` that leaves the nodes named in ``kept`` alone."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    class _Quantizer(PT2EQuantizer):
        def annotate(self, model):
            for node in model.graph.nodes:
                if node.name in kept:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
            return super().annotate(model)

    return _Quantizer().set_global(_config(options))


def _sources() -> dict:
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    return {aten.add.Tensor: torch.add, aten.mul.Tensor: torch.mul, aten.cat.default: torch.cat,
            aten.relu.default: F.relu, aten.relu_.default: F.relu, aten.max_pool2d.default: F.max_pool2d,
            aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.mean.dim: F.adaptive_avg_pool2d}


def mark_sources(gm) -> int:
    """Write ``source_fn_stack`` (the torch function the op comes from) on the nodes that lack it and whose aten
    op one of PT2EQuantizer's source-matched patterns looks for; returns how many were marked."""
    sources, count = _sources(), 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in sources and "source_fn_stack" not in node.meta:
            node.meta["source_fn_stack"] = [(node.name, sources[node.target])]
            count += 1
    return count


def _calibration(options: Int8Options, arg, nhwc: bool):
    """The calibration batches (given in the artifact's layout) as NCHW tensors shaped like ``arg``."""
    import torch

    want = tuple(arg.shape[1:])
    given = (want[1], want[2], want[0]) if nhwc else want
    for part in options.batches():
        if tuple(part.shape[1:]) != given:
            raise ValueError(f"calibration samples have shape {tuple(part.shape[1:])}; the TFLite model's input "
                             f"takes {given}{' (NHWC)' if nhwc else ''}.")
        x = torch.from_numpy(part)
        yield (x.permute(0, 3, 1, 2) if nhwc else x).contiguous()


# ------------------------------------------------------------------------------------------ converter

@contextlib.contextmanager
def _qdq_mode(strict: bool):
    """Run litert-torch's converter with ``strict_qdq_mode`` set.

    litert-torch 0.10 builds its ``ConvertToTFLConfig`` inside ``exported_programs_to_flatbuffer`` and sets only
    ``qdq_conversion_mode``; this wraps the config's constructor for the call. Strict mode quantizes exactly
    the ops between quantize/dequantize pairs (the default also quantizes float ops it can propagate ranges
    through, undoing ``exclude``) and keeps the model's float inputs and outputs, with QUANTIZE and DEQUANTIZE
    ops at the edges (the default makes them int8 tensors).
    """
    from litert_torch._convert import litert_converter

    ext = litert_converter.converter_api_ext
    original = ext.ConvertToTFLConfig
    if strict and not hasattr(original(), "strict_qdq_mode"):
        raise ExportError("this litert-converter has no strict_qdq_mode: TFLite int8 cannot keep float inputs/"
                          "outputs or layers in float; set Int8Options.extra['io'] = 'int8' and no exclude.")

    def make():
        config = original()
        config.strict_qdq_mode = strict
        return config

    ext.ConvertToTFLConfig = make
    try:
        yield
    finally:
        ext.ConvertToTFLConfig = original


def _schema():
    return require("ai_edge_litert.schema_py_generated", EXTRA, "reading TFLite files")


def op_summary(content: bytes) -> dict[str, dict[str, int]]:
    """The ops of a TFLite model's graphs by what they compute in: ``int8`` (their first output is an integer
    tensor), ``float``, and ``convert`` (QUANTIZE / DEQUANTIZE)."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    integer = {schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16, schema.TensorType.INT32}
    out: dict[str, Counter] = {"int8": Counter(), "float": Counter(), "convert": Counter()}
    for graph in model.subgraphs:
        for op in graph.operators:
            oc = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "CUSTOM")
            kind = ("convert" if name in ("QUANTIZE", "DEQUANTIZE") else
                    "int8" if graph.tensors[op.outputs[0]].type in integer else "float")
            out[kind][name] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- quantize

def quantize_tflite(src: Artifact, path, options: Int8Options, module=None, args=None) -> Artifact:
    """A full-integer TFLite model at ``path`` made from the plain ``module`` (traced on ``args``) with the
    calibration of ``options``; ``src`` is the fp32 TFLite artifact (names, layout, parent). See the module
    docstring."""
    litert_torch = require("litert_torch", EXTRA, "TFLite int8 quantization")
    require("torchao", EXTRA, "TFLite int8 quantization")
    import torch
    from litert_torch.quantize.quant_config import QuantConfig

    args = plain_args(module, args, "TFLite", "litert-torch cannot calibrate the fp32 .tflite file")
    io = options.extra.get("io", "float32")
    if io not in ("float32", "int8"):
        raise ValueError(f"Int8Options.extra['io'] for TFLite is 'float32' or 'int8', got {io!r}.")
    if io == "int8" and options.exclude:
        raise ValueError("TFLite int8 with int8 inputs/outputs cannot keep layers in float (litert-converter's "
                         "non-strict QDQ mode quantizes them anyway); drop exclude or use extra['io'] = 'float32'.")
    layout = src.metadata.get("layout", {})
    nhwc_in = [i for i, v in enumerate(layout.get("inputs", ())) if v == "NHWC"]
    nhwc_out = [i for i, v in enumerate(layout.get("outputs", ())) if v == "NHWC"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    gm = recaptured(module, args)  # its nodes named as the ONNX export names them: the blame's layer names
    gm, _ = legalize_for_tflite(gm, args, allow_unsupported_pow=True)  # the fp32 export refused what cannot be
    check_exclude(gm, options.exclude)
    adjusted = adjust_weights(gm, options)
    kept = options.kept_in_float(n.name for n in gm.graph.nodes)
    marked = mark_sources(gm)
    quantizer = _quantizer(options, kept)
    converted, samples = calibrate(gm, quantizer, _calibration(options, args[0], bool(nhwc_in)))
    sample = args
    if nhwc_in or nhwc_out:
        converted = litert_torch.to_channel_last_io(converted, args=nhwc_in, outputs=nhwc_out)
        set_training(converted, False)
        sample = tuple(a.permute(0, 2, 3, 1).contiguous() if i in nhwc_in else a for i, a in enumerate(args))
    try:
        with quiet_litert(), torch.no_grad(), _qdq_mode(strict=io == "float32"):
            content = litert_torch.convert(converted, sample,
                                           quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content()
    except ExportError:
        raise
    except Exception as e:
        raise legalize_error(e) from e
    if path.exists():
        path.unlink()
    path.write_bytes(content)

    art = describe_tflite(path, input_names=src.input_names, output_names=src.output_names, precision="int8",
                          parent=src.path, tflite_outputs=src.metadata.get("tflite_outputs"))
    ops = op_summary(content)
    if kept and not ops["float"]:
        log.warning("%s: %s kept in float, but no op of the TFLite model computes in float", path,
                    ", ".join(kept))
    version = getattr(litert_torch, "__version__", "?")
    art.metadata.update(
        layout=layout, rewrites=list(src.metadata.get("rewrites", [])), exporter=f"litert-torch {version}",
        int8=int8_record(options, f"litert-torch {version} PT2EQuantizer, torchao {_version('torchao')} prepare_pt2e/"
                         f"convert_pt2e, litert-converter STATIC QDQ mode{' (strict)' if io == 'float32' else ''}",
                         samples, kept, ops, **adjusted, source_marked_nodes=marked, io=_edge_type(content)))
    art.note(int8_note("litert-torch PT2E", options, samples, kept, sum(ops["int8"].values()),
                       sum(ops["float"].values())) + f", {art.metadata['int8']['io']} inputs/outputs")
    log.info("quantized %s -> %s (int8, %d calibration samples)", src.path, path, samples)
    return art


def _edge_type(content: bytes) -> str:
    """``"float32"`` when every input and output of the model's graphs is float32, else ``"int8"``."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    edges = [g.tensors[i].type for g in model.subgraphs for i in list(g.inputs) + list(g.outputs)]
    return "float32" if all(t == schema.TensorType.FLOAT32 for t in edges) else "int8"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"
