"""Rewrite passes, one per file, registered by name."""

from __future__ import annotations

from .affine_chain import AffineChain
from .constant_pad import ConstantPad
from .drop_noops import DropNoOps
from .equalize import Equalize
from .fold_bn import FoldBatchNorm
from .fold_bn_region import FoldBatchNormRegion
from .fold_constants import FoldConstants
from .fold_into_next import FoldIntoNext
from .merge_linear import MergeLinear
from .merge_sequence import MergeSequence, MergeSequenceGrow
from .pow_to_mul import PowToMul
from .push_affine import PushAffine
from .rm import RepMerge
from .slice_writes import SliceWrites
from .split_slices import SplitSlices

__all__ = ["REGISTRY", "AffineChain", "ConstantPad", "DropNoOps", "Equalize", "FoldBatchNorm", "FoldBatchNormRegion", "FoldConstants", "FoldIntoNext", "MergeLinear", "MergeSequence", "MergeSequenceGrow", "PowToMul", "PushAffine", "RepMerge", "SliceWrites", "SplitSlices"]

REGISTRY = {p.name: p for p in (AffineChain, ConstantPad, DropNoOps, Equalize, FoldConstants, FoldBatchNorm, FoldBatchNormRegion, FoldIntoNext, MergeLinear, MergeSequence, MergeSequenceGrow, PowToMul, PushAffine, RepMerge, SliceWrites, SplitSlices)}
