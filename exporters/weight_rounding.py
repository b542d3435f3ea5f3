"""``--weight-rounding mse``: each layer's int8 weight grid chosen by a per-channel MSE search, on the merged kernels.

Every quantizer here rounds a weight ``W`` to symmetric int8 on the grid its largest value sets (per output channel
``c``, or per tensor): ``s = max|W_c| / 127``, ``q = clamp(round(W / s), -127, 127) * s``. One outlier tap then
coarsens the grid of its whole channel. The search tries the clipping ranges ``a = alpha * max|W_c|`` for ``alpha``
= 1.00, 0.99, ..., 0.50 (:data:`ALPHAS`) and keeps, per channel, the one with the smallest squared error
``sum (W_c - q_c)^2`` (the largest ``a`` on a tie, so a channel nearest rounding already serves is left alone): the
taps beyond ``a`` are clipped to it, the others get a finer grid.

It is applied to the INT8 forms only, by clamping ``W_c`` to ``[-a_c, a_c]`` in what each quantizer quantizes
(:func:`apply_to_onnx`: ONNX Runtime's weight initializers; :func:`apply_to_graph`: the plain graph the PT2E
quantizers of TFLite and ExecuTorch annotate). The quantizers then read ``max|W_c| = a_c``: their grid is the
chosen one, and the fp32 forms keep the exact weights. NNCF (OpenVINO) and MNN quantize from their own files and
keep nearest rounding. ``deploy.int8.choose_weight_rounding`` keeps the clipping only where it raises the ONNX
Runtime INT8 output SQNR on held-out samples, and bias correction (``exporters.bias_correction``) measures the
rounding error of the clipped weights.

:func:`mse_clips` returns ``{layer: per-channel clip}`` (one value per tensor with ``per_channel=False``) for the
convolution and linear layers of the plain graph where some channel is clipped, named as the ONNX export names
them (``conv2d_3``).
"""

from __future__ import annotations

import logging

import numpy as np

from .bias_correction import clamp_weight, layer_tensors, onnx_layer_inputs, replace_tensor, round_weight, weight_dims

__all__ = ["ALPHAS", "mse_clip", "mse_clips", "apply_to_graph", "apply_to_onnx", "clamp_weight"]

log = logging.getLogger(__name__)

ALPHAS = tuple(round(1.0 - k / 100, 2) for k in range(51))  # 1.00, 0.99, ..., 0.50: the fractions of max|W_c| tried


def mse_clip(w, per_channel: bool = True):
    """The clipping range ``a`` of ``w`` (per output channel, axis 0, shape ``(C,)``; or per tensor, shape ``(1,)``)
    whose symmetric int8 grid gives the smallest squared rounding error (see the module docstring)."""
    import torch

    dims = weight_dims(w, per_channel)
    w = w.detach().double()
    top = w.abs().amax(dim=dims, keepdim=True).clamp_min(2 ** -12)
    best = torch.full_like(top, float("inf"))
    clip = top.clone()
    for alpha in ALPHAS:  # from 1.00 down: a strict improvement is needed to clip further
        a = top * alpha
        err = (w - round_weight(w, per_channel, a.reshape(-1))).pow(2).sum(dim=dims, keepdim=True)
        better = err < best * (1 - 1e-12)
        best = torch.where(better, err, best)
        clip = torch.where(better, a, clip)
    return clip.reshape(-1).float()


def mse_clips(gm, per_channel: bool = True) -> dict[str, np.ndarray]:
    """``{layer: clip}`` of the layers of the plain graph ``gm`` where the MSE search clips some channel."""
    clips = {}
    for node, module, attr in layer_tensors(gm, 1):
        w = getattr(module, attr).detach()
        clip = mse_clip(w, per_channel)
        top = w.abs().amax(dim=weight_dims(w, per_channel)).reshape(-1).float()
        if bool((clip < top * (1 - 1e-6)).any()):
            clips[node.name] = clip.numpy()
    log.info("MSE weight rounding: %d of the layers clipped", len(clips))
    return clips


def apply_to_graph(gm, clips: dict[str, np.ndarray]) -> int:
    """Clamp the weights of the layers of ``gm`` that ``clips`` names (new tensors: a parameter shared with another
    module is not changed); returns how many layers were clamped."""
    done = 0
    for node, module, attr in layer_tensors(gm, 1):
        if node.name in clips:
            replace_tensor(module, attr, clamp_weight(getattr(module, attr).detach(), clips[node.name]))
            done += 1
    return done


def apply_to_onnx(model, clips: dict[str, np.ndarray]) -> int:
    """Clamp the weight initializers of the Conv and Gemm nodes of the ONNX ``model`` that ``clips`` names (node
    ``node_conv2d_3`` or output ``conv2d_3``), in place; returns how many layers were clamped. A Gemm's weight is
    ``(out, in)`` as torch's (the exporter writes ``transB = 1``); another layout is left alone."""
    import torch
    from onnx import helper, numpy_helper

    done = 0
    for key, node, tensor in onnx_layer_inputs(model, clips, 1):
        if node.op_type == "Gemm" and not any(a.name == "transB" and helper.get_attribute_value(a) == 1
                                              for a in node.attribute):
            continue
        w = torch.from_numpy(numpy_helper.to_array(tensor).astype(np.float32))
        tensor.CopyFrom(numpy_helper.from_array(clamp_weight(w, clips[key]).numpy(), tensor.name))
        done += 1
    return done
