"""YOLOv7's blocks and models in the shape their authors write them (WongKinYiu/yolov7, ``models/common.py``,
``models/yolo.py``, ``utils/torch_utils.py``, ``cfg/training/*.yaml``).

Wang, Bochkovskiy and Liao, "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for real-time
object detectors", CVPR 2023; implicit layers from YOLOR (Wang et al., 2021).

The code lives in the package ``authors.yolov7``, laid out as the repository's ``models`` package
(``common.py``: Conv, RepConv, ImplicitA/M, MP, SP, ReOrg, DownC, SPPCSPC, Concat; ``yolo.py``: IDetect,
IAuxDetect, ``parse_model``, ``Model``), so that a test can copy the two files into a folder named ``models``
and pickle a training checkpoint the way the repository's ``train.py`` writes one
(``tests/yolov7_checkpoints.py``). Their docstrings list what the authors' forward code does that a graph
matcher has to live with: in-place activations (``initialize_weights``, which also sets every BatchNorm's
``eps`` to 1e-3), the in-place slice writes of the heads' decode, ReOrg's strided slices, IAuxDetect's
auxiliary heads that its eval forward computes and drops. This module re-exports all of it and adds:

* ``tiny(nc, width)``: a small yolov7-tiny-like network (a RepConv head per level, two with the identity BN,
  one without, and an IDetect), the fixture of ``tests/test_authors_yolov7.py``;
* ``build(name, nc, width_multiple)``: the repository's training config ``name`` (``yolov7-tiny``, ``yolov7``,
  ``yolov7x``, ``yolov7-w6``; ``configs.py``) built by ``Model``, narrowed by ``width_multiple``;
* ``onnx_export_branch()``.

Exporting the fuse form the way the repository does needs ``torch.onnx.is_in_onnx_export()`` to be
true while the graph is traced. ``torch.export`` does not set it (the dynamo exporter hard-codes it
false) and cannot trace ``.data`` (a fake tensor leaks into the constants): :func:`onnx_export_branch`
patches both for the duration of a capture.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from authors.yolov7.common import (MP, SP, Concat, Conv, DownC, ImplicitA, ImplicitM, RepConv, ReOrg, SPPCSPC,
                                   autopad, fuse_conv_and_bn, initialize_weights, make_divisible)
from authors.yolov7.configs import CONFIGS, config
from authors.yolov7.yolo import IAuxDetect, IDetect, Model, check_anchor_order, parse_model

__all__ = ["autopad", "make_divisible", "Conv", "RepConv", "ImplicitA", "ImplicitM", "MP", "SP", "ReOrg", "DownC",
           "SPPCSPC", "Concat", "IDetect", "IAuxDetect", "Model", "fuse_conv_and_bn", "initialize_weights",
           "check_anchor_order", "parse_model", "tiny", "build", "CONFIGS", "config", "onnx_export_branch",
           "ANCHORS", "DEFAULT_WIDTH"]

ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]

# width_multiple per config small enough that a CPU builds and runs it in well under a second (widths are then
# rounded up to multiples of 8 by parse_model): yolov7 0.0625 takes its 32..1024 channels to 8..64
DEFAULT_WIDTH = {"yolov7-tiny": 0.125, "yolov7": 0.0625, "yolov7x": 0.05, "yolov7-w6": 0.0625}


def build(name: str, nc: int = 4, width_multiple: float | None = None) -> Model:
    """The repository's training config ``name`` built by ``Model`` (train mode, as ``train.py`` builds it)."""
    width = DEFAULT_WIDTH[name] if width_multiple is None else width_multiple
    return Model(config(name, nc=nc, width_multiple=width))


def tiny(nc: int = 3, width: int = 8) -> Model:
    """A yolov7-tiny-like network at ``width`` base channels (a multiple of 8): a strided stem, one ELAN block
    (two 1x1 branches, two chained 3x3, concat of four, 1x1 merge), max-pool downsampling to strides 8 / 16 /
    32, an SP pool and an upsampling neck, a RepConv head per level (two with the identity BN, one without) and
    an IDetect over the three levels."""
    w = width
    act = "nn.LeakyReLU(0.1)"
    cfg = {
        "nc": nc,
        "anchors": ANCHORS,
        "backbone": [
            [-1, 1, "Conv", [w, 3, 2, None, 1, act]],  # 0 /2
            [-1, 1, "Conv", [2 * w, 3, 2, None, 1, act]],  # 1 /4
            [-1, 1, "Conv", [w, 1, 1, None, 1, act]],
            [-2, 1, "Conv", [w, 1, 1, None, 1, act]],
            [-1, 1, "Conv", [w, 3, 1, None, 1, act]],
            [-1, 1, "Conv", [w, 3, 1, None, 1, act]],
            [[-1, -2, -3, -4], 1, "Concat", [1]],
            [-1, 1, "Conv", [2 * w, 1, 1, None, 1, act]],  # 7
            [-1, 1, "MP", []],  # 8 /8
            [-1, 1, "Conv", [2 * w, 1, 1, None, 1, act]],  # 9 P3
            [-1, 1, "MP", []],  # 10 /16
            [-1, 1, "Conv", [4 * w, 1, 1, None, 1, act]],  # 11 P4
            [-1, 1, "MP", []],  # 12 /32
            [-1, 1, "Conv", [4 * w, 1, 1, None, 1, act]],  # 13 P5
        ],
        "head": [
            [-1, 1, "SP", [5]],  # 14
            [[-1, 13], 1, "Concat", [1]],
            [-1, 1, "Conv", [4 * w, 1, 1, None, 1, act]],  # 16 P5 out
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 11], 1, "Concat", [1]],
            [-1, 1, "Conv", [4 * w, 1, 1, None, 1, act]],  # 19 P4 out
            [9, 1, "RepConv", [2 * w, 3, 1]],  # 20: c1 == c2, with rbr_identity
            [19, 1, "RepConv", [4 * w, 3, 1]],  # 21: with rbr_identity
            [16, 1, "RepConv", [6 * w, 3, 1]],  # 22: widens, no identity
            [[20, 21, 22], 1, "IDetect", ["nc", "anchors"]],
        ],
    }
    return Model(cfg)


@contextlib.contextmanager
def onnx_export_branch():
    """While active, ``torch.onnx.is_in_onnx_export()`` is true and ``t.data`` reads as ``t.detach()``, so
    ``torch.export`` captures ``IDetect.fuseforward``'s export branch (split + cat), as the repository's
    ``export.py`` gets it from the TorchScript exporter."""
    with mock.patch.object(torch.onnx, "is_in_onnx_export", return_value=True), \
            mock.patch.object(torch.Tensor, "data", property(lambda t: t.detach())):
        yield
