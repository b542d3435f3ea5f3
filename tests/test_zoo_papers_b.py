"""Detector / transformer seed architectures (PANet, GiraffeDet, SA-FPN, small-object YOLOv3, EResFD, EATFormer):
each through the compiler and every CPU format (fp32, ≤ 1e-5 relative), plus one structural check per model
that a wrong implementation (or a compiler that ate the characteristic block) would break."""

from __future__ import annotations

import pytest
import torch
from helpers import conv_layers
from targets import convert_everywhere

from deploy import zoo
from deploy.zoo.giraffedet import skip_sources
from fusers.graph import op_counts

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("litert_torch")

NUM_CLASSES = 3


def _leaves(y):
    return [t for part in y for t in (_leaves(part) if isinstance(part, (list, tuple)) else [part])]


def check_panet(plain, ops, y):
    assert [t.shape[-1] for t in y] == [8, 4, 2] and all(t.shape[1] == NUM_CLASSES + 4 for t in y)
    assert ops["upsample_nearest2d"] == 2  # FPN top-down: P4 += up(P5), P3 += up(P4)
    bottom_up = [c for c in conv_layers(plain) if c.path.startswith("down.")]
    assert len(bottom_up) == 2 and all(c.stride == (2, 2) for c in bottom_up)  # path augmentation N_i -> N_i+1


def check_giraffedet(plain, ops, y):
    assert [t.shape[-1] for t in y] == [8, 4, 2]
    assert ops["pixel_unshuffle"] == 4  # space-to-depth chain, strides 4..32
    assert ops["cat"] == 3 * 3  # one queen-fusion concatenation per GFPN node (depth 3, 3 levels)
    # Queen-fusion input widths at level 1 (neck widths 16 / 24 / 32 at width 0.5): the same-level nodes of
    # the log2n skip layers ({0}, {0, 1}, {1, 2}), the finer level pooled (16) and the coarser upsampled (32).
    fuse = {c.path: c.in_channels for c in conv_layers(plain) if c.path in ("nodes.0.1.0", "nodes.1.1.0", "nodes.2.1.0")}
    assert fuse == {"nodes.0.1.0": 24 + 48, "nodes.1.1.0": 2 * 24 + 48, "nodes.2.1.0": 2 * 24 + 48}


def check_sa_fpn(plain, ops, y):
    assert [t.shape[-1] for t in y] == [8, 4, 2] and all(t.shape[1] == 4 + NUM_CLASSES for t in y)
    assert ops["softmax"] == 3  # scale attention per output level
    head = [c for c in conv_layers(plain) if c.path.startswith("head.")]
    assert len(head) == 3 * 5  # the shared sequential head runs once per level (3 tower units + box + cls)


def check_small_object_det(plain, ops, y):
    assert [t.shape[1:] for t in y] == [(3 * (5 + NUM_CLASSES), s, s) for s in (2, 4)]  # scales=2: strides 32, 16
    dilations = [c.dilation for c in conv_layers(plain) if ".branches." in c.path]
    assert sorted(dilations) == sorted([(1, 1), (2, 2), (3, 3)] * 2)  # parallel dilated branches survive apart
    assert ops["sigmoid"] == 2 * 2 and ops["amax"] == 2 * 2  # CBAM channel + spatial gates at each scale


def check_eresfd(plain, ops, y):
    cls, box = y
    assert [t.shape[-1] for t in cls] == [16, 8, 4, 2] and [t.shape[1] for t in box] == [8] * 4
    assert ops["max_pool2d"] == 2 and ops["upsample_nearest2d"] == 1  # stem pool + bottom-up, top-down


def check_eatformer(plain, ops, y):
    assert y.shape == (1, NUM_CLASSES)
    blocks = 2
    assert ops["softmax"] == blocks and ops["layer_norm"] == blocks and ops["matmul"] == 2 * blocks  # q·kᵀ, ·v
    # MSRA's three depthwise 3x3 branches of dilation 1, 2, 3 meet on the gcd grid: one depthwise conv per block
    # whose 7x7 kernel holds the dilated taps (the dilated reparameterization of UniRepLKNet).
    msra = [c for c in conv_layers(plain) if c.path.endswith(".msra")]
    assert len(msra) == blocks and not [c for c in conv_layers(plain) if ".msra.branches." in c.path]
    assert all(c.kernel == (7, 7) and c.dilation == (1, 1) and c.groups == c.in_channels for c in msra)


CASES = {  # name: (factory keywords, input size, structural check); small enough for ~90 s on 2 cores
    "panet": ({"width": 0.25}, 64, check_panet),
    "giraffedet": ({"width": 0.5}, 64, check_giraffedet),
    "sa_fpn": ({"width": 0.25}, 64, check_sa_fpn),
    "small_object_det": ({"width": 0.25, "scales": 2}, 64, check_small_object_det),
    "eresfd": ({"width": 0.5}, 128, check_eresfd),  # four levels down to stride 64
    "eatformer": ({"width": 0.25, "dims": (32, 64), "depths": (1, 1)}, 64, check_eatformer),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(CASES))
def test_paper_model_everywhere(name, tmp_path):
    kwargs, size, check = CASES[name]
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(zoo.create(name, num_classes=NUM_CLASSES, **kwargs), seed=3).eval()
    x = torch.randn(1, 3, size, size)
    plain, result = convert_everywhere(model, x, tmp_path)
    ops = op_counts(plain)
    assert "batch_norm" not in ops, plain.reparam_report.summary()
    with torch.no_grad():
        y = plain(x)
    assert all(torch.isfinite(t).all() for t in _leaves(y if isinstance(y, (list, tuple)) else [y]))
    check(plain, ops, y)


def test_gfpn_skip_layer_connections():
    assert [skip_sources(k, "log2n") for k in (1, 2, 3, 4, 8)] == [[0], [0, 1], [1, 2], [0, 2, 3], [0, 4, 6, 7]]
    assert skip_sources(4, "dense") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="log2n"):
        skip_sources(2, "sparse")
    # Layer 3 fuses same-level layers {1, 2} with log2n, {0, 1, 2} when dense (neck widths 16 / 24 / 32).
    for skip, same in (("log2n", 2), ("dense", 3)):
        layer3 = zoo.create("giraffedet", width=0.5, skip=skip).nodes[2]
        assert [node[0].conv.in_channels for node in layer3] == [same * 16 + 24, same * 24 + 16 + 32, same * 32 + 24]
