"""Float64 depthwise convolutions by taps (``fusers.numerics.float64_kernels``) against torch's own kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusers.numerics import float64_kernels


def _rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels,multiplier,kernel,stride,dilation,padding,size", [
    (8, 1, (3, 3), 1, 1, 1, (9, 10)),
    (8, 2, (3, 3), 2, 1, 1, (10, 11)),           # a channel multiplier, stride 2
    (6, 1, (5, 5), (1, 2), (2, 1), (4, 2), (11, 12)),  # per-dim stride, dilation and padding
    (4, 3, (1, 3), 1, 1, (0, 1), (7, 8)),
    (5, 1, (7, 7), 3, 1, 0, (16, 17)),
    (3, 1, (3, 3), 1, 1, 5, (4, 5)),             # padding wider than the input
])
def test_depthwise_taps_agree_with_torch(channels, multiplier, kernel, stride, dilation, padding, size):
    x = _rand(2, channels, *size, seed=1)
    w = _rand(channels * multiplier, 1, *kernel, seed=2)
    for bias in (None, _rand(channels * multiplier, seed=3)):
        ref = F.conv2d(x, w, bias, stride, padding, dilation, channels)
        with float64_kernels():
            got = F.conv2d(x, w, bias, stride, padding, dilation, channels)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-15 * 8


def test_other_convs_run_as_torch_runs_them():
    x, w = _rand(1, 4, 8, 8), _rand(4, 2, 3, 3)  # grouped, two input channels per group: torch's kernel
    ref = F.conv2d(x, w, None, 1, 1, 1, 2)
    with float64_kernels():
        assert torch.equal(F.conv2d(x, w, None, 1, 1, 1, 2), ref)
        x32, w32 = x.float(), _rand(4, 1, 3, 3).float()  # float32 depthwise: untouched
        inside = F.conv2d(x32, w32, None, 1, 1, 1, 4)
    assert torch.equal(inside, F.conv2d(x32, w32, None, 1, 1, 1, 4))
