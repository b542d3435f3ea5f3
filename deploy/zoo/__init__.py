"""Built-in model zoo: training-time (multi-branch) forms of reparameterizable networks.

Each entry is written the natural way, branches of ``Conv2d`` + ``BatchNorm2d``
summed in ``forward``, with no deploy-mode code: turning them into plain
networks is the compiler's job. Every factory takes ``width`` (scales every
channel count, so tests can build tiny versions) and ``num_classes``.

    >>> from deploy import zoo
    >>> model = zoo.randomize_batchnorm(zoo.create("repvgg_a0", width=0.25)).eval()
    >>> x = torch.randn(*zoo.input_shape("repvgg_a0"))

Three entries ship trained weights (``create(name, pretrained=True)``) and a held-out data set
(``zoo.samples(name)``): the classifiers ``repvgg_digits`` (:mod:`deploy.zoo.digits`) and ``repvgg_digits32``
(:mod:`deploy.zoo.digits32`, the digits at 32x32 under strong augmentation) and the detector ``yolo_shapes``
(:mod:`deploy.zoo.shapes`, whose samples carry ``gt_boxes`` / ``gt_classes`` instead of ``labels``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .acnet import acnet_resnet
from .dbb import dbb_resnet
from .digits import TEST_SPLIT as _DIGITS_TEST
from .digits import TRAIN_SPLIT as _DIGITS_TRAIN
from .digits import repvgg_digits
from .digits32 import TEST_SPLIT as _DIGITS32_TEST
from .digits32 import TRAIN_SPLIT as _DIGITS32_TRAIN
from .digits32 import repvgg_digits32
from .mobileone import mobileone_s0
from .resnet import resnet_small
from .shapes import TRAIN_SPLIT as _SHAPES_TRAIN
from .shapes import VAL_SPLIT as _SHAPES_VAL
from .shapes import yolo_shapes
from .repvgg import repvgg_a0, repvgg_a0_se, repvgg_a1, repvgg_b0, repvgg_b1g2
from .yolov7 import yolov7_tiny_rep
from .elan_csp import elan_csp
from .ghostnet import ghostnet
from .googlenet2 import googlenet2
from .mlp_mixer import mlp_mixer
from .res2net import res2net
from .sdanet import sdanet
from .shufflenet_v1 import shufflenet_v1
from .shufflenet_v2 import shufflenet_v2
from .threshnet import threshnet
from .eatformer import eatformer
from .eresfd import eresfd
from .giraffedet import giraffedet
from .panet import panet
from .sa_fpn import sa_fpn
from .small_object_det import small_object_det

__all__ = ["create", "describe", "has_weights", "input_shape", "names", "randomize_batchnorm", "randomize_zero_weights",
           "samples", "calibration"]


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    pretrained: bool = False  # the factory takes pretrained=True and loads weights shipped in the package
    samples: str | None = None  # a held-out .npz shipped in the package: input0 (N, ...), labels (N,) or gt_boxes
    # (N, K, 4) and gt_classes (N, K) for a detector
    calibration: str | None = None  # training-split .npz shipped for INT8 calibration (never the held-out one)


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
    "repvgg_digits": _Entry(repvgg_digits, (1, 1, 8, 8), "RepVGG-Digits: 6 RepVGG blocks (16-64 channels) trained on scikit-learn's 8x8 digits; shipped weights and held-out split", pretrained=True, samples=str(_DIGITS_TEST), calibration=str(_DIGITS_TRAIN)),
    "repvgg_digits32": _Entry(repvgg_digits32, (1, 1, 32, 32), "RepVGG-Digits32: 6 RepVGG blocks (64-128 channels) trained with AdamW on the digits upsampled to 32x32, rotated, scaled, shifted and noised; shipped weights and held-out split", pretrained=True, samples=str(_DIGITS32_TEST), calibration=str(_DIGITS32_TRAIN)),
    "yolo_shapes": _Entry(yolo_shapes, (1, 3, 64, 64), "YOLO-Shapes: YOLOv7-tiny (RepConv heads, IDetect) at width 0.25 trained on synthetic 64x64 circles, squares, triangles; shipped weights and held-out split", pretrained=True, samples=str(_SHAPES_VAL), calibration=str(_SHAPES_TRAIN)),
    "yolov7_tiny_rep": _Entry(yolov7_tiny_rep, (1, 3, 320, 320), "YOLOv7-tiny (Wang et al. 2023) with RepConv heads and an IDetect head (ImplicitA / ImplicitM), 80 classes"),
    "panet": _Entry(panet, (1, 3, 128, 128), "PANet (Liu et al. 2018): FPN top-down (lateral 1x1, nearest upsample, add) plus bottom-up path augmentation (stride-2 3x3 into P_i+1), one map per level"),
    "giraffedet": _Entry(giraffedet, (1, 3, 128, 128), "GiraffeDet (Jiang et al. 2022): space-to-depth light backbone, heavy GFPN neck with queen fusion and log2n skip-layer connections"),
    "sa_fpn": _Entry(sa_fpn, (1, 3, 128, 128), "SA-FPN + Seq-Head: scale attention (levels resized, softmax over levels, weighted sum) and a sequential reg-then-cls head shared by all levels"),
    "small_object_det": _Entry(small_object_det, (1, 3, 128, 128), "Small-object YOLOv3: Darknet residual units, fusion of parallel dilated 3x3 convs (d=1,2,3), CBAM channel + spatial attention, 3 scales"),
    "eresfd": _Entry(eresfd, (1, 3, 128, 128), "EResFD (Jeong et al.): channel-reduced ResNet face detector, stride-4 stem, separated top-down / bottom-up aggregation, per-level cls + box heads"),
    "eatformer": _Entry(eatformer, _IMAGENET, "EATFormer (Zhang et al. 2024): EAT blocks of multi-scale dilated depthwise region aggregation, local dwconv + plain MHSA interaction, FFN"),
    "elan_csp": _Entry(elan_csp, (1, 3, 64, 64), "ELAN + CSP (Wang et al. 2022, gradient path design): ELAN blocks (stacked 3x3 units, every output concatenated, 1x1 transition) in CSP stages"),
    "ghostnet": _Entry(ghostnet, (1, 3, 64, 64), "GhostNet (Han et al. 2022): C-Ghost bottlenecks (1x1 intrinsic maps + cheap dw3x3 ghosts, concatenated) and a G-Ghost stage (cheap 1x1 features of the first block)"),
    "shufflenet_v1": _Entry(shufflenet_v1, (1, 3, 64, 64), "ShuffleNet v1 (Zhang et al. 2018), g=3: pointwise group conv, channel shuffle, dw3x3, group conv; stride 2 concats an avg-pooled shortcut"),
    "shufflenet_v2": _Entry(shufflenet_v2, (1, 3, 64, 64), "ShuffleNet V2 (Ma et al. 2018): channel split, 1x1-dw3x3-1x1 branch, concat, channel shuffle; two branches at stride 2"),
    "res2net": _Entry(res2net, (1, 3, 64, 64), "Res2Net (Gao et al. 2021): bottleneck whose 1x1 output is split in s=4 groups, hierarchical 3x3 convs each adding the previous group, concat, 1x1, residual"),
    "threshnet": _Entry(threshnet, (1, 3, 64, 64), "ThreshNet (Ju et al. 2022): dense blocks where layer k concatenates layers k-2^i for 2^i <= threshold (4), transition 1x1 + avg pool"),
    "sdanet": _Entry(sdanet, (1, 3, 64, 64), "SDA-Net (Guo et al. 2022): selective depth attention, a stage's block outputs fused by softmax-over-depth weights from their pooled sum"),
    "googlenet2": _Entry(googlenet2, (1, 3, 64, 64), "GoogLe2Net (2023): ResFRI inceptions, branches of growing receptive field each adding the previous branch's output, concat, 1x1, residual"),
    "mlp_mixer": _Entry(mlp_mixer, (1, 3, 64, 64), "MLP-Mixer (Tolstikhin et al. 2021): 8x8 patch embedding, 2 mixer blocks (token-mixing MLP via transpose, channel-mixing MLP), LayerNorm kept; 64x64 only"),
}


def names() -> list[str]:
    """Sorted names of the zoo models."""
    return sorted(_ZOO)


def _entry(name: str) -> _Entry:
    try:
        return _ZOO[name]
    except KeyError:
        guess = difflib.get_close_matches(name, names(), n=1, cutoff=0.75)
        raise ValueError(f"unknown zoo model {name!r}" + (f" (did you mean {guess[0]}?)" if guess else "")
                         + f"; known models: {', '.join(names())}") from None


def create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build zoo model ``name`` in its training-time form; ``kwargs`` go to its factory (``num_classes``, ``width``, ...).

    ``pretrained=True`` loads the weights shipped in the package (in eval mode); only entries with
    ``has_weights(name)`` have them.
    """
    entry = _entry(name)
    if not pretrained:
        return entry.factory(**kwargs)
    if not entry.pretrained:
        shipped = [n for n in names() if _ZOO[n].pretrained]
        raise ValueError(f"zoo model {name!r} has no shipped weights (only {', '.join(shipped)} "
                         f"{'has' if len(shipped) == 1 else 'have'}); build it with "
                         f"pretrained=False and load a checkpoint")
    return entry.factory(pretrained=True, **kwargs)


