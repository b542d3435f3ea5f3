"""Classifier seed architectures (ELAN/CSP, GhostNet, ShuffleNet v1/v2, Res2Net, ThreshNet, SDA-Net, GoogLe2Net,
MLP-Mixer): each through the compiler and every CPU format (fp32, ≤ 1e-5 relative), plus one structural check per
model on the plain graph that a wrong implementation (or a compiler that ate the characteristic block) would break."""

from __future__ import annotations

import pytest
import torch
from helpers import conv_layers
from targets import convert_everywhere

from deploy import zoo
from deploy.zoo._conv_act import channel_shuffle
from deploy.zoo.threshnet import threshold_links
from fusers.graph import module_path, op_counts

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("litert_torch")

NUM_CLASSES = 5
WIDTH = 0.5


def _cat_arities(plain):
    return sorted(len(n.args[0]) for n in plain.graph.nodes if n.op == "call_function" and "cat" in str(n.target))


def check_elan_csp(plain, ops):
    # per stage: downsampling unit, CSP (cross, part, transition), ELAN (short, long, 4 stacked 3x3, transition)
    assert ops["conv2d"] == 1 + 3 * (1 + 3 + 2 + 4 + 1)
    assert _cat_arities(plain) == [2, 2, 2, 6, 6, 6]  # CSP joins two paths; ELAN concatenates all 2 + 4 outputs
    stacked = [c for c in conv_layers(plain) if ".stack." in c.path]
    assert len(stacked) == 12 and all(c.kernel == (3, 3) for c in stacked)


def check_ghostnet(plain, ops):
    # stem, 4 bottlenecks (2 ghost modules of 2 convs, stride-2 dw, 2-conv shortcuts), G-Ghost stage (10), last unit
    assert ops["conv2d"] == 1 + (4 * 4 + 2 + 2 * 2) + 10 + 1
    cheap = [c for c in conv_layers(plain) if c.path.endswith(".cheap")]
    assert len(cheap) == 8 + 1 and all(c.groups == c.in_channels and c.kernel == (3, 3) for c in cheap[:-1])  # ghost maps: depthwise
    assert cheap[-1].path == "g_ghost.cheap" and cheap[-1].kernel == (1, 1)  # G-Ghost: cheap 1x1 of the intrinsic features
    assert ops["cat"] == 8 + 2  # one per ghost module, the mix's pooled features, the G-Ghost output


def check_shufflenet_v1(plain, ops):
    assert ops["transpose"] == ops["view"] == 6  # the channel shuffle survives in every unit
    grouped = [c for c in conv_layers(plain) if 1 < c.groups < c.in_channels]
    assert len(grouped) == 2 * 6 - 1 and all(c.groups == 3 and c.kernel == (1, 1) for c in grouped)  # g=3 pointwise convs
    assert ops["avg_pool2d"] == 3 and ops["cat"] == 3 and ops["add"] == 3  # stride 2 concatenates, stride 1 adds


def check_shufflenet_v2(plain, ops):
    assert ops["transpose"] == 6 and ops["chunk"] == 3 and ops["cat"] == 6  # split in stride-1 units, shuffle in all
    assert ops["conv2d"] == 1 + 3 * 5 + 3 * 3 + 1
    assert "add" not in ops  # V2 replaces the elementwise add by a concatenation


def check_res2net(plain, ops):
    assert ops["conv2d"] == 1 + 4 * 5 + 3
    assert ops["split"] == 4
    # residuals (4) + hierarchical adds x_i + y_{i-1} in the two stride-1 blocks (s - 2 = 2 each)
    assert ops["add"] == 4 + 2 * 2
    hier = [c for c in conv_layers(plain) if ".convs." in c.path]
    assert len(hier) == 4 * 3 and all(c.kernel == (3, 3) for c in hier)


def check_threshnet(plain, ops):
    assert threshold_links(4, 4) == [3, 2, 0] and threshold_links(7, 2) == [6, 5]
    assert ops["conv2d"] == 1 + 3 * 4 + 2 + 1
    assert _cat_arities(plain) == [2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    # layer 4 of block 1 reads layers 3, 2 and the block input (stem, 12 channels at width 0.5): 6 + 6 + 12
    layer4 = [c for c in conv_layers(plain) if c.path == "body.0.layers.3"]
    assert layer4[0].in_channels == 8 + 8 + 12


def check_sdanet(plain, ops):
    softmax = ops.get("softmax", 0) + ops.get("_softmax", 0)
    assert softmax == 3 and ops["mul"] == 3 * 2  # one depth attention per stage, one weight per block output
    assert ops["conv2d"] == 1 + (4 + 2) + 2 * (4 + 1 + 2)


def check_googlenet2(plain, ops):
    assert ops["conv2d"] == 1 + 2 + 3 * 9
    assert ops["add"] == 3 * (3 + 1)  # three transverse passages and the residual per ResFRI
    assert ops["max_pool2d"] == 3


def check_mlp_mixer(plain, ops):
    depth = 2
    assert ops["linear"] == 4 * depth + 1 and ops["layer_norm"] == 2 * depth + 1 and ops["conv2d"] == 1
    assert ops["transpose"] == 1 + 2 * depth  # tokens, then the token-mixing MLP's transpose in and out
    token_fc = [n for n in plain.graph.nodes if n.target == torch.ops.aten.linear.default
                and module_path(n).endswith("token_mlp.0")]
    assert len(token_fc) == depth and all(n.args[1].meta["val"].shape[1] == 64 for n in token_fc)  # 8x8 patches


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_seed_classifier_converts_everywhere(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(zoo.create(name, width=WIDTH, num_classes=NUM_CLASSES), seed=3).eval()
    assert zoo.input_shape(name) == (1, 3, 64, 64)
    x = torch.randn(*zoo.input_shape(name))
    plain, _ = convert_everywhere(model, x, tmp_path)
    ops = op_counts(plain)
    assert "batch_norm" not in ops and "_native_batch_norm_legit_no_training" not in ops
    with torch.no_grad():
        assert plain(x).shape == (1, NUM_CLASSES)
    CHECKS[name](plain, ops)
