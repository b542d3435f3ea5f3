"""Shared test helpers: non-trivial BatchNorm statistics and running a reparameterization."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import fusers
from deploy import zoo
from fusers.graph import as_conv, module_path, op_counts, replace_conv
from fusers.rules import Pass


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm with statistics and affine parameters far from the identity (``zoo.randomize_batchnorm``),
    in eval mode."""
    return zoo.randomize_batchnorm(model, seed).eval()


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


class ScaleWeights(Pass):
    """A deliberately broken pass: rescales the weights of the conv named ``n`` by ``factors[n]``."""

    name = "scale_weights"

    def __init__(self, factors):
        self.factors = factors

    def match(self, gm, node):
        return self.found([node], self.factors[node.name]) if node.name in self.factors else None

    def rewrite(self, gm, match):
        (node,) = [n for n in gm.graph.nodes if n.name == match.nodes[0]]
        c = as_conv(gm, node)
        replace_conv(gm, node, c.x, "conv", c.weight * match.plan, c.bias, c.stride, c.padding, c.dilation, c.groups)
        gm.graph.erase_node(node)
        return f"x{match.plan}"
