"""YOLOv7's heads and model as its authors write them (WongKinYiu/yolov7 ``models/yolo.py``;
``check_anchor_order`` from ``utils/autoanchor.py``).

* ``IDetect``: per level ``x[i] = im(m(ia(x[i])))``, reshaped to ``(bs, na, ny, nx, no)``; in eval mode the
  decode writes into slices of ``y = x[i].sigmoid()`` in place (``y[..., 0:2] = ...``, ``y[..., 2:4] = ...``),
  which ``torch.export`` captures as ``slice`` + ``copy_``; the grid is rebuilt by ``_make_grid`` whenever the
  feature-map shape changes and kept in a plain list (not a buffer). ``fuse`` folds ``ia`` into ``m``'s bias
  (``bias += W @ a``) and ``im`` into its weight and bias, in place; ``fuseforward`` skips the implicit layers
  and, only while ``torch.onnx.is_in_onnx_export()``, decodes with ``split`` + ``cat`` and reads
  ``anchor_grid.data``.
* ``IAuxDetect`` (the W6 / E6 / D6 / E6E training configs): ``IDetect`` over the first ``nl`` inputs (the lead
  heads) plus ``m2``, plain 1x1 convs over the last ``nl`` inputs (the auxiliary heads, "coarse-to-fine lead
  guided" label assignment, trained by ``train_aux.py``). Its eval ``forward`` still *runs* ``m2`` on the aux
  inputs, then returns ``(decoded lead heads, x[:nl])``: the aux results reach no output. ``fuse`` folds the
  lead heads' implicit layers only; ``fuseforward`` skips ``m2`` and returns all ``2 nl`` inputs as they are
  after the lead convs. The repository deploys these models by building the ``cfg/deploy`` variant (a plain
  ``Detect`` over the lead heads, without the aux branch) and copying the matching weights
  (``tools/reparameterization.ipynb``).
* ``parse_model``: rows ``[from, number, module, args]``; module and arguments may be strings, evaluated here
  (``"nn.LeakyReLU(0.1)"``, ``"nc"``, ``"anchors"``); output channels scaled by ``width_multiple`` and rounded up
  to a multiple of 8 (``make_divisible``), repeats by ``depth_multiple``; each layer tagged with ``f`` (where
  its input comes from), ``i``, ``type`` and ``np``.
* ``Model``: routes through the saved outputs in ``forward_once``; strides are measured with a forward pass at
  256x256 in training mode; ``fuse`` converts every block in place as the repository's ``Model.fuse`` does.

Differences from the repository, deliberate: ``torch.meshgrid`` gets ``indexing="ij"`` (the repository's
call warns; same result), nothing is printed or logged, ``Model.forward`` has no test-time augmentation or
profiling, and the export-only options of the heads (``end2end``, ``include_nms``, ``concat``) are left out.
"""

from __future__ import annotations

import math
from copy import deepcopy

import torch
from torch import nn

from .common import *  # noqa: F401,F403  (the repository's ``from models.common import *``)
from .common import Concat, Conv, DownC, ImplicitA, ImplicitM, RepConv, ReOrg, SPPCSPC, fuse_conv_and_bn, \
    initialize_weights, make_divisible

__all__ = ["IDetect", "IAuxDetect", "Model", "parse_model", "check_anchor_order"]


def check_anchor_order(m):
    """Flip the anchors when their areas grow against the strides."""
    area = m.anchor_grid.prod(-1).view(-1)
    if (area[-1] - area[0]).sign() != (m.stride[-1] - m.stride[0]).sign():
        m.anchors[:] = m.anchors.flip(0)
        m.anchor_grid[:] = m.anchor_grid.flip(0)


def _fold_implicit(convs, ia, im):
    """``ImplicitA`` into each conv's bias (``b += W a``), then ``ImplicitM`` into its bias and weight (``b *= m``,
    ``W *= m`` per output channel), in place on the parameters (call under ``torch.no_grad()``)."""
    for conv, a in zip(convs, ia):
        out_c, in_c = conv.weight.shape[:2]
        conv.bias += torch.matmul(conv.weight.reshape(out_c, in_c), a.implicit.reshape(in_c, 1)).squeeze(1)
    for conv, m in zip(convs, im):
        conv.bias *= m.implicit.reshape(-1)
        conv.weight *= m.implicit.transpose(0, 1)


