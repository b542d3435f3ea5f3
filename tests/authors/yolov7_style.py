"""YOLOv7's blocks in the shape their authors write them (WongKinYiu/yolov7, ``models/common.py``,
``models/yolo.py``, ``utils/torch_utils.py``).

Wang, Bochkovskiy and Liao, "YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for real-time
object detectors", CVPR 2023; implicit layers from YOLOR (Wang et al., 2021). What the forward code
does that a graph matcher has to live with:

* ``Conv``: ``act(bn(conv(x)))`` with a bias-free conv; ``fuseforward`` is ``act(conv(x))``, used once
  ``Model.fuse`` has replaced ``conv`` by the repository's ``fuse_conv_and_bn`` (BN scale as a diagonal
  matrix times the flattened kernel) and deleted ``bn``. Activations are made ``inplace`` by the
  repository's ``initialize_weights``, which also sets every BatchNorm's ``eps`` to 1e-3.
* ``RepConv``: ``rbr_dense`` (3x3 conv-BN Sequential), ``rbr_1x1`` (1x1 conv-BN), ``rbr_identity`` (a bare
  BatchNorm, only when ``c1 == c2`` and stride 1, else ``None`` and ``forward`` adds the int ``0``);
  ``fuse_repvgg_block`` folds each branch with ``fuse_conv_bn``, turns the identity BN into a 1x1 conv with
  a unit diagonal, zero-pads the 1x1 kernels to 3x3, sums into ``rbr_dense`` and renames it ``rbr_reparam``.
* ``ImplicitA`` / ``ImplicitM``: ``implicit + x`` and ``implicit * x`` with a ``(1, C, 1, 1)`` parameter.
* ``IDetect``: per level ``x[i] = im(m(ia(x[i])))``, reshaped to ``(bs, na, ny, nx, no)``; in eval mode
  the *training-form* decode writes into slices of ``y = x[i].sigmoid()`` in place
  (``y[..., 0:2] = ...``, ``y[..., 2:4] = ...``), which ``torch.export`` captures as ``slice`` + ``copy_``;
  the grid is rebuilt by ``_make_grid`` whenever the feature-map shape changes and kept in a plain list
  (not a buffer). ``fuse`` folds ``ia`` into ``m``'s bias (``bias += W @ a``) and ``im`` into its weight
  and bias, in place on the parameters; ``fuseforward`` skips the implicit layers and, only while
  ``torch.onnx.is_in_onnx_export()``, decodes with ``split`` + ``cat`` and reads ``anchor_grid.data``.
* ``Model``: layers built from a yaml-like dict by ``parse_model``, each tagged with ``f`` (where its
  input comes from) and ``i``; ``forward_once`` routes through the saved outputs; strides are measured
  with a forward pass at 256x256 in training mode; ``fuse`` converts every block in place as
  ``Model.fuse`` does.

``tiny(width)`` builds a yolov7-tiny-like network from these blocks (ELAN-ish backbone, SP pooling,
upsampling neck, a RepConv head per level, IDetect over strides 8 / 16 / 32). Two deliberate
differences from the repository: ``torch.meshgrid`` gets ``indexing="ij"`` (the repository's call
warns; same result) and ``fuse`` prints nothing.

Exporting the fuse form the way the repository does needs ``torch.onnx.is_in_onnx_export()`` to be
true while the graph is traced. ``torch.export`` does not set it (the dynamo exporter hard-codes it
false) and cannot trace ``.data`` (a fake tensor leaks into the constants): :func:`onnx_export_branch`
patches both for the duration of a capture.
"""

from __future__ import annotations

import contextlib
import copy
import math
from unittest import mock

import torch
from torch import nn

__all__ = ["autopad", "Conv", "RepConv", "ImplicitA", "ImplicitM", "MP", "SP", "Concat", "IDetect", "Model",
           "fuse_conv_and_bn", "parse_model", "tiny", "onnx_export_branch", "ANCHORS"]

ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def autopad(k, p=None):
    """'same' padding for an odd kernel unless ``p`` is given."""
    if p is None:
        p = k // 2 if isinstance(k, int) else [side // 2 for side in k]
    return p


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new biased conv computing ``bn(conv(x))``: the BN scale as a diagonal matrix times the flattened
    kernel, the conv bias through the same matrix plus the BN shift (``utils/torch_utils.py``)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, groups=conv.groups, bias=True).requires_grad_(False)
    scale = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    flat = conv.weight.clone().view(conv.out_channels, -1)
    fused.weight.copy_(torch.mm(scale, flat).view(fused.weight.shape))
    conv_bias = conv.bias if conv.bias is not None else torch.zeros(conv.weight.size(0))
    shift = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fused.bias.copy_(torch.mm(scale, conv_bias.reshape(-1, 1)).reshape(-1) + shift)
    return fused


class MP(nn.Module):
    def __init__(self, k=2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x):
        return self.m(x)


