"""Rewrite passes, one per file, registered by name."""

from __future__ import annotations

from .fold_bn import FoldBatchNorm
from .fold_constants import FoldConstants
from .fold_into_next import FoldIntoNext
from .merge_linear import MergeLinear
from .merge_sequence import MergeSequence
from .pow_to_mul import PowToMul
from .push_affine import PushAffine
from .rm import RepMerge

__all__ = ["REGISTRY", "FoldBatchNorm", "FoldConstants", "FoldIntoNext", "MergeLinear", "MergeSequence", "PowToMul", "PushAffine", "RepMerge"]

REGISTRY = {p.name: p for p in (FoldConstants, FoldBatchNorm, FoldIntoNext, MergeLinear, MergeSequence, PowToMul, PushAffine, RepMerge)}
