"""``reparameterize``: capture, rewrite in float64 under proof, round once, check in float32.

Ops no output depends on are dropped right after capture (``capture.drop_dead_code``); the report lists them
(``dead_ops``) and the model's tensors that only they, or nothing, read (``unused``).

The result is the captured ``GraphModule`` (``ep.module()``) rewritten, returned as an ordinary
module: ``.eval()``/``.train()``, ``deepcopy``, ``state_dict``, ``.to()`` and ``torch.compile`` work,
and it exports again with ``torch.export`` / ``torch.onnx.export``. Its graph is the deploy form
whatever its ``training`` flag says (no op in it depends on the mode).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from runtimes.core import eval_mode, max_rel_error, nonfinite, set_training, tensor_leaves

from .capture import InputError, as_args, capture, drop_dead_code, unused_parameters
from .graph import op_counts, remove_unused_attributes, share_identical_weights
from .leftovers import find_leftovers
from .manager import PassManager, Report
from .numerics import convert_dtype, seeded_like
from .passes import REGISTRY
from .rules import Pass

__all__ = ["DEFAULT_PASSES", "reparameterize", "last_report", "resolve_passes"]

log = logging.getLogger(__name__)

DEFAULT_PASSES: tuple[str, ...] = ("slice_writes", "drop_noops", "fold_constants", "constant_pad", "affine_chain",
                                   "fold_bn", "push_affine", "fold_into_next", "merge_linear", "merge_sequence",
                                   "split_slices")
TOLERANCE = 1e-9
_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
_LAST: list[Report] = []


def last_report() -> Report | None:
    """The report of the most recent ``reparameterize`` call (also at ``result.reparam_report``)."""
    return _LAST[-1] if _LAST else None


def resolve_passes(passes) -> list[Pass]:
    out = []
    for p in DEFAULT_PASSES if passes is None else passes:
        if isinstance(p, Pass):
            out.append(p)
        elif p in REGISTRY:
            out.append(REGISTRY[p]())
        else:
            raise ValueError(f"unknown pass {p!r}; known passes: {', '.join(sorted(REGISTRY))}")
    return out


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def reparameterize(model: torch.nn.Module, example_inputs, *, passes=None, verify: bool = True,
                   seed: int = 0, instruments: Iterable[Any] = ()) -> fx.GraphModule:
    """Return a plain deploy module computing the same function as ``model``.

    ``model`` is untouched (its train/eval mode is restored). Rewrites run on a float64 copy of
    the captured graph; after each pass its outputs on seeded inputs must agree with the captured
    model's to ``1e-9`` relative, or the pass's inexact rewrites are rolled back and reported.
    Weights are rounded to the model's dtype once, at the end. With ``verify`` the result is also
    compared with ``model`` itself in its own dtype (``report.float32_error``), and a model whose
    outputs on the seeded inputs hold NaN or infinities is refused (:class:`InputError`): nothing
    can be verified against them.

    ``instruments`` observe the passes (``on_pass_start``, ``on_pass_end``) and receive the finished
    report (``on_run_end``); see ``fusers.manager.Instrument``.
    """
    args = as_args(example_inputs)
    report, times = Report(), {}
    start = time.perf_counter()
    gm = capture(model, args)
    times["capture"] = time.perf_counter() - start
    report.ops_before = op_counts(gm)
    report.params_before = sum(p.numel() for p in model.parameters())
    report.unused = unused_parameters(model, gm)
    report.dead_ops = drop_dead_code(gm)  # computed in eval mode for no output (YOLOv7 IAuxDetect's aux heads)
    dtype = _float_dtype(model)

    start = time.perf_counter()
    convert_dtype(gm, dtype, torch.float64)
    check_inputs = seeded_like(args, seed, dtype=torch.float64)
    with torch.no_grad():
        reference = gm(*check_inputs)
    if verify:
        _check_finite(model, reference)
    manager = PassManager(resolve_passes(passes), check_inputs, reference, TOLERANCE, instruments=instruments)
    manager.run(gm, report)
    remove_unused_attributes(gm)
    report.leftovers = find_leftovers(gm, report.refusals())
    shared = share_identical_weights(gm)
    if shared:
        log.info("%d weight tensors were identical and are now shared", shared)
    with torch.no_grad():
        report.float64_error = max_rel_error(reference, gm(*check_inputs))
    del reference
    convert_dtype(gm, torch.float64, dtype)
    times["passes"] = time.perf_counter() - start

    if verify:
        start = time.perf_counter()
        inputs = seeded_like(args, seed + 1)
        with torch.no_grad(), eval_mode(model):
            report.float32_error = max_rel_error(model(*inputs), gm(*inputs))
        times["verify"] = time.perf_counter() - start
    report.ops_after = op_counts(gm)
    report.params_after = sum(p.numel() for p in gm.parameters())
    report.seconds = times
    _ordinary_module(gm, report)
    _LAST[:] = [report]
    log.info("reparameterized %s: %d rewrites, %d refused, %d left unfused, float64 error %.1e",
             type(model).__name__, report.count(), len(report.refusals()), len(report.leftovers), report.float64_error)
    manager.finish(report)
    return gm


def _check_finite(model: torch.nn.Module, reference) -> None:
    """A model whose outputs hold NaN or infinities on seeded inputs cannot be checked: refuse it."""
    bad = [f"output{i} holds {nonfinite(t)}" for i, t in enumerate(tensor_leaves(reference)) if nonfinite(t)]
    if bad:
        raise InputError(f"{type(model).__name__} on seeded inputs: {'; '.join(bad)}; no rewrite can be verified "
                         "against such outputs: fix the model (a NaN or an overflow in its forward) or its weights")


def _ordinary_module(gm: fx.GraphModule, report: Report) -> None:
    """Give ``gm`` back ``nn.Module``'s ``train``/``eval`` (``ep.module()`` replaces them, on the instance,
    by methods that raise NotImplementedError), put it in eval mode and attach ``reparam_report`` so
    that ``copy.deepcopy`` keeps it (GraphModule copies the attributes its meta names)."""
    for name in ("train", "eval"):
        vars(gm).pop(name, None)
    set_training(gm, False)
    gm.reparam_report = report
    gm.meta.setdefault(_PRESERVED, {})["reparam_report"] = report
