"""Pure tensor algebra of reparameterization: (kernel, bias) pairs in, (kernel, bias) pairs out.

No graph code lives here (STYLE 1). Kernels follow PyTorch layouts:

* convolution: ``K[out, in / groups, *k]``; a Linear is a convolution with no spatial dims;
* transposed convolution: ``K[in, out / groups, *k]``.

With ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s`` (eval-mode BatchNorm as ``s*x + t``):

* conv -> BN:            ``K' = K * s[out]``,            ``b' = s * b + t``
* BN -> conv (unpadded): ``K' = K * s[in]``,             ``b' = b + sum(K * t[in])``
* branch sum:            ``K = sum(place(K_i))``,        ``b = sum(b_i)`` (kernels aligned on input offsets)
* 1x1 -> kxk sequence:   ``K = K2 . K1`` per group,      ``b = b2 + sum(K2 * b1)``
* RM carry (conv ``i`` of a residual chain with block input ``x`` of ``C_x`` channels):
  ``K' = [[K, 0], [0, D]]``, ``b' = [b, 0]`` where ``D`` is a ``C_x`` identity placed at the tap that
  reads input offset 0; the last conv adds the shortcut ``S`` (identity or a 1x1 kernel) at that tap:
  ``K' = [K, S]``, ``b' = b + b_S``

Everything is meant to be computed in float64; callers round once at the end.
A condition that makes a rewrite inexact raises :class:`NotExact` with a
:class:`~fusers.rules.RefusalCode` and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .rules import RefusalCode

__all__ = [
    "NotExact",
    "Branch",
    "bn_scale_shift",
    "fuse_conv_bn",
    "fuse_conv_transpose_bn",
    "fuse_affine_into_conv",
    "regroup",
    "identity_branch",
    "avgpool_branch",
    "merge_branches",
    "compose_pointwise",
    "dirac_tap",
    "carry_input",
    "add_shortcut",
    "compose_affine",
    "affine_as_batchnorm",
]


class NotExact(Exception):
    """A rewrite would change the function; ``code`` says which condition failed, the message why."""

    def __init__(self, code: RefusalCode, message: str):
        super().__init__(message)
        self.code = code


def _per_out(v: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Shape a per-output-channel vector to broadcast over a conv kernel."""
    return v.reshape(-1, *([1] * (kernel.dim() - 1)))


