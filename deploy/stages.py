"""Running a run's stages: open a stage's artifact on its runtime, run it over many inputs in batches.

The one place verification, the INT8 guard and detection open and run stages; it imports none of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from exporters import targets as registry

from .record import PipelineError, StageRecord

__all__ = ["open_stage", "run_batched", "batch_of", "torch_threads", "GROUND_TRUTH"]

GROUND_TRUTH = ("gt_boxes", "gt_classes")  # a detection sample file's boxes (N, K, 4) xyxy and classes (N, K), -1 pad


def torch_threads(shape) -> int | None:
    """One thread for small inputs: many small calls gain nothing from torch's thread pool but its
    synchronization, which on a busy machine costs more than the work."""
    return 1 if shape and math.prod(shape) < 100_000 else None


def open_stage(stage: StageRecord, root: Path, *, trust_pickle: bool = False, **kwargs):
    """A runner for ``stage``'s artifact in ``root``, with its target's options. Its paths are checked to be
    inside ``root`` (``ExportRecord.artifact_in``); a ``.pt2`` that would unpickle is refused when the runner
    activates, unless ``trust_pickle``."""
    target = registry.get(stage.format)
    art = stage.export.artifact_in(root)
    if target.name == "pt2":  # the one runner that could unpickle
        kwargs.setdefault("trust_pickle", trust_pickle)
        if art.inputs:
            kwargs.setdefault("threads", torch_threads(art.inputs[0].concrete_shape(1)))
    return target.open(art, precision=stage.precision, **kwargs)


def batch_of(stage: StageRecord, n: int) -> int:
    """The batch ``stage``'s artifact takes: its fixed input batch, or ``n`` when the batch is free."""
    art = stage.export.artifact
    shape = art.inputs[0].shape if art is not None and art.inputs else (None,)
    return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else n


def run_batched(runner, x: np.ndarray, batch: int, names=None):
    """Run ``runner`` on the rows of ``x`` in chunks of ``batch`` (the last one padded); its outputs concatenated,
    as a list in output order, or, given ``names``, as ``{name: array}`` of those outputs (a
    :class:`PipelineError` naming the outputs the artifact lacks)."""
    chunks: list[dict[str, np.ndarray]] = []
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        k = len(part)
        if k < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - k, axis=0)])
        outs = runner.infer([np.ascontiguousarray(part)])
        missing = [n for n in names or () if n not in outs]
        if missing:
            raise PipelineError(f"the artifact has no output(s) {', '.join(missing)} (it has {', '.join(outs)})")
        chunks.append({n: o[:k] if o.ndim and o.shape[0] == batch else o
                       for n, o in ((n, np.asarray(o)) for n, o in outs.items())})
    joined = {n: np.concatenate([c[n] for c in chunks]) for n in chunks[0]}
    return {n: joined[n] for n in names} if names is not None else list(joined.values())
