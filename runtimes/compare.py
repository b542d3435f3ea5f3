"""Inputs, output comparison and stage-by-stage verification.

Error measure: ``max_rel = max|a - b| / max|a|`` per output, i.e. the largest error relative to the
output's scale (an element-wise relative error explodes on values near zero and says nothing about
a network). An output passes when ``max|a - b| <= rtol * max|a| + atol``; default ``rtol`` by
precision: fp32 1e-5, fp16 1e-2 (bf16, which OpenVINO's CPU plugin runs for an "f16" hint on CPUs
without native fp16, 3e-2). Cosine similarity and, for 2-D ``(N, classes)`` outputs, top-1
agreement are reported too.

Non-finite values never pass: a NaN or an infinity in an output where the reference has a finite
value (or another non-finite one) fails that output, and so does any NaN or infinity in the
reference itself (a comparison with it proves nothing). Only a comparison with a parent stage,
which decides the blame, counts the same non-finite value at the same position as equal
(``match_nonfinite``). Outputs given as ``{name: array}`` on both sides, under the same names in
another order, are matched by name.

:func:`verify_chain` runs stages in order (training torch -> plain torch -> ONNX -> simplified ONNX
-> OpenVINO / TFLite / TensorRT) on the same inputs and compares each stage with the reference (the
first stage) and with its parent stage, so the stage that introduced a mismatch is named: a
mismatch that first appears after onnxsim is the simplifier's, not the exporter's.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .core import TensorSpec, as_numpy, first_line, leaves, nonfinite

__all__ = [
    "DEFAULT_RTOL",
    "Tolerance",
    "OutputComparison",
    "ComparisonResult",
    "Stage",
    "StageResult",
    "ChainResult",
    "flatten",
    "make_inputs",
    "load_inputs",
    "save_inputs",
    "compare",
    "verify_chain",
]

log = logging.getLogger(__name__)

DEFAULT_RTOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2}


def _rtol_for(precision: str) -> float:
    if precision not in DEFAULT_RTOL:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(DEFAULT_RTOL)}")
    return DEFAULT_RTOL[precision]


@dataclass
class Tolerance:
    """Pass threshold: ``max|a-b| <= rtol * max|a| + atol``; ``per_output`` overrides rtol by name or index."""

    rtol: float = 1e-5
    atol: float = 0.0
    per_output: dict[str | int, float] = field(default_factory=dict)

    @classmethod
    def for_precision(cls, precision: str = "fp32", **per_output: float) -> Tolerance:
        return cls(rtol=_rtol_for(precision), per_output=dict(per_output))

    @classmethod
    def coerce(cls, value, precision: str = "fp32") -> Tolerance:
        if value is None:
            return cls.for_precision(precision)
        if isinstance(value, Tolerance):
            return value
        if isinstance(value, (int, float)):
            return cls(rtol=float(value))
        if isinstance(value, Mapping):
            return cls(rtol=_rtol_for(precision), per_output=dict(value))
        raise TypeError(f"tolerance must be a float, a Tolerance or a mapping, got {type(value).__name__}")

    def rtol_for(self, name: str, index: int) -> float:
        if name in self.per_output:
            return self.per_output[name]
        return self.per_output.get(index, self.rtol)


def flatten(outputs) -> list[np.ndarray]:
    """Leaves of a nested output (tuple / list / dict / torch tensors / arrays), in order, as numpy arrays.

    Dicts are flattened in insertion order, as torch.export and torch.onnx do.
    """
    return [as_numpy(v) for v in leaves(outputs)]


def _named_leaves(outputs, names: Sequence[str] | None) -> tuple[list[str], list[np.ndarray]]:
    if isinstance(outputs, Mapping) and all(isinstance(v, np.ndarray) for v in outputs.values()):
        keys, arrays = list(outputs.keys()), [np.asarray(v) for v in outputs.values()]
    else:
        arrays = flatten(outputs)
        keys = [f"output{i}" for i in range(len(arrays))]
    if names is not None:
        keys = list(names) + keys[len(names):]
    return keys, arrays


# ---------------------------------------------------------------------------------------------- inputs

def make_inputs(specs, seed: int = 0, *, dynamic_size: int | Mapping[str, int] = 1) -> dict[str, np.ndarray]:
    """Seeded random inputs for ``specs`` (TensorSpecs, a runner, or ``{name: (shape, dtype)}``).

    Floats are standard normal, integers uniform in [0, 10), booleans fair coins. Dynamic
    dimensions get ``dynamic_size`` (an int, or a size per symbol name).
    """
    if hasattr(specs, "get_input_specs"):
        specs = specs.get_input_specs()
    if isinstance(specs, Mapping):
        specs = [TensorSpec(name, tuple(shape), dtype) for name, (shape, dtype) in specs.items()]
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = spec.concrete_shape(dict(dynamic_size) if isinstance(dynamic_size, Mapping) else dynamic_size)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            value = rng.integers(0, 10, shape).astype(dtype)
        elif dtype.kind == "b":
            value = rng.integers(0, 2, shape).astype(bool)
        else:
            raise ValueError(f"cannot make random inputs of dtype {dtype} for input {spec.name!r}")
        feeds[spec.name] = value
    return feeds


def load_inputs(path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Real samples from an ``.npz`` file, as ``{name: array}`` in file order.

    Arrays saved positionally (``arr_0, arr_1, ...``) are renamed to ``names`` when given.
    """
    path = os.fspath(path)
    with np.load(path, allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    if names is not None:
        if len(names) != len(feeds):
            raise ValueError(f"{path} holds {len(feeds)} arrays ({', '.join(feeds)}) but {len(names)} inputs "
                             f"were named ({', '.join(names)}).")
        if set(feeds) != set(names):
            feeds = dict(zip(names, feeds.values()))
    return feeds


def save_inputs(path, feeds: Mapping[str, np.ndarray]) -> str:
    """Write ``feeds`` to an ``.npz`` file readable by :func:`load_inputs`."""
    path = os.fspath(path)
    np.savez(path, **{k: np.asarray(v) for k, v in feeds.items()})
    return path if path.endswith(".npz") else path + ".npz"


# ------------------------------------------------------------------------------------------ comparison

@dataclass
class OutputComparison:
    """How one output compares with its reference."""

    name: str
    reference_shape: tuple[int, ...]
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    rtol: float
    atol: float
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else _json_float(v)) for k, v in vars(self).items()}


