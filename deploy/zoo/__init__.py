"""Built-in model zoo: training-time (multi-branch) forms of reparameterizable networks.

Each entry is written the natural way, branches of ``Conv2d`` + ``BatchNorm2d``
summed in ``forward``, with no deploy-mode code: turning them into plain
networks is the compiler's job. Every factory takes ``width`` (scales every
channel count, so tests can build tiny versions) and ``num_classes``.

    >>> from deploy import zoo
    >>> model = zoo.randomize_batchnorm(zoo.create("repvgg_a0", width=0.25)).eval()
    >>> x = torch.randn(*zoo.input_shape("repvgg_a0"))

``repvgg_digits`` is the one entry with trained weights (``create("repvgg_digits", pretrained=True)``)
and a held-out data set (``zoo.samples("repvgg_digits")``); see :mod:`deploy.zoo.digits`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .acnet import acnet_resnet
from .dbb import dbb_resnet
from .digits import TEST_SPLIT as _DIGITS_TEST
from .digits import repvgg_digits
from .mobileone import mobileone_s0
from .resnet import resnet_small
from .repvgg import repvgg_a0, repvgg_a0_se, repvgg_a1, repvgg_b0, repvgg_b1g2
from .yolov7 import yolov7_tiny_rep

__all__ = ["create", "describe", "has_weights", "input_shape", "names", "randomize_batchnorm", "samples"]


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    pretrained: bool = False  # the factory takes pretrained=True and loads weights shipped in the package
    samples: str | None = None  # a held-out .npz shipped in the package: input0 (N, ...), labels (N,)


_IMAGENET = (1, 3, 224, 224)

_ZOO: dict[str, _Entry] = {
    "repvgg_a0": _Entry(repvgg_a0, _IMAGENET, "RepVGG-A0 (Ding et al. 2021): 22 blocks of relu(bn(3x3) + bn(1x1) + bn(x)), 8.30M params deployed"),
    "repvgg_a1": _Entry(repvgg_a1, _IMAGENET, "RepVGG-A1 (Ding et al. 2021): RepVGG-A0 with width multipliers a=1, b=2.5"),
    "repvgg_b0": _Entry(repvgg_b0, _IMAGENET, "RepVGG-B0 (Ding et al. 2021): 28 RepVGG blocks, depths 1/4/6/16/1, a=1, b=2.5"),
    "repvgg_b1g2": _Entry(repvgg_b1g2, _IMAGENET, "RepVGG-B1g2 (Ding et al. 2021): RepVGG-B, a=2, b=4, groups=2 on blocks 2, 4, ..., 26"),
    "repvgg_a0_se": _Entry(repvgg_a0_se, _IMAGENET, "RepVGG-A0 with a squeeze-and-excitation unit after each block's ReLU"),
    "mobileone_s0": _Entry(mobileone_s0, _IMAGENET, "MobileOne-S0 (Vasu et al. 2023): k=4 branches in depthwise 3x3 and pointwise 1x1 blocks, ~2.1M params deployed"),
    "acnet_resnet": _Entry(acnet_resnet, _IMAGENET, "Small ResNet (32/64/128) with ACNet blocks (Ding et al. 2019): bn(3x3) + bn(1x3) + bn(3x1)"),
    "dbb_resnet": _Entry(dbb_resnet, _IMAGENET, "Small ResNet (32/64/128) with Diverse Branch Blocks (Ding et al. 2021): kxk, 1x1, 1x1-kxk, 1x1-avg; zero_pad=True for the inexact variant"),
    "resnet_small": _Entry(resnet_small, _IMAGENET, "Small ResNet (32/64/128) of basic blocks relu(bn(3x3(relu(bn(3x3(x))))) + shortcut(x)); plain with the 'rm' pass"),
    "repvgg_digits": _Entry(repvgg_digits, (1, 1, 8, 8), "RepVGG-Digits: 6 RepVGG blocks (16-64 channels) trained on scikit-learn's 8x8 digits; shipped weights and held-out split", pretrained=True, samples=str(_DIGITS_TEST)),
    "yolov7_tiny_rep": _Entry(yolov7_tiny_rep, (1, 3, 320, 320), "YOLOv7-tiny (Wang et al. 2023) with RepConv heads and an IDetect head (ImplicitA / ImplicitM), 80 classes"),
}


def names() -> list[str]:
    """Sorted names of the zoo models."""
    return sorted(_ZOO)


def _entry(name: str) -> _Entry:
    try:
        return _ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known models: {', '.join(names())}") from None


def create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build zoo model ``name`` in its training-time form; ``kwargs`` go to its factory (``num_classes``, ``width``, ...).

    ``pretrained=True`` loads the weights shipped in the package (in eval mode); only entries with
    ``has_weights(name)`` have them.
    """
    entry = _entry(name)
    if not pretrained:
        return entry.factory(**kwargs)
    if not entry.pretrained:
        shipped = ", ".join(n for n in names() if _ZOO[n].pretrained)
        raise ValueError(f"zoo model {name!r} has no shipped weights (only {shipped} has); build it with "
                         f"pretrained=False and load a checkpoint")
    return entry.factory(pretrained=True, **kwargs)


def has_weights(name: str) -> bool:
    """Whether zoo model ``name`` ships trained weights (``create(name, pretrained=True)``)."""
    return _entry(name).pretrained


def samples(name: str) -> str | None:
    """Path of the held-out samples shipped for zoo model ``name`` (``.npz``: ``input0``, ``labels``), or None."""
    return _entry(name).samples


def input_shape(name: str) -> tuple[int, ...]:
    """Default example input shape of zoo model ``name``, batch size 1."""
    return _entry(name).input_shape


def describe(name: str) -> str:
    """One-line description of zoo model ``name``."""
    return _entry(name).description


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, in place.

    running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.5), drawn from a generator seeded with ``seed`` in module
    order, so the same model and seed always give the same numbers. Returns
    ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        n = module.num_features
        draws = {
            "running_mean": torch.randn(n, generator=g, dtype=torch.float64) * 0.5,
            "running_var": torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.5,
            "weight": torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
            "bias": torch.randn(n, generator=g, dtype=torch.float64) * 0.5,
        }
        for attr, value in draws.items():
            target = getattr(module, attr)
            if target is not None:
                target.copy_(value)
    return model
