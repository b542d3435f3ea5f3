"""The pure tensor algebra of ``fusers.algebra``, checked in float64 against the ops it replaces."""

import pytest
import torch
import torch.nn.functional as F

from fusers import RefusalCode, algebra

D = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def bn_params(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g, dtype=D), torch.rand(c, generator=g, dtype=D) + 0.5,
            torch.rand(c, generator=g, dtype=D) + 0.5, torch.randn(c, generator=g, dtype=D), 1e-5)


def bn(y, mean, var, weight, bias, eps):
    return F.batch_norm(y, mean, var, weight, bias, False, 0.0, eps)


@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (2, 2, 1), (4, 1, 2)])
def test_fuse_conv_bn(groups, stride, dilation):
    x, k, b = rand(2, 8, 9, 9), rand(8, 8 // groups, 3, 3, seed=2), rand(8, seed=3)
    p = bn_params(8)
    s, t = algebra.bn_scale_shift(*p)
    k2, b2 = algebra.fuse_conv_bn(k, b, s, t)
    ref = bn(F.conv2d(x, k, b, stride, 1, dilation, groups), *p)
    torch.testing.assert_close(F.conv2d(x, k2, b2, stride, 1, dilation, groups), ref, **TOL)


def test_fuse_conv_transpose_bn_grouped():
    x, k = rand(2, 4, 5, 5), rand(4, 3, 2, 2, seed=2)
    p = bn_params(6)
    s, t = algebra.bn_scale_shift(*p)
    k2, b2 = algebra.fuse_conv_transpose_bn(k, None, s, t, groups=2)
    ref = bn(F.conv_transpose2d(x, k, None, 2, groups=2), *p)
    torch.testing.assert_close(F.conv_transpose2d(x, k2, b2, 2, groups=2), ref, **TOL)


def test_fuse_affine_into_unpadded_conv():
    x, k, b = rand(2, 6, 7, 7), rand(4, 3, 3, 3, seed=2), rand(4, seed=3)
    s, t = rand(6, seed=4), rand(6, seed=5)
    k2, b2 = algebra.fuse_affine_into_conv(k, b, s, t, groups=2)
    ref = F.conv2d(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), k, b, groups=2)
    torch.testing.assert_close(F.conv2d(x, k2, b2, groups=2), ref, **TOL)


def test_regroup_and_its_refusal():
    x, k = rand(1, 8, 5, 5), rand(8, 2, 3, 3, seed=2)
    torch.testing.assert_close(F.conv2d(x, algebra.regroup(k, 4, 2), groups=2), F.conv2d(x, k, groups=4), **TOL)
    with pytest.raises(algebra.NotExact) as e:
        algebra.regroup(k, 4, 3)
    assert e.value.code is RefusalCode.GROUPS_INCOMPATIBLE


def test_identity_and_avgpool_branches():
    x, s, t = rand(2, 5, 6, 6), rand(5, seed=2), rand(5, seed=3)
    ident = algebra.identity_branch(5, 2, s, t)
    torch.testing.assert_close(F.conv2d(x, ident.kernel, ident.bias, groups=ident.groups),
                               x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), **TOL)
    pool = algebra.avgpool_branch(5, (3, 3), (2, 2), (1, 1))
    torch.testing.assert_close(F.conv2d(x, pool.kernel, pool.bias, pool.stride, pool.padding, groups=5),
                               F.avg_pool2d(x, 3, 2, 1, count_include_pad=True), **TOL)


def _run(x, b):
    return F.conv2d(x, b.weight, b.bias, b.stride, b.padding, b.dilation, b.groups)


def test_merge_branches_acnet_dilated_grouped_and_scaled():
    x = rand(2, 4, 11, 11)
    branches = [
        algebra.Branch(rand(4, 2, 3, 3, seed=1), rand(4, seed=2), (1, 1), (1, 1), (1, 1), 2),
        algebra.Branch(rand(4, 4, 1, 3, seed=3), rand(4, seed=4), (1, 1), (0, 1), (1, 1), 1),
        algebra.Branch(rand(4, 4, 3, 1, seed=5), rand(4, seed=6), (1, 1), (1, 0), (1, 1), 1),
        algebra.Branch(rand(4, 1, 3, 3, seed=7), rand(4, seed=8), (1, 1), (2, 2), (2, 2), 4),  # dilated
        algebra.identity_branch(4, 2).scaled(rand(4, seed=9)),
    ]
    merged = algebra.merge_branches(branches, (11, 11))
    assert tuple(merged.kernel.shape) == (4, 4, 5, 5) and merged.groups == 1
    torch.testing.assert_close(_run(x, merged), sum(_run(x, b) for b in branches), **TOL)