def bn_scale_shift(mean, var, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``s * x + t``."""
    s = torch.rsqrt(var + eps)
    if weight is not None:
        s = s * weight
    t = -mean * s
    if bias is not None:
        t = t + bias
    return s, t


def fuse_conv_bn(kernel, bias, s, t) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(conv(x))`` as one conv (also Linear -> BatchNorm1d)."""
    if bias is None:
        bias = torch.zeros_like(s)
    return kernel * _per_out(s, kernel), s * bias + t


def fuse_conv_transpose_bn(kernel, bias, s, t, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(conv_transpose(x))`` as one transposed conv; output channels live in dim 1 per group."""
    c_in, c_out_g = kernel.shape[:2]
    k = kernel.reshape(groups, c_in // groups, c_out_g, *kernel.shape[2:])
    scale = s.reshape(groups, 1, c_out_g, *([1] * (kernel.dim() - 2)))
    if bias is None:
        bias = torch.zeros_like(s)
    return (k * scale).reshape(kernel.shape), s * bias + t


def fuse_affine_into_conv(kernel, bias, s, t, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv(s * x + t)`` as one conv; exact only when the conv reads no padding."""
    c_out, c_in_g = kernel.shape[:2]
    per_group = c_out // groups
    # the input channel that kernel[o, j] reads is (o // per_group) * c_in_g + j
    s_in = s.reshape(groups, 1, c_in_g).expand(groups, per_group, c_in_g).reshape(c_out, c_in_g)
    t_in = t.reshape(groups, 1, c_in_g).expand(groups, per_group, c_in_g).reshape(c_out, c_in_g)
    spatial = tuple(range(2, kernel.dim()))
    k_sum = kernel.sum(dim=spatial) if spatial else kernel
    if bias is None:
        bias = torch.zeros(c_out, dtype=kernel.dtype)
    new_kernel = kernel * s_in.reshape(c_out, c_in_g, *([1] * len(spatial)))
    return new_kernel, bias + (k_sum * t_in).sum(dim=1)


def regroup(kernel: torch.Tensor, groups_from: int, groups_to: int) -> torch.Tensor:
    """Express a grouped kernel with coarser groups (``groups_to`` divides ``groups_from``)."""
    if groups_from == groups_to:
        return kernel
    if groups_from % groups_to:
        raise NotExact(RefusalCode.GROUPS_INCOMPATIBLE,
                       f"groups {groups_from} cannot be expressed with groups {groups_to}")
    c_out, c_in_from = kernel.shape[:2]
    c_in_to = c_in_from * groups_from // groups_to
    out = kernel.new_zeros(c_out, c_in_to, *kernel.shape[2:])
    per_from, per_to = c_out // groups_from, c_out // groups_to
    for g in range(groups_from):
        rows = slice(g * per_from, (g + 1) * per_from)
        start = g * c_in_from - (g * per_from // per_to) * c_in_to
        out[rows, start:start + c_in_from] = kernel[rows]
    return out


@dataclass
class Branch:
    """One linear branch ``conv(x; kernel, bias, stride, padding, dilation, groups)`` of a sum."""

    kernel: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    label: str = field(default="conv")

    def scaled(self, coef: torch.Tensor) -> "Branch":
        if bool((coef == 1).all()):  # the common case, a plain sum: no copy of the kernel
            return self
        return self.affine(coef, 0.0)

    def affine(self, s, t) -> "Branch":
        """The branch followed by ``s * y + t`` per output channel."""
        return replace(self, kernel=self.kernel * _per_out(s, self.kernel), bias=self.bias * s + t)


def identity_branch(channels: int, ndim: int, scale=None, shift=None, dtype=torch.float64) -> Branch:
    """``s * x + t`` per channel (bare identity, or an identity BatchNorm) as a depthwise 1x1 conv."""
    scale = torch.ones(channels, dtype=dtype) if scale is None else scale
    shift = torch.zeros(channels, dtype=dtype) if shift is None else shift
    kernel = scale.reshape(channels, 1, *([1] * ndim)).clone()
    return Branch(kernel, shift.clone(), (1,) * ndim, (0,) * ndim, (1,) * ndim, channels, "identity")


def avgpool_branch(channels: int, kernel_size, stride, padding, dtype=torch.float64) -> Branch:
    """Average pooling (count_include_pad) as a depthwise conv with kernel ``1 / prod(k)``."""
    kernel = torch.full((channels, 1, *kernel_size), 1.0 / math.prod(kernel_size), dtype=dtype)
    zero = torch.zeros(channels, dtype=dtype)
    return Branch(kernel, zero, tuple(stride), tuple(padding), (1,) * len(kernel_size), channels, "avgpool")


def merge_branches(branches: list[Branch], in_size: tuple[int, ...]) -> Branch:
    """Sum of branches on one input as one conv.

    Tap ``j`` of a branch reads input offset ``d * j - p``; a negative ``p`` is a branch that crops its
    input (ACNet); branches are placed in a common
    kernel so equal offsets coincide. Exact when strides agree, the offsets of all branches
    lie on one dilation grid, and the merged conv has the branches' output size.
    """
    ndim = len(in_size)
    strides = {b.stride for b in branches}
    if len(strides) > 1:
        raise NotExact(RefusalCode.STRIDE_MISMATCH, f"mismatched strides {sorted(strides)}")
    stride = branches[0].stride
    dilation = []
    for dim in range(ndim):  # mixed dilations meet on their gcd grid (dilated kernels get zero taps)
        ds = {b.dilation[dim] for b in branches if b.kernel.shape[2 + dim] > 1}
        dilation.append(math.gcd(*ds) if ds else 1)
    branches = [_redilate(b, dilation) for b in branches]
    groups = math.gcd(*[b.groups for b in branches])
    lo = [min(-b.padding[d] for b in branches) for d in range(ndim)]
    hi = [max(dilation[d] * (b.kernel.shape[2 + d] - 1) - b.padding[d] for b in branches) for d in range(ndim)]
    size = [(hi[d] - lo[d]) // dilation[d] + 1 for d in range(ndim)]
    if any(x > 0 for x in lo):
        raise NotExact(RefusalCode.OUTPUT_SIZE_MISMATCH, "every branch crops its input in a spatial dim: the merged "
                       "conv would need negative padding")
    out_size = _conv_out(in_size, size, stride, [-x for x in lo], dilation)
    c_out = branches[0].kernel.shape[0]
    c_in_g = branches[0].kernel.shape[1] * branches[0].groups // groups
    kernel = torch.zeros(c_out, c_in_g, *size, dtype=branches[0].kernel.dtype)
    bias = torch.zeros(c_out, dtype=branches[0].kernel.dtype)
    for b in branches:
        if b.kernel.shape[0] != c_out:
            raise NotExact(RefusalCode.CHANNEL_MISMATCH,
                           f"branch '{b.label}' has {b.kernel.shape[0]} output channels, expected {c_out}")
        if _conv_out(in_size, b.kernel.shape[2:], b.stride, b.padding, b.dilation) != out_size:
            raise NotExact(RefusalCode.OUTPUT_SIZE_MISMATCH,
                           f"branch '{b.label}' output size differs from the merged conv's")
        index = [slice(None), slice(None)]
        for d in range(ndim):
            shift = -b.padding[d] - lo[d]
            if shift % dilation[d]:
                raise NotExact(RefusalCode.OFF_DILATION_GRID,
                               f"branch '{b.label}' is off the dilation grid in spatial dim {d}")
            start = shift // dilation[d]
            index.append(slice(start, start + b.kernel.shape[2 + d]))
        kernel[tuple(index)] += regroup(b.kernel, b.groups, groups)
        bias += b.bias
    return Branch(kernel, bias, stride, tuple(-x for x in lo), tuple(dilation), groups, "merged")


def _redilate(b: Branch, dilation: list[int]) -> Branch:
    """The same branch on a finer dilation grid: a kernel with zero taps between the old ones."""
    factors = [b.dilation[d] // dilation[d] if b.kernel.shape[2 + d] > 1 else 1 for d in range(len(dilation))]
    if all(f == 1 for f in factors):
        return replace(b, dilation=tuple(dilation))
    size = [(k - 1) * f + 1 for k, f in zip(b.kernel.shape[2:], factors)]
    kernel = b.kernel.new_zeros(*b.kernel.shape[:2], *size)
    kernel[(slice(None), slice(None)) + tuple(slice(None, None, f) for f in factors)] = b.kernel
    return replace(b, kernel=kernel, dilation=tuple(dilation))


def _conv_out(in_size, kernel, stride, padding, dilation) -> tuple[int, ...]:
    return tuple(
        (in_size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
        for d in range(len(in_size))
    )


def compose_pointwise(first: Branch, second: Branch) -> Branch:
    """``second(first(x))`` as one conv, where ``first`` is a 1x1, stride-1, unpadded conv.

    The caller proves the padding of ``second`` reads what ``first`` gives on a zero input.
    """
    if any(k != 1 for k in first.kernel.shape[2:]) or any(first.stride) != 1 or any(first.padding):
        raise NotExact(RefusalCode.NOT_POINTWISE, "the first conv of a sequence must be 1x1, stride 1, unpadded")
    groups = math.gcd(first.groups, second.groups)
    k1 = regroup(first.kernel, first.groups, groups).flatten(1)  # [mid, in/g]
    k2 = regroup(second.kernel, second.groups, groups)  # [out, mid/g, *k]
    mid_g, out_g = k1.shape[0] // groups, k2.shape[0] // groups
    if k2.shape[1] != mid_g:
        raise NotExact(RefusalCode.CHANNEL_MISMATCH, "channel counts of the sequence do not chain")
    parts, biases = [], []
    for g in range(groups):
        a = k1[g * mid_g:(g + 1) * mid_g]
        b = k2[g * out_g:(g + 1) * out_g]
        parts.append(torch.einsum("om...,mc->oc...", b, a))
        spatial = tuple(range(2, b.dim()))
        b_sum = b.sum(dim=spatial) if spatial else b
        biases.append(b_sum @ first.bias[g * mid_g:(g + 1) * mid_g])
    kernel = torch.cat(parts, 0)
    bias = second.bias + torch.cat(biases, 0)
    return Branch(kernel, bias, second.stride, second.padding, second.dilation, groups, "sequence")


def dirac_tap(kernel_size, padding, dilation) -> tuple[int, ...] | None:
    """The kernel tap that reads input offset 0 (``d * j - p == 0`` in every dim), or None."""
    taps = []
    for k, p, d in zip(kernel_size, padding, dilation):
        if p % d or not 0 <= p // d < k:
            return None
        taps.append(p // d)
    return tuple(taps)


def carry_input(kernel, bias, carried: int, tap: tuple[int, ...], first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv of an RM chain widened by ``carried`` outputs that copy the block input ``x`` unchanged.

    ``first``: the conv reads ``x`` itself (its first ``carried`` input channels are ``x``); otherwise
    ``x`` arrives as ``carried`` extra input channels after the main ones. The copy is a Dirac kernel
    at ``tap`` (the tap that reads offset 0, so padding is never read) with zero bias:
    ``K' = [[K, 0], [D, 0]]`` (first) or ``[[K, 0], [0, D]]``, ``b' = [b, 0]``.
    """
    out, cin = kernel.shape[:2]
    extra_in = 0 if first else carried
    k = kernel.new_zeros(out + carried, cin + extra_in, *kernel.shape[2:])
    k[:out, :cin] = kernel
    start = 0 if first else cin
    k[out:, start:start + carried][(slice(None), slice(None)) + tuple(tap)] = torch.eye(carried, dtype=kernel.dtype)
    b = bias if bias is not None else kernel.new_zeros(out)
    return k, torch.cat([b, kernel.new_zeros(carried)])


def add_shortcut(kernel, bias, carried: int, tap: tuple[int, ...], shortcut_kernel=None, shortcut_bias=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The last conv of an RM chain, reading ``x`` as ``carried`` extra input channels, plus the shortcut.

    ``K' = [K, S]`` with ``S`` at ``tap``: the identity (``shortcut_kernel`` None) or a 1x1 kernel
    ``[out, carried]`` (a BN-folded downsample, i.e. padded to the conv's kernel size);
    ``b' = b + b_S``. The block's ``conv(...) + shortcut(x)`` becomes this one conv.
    """
    out, cin = kernel.shape[:2]
    k = kernel.new_zeros(out, cin + carried, *kernel.shape[2:])
    k[:, :cin] = kernel
    s = torch.eye(carried, dtype=kernel.dtype) if shortcut_kernel is None else shortcut_kernel.reshape(out, carried)
    k[:, cin:][(slice(None), slice(None)) + tuple(tap)] += s
    b = bias if bias is not None else kernel.new_zeros(out)
    if shortcut_bias is not None:
        b = b + shortcut_bias
    return k, b


def compose_affine(s, t, a_in=None, c_in=None, a_out=None, c_out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``A_out(s * A_in^-1(u) + t)`` per channel as ``(s', t')``, where ``A(v) = a * v + c`` (None: identity).

    ``s' = a_out * s / a_in``, ``t' = a_out * (t - s * c_in / a_in) + c_out``: a BatchNorm read and written in
    other coordinates is still one BatchNorm.
    """
    if a_in is not None:
        s, t = s / a_in, t - s * c_in / a_in
    if a_out is not None:
        s, t = a_out * s, a_out * t + c_out
    return s, t


def affine_as_batchnorm(s, t, var, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight, bias, running_mean)`` of an eval BatchNorm with running variance ``var`` computing ``s * x + t``:
    ``weight = s * sqrt(var + eps)``, ``bias = t``, ``mean = 0``."""
    return s * torch.sqrt(var + eps), t.clone(), torch.zeros_like(t)
