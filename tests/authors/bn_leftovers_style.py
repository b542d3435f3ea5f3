"""BatchNorms that no single neighbour absorbs, written the way timm writes the blocks they come from.

CoAtNet's pre-norm MbConv block with a pooled shortcut (``maxxvit.py``), the pre-activation ResNetV2 block
and stem (``resnetv2.py``), DenseNet's concatenating layers (``densenet.py``), the Lambda layer's normalised
q and v slices (``lambda_layer.py``) and MobileNetV4's universal inverted residual and multi-query attention
blocks (``_efficientnet_blocks.py``, ``attention2d.py``). Tiny widths; timm's attribute names and forward code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNorm with its activation in the same module (``norm_act.py``)."""

    def __init__(self, num_features, eps=1e-5, act_layer=nn.ReLU, apply_act=True):
        super().__init__(num_features, eps=eps)
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


# ----------------------------------------------------------------------------------------------- CoAtNet
class Downsample2d(nn.Module):
    def __init__(self, dim, dim_out, pool_type="avg2", bias=True):
        super().__init__()
        if pool_type == "avg":
            self.pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        elif pool_type == "avg_pad":  # zero padding counted in the average
            self.pool = nn.AvgPool2d(3, 2, 1)
        else:
            self.pool = nn.AvgPool2d(2)
        self.expand = nn.Conv2d(dim, dim_out, 1, bias=bias) if dim != dim_out else nn.Identity()

    def forward(self, x):
        x = self.pool(x)  # spatial downsample
        x = self.expand(x)  # expand chs
        return x


class MbConvBlock(nn.Module):
    """Pre-norm conv block, 1x1 - kxk - 1x1 with an inverted bottleneck; strides in a pool (``stride_mode='pool'``)."""

    def __init__(self, in_chs, out_chs, stride=1, expand_ratio=2.0, pool_type="avg2"):
        super().__init__()
        mid_chs = int(out_chs * expand_ratio)
        self.shortcut = Downsample2d(in_chs, out_chs, pool_type) if stride == 2 else nn.Identity()
        self.pre_norm = BatchNormAct2d(in_chs, eps=1e-3, act_layer=nn.SiLU)
        self.down = Downsample2d(in_chs, in_chs, pool_type) if stride == 2 else nn.Identity()
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm1 = BatchNormAct2d(mid_chs, eps=1e-3, act_layer=nn.SiLU)
        self.conv2_kxk = nn.Conv2d(mid_chs, mid_chs, 3, padding=1, groups=mid_chs, bias=False)
        self.norm2 = BatchNormAct2d(mid_chs, eps=1e-3, act_layer=nn.SiLU)
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, 1, bias=True)
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = self.shortcut(x)
        x = self.pre_norm(x)
        x = self.down(x)

        x = self.conv1_1x1(x)
        x = self.norm1(x)
        x = self.conv2_kxk(x)
        x = self.norm2(x)
        x = self.conv3_1x1(x)
        x = self.drop_path(x) + shortcut
        return x


class Stem(nn.Module):
    def __init__(self, in_chs, out_chs):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1)
        self.norm1 = BatchNormAct2d(out_chs, eps=1e-3, act_layer=nn.SiLU)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        x = self.norm1(x)
        x = self.conv2(x)
        return x