def _json_float(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


@dataclass
class ComparisonResult:
    """Per-output comparison of two sets of outputs."""

    outputs: list[OutputComparison]
    reason: str = ""

    @property
    def passed(self) -> bool:
        return not self.reason and all(o.passed for o in self.outputs)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0 if not self.reason else math.inf)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0 if not self.reason else math.inf)

    @property
    def failed_outputs(self) -> list[str]:
        return [o.name for o in self.outputs if not o.passed]

    def summary(self) -> str:
        if self.reason:
            return self.reason
        worst = max(self.outputs, key=lambda o: o.max_rel / o.rtol if o.rtol else o.max_rel, default=None)
        if worst is None:
            return "no outputs"
        failed = "; ".join(f"{o.name}: {o.reason}" for o in self.outputs if not o.passed)
        state = "pass" if self.passed else f"FAIL ({failed})"
        return (f"{state}: {len(self.outputs)} output(s), worst {worst.name} max rel {worst.max_rel:.2e} "
                f"(rtol {worst.rtol:.0e}), max abs {worst.max_abs:.2e}, cosine {worst.cosine:.6f}")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "max_rel": _json_float(self.max_rel), "reason": self.reason,
                "outputs": [o.to_dict() for o in self.outputs]}


def _compare_one(name: str, a: np.ndarray, b: np.ndarray, rtol: float, atol: float,
                 match_nonfinite: bool = False) -> OutputComparison:
    if a.shape != b.shape:
        return OutputComparison(name, a.shape, b.shape, math.inf, math.inf, float("nan"), None, rtol, atol, False,
                                f"shape {b.shape} differs from the reference {a.shape}")
    if a.dtype.kind not in "fc" and b.dtype.kind not in "fc":
        equal = bool(np.array_equal(a, b))
        diff = 0.0 if equal else float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        return OutputComparison(name, a.shape, b.shape, diff, 0.0 if equal else math.inf, 1.0 if equal else 0.0,
                                None, rtol, atol, equal, "" if equal else "integer outputs differ")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
    if not match_nonfinite and not fin_a.all():
        return OutputComparison(name, a.shape, b.shape, math.inf, math.inf, float("nan"), None, rtol, atol, False,
                                f"the reference holds {nonfinite(a64)}; a comparison with it proves nothing: fix "
                                "the model or its inputs")
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))  # the same infinity, or NaN on both sides
    reason = ""
    if not fin_b.all() or not fin_a.all():
        new_b, lost = ~fin_b & ~same, ~fin_a & ~same
        if new_b.any():
            where = "is finite" if fin_a[new_b].all() else "holds other values"
            reason = f"{nonfinite(b64[new_b])} where the reference {where}"
        elif lost.any():
            reason = f"finite values where the reference holds {nonfinite(a64[lost])}"
    keep = fin_a & fin_b
    a64, b64 = a64[keep], b64[keep]
    top1 = None
    if a.ndim == 2 and a.shape[1] > 1:
        top1 = float(np.mean(np.argmax(np.nan_to_num(a), axis=1) == np.argmax(np.nan_to_num(b), axis=1)))
    with np.errstate(invalid="ignore", over="ignore"):
        na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
        cosine = float(np.dot(a64.ravel(), b64.ravel()) / (na * nb)) if na > 0 and nb > 0 else \
            (1.0 if na == nb else 0.0)
        if a64.size == 0:
            cosine = float("nan") if reason else 1.0
        if reason:
            return OutputComparison(name, a.shape, b.shape, math.inf, math.inf, cosine, top1, rtol, atol, False,
                                    reason)
        max_abs = float(np.abs(a64 - b64).max()) if a64.size else 0.0
        scale = float(np.abs(a64).max()) if a64.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = max_abs <= rtol * scale + atol
    if not passed:
        reason = f"max rel error {max_rel:.2e} exceeds rtol {rtol:.0e}"
    return OutputComparison(name, a.shape, b.shape, max_abs, max_rel, cosine, top1, rtol, atol, passed, reason)


