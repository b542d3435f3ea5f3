"""RepVGG-Digits: a small RepVGG trained on scikit-learn's handwritten digits, shipped with its weights.

The built-in default of ``deploy``: a training-time multi-branch network with *trained* weights,
so a default run shows task-level numbers (held-out accuracy of every form and artifact), not only
errors on random inputs.

Architecture: six ``RepVGGBlock`` s (``relu(bn(3x3) + bn(1x1) [+ bn(x)])``) of widths 16, 16, 32,
32, 64, 64, strides 1, 1, 2, 1, 2, 1, then global average pooling and a Linear layer:
81 k parameters in training form, three blocks with an identity branch. After reparameterization each
block is one 3x3 convolution.

Input: ``(N, 1, 8, 8)`` float32, the digits' 8x8 grey levels (0..16) divided by 16, so in [0, 1].
The native 8x8 resolution is kept: upsampling to 16x16 would add no information, quadruple the
work and make every caller of the artifacts resample the same way; with stride 1 in the first
stage the features are 8x8, 4x4 and 2x2.

Data: ``sklearn.datasets.load_digits`` (1797 images, bundled with scikit-learn, no download),
split 80/20 stratified with ``random_state=0``. The held-out 360 images ship as
``data/digits_test.npz`` (``input0``: images, ``labels``: classes) so the runtime needs no
scikit-learn; the 1437 training images as ``data/digits_train.npz``, the INT8 calibration data;
``data/repvgg_digits.pt`` holds the weights and the training record. Both are
written by ``python -m deploy.zoo.train_digits`` (which needs ``pip install scikit-learn``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtimes.safe_load import load_shipped

from ._layers import ClassifierHead, scale_channels
from .repvgg import RepVGGBlock

__all__ = ["RepVGGDigits", "repvgg_digits", "WEIGHTS", "TEST_SPLIT", "TRAIN_SPLIT", "INPUT_SHAPE", "load_test_split",
           "load_weights", "training_record"]

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA_DIR / "repvgg_digits.pt"
TEST_SPLIT = DATA_DIR / "digits_test.npz"
TRAIN_SPLIT = DATA_DIR / "digits_train.npz"  # the training split: INT8 calibration data, never evaluated on
INPUT_SHAPE = (1, 1, 8, 8)
WIDTHS = (16, 16, 32, 32, 64, 64)
STRIDES = (1, 1, 2, 1, 2, 1)


class RepVGGDigits(nn.Module):
    """RepVGG blocks (six: ``WIDTHS``, ``STRIDES``) and a classifier head for ``(N, 1, 8, 8)`` digit images."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 1,
                 widths: tuple[int, ...] = WIDTHS, strides: tuple[int, ...] = STRIDES) -> None:
        super().__init__()
        blocks, channels = [], in_channels
        for base, stride in zip(widths, strides):
            out = scale_channels(base, width)
            blocks.append(RepVGGBlock(channels, out, stride=stride))
            channels = out
        self.features = nn.Sequential(*blocks)
        self.head = ClassifierHead(channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def load_weights(path: str | os.PathLike = WEIGHTS) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict (float32; a checkpoint may store float16) and the training record (``meta``) stored in a
    shipped digits checkpoint."""
    ckpt = load_shipped(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    return state, dict(ckpt.get("meta", {}))


def load_pretrained(model: nn.Module, name: str, path: str | os.PathLike, num_classes: int,
                    width: float) -> nn.Module:
    """``model`` with the shipped weights at ``path`` (trained for 10 classes at width 1 only), in eval mode."""
    if num_classes != 10 or width != 1.0:
        raise ValueError(f"the shipped {name} weights are for num_classes=10, width=1.0; got "
                         f"num_classes={num_classes}, width={width}")
    model.load_state_dict(load_weights(path)[0], strict=True)
    return model.eval()


def training_record() -> dict:
    """How the shipped weights were trained: seed, epochs, held-out accuracy, data split."""
    return load_weights()[1]


def repvgg_digits(num_classes: int = 10, width: float = 1.0, pretrained: bool = False) -> RepVGGDigits:
    """RepVGG-Digits; ``pretrained=True`` loads the shipped weights (10 classes, width 1 only)."""
    model = RepVGGDigits(num_classes=num_classes, width=width)
    return load_pretrained(model, "repvgg_digits", WEIGHTS, num_classes, width) if pretrained else model


def load_test_split(path: str | os.PathLike = TEST_SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """A shipped split (by default the held-out digits): images ``(N, 1, H, W)`` float32 in [0, 1] (a split may
    store float16) and labels ``(N,)`` int64."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        return data["input0"].astype(np.float32), data["labels"]