def has_weights(name: str) -> bool:
    """Whether zoo model ``name`` ships trained weights (``create(name, pretrained=True)``)."""
    return _entry(name).pretrained


def samples(name: str) -> str | None:
    """Path of the held-out samples shipped for zoo model ``name`` (``.npz``: ``input0``, ``labels``), or None."""
    return _entry(name).samples


def calibration(name: str) -> str | None:
    """Path of the training-split samples shipped for INT8 calibration of zoo model ``name``, or None."""
    return _entry(name).calibration


def input_shape(name: str) -> tuple[int, ...]:
    """Default example input shape of zoo model ``name``, batch size 1."""
    return _entry(name).input_shape


def describe(name: str) -> str:
    """One-line description of zoo model ``name``."""
    return _entry(name).description


@torch.no_grad()
def randomize_zero_weights(model: nn.Module, seed: int = 0) -> list[str]:
    """Draw new values, in place, for every parameter that is all zeros but a bias: what a library
    zero-initializes (torchvision's ViT head, timm's gMLP and MLP-Mixer heads) silences everything before it in a
    model with random weights, so that every output is the same and verifying against it proves nothing. Returns
    their names.

    Values ~ N(0, 1/fan_in) for a weight of 2 or more dimensions (fan_in: the elements of one output's slice),
    N(0, 0.02) otherwise, from a generator seeded with ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    names = []
    for name, p in model.named_parameters():
        if p.numel() and p.is_floating_point() and not name.endswith("bias") and not p.any():
            std = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.02
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
            names.append(name)
    return names


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
