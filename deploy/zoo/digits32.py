"""RepVGG-Digits32: a RepVGG trained on scikit-learn's digits upsampled to 32x32 under strong augmentation, shipped
with its weights: the zoo's trained network for the INT8 reparameterized-outlier case.

Where :mod:`deploy.zoo.digits` keeps the digits' native 8x8 (and a trained RepVGG that quantizes without loss),
this task is harder: each 8x8 image is upsampled bilinearly to 32x32, then rotated, scaled and shifted at random
and covered in Gaussian noise (:func:`augment`), so the held-out accuracy is below 100 % and the network's
decisions have smaller margins.

Architecture: ``RepVGGBlock`` s of :mod:`deploy.zoo.repvgg` (``relu(bn(3x3) + bn(1x1) [+ bn(x)])``) of widths
``WIDTHS`` and strides ``STRIDES``, global average pooling and a Linear layer; every block whose width and
resolution stay the same has the identity branch. After reparameterization each block is one 3x3 convolution.

Input: ``(N, 1, 32, 32)`` float32 in [0, 1], in steps of 1/256 (exact in float16).

Data: ``sklearn.datasets.load_digits``, split 80/20 stratified with ``random_state=0`` (the split of
``repvgg_digits``). Shipped files, written by ``python -m deploy.zoo.train_digits32`` (needs scikit-learn):
``data/repvgg_digits32.pt`` (the weights in float16, loaded into float32 parameters, and the training record),
``data/digits32_test.npz`` (the 360 held-out digits, each augmented once with seed ``TEST_SEED``: ``input0``
float16, ``labels``) and ``data/digits32_train.npz`` (the first ``CALIBRATION_IMAGES`` training digits augmented
once with seed ``CALIBRATION_SEED``: the INT8 calibration data, never evaluated on).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import digits

__all__ = ["RepVGGDigits32", "repvgg_digits32", "augment", "WEIGHTS", "TEST_SPLIT", "TRAIN_SPLIT", "INPUT_SHAPE",
           "load_split", "load_weights", "training_record"]

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA_DIR / "repvgg_digits32.pt"
TEST_SPLIT = DATA_DIR / "digits32_test.npz"
TRAIN_SPLIT = DATA_DIR / "digits32_train.npz"  # augmented training digits: INT8 calibration data
SIZE = 32
INPUT_SHAPE = (1, 1, SIZE, SIZE)
WIDTHS = (64, 64, 64, 64, 128, 128)
STRIDES = (2, 1, 2, 1, 2, 1)
TEST_SEED = 12345
CALIBRATION_SEED = 54321
CALIBRATION_IMAGES = 256
# augmentation at full strength: rotation, scale and shift ranges (uniform, +-), and the largest noise sigma
ROTATE_DEG, SCALE, SHIFT_PX, NOISE = 30.0, 0.225, 6.0, 0.3
_LEVELS = 256  # grey levels: every value is k / 256, held exactly by a float16


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(N, 1, 8, 8)`` digits in [0, 1] -> ``(N, 1, 32, 32)``: bilinear upsampling, a random rotation (+-
    ``ROTATE_DEG``), scale (1 +- ``SCALE``) and shift (+- ``SHIFT_PX``), zero fill, then Gaussian noise of a
    sigma drawn from [0, ``NOISE``], clipped to [0, 1] and rounded to 1/256."""
    n = images.shape[0]
    x = F.interpolate(images, size=SIZE, mode="bilinear", align_corners=False)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(ROTATE_DEG)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * SCALE
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (SHIFT_PX / (SIZE / 2))  # affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, SIZE, SIZE), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * NOISE
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return (x.clamp(0, 1) * _LEVELS).round() / _LEVELS


class RepVGGDigits32(digits.RepVGGDigits):
    """RepVGG blocks of ``WIDTHS`` / ``STRIDES`` and a classifier head for ``(N, 1, 32, 32)`` digit images."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 1) -> None:
        super().__init__(num_classes, width, in_channels, WIDTHS, STRIDES)


def load_weights(path: str | os.PathLike = WEIGHTS) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict (float32, from the float16 stored) and the training record of a RepVGG-Digits32 checkpoint."""
    return digits.load_weights(path)


def training_record() -> dict:
    """How the shipped weights were trained: recipe, seed, epochs, held-out accuracy, time."""
    return load_weights()[1]


def repvgg_digits32(num_classes: int = 10, width: float = 1.0, pretrained: bool = False) -> RepVGGDigits32:
    """RepVGG-Digits32; ``pretrained=True`` loads the shipped weights (10 classes, width 1 only)."""
    model = RepVGGDigits32(num_classes=num_classes, width=width)
    return digits.load_pretrained(model, "repvgg_digits32", WEIGHTS, num_classes, width) if pretrained else model


def load_split(path: str | os.PathLike = TEST_SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """A shipped split: images ``(N, 1, 32, 32)`` float32 (the stored float16 values) and labels ``(N,)`` int64."""
    return digits.load_test_split(path)
