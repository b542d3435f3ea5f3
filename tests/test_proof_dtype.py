"""The float64 proof on graphs that do not run in float64 as captured.

- EfficientViT's linear attention computes in float32 on purpose: ``.float()`` casts and an autocast region
  turned off. Captured, the region is a higher-order op whose subgraph holds ``dtype=float32``; the float64
  copy must cast that subgraph too, or the check crashes on a dtype mismatch.
- A kernel that only takes float32 (a custom extension op): rewrites are checked in float32 against a bound
  of ``ops * eps``, and the report says so instead of claiming float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fusers
from tests.helpers import randomize_bn


class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, k=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.Hardswish() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class LinearAttention(nn.Module):
    """ReLU linear attention over q, k, v from one 1x1 conv, its product taken in float32 with autocast off."""

    def __init__(self, dim=8, head=4, eps=1e-15):
        super().__init__()
        self.dim, self.eps = head, eps
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.proj = ConvNormAct(dim, dim, act=False)

    def _attn(self, q, k, v):
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        out = q @ (k.transpose(-1, -2) @ v)
        return (out[..., :-1] / (out[..., -1:] + self.eps)).to(dtype)

    def forward(self, x):
        b, _, h, w = x.shape
        qkv = self.qkv(x).reshape(b, -1, 3 * self.dim, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        with torch.autocast(device_type=v.device.type, enabled=False):
            out = self._attn(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


class LiteStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3)
        self.attn = LinearAttention()

    def forward(self, x):
        x = self.stem(x)
        return x + self.attn(x)


@torch.library.custom_op("reparam_tests::float32_only", mutates_args=())
def float32_only(x: torch.Tensor) -> torch.Tensor:
    """Stands for a compiled extension kernel written for float32 alone."""
    if x.dtype != torch.float32:
        raise RuntimeError(f"float32_only: expected a float32 tensor, got {x.dtype}")
    return torch.tanh(x) * 0.5


@float32_only.register_fake
def _(x):
    return torch.empty_like(x)


class WithExtension(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ConvNormAct(3, 8, 3)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.b(float32_only(self.a(x)))


def _convert(model, shape):
    randomize_bn(model, 0)
    model.eval()
    gm = fusers.reparameterize(model, (torch.randn(*shape),))
    return gm, gm.reparam_report


def test_float32_region_of_a_float64_graph_is_cast_and_proved_in_float64():
    gm, report = _convert(LiteStage(), (2, 3, 8, 8))
    assert report.proof == "float64"
    assert report.float64_error <= 1e-12
    assert report.ops_before["batch_norm"] == 2 and "batch_norm" not in report.ops_after
    assert report.float32_error <= 1e-5


def test_a_float32_only_kernel_is_proved_in_float32_against_a_stated_bound():
    gm, report = _convert(WithExtension(), (2, 3, 8, 8))
    ops = sum(n.op == "call_function" for n in gm.graph.nodes)
    assert report.proof.startswith("float32 with a bound of ")
    assert "float32_only: expected a float32 tensor" in report.proof
    assert "batch_norm" not in report.ops_after and report.ops_after["conv2d"] == 2
    assert 0 < report.float64_error <= (ops + 4) * torch.finfo(torch.float32).eps
    assert report.to_dict()["proof"] == report.proof
    assert "proof: float32 with a bound" in report.summary()


def test_the_float32_check_still_rolls_back_an_inexact_rewrite():
    """A wrong rewrite (a BatchNorm dropped) is far outside the float32 bound: rolled back with the reason."""
    from fusers.rules import Match, Pass, RefusalCode

    class DropBatchNorm(Pass):
        name = "drop_bn_wrongly"

        def match(self, gm, node):
            return self.found([node]) if node.target == torch.ops.aten.batch_norm.default else None

        def rewrite(self, gm, match: Match) -> str:
            node = next(n for n in gm.graph.nodes if n.name == match.nodes[0])
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            return "dropped"

    model = WithExtension()
    randomize_bn(model, 0)
    model.eval()
    gm = fusers.reparameterize(model, (torch.randn(2, 3, 8, 8),), passes=[DropBatchNorm()])
    report = gm.reparam_report
    assert report.proof.startswith("float32")
    codes = [r.code for r in report.refusals()]
    assert codes and set(codes) == {RefusalCode.ROLLED_BACK}
    assert all("rolled back: float32 error" in r.reason for r in report.refusals())
    assert report.ops_after["batch_norm"] == 2