class SP(nn.Module):
    def __init__(self, k=3, s=1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x):
        return self.m(x)


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Conv(nn.Module):
    """conv (no bias) -> bn -> act; ``act=True`` means SiLU, a module is used as given."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def fuseforward(self, x):
        return self.act(self.conv(x))


class RepConv(nn.Module):
    """RepVGG's block with YOLO's activation; ``rbr_reparam`` after ``fuse_repvgg_block``."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False):
        super().__init__()
        assert k == 3 and autopad(k, p) == 1
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2
        pad_1x1 = autopad(k, p) - k // 2
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(num_features=c1) if c2 == c1 and s == 1 else None
            self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False),
                                           nn.BatchNorm2d(num_features=c2))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, pad_1x1, groups=g, bias=False),
                                         nn.BatchNorm2d(num_features=c2))

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    def fuse_conv_bn(self, conv, bn):
        """A new biased conv with the same geometry as ``conv`` computing ``bn(conv(x))``."""
        std = (bn.running_var + bn.eps).sqrt()
        shift = bn.bias - bn.running_mean * bn.weight / std
        kernel = conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                          padding_mode=conv.padding_mode)
        fused.weight = nn.Parameter(kernel)
        fused.bias = nn.Parameter(shift)
        return fused

    def fuse_repvgg_block(self):
        if self.deploy:
            return
        self.rbr_dense = self.fuse_conv_bn(self.rbr_dense[0], self.rbr_dense[1])
        self.rbr_1x1 = self.fuse_conv_bn(self.rbr_1x1[0], self.rbr_1x1[1])
        bias_1x1 = self.rbr_1x1.bias
        kernel_1x1 = nn.functional.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if isinstance(self.rbr_identity, nn.BatchNorm2d):
            # the identity as a 1x1 conv with ones on the diagonal, then folded with the identity BN
            unit = nn.Conv2d(self.in_channels, self.out_channels, kernel_size=1, stride=1, padding=0,
                             groups=self.groups, bias=False)
            unit.weight.data = unit.weight.data.squeeze().squeeze()
            unit.weight.data.fill_(0.0)
            unit.weight.data.fill_diagonal_(1.0)
            unit.weight.data = unit.weight.data.unsqueeze(2).unsqueeze(3)
            unit = self.fuse_conv_bn(unit, self.rbr_identity)
            bias_id = unit.bias
            kernel_id = nn.functional.pad(unit.weight, [1, 1, 1, 1])
        else:
            bias_id = nn.Parameter(torch.zeros_like(bias_1x1))
            kernel_id = nn.Parameter(torch.zeros_like(kernel_1x1))
        self.rbr_dense.weight = nn.Parameter(self.rbr_dense.weight + kernel_1x1 + kernel_id)
        self.rbr_dense.bias = nn.Parameter(self.rbr_dense.bias + bias_1x1 + bias_id)
        self.rbr_reparam = self.rbr_dense
        self.deploy = True
        if self.rbr_identity is not None:
            del self.rbr_identity
            self.rbr_identity = None
        if self.rbr_1x1 is not None:
            del self.rbr_1x1
            self.rbr_1x1 = None


class ImplicitA(nn.Module):
    def __init__(self, channel, mean=0.0, std=0.02):
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    def __init__(self, channel, mean=1.0, std=0.02):
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)

    def forward(self, x):
        return self.implicit * x


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
        """Fold ImplicitA into the 1x1 conv's bias (``b += W a``), then ImplicitM into its bias and weight
        (``b *= m``, ``W *= m`` per output channel), in place on the parameters."""
        for conv, ia in zip(self.m, self.ia):
            out_c, in_c = conv.weight.shape[:2]
            conv.bias += torch.matmul(conv.weight.reshape(out_c, in_c), ia.implicit.reshape(in_c, 1)).squeeze(1)
        for conv, im in zip(self.m, self.im):
            conv.bias *= im.implicit.reshape(-1)
            conv.weight *= im.implicit.transpose(0, 1)

    @staticmethod
    def _make_grid(nx=20, ny=20):
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()


def parse_model(d: dict, ch: list[int]):
    """Layers from a yaml-like dict (rows ``[from, module, args]``), each tagged with ``f`` and ``i``, and the
    indices whose outputs later layers read (the repository's ``parse_model``, without depth/width gains)."""
    nc, anchors = d["nc"], d["anchors"]
    layers, save = [], []
    for i, (f, m, args) in enumerate(d["backbone"] + d["head"]):
        args = list(args)
        if m in (Conv, RepConv):
            c1, c2 = ch[f], args[0]
            args = [c1, c2, *args[1:]]
        elif m is Concat:
            c2 = sum(ch[j] for j in f)
        elif m is IDetect:
            args = [nc, anchors, [ch[j] for j in f]]
        else:
            c2 = ch[f]
        module = m(*args)
        module.i, module.f, module.type = i, f, m.__name__
        save.extend(j % i for j in ([f] if isinstance(f, int) else f) if j != -1)
        layers.append(module)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def initialize_weights(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6):
            m.inplace = True