@pytest.mark.parametrize("second,code", [
    (algebra.Branch(rand(4, 4, 5, 5), rand(4), (1, 1), (0, 0), (1, 1), 1), RefusalCode.STRIDE_MISMATCH),
    (algebra.Branch(rand(3, 4, 1, 1), rand(3), (2, 2), (0, 0), (1, 1), 1), RefusalCode.CHANNEL_MISMATCH),
    (algebra.Branch(rand(4, 4, 3, 3), rand(4), (2, 2), (0, 0), (1, 1), 1), RefusalCode.OUTPUT_SIZE_MISMATCH),
])
def test_merge_branches_refusals_carry_codes(second, code):
    first = algebra.Branch(rand(4, 4, 1, 1, seed=1), rand(4, seed=2), (2, 2), (0, 0), (1, 1), 1)
    with pytest.raises(algebra.NotExact) as e:
        algebra.merge_branches([first, second], (8, 8))
    assert e.value.code is code and str(e.value)


def test_compose_pointwise_with_bias_padded_input_and_affine():
    """DBB: conv1x1 -> pad with its own bias -> s * y + t -> conv kxk, as one conv."""
    x = rand(2, 6, 7, 7)
    first = algebra.Branch(rand(4, 3, 1, 1, seed=1), rand(4, seed=2), (1, 1), (0, 0), (1, 1), 2)
    s, t = rand(4, seed=3), rand(4, seed=4)
    second = algebra.Branch(rand(6, 2, 3, 3, seed=5), rand(6, seed=6), (2, 2), (1, 1), (1, 1), 2)
    y = _run(x, first) * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)
    border = (first.bias * s + t).view(1, -1, 1, 1)  # what the pad holds after the affine op
    ref = F.conv2d(F.pad(y - border, [1, 1, 1, 1]) + border, second.kernel, second.bias, 2, 0, 1, 2)
    merged = algebra.compose_pointwise(first.affine(s, t), second)
    torch.testing.assert_close(_run(x, merged), ref, **TOL)
    with pytest.raises(algebra.NotExact) as e:
        algebra.compose_pointwise(second, first)
    assert e.value.code is RefusalCode.NOT_POINTWISE


def test_dirac_tap():
    assert algebra.dirac_tap((3, 3), (1, 1), (1, 1)) == (1, 1)
    assert algebra.dirac_tap((3, 3), (2, 2), (2, 2)) == (1, 1)
    assert algebra.dirac_tap((3, 1), (0, 0), (1, 1)) == (0, 0)
    assert algebra.dirac_tap((3, 3), (3, 1), (1, 1)) is None  # offset 0 falls outside the kernel
    assert algebra.dirac_tap((3, 3), (1, 1), (2, 2)) is None  # offset 0 between two taps


@pytest.mark.parametrize("shortcut", [False, True])
def test_rm_carry_removes_the_residual(shortcut):
    """``c2(relu(c1(x))) + shortcut(x)`` with ``x >= 0`` as a plain chain of two widened convs."""
    x = rand(2, 4, 8, 8).relu()
    stride = (2, 2) if shortcut else (1, 1)
    k1, b1 = rand(6, 4, 3, 3, seed=1), rand(6, seed=2)
    k2, b2 = rand(5 if shortcut else 4, 6, 3, 3, seed=3), rand(5 if shortcut else 4, seed=4)
    ks, bs = (rand(5, 4, 1, 1, seed=5), rand(5, seed=6)) if shortcut else (None, None)
    ref = F.conv2d(F.conv2d(x, k1, b1, stride, 1).relu(), k2, b2, 1, 1)
    ref = ref + (F.conv2d(x, ks, bs, stride) if shortcut else x)
    tap = algebra.dirac_tap((3, 3), (1, 1), (1, 1))
    w1, c1 = algebra.carry_input(k1, b1, 4, tap, first=True)
    w2, c2 = algebra.add_shortcut(k2, b2, 4, tap, ks, bs)
    assert tuple(w1.shape) == (10, 4, 3, 3) and tuple(w2.shape[:2]) == (k2.shape[0], 10)
    out = F.conv2d(F.conv2d(x, w1, c1, stride, 1).relu(), w2, c2, 1, 1)
    torch.testing.assert_close(out, ref, **TOL)


def test_rm_carry_through_a_middle_conv():
    """The carried channels pass through a conv that already receives them (a chain of three)."""
    x = rand(1, 3, 6, 6).relu()
    ks = [rand(5, 3, 3, 3, seed=1), rand(4, 5, 1, 1, seed=2), rand(3, 4, 3, 3, seed=3)]
    bs = [rand(5, seed=4), None, rand(3, seed=5)]
    pads = [1, 0, 1]
    y = x
    for i, (k, b, p) in enumerate(zip(ks, bs, pads)):
        y = F.conv2d(y, k, b, 1, p)
        y = y.relu() if i < 2 else y
    ref = y + x
    y = x
    for i, (k, b, p) in enumerate(zip(ks, bs, pads)):
        tap = algebra.dirac_tap(k.shape[2:], (p, p), (1, 1))
        w, c = algebra.carry_input(k, b, 3, tap, first=i == 0) if i < 2 else algebra.add_shortcut(k, b, 3, tap)
        y = F.conv2d(y, w, c, 1, p)
        y = y.relu() if i < 2 else y
    torch.testing.assert_close(y, ref, **TOL)
