"""MLP-Mixer, training-time form.

Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021.

Characteristic block (``MixerBlock``) on tokens ``X`` of shape ``(N, S, C)`` (``S`` patches)::

    U = X + (W_2 · gelu(W_1 · LN(X)^T))^T        token mixing: Linear over the patch axis
    Y = U + W_4 · gelu(W_3 · LN(U))              channel mixing: Linear over the channel axis

The patch embedding is a ``p × p`` stride-``p`` conv with bias, the head a LayerNorm, the mean
over tokens and a Linear. There is no BatchNorm: the LayerNorms stay in the deploy graph (their
statistics depend on the input). The token-mixing Linear fixes the number of patches, so the
model only accepts its input resolution (``image_size``).

Default network: 64×64 inputs, patch 8 (64 tokens), hidden 64, token MLP 32, channel MLP 128,
depth 2.
"""

from __future__ import annotations

from torch import nn

from ._layers import scale_channels

__all__ = ["MLPMixer", "MixerBlock", "MixerMlp", "mlp_mixer"]


class MixerMlp(nn.Sequential):
    """``Linear → GELU → Linear`` on the last axis."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MixerBlock(nn.Module):
    """Token-mixing MLP (across patches, via transpose) then channel-mixing MLP, each pre-LN and residual."""

    def __init__(self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = MixerMlp(num_tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = MixerMlp(dim, channel_hidden)

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """Patch embedding, ``MixerBlock`` s, LayerNorm, mean over tokens, Linear head."""

    def __init__(self, image_size: int = 64, patch: int = 8, dim: int = 64, token_hidden: int = 32,
                 channel_hidden: int = 128, depth: int = 2, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"MLP-Mixer image_size {image_size} is not a multiple of the patch size {patch}")
        dim, token_hidden, channel_hidden = (scale_channels(c, width) for c in (dim, token_hidden, channel_hidden))
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*(MixerBlock(tokens, dim, token_hidden, channel_hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # (N, S, C)
        return self.head(self.norm(self.blocks(x)).mean(1))


def mlp_mixer(num_classes: int = 1000, width: float = 1.0, image_size: int = 64) -> MLPMixer:
    return MLPMixer(image_size=image_size, num_classes=num_classes, width=width)