class Model(nn.Module):
    def __init__(self, cfg: dict, ch: int = 3):
        super().__init__()
        self.yaml = copy.deepcopy(cfg)
        self.model, self.save = parse_model(copy.deepcopy(self.yaml), ch=[ch])
        detect = self.model[-1]
        s = 256  # twice the largest stride
        detect.stride = torch.tensor([s / out.shape[-2] for out in self.forward(torch.zeros(1, ch, s, s))])
        self._check_anchor_order(detect)
        detect.anchors /= detect.stride.view(-1, 1, 1)
        self.stride = detect.stride
        self._initialize_biases()
        initialize_weights(self)

    def forward(self, x):
        return self.forward_once(x)

    def forward_once(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    @staticmethod
    def _check_anchor_order(m):
        area = m.anchor_grid.prod(-1).view(-1)
        if (area[-1] - area[0]).sign() != (m.stride[-1] - m.stride[0]).sign():
            m.anchors[:] = m.anchors.flip(0)
            m.anchor_grid[:] = m.anchor_grid.flip(0)

    def _initialize_biases(self):
        """Objectness and class priors in the output convs' biases (RetinaNet, section 3.3)."""
        m = self.model[-1]
        for conv, s in zip(m.m, m.stride):
            b = conv.bias.view(m.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5:] += math.log(0.6 / (m.nc - 0.99))
            conv.bias = nn.Parameter(b.view(-1), requires_grad=True)

    def fuse(self):
        """Convert in place the way the repository's ``Model.fuse`` does (call it under ``torch.no_grad()``:
        ``IDetect.fuse`` updates parameters in place)."""
        for m in self.model.modules():
            if isinstance(m, RepConv):
                m.fuse_repvgg_block()
            elif type(m) is Conv and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.fuseforward
            elif isinstance(m, IDetect):
                m.fuse()
                m.forward = m.fuseforward
        return self


def tiny(nc: int = 3, width: int = 8) -> Model:
    """A yolov7-tiny-like network at ``width`` base channels: a strided stem, one ELAN block (two 1x1
    branches, two chained 3x3, concat of four, 1x1 merge), max-pool downsampling to strides 8 / 16 / 32, an
    SP pool and an upsampling neck, a RepConv head per level (two with the identity BN, one without) and an
    IDetect over the three levels."""
    w = width

    def lrelu():
        return nn.LeakyReLU(0.1)

    cfg = {
        "nc": nc,
        "anchors": ANCHORS,
        "backbone": [
            [-1, Conv, [w, 3, 2, None, 1, lrelu()]],  # 0 /2
            [-1, Conv, [2 * w, 3, 2, None, 1, lrelu()]],  # 1 /4
            [-1, Conv, [w, 1, 1, None, 1, lrelu()]],
            [-2, Conv, [w, 1, 1, None, 1, lrelu()]],
            [-1, Conv, [w, 3, 1, None, 1, lrelu()]],
            [-1, Conv, [w, 3, 1, None, 1, lrelu()]],
            [[-1, -2, -3, -4], Concat, [1]],
            [-1, Conv, [2 * w, 1, 1, None, 1, lrelu()]],  # 7
            [-1, MP, []],  # 8 /8
            [-1, Conv, [2 * w, 1, 1, None, 1, lrelu()]],  # 9 P3
            [-1, MP, []],  # 10 /16
            [-1, Conv, [4 * w, 1, 1, None, 1, lrelu()]],  # 11 P4
            [-1, MP, []],  # 12 /32
            [-1, Conv, [4 * w, 1, 1, None, 1, lrelu()]],  # 13 P5
        ],
        "head": [
            [-1, SP, [5]],  # 14
            [[-1, 13], Concat, [1]],
            [-1, Conv, [4 * w, 1, 1, None, 1, lrelu()]],  # 16 P5 out
            [-1, nn.Upsample, [None, 2, "nearest"]],
            [[-1, 11], Concat, [1]],
            [-1, Conv, [4 * w, 1, 1, None, 1, lrelu()]],  # 19 P4 out
            [9, RepConv, [2 * w, 3, 1]],  # 20: c1 == c2, with rbr_identity
            [19, RepConv, [4 * w, 3, 1]],  # 21: with rbr_identity
            [16, RepConv, [6 * w, 3, 1]],  # 22: widens, no identity
            [[20, 21, 22], IDetect, []],
        ],
    }
    return Model(cfg)


@contextlib.contextmanager
def onnx_export_branch():
    """While active, ``torch.onnx.is_in_onnx_export()`` is true and ``t.data`` reads as ``t.detach()``, so
    ``torch.export`` captures ``IDetect.fuseforward``'s export branch (split + cat), as the repository's
    ``export.py`` gets it from the TorchScript exporter."""
    with mock.patch.object(torch.onnx, "is_in_onnx_export", return_value=True), \
            mock.patch.object(torch.Tensor, "data", property(lambda t: t.detach())):
        yield
