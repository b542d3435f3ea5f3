"""Shared test helpers: non-trivial BatchNorm statistics and running a reparameterization."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import fusers
from fusers.graph import as_conv, module_path, op_counts


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm statistics and affine parameters far from the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return model.eval()


def reparam(model: nn.Module, *shape, passes=None):
    """Reparameterize ``model`` on a random input of ``shape``; return (deploy, report, ops, fp32 error)."""
    model = randomize_bn(model)
    x = torch.randn(*shape)
    deploy = fusers.reparameterize(model, (x,), passes=passes)
    report = deploy.reparam_report
    assert report.float64_error <= 1e-9, report.summary()
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    err = fusers.numerics.max_rel_error(ref, out)
    return deploy, report, op_counts(deploy), err


def reasons(report) -> str:
    return " | ".join(r.reason for r in report.refusals())


class ConvLayer(NamedTuple):
    path: str  # the unit's module path (a folded conv carries its conv's or BatchNorm's path: that part dropped)
    stride: tuple
    dilation: tuple
    groups: int
    in_channels: int
    kernel: tuple


def conv_layers(plain) -> list[ConvLayer]:
    """Every convolution of a plain graph, in graph order."""
    out = []
    for node in plain.graph.nodes:
        conv = as_conv(plain, node) if node.op == "call_function" else None
        if conv is not None and conv.kind == "conv":
            path = module_path(node).removesuffix(".bn").removesuffix(".conv")
            out.append(ConvLayer(path, tuple(conv.stride), tuple(conv.dilation), conv.groups,
                                 conv.weight.shape[1] * conv.groups, tuple(conv.weight.shape[2:])))
    return out
