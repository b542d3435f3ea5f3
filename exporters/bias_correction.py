"""Bias correction for INT8 (Nagel et al. 2019, "Data-Free Quantization", empirically): per output channel, the
mean error that rounding a layer's weights to int8 adds to its output, subtracted from its bias.

For a convolution or linear layer with weight ``W`` and bias ``b``, ``W_q`` is ``W`` rounded the way every
quantizer here rounds weights (symmetric int8, ``s = max|W| / 127`` per output channel, or per tensor, ``q`` in
``[-127, 127]``; on the clipped grid when ``--weight-rounding mse`` chose one). On the calibration
inputs, the layer's float input ``x`` gives the error ``conv(x, W_q - W)``;
its mean over the batch and the positions, per output channel ``c``, is ``e_c``, and the corrected bias is
``b_c - e_c``. In expectation the INT8 layer then adds no error of its own weights' rounding on the
calibration data (the activations' rounding is not corrected). The correction is not exact in float: it is
applied to the INT8 forms only, each quantizer in its own terms (:func:`apply_to_graph` for the PT2E
quantizers of TFLite and ExecuTorch, :func:`apply_to_onnx` for ONNX Runtime's); ``deploy.int8`` keeps it only
where it raises the INT8 output SQNR on held-out samples.

:func:`corrections` measures ``e`` on the plain graph, its layers named as the ONNX export names them
(``conv2d_3``): ``{layer: per-channel float32 array}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

__all__ = ["corrections", "apply_to_graph", "apply_to_onnx", "round_weight", "layer_tensors", "replace_tensor",
           "onnx_layer_inputs", "clamp_weight", "weight_dims"]

log = logging.getLogger(__name__)


def clamp_weight(w, clip):
    """``w`` with each output channel (or the whole tensor, for a one-value ``clip``) clamped to ``[-a, a]``."""
    import torch

    a = torch.as_tensor(np.asarray(clip), dtype=w.dtype)
    a = a.reshape(-1, *([1] * (w.dim() - 1))) if a.numel() > 1 else a.reshape(())
    return torch.minimum(torch.maximum(w, -a), a)


def weight_dims(w, per_channel: bool = True) -> tuple[int, ...]:
    """The dimensions one int8 weight scale spans: all but the output channel (axis 0), or all."""
    return tuple(range(1, w.dim())) if per_channel and w.dim() > 1 else tuple(range(w.dim()))


def round_weight(w, per_channel: bool = True, clip=None):
    """``w`` rounded to symmetric int8 and back (per output channel, axis 0, or per tensor); with ``clip``
    (``exporters.weight_rounding``), on the grid of ``w`` clamped to it, as the quantizers then see it."""
    import torch

    if clip is not None:
        w = clamp_weight(w, clip)
    dims = weight_dims(w, per_channel)
    scale = w.abs().amax(dim=dims, keepdim=True).clamp_min(2 ** -12) / 127.0
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def _layer(node) -> str:
    name = getattr(node.target, "__name__", "")
    return name.split(".")[0] if name.split(".")[0] in ("conv2d", "conv1d", "linear") else ""


def corrections(gm, batches: Iterable, per_channel: bool = True, clips: dict | None = None) -> dict[str, np.ndarray]:
    """The per-channel bias corrections ``e_c`` of every convolution and linear layer with a bias of the plain
    graph ``gm``, measured on the calibration ``batches`` (torch tensors); see the module docstring. ``clips``: the
    layers' weight clipping (``exporters.weight_rounding``), so the error is that of the weights as quantized."""
    import torch
    import torch.nn.functional as F
    from torch import fx

    clips = clips or {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            kind = _layer(n) if n.op == "call_function" else ""
            if kind and len(n.args) > 2 and n.args[2] is not None:
                x, w = self.env[n.args[0]], self.env[n.args[1]]
                dw = round_weight(w.detach(), per_channel, clips.get(n.name)) - w.detach()
                if kind == "linear":
                    err = F.linear(x, dw).reshape(-1, dw.shape[0])
                else:
                    conv = F.conv2d if kind == "conv2d" else F.conv1d
                    err = conv(x, dw, None, *n.args[3:]).transpose(0, 1).reshape(dw.shape[0], -1).T
                sums[n.name] = sums.get(n.name, 0) + err.double().sum(0)
                counts[n.name] = counts.get(n.name, 0) + err.shape[0]
            return out

    with torch.no_grad():
        for x in batches:
            _Recorder(gm).run(x)
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def layer_tensors(gm, position: int):
    """``(node, owner module, attribute)`` of every convolution and linear layer of ``gm`` whose argument at
    ``position`` (1: the weight, 2: the bias) is a ``get_attr``."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _layer(node) or len(node.args) <= position:
            continue
        arg = node.args[position]
        if getattr(arg, "op", "") == "get_attr":
            owner, _, attr = arg.target.rpartition(".")
            yield node, gm.get_submodule(owner) if owner else gm, attr


def replace_tensor(module, attr: str, value) -> None:
    """Set ``module.attr`` to the new tensor ``value``, as a frozen parameter or a buffer like the one it replaces
    (a tensor shared with another module is left as it is)."""
    import torch

    if isinstance(getattr(module, attr), torch.nn.Parameter):
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    else:
        module.register_buffer(attr, value)


def onnx_layer_inputs(model, names: dict, position: int):
    """``(key, initializer)`` of input ``position`` (1: the weight, 2: the bias) of every Conv and Gemm node of the
    ONNX ``model`` that ``names`` names (node ``node_conv2d_3`` or output ``conv2d_3``) when it is an initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        key = next((k for k in (node.name.removeprefix("node_"), *node.output) if k in names), None)
        if key is not None and node.op_type in ("Conv", "Gemm") and len(node.input) > position and \
                node.input[position] in inits:
            yield key, node, inits[node.input[position]]


def apply_to_graph(gm, fixes: dict[str, np.ndarray]) -> int:
    """Subtract ``fixes`` from the biases of the layers of ``gm`` they name (new tensors: a parameter shared with
    another module is not changed); returns how many layers were corrected."""
    import torch

    done = 0
    for node, module, attr in layer_tensors(gm, 2):
        if node.name in fixes:
            bias = getattr(module, attr).detach()
            replace_tensor(module, attr, bias - torch.from_numpy(fixes[node.name]).to(bias.dtype))
            done += 1
    return done


def apply_to_onnx(model, fixes: dict[str, np.ndarray]) -> int:
    """Subtract ``fixes`` from the bias initializers of the Conv and Gemm nodes of the ONNX ``model`` they name
    (node ``node_conv2d_3`` or output ``conv2d_3``), in place; returns how many layers were corrected."""
    from onnx import numpy_helper

    done = 0
    for key, _, tensor in onnx_layer_inputs(model, fixes, 2):
        fixed = numpy_helper.to_array(tensor).astype(np.float32) - fixes[key]
        tensor.CopyFrom(numpy_helper.from_array(fixed.astype(np.float32), tensor.name))
        done += 1
    return done