def compare(reference_outputs, outputs, tolerance=None, *, precision: str = "fp32",
            names: Sequence[str] | None = None, match_nonfinite: bool = False) -> ComparisonResult:
    """Compare two (possibly nested) sets of outputs leaf by leaf.

    ``tolerance``: a float rtol, a :class:`Tolerance`, a ``{name or index: rtol}`` mapping (other
    outputs use ``precision``'s default), or None for ``precision``'s default. Outputs are matched
    by name when both sides name the same outputs, else by position. A NaN or infinity in the
    reference fails, unless ``match_nonfinite`` (for a comparison with a parent stage, not with the
    reference): the same non-finite value at the same position then counts as equal.
    """
    tol = Tolerance.coerce(tolerance, precision)
    ref_names, ref = _named_leaves(reference_outputs, names)
    out_names, out = _named_leaves(outputs, None)
    if out_names != ref_names and sorted(out_names) == sorted(ref_names) and len(set(out_names)) == len(out_names):
        by_name = dict(zip(out_names, out))  # the same outputs in another order: match them by name
        out = [by_name[n] for n in ref_names]
    reason = ""
    if len(ref) != len(out):
        reason = f"{len(out)} outputs where the reference has {len(ref)}"
    results = [_compare_one(name, a, b, tol.rtol_for(name, i), tol.atol, match_nonfinite)
               for i, (name, a, b) in enumerate(zip(ref_names, ref, out))]
    return ComparisonResult(results, reason)


# -------------------------------------------------------------------------------------- verify_chain

@dataclass
class Stage:
    """One step of a verification chain.

    ``runner``: a :class:`runtimes.Runner`, a torch module, or any callable taking the feed dict.
    ``parent``: name of the stage this one was made from (default: the previous stage).
    ``adapt_inputs``: maps the shared feed to this stage's inputs (e.g. NCHW -> NHWC).
    ``adapt_outputs``: maps this stage's flat outputs back to the reference layout.
    """

    name: str
    runner: Any
    parent: str | None = None
    precision: str = "fp32"
    tolerance: Any = None
    adapt_inputs: Callable[[dict[str, np.ndarray]], Any] | None = None
    adapt_outputs: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None


@dataclass
class StageResult:
    """A stage's outputs compared with the reference and with its parent stage."""

    name: str
    parent: str | None
    precision: str
    vs_reference: ComparisonResult | None = None
    vs_parent: ComparisonResult | None = None
    error: str = ""
    blame: str | None = None

    @property
    def passed(self) -> bool:
        """No error and within tolerance of the reference (``vs_parent`` only decides the blame)."""
        return not self.error and (self.vs_reference is None or self.vs_reference.passed)

    @property
    def introduced_mismatch(self) -> bool:
        """This stage broke: it failed to run, or differs from a parent that was still correct."""
        return self.blame == self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "parent": self.parent, "precision": self.precision, "passed": self.passed,
                "blame": self.blame, "error": self.error,
                "vs_reference": self.vs_reference.to_dict() if self.vs_reference else None,
                "vs_parent": self.vs_parent.to_dict() if self.vs_parent else None}


