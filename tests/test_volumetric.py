"""3-D convolutions (video and volumetric networks) fold and merge like 2-D ones.

torchvision's own video ResNets are built directly (R(2+1)D: a (1,3,3) conv, BatchNorm, ReLU, then a (3,1,1) conv;
MC3: 3-D then 2-D-in-3-D blocks), one block per stage at a clip of 4 frames of 32x32. The decoder stage is
written the way MONAI's ``UnetrUpBlock`` writes it: a bias-free transposed conv up, the skip concatenated, then a
``UnetResBlock`` (conv-norm-LeakyReLU, conv-norm, a 1x1x1 conv-norm on the residual when the width changes, the
sum through LeakyReLU), with BatchNorm as its norm.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusers
from deploy.zoo import randomize_batchnorm
from fusers.graph import op_counts

video = pytest.importorskip("torchvision.models.video.resnet")


def _converted(model: nn.Module, x: torch.Tensor):
    model = randomize_batchnorm(model, seed=0).eval()
    deploy = fusers.reparameterize(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-4, atol=1e-5)
    return deploy.reparam_report, op_counts(deploy)


@pytest.mark.parametrize("blocks,stem,bns", [
    ([video.Conv2Plus1D] * 4, video.R2Plus1dStem, 21),
    ([video.Conv3DSimple] + [video.Conv3DNoTemporal] * 3, video.BasicStem, 12),
])
def test_torchvision_video_resnets_keep_no_batchnorm(blocks, stem, bns):
    torch.manual_seed(0)
    model = video.VideoResNet(video.BasicBlock, blocks, [1, 1, 1, 1], stem, num_classes=10)
    report, after = _converted(model, torch.randn(1, 3, 4, 32, 32))
    assert report.ops_before["batch_norm"] == bns and "batch_norm" not in after
    assert after["conv3d"] == report.ops_before["conv3d"]  # folded into the convs, none added
    assert report.float64_error <= 1e-9


class UnetResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1, self.norm2 = nn.BatchNorm3d(cout), nn.BatchNorm3d(cout)
        self.downsample = cin != cout
        if self.downsample:
            self.conv3 = nn.Conv3d(cin, cout, 1, bias=False)
            self.norm3 = nn.BatchNorm3d(cout)

    def forward(self, inp):
        residual = inp
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.norm2(self.conv2(out))
        if self.downsample:
            residual = self.norm3(self.conv3(residual))
        out += residual
        return self.lrelu(out)


class UnetrUpBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.transp_conv = nn.ConvTranspose3d(cin, cout, 2, stride=2, bias=False)
        self.conv_block = UnetResBlock(cout * 2, cout)

    def forward(self, inp, skip):
        out = torch.cat((self.transp_conv(inp), skip), dim=1)
        return self.conv_block(out)


def test_volumetric_decoder_folds_each_norm_and_merges_nothing_across_inputs():
    torch.manual_seed(0)
    model = UnetrUpBlock(8, 4)
    x, skip = torch.randn(1, 8, 2, 3, 3), torch.randn(1, 4, 4, 6, 6)
    model = randomize_batchnorm(model, seed=0).eval()
    deploy = fusers.reparameterize(model, (x, skip))
    report, after = deploy.reparam_report, op_counts(deploy)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x, skip), model(x, skip), rtol=1e-4, atol=1e-5)
    assert report.ops_before["batch_norm"] == 3 and "batch_norm" not in after
    # conv2 reads the block's hidden tensor, conv3 its input: not one input, so no branch merge
    assert after["conv3d"] == 3 and after["conv_transpose3d"] == 1 and report.float64_error <= 1e-9


def test_parallel_3d_kernels_merge_into_one():
    """ACNet's idea in 3-D: a 3x3x3 and a 1x1x1 conv of one input, each with its BatchNorm, summed."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.square, self.point = nn.Conv3d(4, 6, 3, padding=1, bias=False), nn.Conv3d(4, 6, 1, bias=False)
            self.bn_square, self.bn_point = nn.BatchNorm3d(6), nn.BatchNorm3d(6)

        def forward(self, x):
            return torch.relu(self.bn_square(self.square(x)) + self.bn_point(self.point(x)))

    report, after = _converted(Block(), torch.randn(1, 4, 3, 5, 5))
    assert after == {"conv3d": 1, "relu": 1} and report.float64_error <= 1e-9
