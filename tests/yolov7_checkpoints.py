"""YOLOv7 training checkpoints written the way the repository's ``train.py`` writes them.

The repository's model code is ``tests/authors/yolov7`` (``common.py``, ``yolo.py``), copied unchanged into
``CODE/models/`` (:func:`write_code`): a model built from there pickles as ``models.yolo.Model``,
``models.common.Conv`` ..., so loading the checkpoint needs ``CODE`` on ``sys.path`` (``--code-path CODE``), as a
real ``yolov7.pt`` needs a clone of the repository. As in ``tests/test_sources.py``'s ``yolo_style_checkpoint``
fixture, the package is imported only while the checkpoint is written, and ``sys.path`` / ``sys.modules`` are
restored afterwards.

:func:`write_checkpoint` follows ``train.py``'s save step (``{'epoch', 'best_fitness', 'training_results',
'model': deepcopy(model).half(), 'ema': deepcopy(ema.ema).half(), 'updates', 'optimizer', 'wandb_id'}``): the
model is left in train mode as ``train.py`` leaves it, the EMA copy (``utils/torch_utils.py``'s ``ModelEMA``)
is in eval mode and trails the model by one update, so their weights differ and a test can tell which one a
loader picked.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from authors.yolov7.configs import config
from authors.yolov7_style import DEFAULT_WIDTH
from deploy import zoo

__all__ = ["SOURCE", "INPUT_SIZE", "Checkpoint", "ModelEMA", "write_code", "importable", "write_checkpoint"]

SOURCE = Path(__file__).resolve().parent / "authors" / "yolov7"
INPUT_SIZE = {"yolov7-tiny": 64, "yolov7": 64, "yolov7x": 64, "yolov7-w6": 128}  # W6's P6 level is 1/64


def write_code(root: str | Path) -> Path:
    """``root/models/{__init__,common,yolo}.py``: the repository's ``models`` package; returns ``root``."""
    root = Path(root)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models" / "__init__.py").write_text("")
    for name in ("common.py", "yolo.py"):
        shutil.copyfile(SOURCE / name, root / "models" / name)
    return root


def _is_models(name: str) -> bool:
    return name == "models" or name.startswith("models.")


@contextlib.contextmanager
def importable(code: str | Path):
    """``models.yolo`` imported from ``code`` while the block runs; ``sys.path`` and whatever ``models`` modules
    were imported before are restored afterwards."""
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _is_models(k)]}
    sys.path.insert(0, str(code))
    try:
        yield importlib.import_module("models.yolo")
    finally:
        sys.path.remove(str(code))
        for k in [k for k in sys.modules if _is_models(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


class ModelEMA:
    """``utils/torch_utils.py``'s exponential moving average of every floating-point tensor of the state dict,
    with its decay ramp ``0.9999 * (1 - exp(-updates / 2000))``."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, updates: int = 0):
        self.ema = copy.deepcopy(model).eval()
        self.updates = updates
        self.decay = lambda x: decay * (1 - math.exp(-x / 2000))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def update(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            current = model.state_dict()
            for k, v in self.ema.state_dict().items():
                if v.dtype.is_floating_point:
                    v *= d
                    v += (1.0 - d) * current[k].detach()


def _trained(model: torch.nn.Module, seed: int) -> None:
    """Weights that look trained: BatchNorm statistics and affine parameters and the implicit layers far from
    their initial values (ImplicitA near 0 and ImplicitM near 1 would hide a wrong fold)."""
    zoo.randomize_batchnorm(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            name = type(m).__name__
            if name == "ImplicitA":
                m.implicit.copy_(torch.randn(m.implicit.shape, generator=g) * 0.5)
            elif name == "ImplicitM":
                m.implicit.copy_(torch.rand(m.implicit.shape, generator=g) + 0.5)


def _step(model: torch.nn.Module, seed: int) -> None:
    """One training step's worth of change to every floating-point tensor (an optimizer step, BN momentum)."""
    g = torch.Generator().manual_seed(seed + 200)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.dtype.is_floating_point:
                v += 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g)


@dataclass
class Checkpoint:
    """A written checkpoint, and what a loader must make of it."""

    name: str  # the training config (a key of authors.yolov7.configs.CONFIGS)
    path: Path
    code: Path  # the folder holding the models package: --code-path
    input_shape: tuple[int, int, int, int]
    ema: dict[str, torch.Tensor]  # ckpt['ema']'s state dict in float32: what loading must give
    model: dict[str, torch.Tensor]  # ckpt['model']'s, in float32: what loading must not give
    layers: int
    params: int


def write_checkpoint(path: str | Path, code: str | Path, name: str, *, nc: int = 4,
                     width_multiple: float | None = None, seed: int = 0) -> Checkpoint:
    """Build training config ``name`` from the ``models`` package in ``code`` and save it as ``train.py`` does
    at the end of an epoch."""
    width = DEFAULT_WIDTH[name] if width_multiple is None else width_multiple
    with importable(code) as yolo, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = yolo.Model(config(name, nc=nc, width_multiple=width))
        _trained(model, seed)
        ema = ModelEMA(model, updates=1999)  # resumed late in training: the EMA decays by about 0.63
        _step(model, seed)
        ema.update(model)
        ckpt = {"epoch": 0,
                "best_fitness": np.array([0.0]),
                "training_results": "",
                "model": copy.deepcopy(model).half(),  # train mode, as train.py leaves it
                "ema": copy.deepcopy(ema.ema).half(),
                "updates": ema.updates,
                "optimizer": None,
                "wandb_id": None}
        torch.save(ckpt, path)
    size = INPUT_SIZE[name]
    as_float = lambda m: {k: v.float() if v.is_floating_point() else v.clone()  # noqa: E731
                          for k, v in m.state_dict().items()}
    return Checkpoint(name, Path(path), Path(code), (1, 3, size, size), as_float(ckpt["ema"]), as_float(ckpt["model"]),
                      len(model.model), sum(p.numel() for p in model.parameters()))