@dataclass
class ChainResult:
    stages: list[StageResult]

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages)

    @property
    def culprits(self) -> list[str]:
        """Stages that introduced a mismatch (or failed to run), in chain order."""
        return [s.name for s in self.stages if s.introduced_mismatch]

    @property
    def first_failure(self) -> str | None:
        return self.culprits[0] if self.culprits else None

    def __getitem__(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def summary(self) -> str:
        lines = []
        for s in self.stages:
            state = "ok" if s.passed else ("BROKE HERE" if s.introduced_mismatch else f"inherits from {s.blame}")
            detail = s.error or (s.vs_reference.summary() if s.vs_reference else "reference")
            lines.append(f"{s.name:<24} {state:<22} {detail}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "culprits": self.culprits, "stages": [s.to_dict() for s in self.stages]}


def _call_stage(stage: Stage, feed: dict[str, np.ndarray]):
    from .base import Runner

    runner = stage.runner
    feed = stage.adapt_inputs(dict(feed)) if stage.adapt_inputs else feed
    if isinstance(runner, Runner):
        names = [s.name for s in runner.get_input_specs()]
        if isinstance(feed, Mapping) and set(feed) != set(names) and len(feed) == len(names):
            feed = list(feed.values())  # same inputs under another naming: match by position
        outputs = list(runner.infer(feed).values())
    else:
        outputs = flatten(runner(feed))
    return stage.adapt_outputs(outputs) if stage.adapt_outputs else outputs


def _as_runner(stage: Stage) -> Stage:
    import torch

    from .torch_runner import TorchRunner

    if isinstance(stage.runner, torch.nn.Module):
        stage.runner = TorchRunner(stage.runner)
    return stage


def verify_chain(stages: Sequence[Stage], inputs: Mapping[str, np.ndarray]) -> ChainResult:
    """Run ``stages`` in order on ``inputs``; the first stage is the reference.

    Each later stage is compared with the reference and with its parent; its ``blame`` names the
    stage that introduced the mismatch it shows (itself, or an ancestor that already differed).
    Runners that are not active are activated for the call and deactivated afterwards.
    """
    from .base import Runner

    results: list[StageResult] = []
    outputs: dict[str, list[np.ndarray]] = {}
    by_name: dict[str, StageResult] = {}
    reference: list[np.ndarray] | None = None
    ref_names: list[str] | None = None
    bad_reference: str | None = None  # the reference stage, when its outputs are not finite
    for i, stage in enumerate(stages):
        stage = _as_runner(stage)
        parent = stage.parent if stage.parent is not None else (stages[i - 1].name if i else None)
        if parent is not None and parent not in by_name:
            raise ValueError(f"stage {stage.name!r} names parent {parent!r}, which is not an earlier stage")
        res = StageResult(stage.name, parent, stage.precision)
        started = isinstance(stage.runner, Runner) and not stage.runner.is_active
        try:
            if started:
                stage.runner.activate()
            outs = _call_stage(stage, dict(inputs))
        except Exception as e:
            res.error = f"{type(e).__name__}: {first_line(e)}"
            res.blame = stage.name
            log.debug("stage %s failed:\n%s", stage.name, traceback.format_exc())
            results.append(res)
            by_name[stage.name] = res
            continue
        finally:
            if started and stage.runner.is_active:
                stage.runner.deactivate()
        outputs[stage.name] = outs
        if reference is None:
            reference = outs
            if isinstance(stage.runner, Runner) and stage.runner.output_names:
                ref_names = list(stage.runner.output_names)
            bad = [f"{name} holds {nonfinite(o)}" for name, o in zip(_named_leaves(outs, ref_names)[0], outs)
                   if nonfinite(o)]
            if bad:  # nothing can be verified against it: the reference is the stage that failed
                res.error, res.blame = f"reference output {'; '.join(bad)}: fix the model or its inputs", stage.name
                bad_reference = stage.name
        else:
            res.vs_reference = compare(reference, outs, stage.tolerance, precision=stage.precision, names=ref_names)
            if parent is not None and parent != stages[0].name and parent in outputs:
                res.vs_parent = compare(outputs[parent], outs, stage.tolerance, precision=stage.precision,
                                        names=ref_names, match_nonfinite=True)
            if not res.passed:
                p = by_name.get(parent) if parent else None
                if bad_reference:
                    res.blame = bad_reference  # a non-finite reference fails every comparison with it
                elif p is None or p.error or p.passed or (res.vs_parent is not None and not res.vs_parent.passed):
                    res.blame = stage.name  # the parent was right (or unknown), or this stage moved away from it
                else:
                    res.blame = p.blame or p.name  # same numbers as a parent that was already wrong
        if res.blame == stage.name:
            log.warning("verification: stage %s introduced a mismatch: %s", stage.name,
                        res.error or (res.vs_parent or res.vs_reference).summary())
        results.append(res)
        by_name[stage.name] = res
    return ChainResult(results)