class IDetect(nn.Module):
    stride = None  # set by Model from a forward pass
    export = False  # the repository's export.py sets it to skip the decode

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # box (4), objectness, classes
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl  # a plain list, rebuilt when the feature-map shape changes
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)  # (nl, na, 2), divided by the strides in Model
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))  # in pixels
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.ia = nn.ModuleList(ImplicitA(c) for c in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)

    def forward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](self.ia[i](x[i]))
            x[i] = self.im[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
                y = x[i].sigmoid()
                y[..., 0:2] = (y[..., 0:2] * 2. - 0.5 + self.grid[i]) * self.stride[i]  # xy
                y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]  # wh
                z.append(y.view(bs, -1, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def fuseforward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](x[i])  # ia and im live in m now
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
                y = x[i].sigmoid()
                if not torch.onnx.is_in_onnx_export():
                    y[..., 0:2] = (y[..., 0:2] * 2. - 0.5 + self.grid[i]) * self.stride[i]
                    y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                else:
                    xy, wh, conf = y.split((2, 2, self.nc + 1), 4)
                    xy = xy * (2. * self.stride[i]) + (self.stride[i] * (self.grid[i] - 0.5))
                    wh = wh ** 2 * (4 * self.anchor_grid[i].data)
                    y = torch.cat((xy, wh, conf), 4)
                z.append(y.view(bs, -1, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def fuse(self):
        _fold_implicit(self.m, self.ia, self.im)

    @staticmethod
    def _make_grid(nx=20, ny=20):
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()


class IAuxDetect(nn.Module):
    stride = None
    export = False

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch[:self.nl])  # lead heads
        self.m2 = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch[self.nl:])  # auxiliary heads
        self.ia = nn.ModuleList(ImplicitA(c) for c in ch[:self.nl])
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch[:self.nl])

    def forward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](self.ia[i](x[i]))
            x[i] = self.im[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            aux = i + self.nl  # computed in eval mode too; only training returns it
            x[aux] = self.m2[i](x[aux])
            x[aux] = x[aux].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
                y = x[i].sigmoid()
                if not torch.onnx.is_in_onnx_export():
                    y[..., 0:2] = (y[..., 0:2] * 2. - 0.5 + self.grid[i]) * self.stride[i]  # xy
                    y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]  # wh
                else:
                    xy, wh, conf = y.split((2, 2, self.nc + 1), 4)
                    xy = xy * (2. * self.stride[i]) + (self.stride[i] * (self.grid[i] - 0.5))
                    wh = wh ** 2 * (4 * self.anchor_grid[i].data)
                    y = torch.cat((xy, wh, conf), 4)
                z.append(y.view(bs, -1, self.no))
        return x if self.training else (torch.cat(z, 1), x[:self.nl])

    def fuseforward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
                y = x[i].sigmoid()
                if not torch.onnx.is_in_onnx_export():
                    y[..., 0:2] = (y[..., 0:2] * 2. - 0.5 + self.grid[i]) * self.stride[i]
                    y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                else:
                    xy = (y[..., 0:2] * 2. - 0.5 + self.grid[i]) * self.stride[i]
                    wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i].data
                    y = torch.cat((xy, wh, y[..., 4:]), -1)
                z.append(y.view(bs, -1, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def fuse(self):
        _fold_implicit(self.m, self.ia, self.im)  # the lead heads only: m2 has no implicit layers

    @staticmethod
    def _make_grid(nx=20, ny=20):
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()


_CHANNEL_BLOCKS = (nn.Conv2d, Conv, RepConv, DownC, SPPCSPC)  # rows whose first argument is c2
_REPEATED_INSIDE = (DownC, SPPCSPC)  # rows whose repeat count goes in as an argument
_HEADS = (IDetect, IAuxDetect)


def parse_model(d: dict, ch: list[int]):
    """Layers from a yaml-like dict and the indices whose outputs later layers read."""
    anchors, nc = d["anchors"], d["nc"]
    gd, gw = d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    layers, save, c2 = [], [], ch[-1]
    for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
        m = eval(m) if isinstance(m, str) else m
        for j, a in enumerate(args):
            try:
                args[j] = eval(a) if isinstance(a, str) else a
            except NameError:  # a plain string argument ('nearest')
                pass
        n = max(round(n * gd), 1) if n > 1 else n
        if m in _CHANNEL_BLOCKS:
            c1, c2 = ch[f], args[0]
            if c2 != no:  # the output convs keep their width
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if m in _REPEATED_INSIDE:
                args.insert(2, n)
                n = 1
        elif m is nn.BatchNorm2d:
            args = [ch[f]]
        elif m is Concat:
            c2 = sum(ch[j] for j in f)
        elif m in _HEADS:
            args.append([ch[j] for j in f])
            if isinstance(args[1], int):  # a number of anchors per level
                args[1] = [list(range(args[1] * 2))] * len(f)
        elif m is ReOrg:
            c2 = ch[f] * 4
        else:
            c2 = ch[f]
        module = nn.Sequential(*[m(*args) for _ in range(n)]) if n > 1 else m(*args)
        module.i, module.f, module.type = i, f, str(m)[8:-2].replace("__main__.", "")
        module.np = sum(p.numel() for p in module.parameters())
        save.extend(j % i for j in ([f] if isinstance(f, int) else f) if j != -1)
        layers.append(module)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


class Model(nn.Module):
    def __init__(self, cfg: dict, ch: int = 3, nc: int | None = None, anchors=None):
        super().__init__()
        self.traced = False
        self.yaml = cfg
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            self.yaml["nc"] = nc
        if anchors:
            self.yaml["anchors"] = round(anchors)
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        m = self.model[-1]
        s = 256  # twice the largest stride of the P5 configs
        if isinstance(m, IDetect):
            m.stride = torch.tensor([s / out.shape[-2] for out in self.forward(torch.zeros(1, ch, s, s))])
            check_anchor_order(m)
            m.anchors /= m.stride.view(-1, 1, 1)
            self.stride = m.stride
            self._initialize_biases()
        if isinstance(m, IAuxDetect):
            m.stride = torch.tensor([s / out.shape[-2] for out in self.forward(torch.zeros(1, ch, s, s))[:4]])
            check_anchor_order(m)
            m.anchors /= m.stride.view(-1, 1, 1)
            self.stride = m.stride
            self._initialize_aux_biases()
        initialize_weights(self)

    def forward(self, x):
        return self.forward_once(x)

    def forward_once(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if not hasattr(self, "traced"):
                self.traced = False
            if self.traced and isinstance(m, _HEADS):
                break
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    @staticmethod
    def _prior(conv, stride, m):
        """Objectness and class priors in an output conv's bias (RetinaNet, section 3.3)."""
        b = conv.bias.view(m.na, -1)
        b.data[:, 4] += math.log(8 / (640 / stride) ** 2)
        b.data[:, 5:] += math.log(0.6 / (m.nc - 0.99))
        conv.bias = nn.Parameter(b.view(-1), requires_grad=True)

    def _initialize_biases(self):
        m = self.model[-1]
        for conv, s in zip(m.m, m.stride):
            self._prior(conv, s, m)

    def _initialize_aux_biases(self):
        m = self.model[-1]
        for conv, conv2, s in zip(m.m, m.m2, m.stride):
            self._prior(conv, s, m)
            self._prior(conv2, s, m)

    def fuse(self):
        """Convert in place the way the repository's ``Model.fuse`` does (call it under ``torch.no_grad()``:
        the heads' ``fuse`` updates parameters in place)."""
        for m in self.model.modules():
            if isinstance(m, RepConv):
                m.fuse_repvgg_block()
            elif type(m) is Conv and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.fuseforward
            elif isinstance(m, _HEADS):
                m.fuse()
                m.forward = m.fuseforward
        return self