class CoAtNetLike(nn.Module):
    """Stem, one stage of MbConv blocks (the first strides, its shortcut average-pools the stem's output),
    pooled head."""

    def __init__(self, chs=8, out_chs=8, depth=3, pool_type="avg2", num_classes=5):
        super().__init__()
        self.stem = Stem(3, chs)
        self.blocks = nn.Sequential(*[MbConvBlock(chs if i == 0 else out_chs, out_chs, 2 if i == 0 else 1,
                                                  pool_type=pool_type) for i in range(depth)])
        self.head = nn.Linear(out_chs, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


class ConvFeedsPaddedConv(nn.Module):
    """A conv read by a pre-norm (BN -> SiLU) and by a zero-padded 3x3 conv: the BN's shift cannot reach it."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.pre_norm = BatchNormAct2d(c, act_layer=nn.SiLU)
        self.side = nn.Conv2d(c, c, 3, padding=1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = self.conv(x)
        return self.proj(self.pre_norm(x)) + self.side(x)


# ----------------------------------------------------------------------------------------------- ResNetV2
class PreActBasic(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1):
        super().__init__()
        self.downsample = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) \
            if stride != 1 or in_chs != out_chs else None
        self.norm1 = BatchNormAct2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.norm2 = BatchNormAct2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.drop_path = nn.Identity()

    def forward(self, x):
        x_preact = self.norm1(x)

        # shortcut branch
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)

        # residual branch
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.drop_path(x)
        return x + shortcut


class ResNetV2Like(nn.Module):
    """Stem conv -> max pool, pre-activation basic blocks in two stages, final norm (BN -> ReLU), head."""

    def __init__(self, chs=(8, 12), depth=2, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(3, chs[0], 7, stride=2, padding=3, bias=False))
        self.stem.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))
        blocks, prev = [], chs[0]
        for i, c in enumerate(chs):
            for d in range(depth):
                blocks.append(PreActBasic(prev, c, 2 if i > 0 and d == 0 else 1))
                prev = c
        self.stages = nn.Sequential(*blocks)
        self.norm = BatchNormAct2d(prev)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = self.norm(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size):
        super().__init__()
        self.add_module("norm1", BatchNormAct2d(num_input_features))
        self.add_module("conv1", nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False))
        self.add_module("norm2", BatchNormAct2d(bn_size * growth_rate))
        self.add_module("conv2", nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False))

    def bottleneck_fn(self, xs):
        concated_features = torch.cat(xs, 1)
        bottleneck_output = self.conv1(self.norm1(concated_features))
        return bottleneck_output

    def forward(self, x):
        prev_features = [x] if isinstance(x, torch.Tensor) else x
        bottleneck_output = self.bottleneck_fn(prev_features)
        new_features = self.conv2(self.norm2(bottleneck_output))
        return new_features


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                              bn_size))

    def forward(self, init_features):
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class DenseTransition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.add_module("norm", BatchNormAct2d(num_input_features))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNetLike(nn.Module):
    """Stem (conv, norm, ReLU, max pool), dense block, transition, dense block, norm5, head."""

    def __init__(self, growth_rate=4, layers=(3, 3), init=8, bn_size=2, num_classes=5):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, init, 3, stride=2, padding=1, bias=False))
        self.features.add_module("norm0", BatchNormAct2d(init))
        self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        chs = init
        for i, n in enumerate(layers):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(n, chs, bn_size, growth_rate))
            chs += n * growth_rate
            if i != len(layers) - 1:
                self.features.add_module(f"transition{i + 1}", DenseTransition(chs, chs // 2))
                chs //= 2
        self.features.add_module("norm5", BatchNormAct2d(chs))
        self.classifier = nn.Linear(chs, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))


# ----------------------------------------------------------------------------------------------- Lambda
class LambdaLayer(nn.Module):
    """Content lambda only (``r=None`` and no position embedding): q and v are BatchNorm'd slices of one conv."""

    def __init__(self, dim, num_heads=2, dim_qk=4):
        super().__init__()
        self.dim_qk, self.num_heads = dim_qk, num_heads
        self.dim_v = dim // num_heads
        self.qkv = nn.Conv2d(dim, num_heads * dim_qk + dim_qk + self.dim_v, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(num_heads * dim_qk)
        self.norm_v = nn.BatchNorm2d(self.dim_v)
        self.pool = nn.Identity()

    def forward(self, x):
        B, C, H, W = x.shape
        M = H * W
        qkv = self.qkv(x)
        q, k, v = torch.split(qkv, [self.num_heads * self.dim_qk, self.dim_qk, self.dim_v], dim=1)
        q = self.norm_q(q).reshape(B, self.num_heads, self.dim_qk, M).transpose(-1, -2)  # B, num_heads, M, K
        v = self.norm_v(v).reshape(B, self.dim_v, M).transpose(-1, -2)  # B, M, V
        k = F.softmax(k.reshape(B, self.dim_qk, M), dim=-1)  # B, K, M

        content_lam = k @ v  # B, K, V
        content_out = q @ content_lam.unsqueeze(1)  # B, num_heads, M, V
        out = content_out.transpose(-1, -2).reshape(B, C, H, W)  # B, C (num_heads * V), H, W
        return self.pool(out)


class LambdaBottleneck(nn.Module):
    """ByobNet's self-attention bottleneck: 1x1, the lambda layer, post-attention BN -> ReLU, 1x1, residual."""

    def __init__(self, chs=8):
        super().__init__()
        self.conv1_1x1 = nn.Sequential(nn.Conv2d(chs, chs, 1, bias=False), BatchNormAct2d(chs))
        self.self_attn = LambdaLayer(chs)
        self.post_attn = BatchNormAct2d(chs)
        self.conv3_1x1 = nn.Sequential(nn.Conv2d(chs, chs, 1, bias=False), BatchNormAct2d(chs, apply_act=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.conv1_1x1(x)
        x = self.self_attn(x)
        x = self.post_attn(x)
        x = self.conv3_1x1(x)
        return self.act(x + shortcut)


# ----------------------------------------------------------------------------------------------- MobileNetV4
class LayerScale2d(nn.Module):
    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        gamma = self.gamma.view(1, -1, 1, 1)
        return x.mul_(gamma) if self.inplace else x * gamma


class ConvNormAct(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size, stride=1, groups=1, apply_act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(out_chs, apply_act=apply_act)

    def forward(self, x):
        return self.bn(self.conv(x))


class UniversalInvertedResidual(nn.Module):
    def __init__(self, chs, exp_ratio=2.0):
        super().__init__()
        mid_chs = int(chs * exp_ratio)
        self.dw_start = ConvNormAct(chs, chs, 3, groups=chs, apply_act=False)
        self.pw_exp = ConvNormAct(chs, mid_chs, 1)
        self.dw_mid = ConvNormAct(mid_chs, mid_chs, 3, groups=mid_chs)
        self.pw_proj = ConvNormAct(mid_chs, chs, 1, apply_act=False)
        self.layer_scale = LayerScale2d(chs, 0.5)

    def forward(self, x):
        shortcut = x
        x = self.dw_start(x)
        x = self.pw_exp(x)
        x = self.dw_mid(x)
        x = self.pw_proj(x)
        x = self.layer_scale(x)
        return x + shortcut


class MultiQueryAttention2d(nn.Module):
    """One query head group over keys and values from stride-2 depthwise convs (``kv_stride=2``)."""

    def __init__(self, dim, num_heads=2, key_dim=4):
        super().__init__()
        self.num_heads, self.key_dim, self.scale = num_heads, key_dim, key_dim ** -0.5
        self.query = nn.Sequential()
        self.query.add_module("proj", nn.Conv2d(dim, num_heads * key_dim, 1, bias=False))
        self.key = nn.Sequential()
        self.key.add_module("down_conv", nn.Conv2d(dim, dim, 3, 2, 1, groups=dim, bias=False))
        self.key.add_module("norm", nn.BatchNorm2d(dim))
        self.key.add_module("proj", nn.Conv2d(dim, key_dim, 1, bias=False))
        self.value = nn.Sequential()
        self.value.add_module("down_conv", nn.Conv2d(dim, dim, 3, 2, 1, groups=dim, bias=False))
        self.value.add_module("norm", nn.BatchNorm2d(dim))
        self.value.add_module("proj", nn.Conv2d(dim, key_dim, 1, bias=False))
        self.output = nn.Sequential()
        self.output.add_module("proj", nn.Conv2d(num_heads * key_dim, dim, 1, bias=False))

    def _reshape_input(self, t):
        s = t.shape
        t = t.reshape(s[0], s[1], -1).transpose(1, 2)
        return t.unsqueeze(1).contiguous()

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.query(x)
        q = q.reshape(B, self.num_heads, self.key_dim, -1).transpose(-1, -2).contiguous()
        k = self._reshape_input(self.key(x))
        v = self._reshape_input(self.value(x))
        attn = (q @ k.transpose(-1, -2)) * self.scale
        attn = attn.softmax(dim=-1)
        o = attn @ v  # B, heads, H*W, key_dim
        o = o.transpose(1, 2).reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        return self.output(o)


class MobileAttention(nn.Module):
    def __init__(self, chs):
        super().__init__()
        self.norm = BatchNormAct2d(chs, apply_act=False)
        self.attn = MultiQueryAttention2d(chs)
        self.layer_scale = LayerScale2d(chs, 0.5)

    def forward(self, x):
        shortcut = x
        x = self.norm(x)
        x = self.attn(x)
        x = self.layer_scale(x)
        return x + shortcut


class MobileNetV4Like(nn.Module):
    """Stem, UIR, attention, UIR, attention on one residual stream, a strided conv, pooled head."""

    def __init__(self, chs=8, num_classes=5):
        super().__init__()
        self.conv_stem = ConvNormAct(3, chs, 3, stride=2)
        self.blocks = nn.Sequential(UniversalInvertedResidual(chs), MobileAttention(chs),
                                    UniversalInvertedResidual(chs), MobileAttention(chs),
                                    ConvNormAct(chs, 2 * chs, 3, stride=2))
        self.classifier = nn.Linear(2 * chs, num_classes)

    def forward(self, x):
        x = self.blocks(self.conv_stem(x))
        return self.classifier(x.mean((2, 3)))
