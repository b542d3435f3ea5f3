"""INT8 calibration and evaluation data: where it comes from, checked against the model's input.

Calibration (``--calibration``):

- an ``.npz`` holding one input array ``(N, ...)`` (a ``labels`` array beside it is ignored), like
  ``--inputs``;
- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``; sorted by name, not
  recursive). Each image is read with Pillow, converted to RGB (grey for a 1-channel model),
  resized so its shorter side is ``H / 0.875`` (bilinear) and center-cropped to the model's ``H x W``
  (the ImageNet evaluation transform), scaled to [0, 1] and normalized with ``mean`` / ``std`` per
  channel: ``--mean`` / ``--std``, else what the model declares (timm's ``pretrained_cfg``, the
  zoo's digits: grey levels in [0, 1]), else ImageNet's;
- ``seeded``: standard-normal inputs, seed ``--seed`` + 2. Only meaningful for random weights, and
  the default for them.

Without ``--calibration`` a model that ships a training split (``repvgg_digits``) calibrates on it;
one with random weights (zoo, timm and torchvision models without ``--checkpoint``) on seeded
inputs; one with trained weights and nothing shipped is refused: its ranges must come from its data.
``--calibration-size N`` samples are used (a seeded random subset when there are more).

Evaluation: the accuracy guard compares every INT8 artifact with the fp32 forms on held-out samples,
never the calibration ones: ``--inputs`` or the samples shipped with the model, else
:func:`seeded_eval` inputs (seed + 1, no labels: top-1 agreement and SQNR only).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes.core import first_line

from .record import PipelineError
from .resources import ResourceError, check_memory, read_npz
from .stages import GROUND_TRUTH

__all__ = ["Calibration", "load_calibration", "read_images", "seeded_eval", "IMAGE_SUFFIXES", "IMAGENET",
           "DEFAULT_SIZE"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
DEFAULT_SIZE = 128
CROP_FRACTION = 0.875


@dataclass
class Calibration:
    """Calibration inputs ``x`` ``(N, ...)`` float32 and where they came from, in words."""

    x: np.ndarray
    source: str
    kind: str  # npz, images, shipped, seeded

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "count": int(len(self.x))}


def _shape_text(shape) -> str:
    return ",".join(map(str, shape))


def _subset(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    if len(x) <= size:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size, replace=False))
    return x[idx]


def _read_npz(path: str, shape) -> np.ndarray:
    try:
        arrays = {k: v for k, v in read_npz(path, "--calibration file").items() if k not in ("labels", *GROUND_TRUTH)}
    except ResourceError:
        raise
    except Exception as e:
        raise PipelineError(f"--calibration file {path} is not a readable .npz ({first_line(e)}); save it with "
                            "numpy.savez(path, input0=images)") from e
    if len(arrays) != 1:
        raise PipelineError(f"--calibration file {path} holds {len(arrays)} input arrays ({', '.join(arrays)}); "
                            "save one array of model inputs")
    (name, x), = arrays.items()
    if x.ndim != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:]):
        raise PipelineError(f"--calibration array {name!r} in {path} has shape {tuple(x.shape)} but the model input "
                            f"is {_shape_text(shape)}; calibration samples must be (N, {', '.join(map(str, shape[1:]))})")
    if len(x) == 0:
        raise PipelineError(f"--calibration array {name!r} in {path} holds no samples; save at least one")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x.astype(np.float32))
    if not np.isfinite(x).all():
        raise PipelineError(f"--calibration array {name!r} in {path} holds NaN or infinite values; calibration "
                            "samples must be finite")
    return x


def read_images(folder: str | os.PathLike, shape, mean, std, limit: int | None = None) -> np.ndarray:
    """The images of ``folder`` as model inputs ``(N, C, H, W)``; see the module docstring for the transform."""
    try:
        from PIL import Image
    except ImportError as e:
        raise PipelineError("reading a folder of calibration images needs Pillow: pip install pillow (or pass an "
                            ".npz)") from e
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise PipelineError(f"a folder of images calibrates 1- or 3-channel image models (N,C,H,W), but the model "
                            f"input is {_shape_text(shape)}; pass an .npz of inputs instead")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise PipelineError(f"--calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add "
                            "images or pass an .npz")
    files = files[:limit] if limit else files
    c, h, w = shape[1:]
    mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, np.float32).reshape(-1, 1, 1)
    if mean.shape[0] not in (1, c) or std.shape[0] not in (1, c):
        raise PipelineError(f"--mean / --std give {mean.shape[0]} / {std.shape[0]} values for a {c}-channel input; "
                            f"give 1 or {c}")
    check_memory(len(files) * c * h * w * 4 * 2, f"reading the {len(files)} images of {folder}",
                 "calibrate on fewer images (a folder of a few hundred is plenty)")
    out = np.empty((len(files), c, h, w), np.float32)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
                scale = max(h, w) / CROP_FRACTION / min(im.size)
                im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))),
                               Image.BILINEAR)
                left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
                pixels = np.asarray(im.crop((left, top, left + w, top + h)), np.float32) / 255.0
        except Exception as e:
            raise PipelineError(f"calibration image {f} cannot be read ({first_line(e)}); remove it from the folder "
                                "or replace it") from e
        pixels = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
        out[i] = (pixels - mean) / std
    return out


def seeded_eval(shape, count: int, seed: int) -> np.ndarray:
    """``count`` standard-normal held-out inputs (seed + 1: disjoint from the seeded verification input and from
    seeded calibration)."""
    return np.random.default_rng(seed + 1).standard_normal((count, *shape[1:]), dtype=np.float32)


def seeded_eval_count(shape) -> int:
    """How many seeded held-out inputs the accuracy guard evaluates on: 64, or 32 for inputs of 100k values or
    more (ImageNet-sized: each costs a run on every runtime)."""
    return 64 if math.prod(shape[1:]) < 100_000 else 32


def load_calibration(path: str | None, shape, *, size: int = DEFAULT_SIZE, seed: int = 0, loaded=None,
                     mean=None, std=None) -> Calibration:
    """The calibration inputs for a model whose input is ``shape``; see the module docstring for the rules."""
    if path == "seeded" or (path is None and loaded is not None and not loaded.trained):
        check_memory(size * math.prod(shape[1:]) * 4 * 2, f"{size} seeded calibration inputs of {_shape_text(shape)}",
                     "pass a smaller --calibration-size")
        x = np.random.default_rng(seed + 2).standard_normal((size, *shape[1:]), dtype=np.float32)
        why = "" if path else " (the model has random weights)"
        return Calibration(x, f"{size} seeded standard-normal inputs, seed {seed + 2}{why}", "seeded")
    if path is None:
        shipped = getattr(loaded, "calibration", None)
        if not shipped:
            raise PipelineError("--precision int8 needs calibration data for a model with trained weights: pass "
                                "--calibration PATH (an .npz of inputs or a folder of images from the training "
                                "data), or --calibration seeded to calibrate on random inputs")
        x = _read_npz(shipped, shape)
        return Calibration(_subset(x, size, seed), f"{min(size, len(x))} of the {len(x)} training-split samples "
                           f"shipped with the model ({os.path.basename(shipped)})", "shipped")
    if os.path.isdir(path):
        declared = getattr(loaded, "preprocess", None) or IMAGENET
        mean = mean if mean is not None else declared["mean"]
        std = std if std is not None else declared["std"]
        x = read_images(path, shape, mean, std)
        return Calibration(_subset(x, size, seed), f"{min(size, len(x))} of {len(x)} images in {path} (shorter side "
                           f"to {max(shape[2:]) / CROP_FRACTION:.0f}, center crop {shape[2]}x{shape[3]}, mean "
                           f"{list(mean)}, std {list(std)})", "images")
    if not os.path.isfile(path):
        raise PipelineError(f"--calibration {path} does not exist; pass an .npz of inputs, a folder of images, or "
                            "seeded")
    x = _read_npz(path, shape)
    return Calibration(_subset(x, size, seed), f"{min(size, len(x))} of {len(x)} samples in {path}", "npz")
