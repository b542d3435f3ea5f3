"""YOLO-Shapes: a narrow YOLOv7-tiny trained on a synthetic shape-detection data set, shipped with its weights.

The built-in trained *detector*: like :mod:`deploy.zoo.digits` for classification, it lets a default
run show task-level numbers (held-out mAP of every form and artifact), not only errors on random inputs.

Data (:func:`generate`): 64x64 RGB images, float32 in [0, 1] in steps of 1/256 (so a float16 holds them
exactly), each with 1 to 4 objects of three classes (``CLASSES``: circle, square, triangle), 10 to 32 px
across, in random flat colours that stand out from the local background, at random non-overlapping
positions (1 px apart at least), over a textured background: a bilinear gradient between four random
corner colours, a triangle-wave stripe pattern of random period, angle and colour, and uniform noise
in 2x2 px grains. Triangles are equilateral, rotated by a random angle; squares are axis-aligned. Boxes
are xyxy pixel edges, tight to the drawn pixels (``x1 = last column + 1``). Generation uses numpy only,
with ``np.random.default_rng(seed)``, elementwise IEEE arithmetic and no transcendental function whose
last bit could differ between machines (the rotations' cosines are rounded to 1/4096), so a seed gives
the same images everywhere.

Model (:func:`yolo_shapes`): ``yolov7_tiny_rep`` at width 0.25 (399 k parameters and buffers in
training form), 3 classes, anchors ``ANCHORS`` for 10-32 px objects on the 8x8 / 4x4 / 2x2 grids of a
64x64 input. In eval mode it returns ``(decoded (N, 252, 8), raw maps)``: per box cx, cy, w, h in
pixels, objectness and the 3 class probabilities (after the sigmoid).

Shipped files, written by ``python -m deploy.zoo.train_shapes``: ``data/yolo_shapes.pt`` (the weights,
stored in float16 and loaded into float32 parameters, and the training record), ``data/shapes_val.npz``
(the held-out split ``generate(128, VAL_SEED)``: ``input0`` float16 images, ``gt_boxes``, ``gt_classes``)
and ``data/shapes_train.npz`` (the first 128 training images, ``generate(128, TRAIN_SEED)``: the INT8
calibration data, same keys).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from runtimes.safe_load import load_shipped

from .yolov7 import YOLOv7Tiny, yolov7_tiny_rep

__all__ = ["ANCHORS", "CLASSES", "INPUT_SHAPE", "K", "SIZE", "TRAIN_SEED", "VAL_SEED", "WEIGHTS", "VAL_SPLIT",
           "TRAIN_SPLIT", "WIDTH", "generate", "load_split", "load_weights", "training_record", "yolo_shapes"]

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA_DIR / "yolo_shapes.pt"
VAL_SPLIT = DATA_DIR / "shapes_val.npz"
TRAIN_SPLIT = DATA_DIR / "shapes_train.npz"  # training images: INT8 calibration data, never evaluated on

SIZE = 64
K = 4  # at most K objects per image; boxes and classes are padded to K
CLASSES = ("circle", "square", "triangle")
TRAIN_SEED = 1000  # the training run draws generate(n, TRAIN_SEED + epoch)
VAL_SEED = 7
INPUT_SHAPE = (1, 3, SIZE, SIZE)
WIDTH = 0.25
# Anchors (w, h in pixels) for strides 8, 16, 32: objects are 9 to 32 px, about square.
ANCHORS = ((10, 10, 13, 13, 16, 16), (19, 19, 23, 23, 27, 27), (30, 30, 36, 36, 44, 44))

_MIN_SIZE, _MAX_SIZE = 10.0, 32.0
_LEVELS = 256  # grey levels: every value is k / 256, held exactly by a float16
_TRIES = 30  # placements tried per object before giving up on it (the image then holds fewer)


# ------------------------------------------------------------------------------------------ data

def _cos_sin(angle: float) -> tuple[float, float]:
    """cos and sin rounded to 1/4096, so that a last-bit difference between libms cannot change a pixel."""
    return round(math.cos(angle) * 4096) / 4096, round(math.sin(angle) * 4096) / 4096


def _background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A textured background (3, SIZE, SIZE) float64 in [0, 1] and its four corner colours (4, 3)."""
    corners = rng.random((4, 3))
    u, v = (xs + 0.5) / SIZE, (ys + 0.5) / SIZE
    image = (corners[0][:, None, None] * ((1 - u) * (1 - v)) + corners[1][:, None, None] * (u * (1 - v))
             + corners[2][:, None, None] * ((1 - u) * v) + corners[3][:, None, None] * (u * v))
    period = rng.uniform(0.05, 0.25)
    c, s = _cos_sin(rng.uniform(0.0, math.pi))
    phase = (xs * c + ys * s) / period + rng.random()
    wave = np.abs(2.0 * (phase - np.floor(phase)) - 1.0) - 0.5  # triangle wave in [-0.5, 0.5]
    image = image + rng.uniform(0.1, 0.5) * wave * rng.uniform(-1.0, 1.0, 3)[:, None, None]
    grain = (rng.random((3, SIZE // 2, SIZE // 2)) - 0.5).repeat(2, 1).repeat(2, 2)  # noise in 2x2 px grains
    image = image + grain * rng.uniform(0.1, 0.35)
    return np.clip(image, 0.0, 1.0), corners


def _shape_mask(rng: np.random.Generator, cls: int, size: float, cx: float, cy: float,
                xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pixels (of the grid ``xs``, ``ys``) whose centre lies inside a ``CLASSES[cls]`` of ``size`` px centred
    at (cx, cy)."""
    px, py = xs + 0.5 - cx, ys + 0.5 - cy
    half = size / 2
    if cls == 0:  # circle of diameter size
        return px * px + py * py <= half * half
    if cls == 1:  # axis-aligned square of side size
        return (np.abs(px) <= half) & (np.abs(py) <= half)
    # equilateral triangle of side size (circumradius size / sqrt 3), rotated by a random angle
    radius = size / math.sqrt(3.0)
    theta = rng.uniform(0.0, 2 * math.pi)
    corners = [_cos_sin(theta + k * 2 * math.pi / 3) for k in range(3)]
    vx, vy = [radius * c for c, _ in corners], [radius * s for _, s in corners]
    mask = np.ones(px.shape, dtype=bool)
    for k in range(3):  # counter-clockwise vertices: inside is left of every edge
        ax, ay, bx, by = vx[k], vy[k], vx[(k + 1) % 3], vy[(k + 1) % 3]
        mask &= (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0
    return mask


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    """Whether ``box`` comes closer than 1 px to any of ``boxes`` (so every object stays whole, every box tight)."""
    return any(box[0] <= b[2] and b[0] <= box[2] and box[1] <= b[3] and b[1] <= box[3] for b in boxes)


def _image(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, list, list]:
    image, corners = _background(rng, xs, ys)
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, K + 1))):
        cls = int(rng.integers(len(CLASSES)))
        for _ in range(_TRIES):
            size = rng.uniform(_MIN_SIZE, _MAX_SIZE)
            cx, cy = rng.uniform(size / 2 + 1, SIZE - size / 2 - 1, 2)
            # the shape lies within 0.58 size of its centre (a triangle's circumradius is size / sqrt 3)
            x0, y0 = max(0, int(cx - 0.58 * size) - 1), max(0, int(cy - 0.58 * size) - 1)
            x1, y1 = min(SIZE, int(cx + 0.58 * size) + 2), min(SIZE, int(cy + 0.58 * size) + 2)
            mask = _shape_mask(rng, cls, size, cx, cy, xs[y0:y1, x0:x1], ys[y0:y1, x0:x1])
            cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
            box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        u, v = cx / SIZE, cy / SIZE
        local = (corners[0] * ((1 - u) * (1 - v)) + corners[1] * (u * (1 - v)) + corners[2] * ((1 - u) * v)
                 + corners[3] * (u * v))
        colour = rng.random(3)
        for _ in range(_TRIES):  # a colour that stands out from the local background
            if np.abs(colour - local).max() >= 0.35:
                break
            colour = rng.random(3)
        image[:, y0:y1, x0:x1][:, mask] = colour[:, None]
        boxes.append(box)
        classes.append(cls)
    return image, boxes, classes


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images drawn from ``np.random.default_rng(seed)``.

    Returns images ``(n, 3, SIZE, SIZE)`` float32 in [0, 1], boxes ``(n, K, 4)`` float32 (xyxy pixel edges,
    zero padding) and classes ``(n, K)`` int64 (indices into ``CLASSES``, -1 padding).
    """
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    boxes = np.zeros((n, K, 4), dtype=np.float32)
    classes = np.full((n, K), -1, dtype=np.int64)
    for i in range(n):
        image, b, c = _image(rng, xs, ys)
        images[i] = np.round(image * _LEVELS) / _LEVELS  # 8-bit steps of 1/256: exact in float16
        boxes[i, :len(b)] = b
        classes[i, :len(c)] = c
    return images, boxes, classes


def load_split(path: str | os.PathLike = VAL_SPLIT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shipped split: images ``(N, 3, SIZE, SIZE)`` float32 (the stored float16 values), ``gt_boxes``,
    ``gt_classes``."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        return data["input0"].astype(np.float32), data["gt_boxes"], data["gt_classes"]


# ----------------------------------------------------------------------------------------- model

def load_weights(path: str | os.PathLike = WEIGHTS) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and the training record (``meta``) stored in a YOLO-Shapes checkpoint."""
    ckpt = load_shipped(path)
    return ckpt["state_dict"], dict(ckpt.get("meta", {}))


def training_record() -> dict:
    """How the shipped weights were trained: seeds, epochs, held-out mAP, time."""
    return load_weights()[1]


def yolo_shapes(num_classes: int = len(CLASSES), width: float = WIDTH, pretrained: bool = False) -> YOLOv7Tiny:
    """YOLOv7-tiny (RepConv heads, IDetect) narrowed to ``width`` with ``ANCHORS`` for 64x64 inputs;
    ``pretrained=True`` loads the shipped weights (3 classes, width 0.25 only)."""
    model = yolov7_tiny_rep(num_classes=num_classes, width=width, anchors=ANCHORS)
    with torch.no_grad():  # objectness prior for a 64 px image instead of IDetect's 640 px one
        for conv in model.detect.m:
            conv.bias.view(model.detect.na, model.detect.no)[:, 4] += 2 * math.log(640 / SIZE)
    if pretrained:
        if num_classes != len(CLASSES) or width != WIDTH:
            raise ValueError(f"the shipped yolo_shapes weights are for num_classes={len(CLASSES)}, width={WIDTH}; "
                             f"got num_classes={num_classes}, width={width}")
        model.load_state_dict(load_weights()[0], strict=True)
        model.eval()
    if num_classes == len(CLASSES):
        model.names = list(CLASSES)  # YOLOv7's convention: the class names on the model (deploy's pictures read them)
    return model
