"""Merge a 1x1 convolution followed by a kxk convolution (or average pooling) into one kxk conv.

DBB's sequential branches: ``conv1x1 -> pad -> convkxk``. Per group, ``K = K2 . K1`` and
``b = b2 + sum(K2) * b1``. The merged conv pads its *input* with zeros, and a 1x1 conv maps a zero
input to its bias ``b1``; so the sequence is exact only when every padded value in between equals
``b1``: an explicit pad whose value is ``b1`` (DBB's BN-and-pad), or zero padding with ``b1 == 0``.
With zero padding and a nonzero bias the border outputs would change (error ~0.1): refused.
A per-channel affine op after the pad (``s * y + t``, DBB's ``+ v``) joins the 1x1 conv first:
``K1' = s * K1``, ``b1' = s * b1 + t``. The pattern is matched by ``matchers.match_sequence``.

Outside a branch sum a sequence whose merged kernel holds more weights than its two ops (a bottleneck,
``16 -> 2 -> 16`` channels) is kept by ``merge_sequence``: exact either way, and which runs faster is a
question for the runtime. ``merge_sequence_grow`` merges those too; ``deploy tune --passes
default,default+grow`` converts with each and keeps the faster by measurement.
"""

from __future__ import annotations

from ..graph import erase_unused, replace_conv
from ..matchers import Unproven, match_sequence
from ..rules import Match, Pass


class MergeSequence(Pass):
    name = "merge_sequence"
    refusal = "1x1 -> kxk sequence not merged"

    grow = False  # merge a bottleneck too (see the module docstring)

    def match(self, gm, node):
        seq = match_sequence(gm, node, check_cost=not self.grow)
        if isinstance(seq, Unproven):
            return self.refuse(seq.code, [node], seq.why)
        return None if seq is None else self.found([node], seq)

    def rewrite(self, gm, match: Match) -> str:
        seq = match.plan
        node, b = seq.chain[0], seq.merged
        replace_conv(gm, node, seq.first.x, "conv", b.kernel, b.bias, b.stride, b.padding, b.dilation, b.groups)
        erase_unused(gm.graph, [node])
        return f"1x1 conv + {node.target.__name__} -> conv"


class MergeSequenceGrow(MergeSequence):
    """``merge_sequence`` that also merges a bottleneck into one larger kernel."""

    name = "merge_sequence_grow"
    grow = True
