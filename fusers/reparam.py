"""``reparameterize``: capture, rewrite in float64 under proof, round once, check in float32.

Ops no output depends on are dropped right after capture (``capture.drop_dead_code``); the report lists them
(``dead_ops``) and the model's tensors that only they, or nothing, read (``unused``).

The result is the captured ``GraphModule`` (recorded, or ``ep.module()``: ``capture.capture``) rewritten,
returned as an ordinary module: ``.eval()``/``.train()``, ``deepcopy``, ``state_dict``, ``.to()`` and
``torch.compile`` work, and it exports again with ``torch.export`` / ``torch.onnx.export``. Its graph is the deploy form
whatever its ``training`` flag says (no op in it depends on the mode).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from runtimes.core import eval_mode, first_line, max_rel_error, nonfinite, set_training, tensor_leaves

from .batch import guard_calls
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
                                   "fold_bn_region", "split_slices")
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
                   seed: int = 0, instruments: Iterable[Any] = (), small: bool = True) -> fx.GraphModule:
    """Return a plain deploy module computing the same function as ``model``.

    ``model`` is untouched (its train/eval mode is restored). Rewrites run on a float64 copy of
    the captured graph; after each pass its outputs on seeded inputs must agree with the captured
    model's to ``1e-9`` relative, or the pass's inexact rewrites are rolled back and reported (an
    ill-conditioned graph whose own float64 rounding noise exceeds that is held to a multiple of the noise
    instead, ``report.tolerance_note``: see :class:`fusers.manager.PassManager`).
    Weights are rounded to the model's dtype once, at the end. With ``verify`` the result is also
    compared with ``model`` itself in its own dtype (``report.float32_error``), and a model whose
    outputs on the seeded inputs hold NaN or infinities is refused (:class:`InputError`): nothing
    can be verified against them.

    ``instruments`` observe the passes (``on_pass_start``, ``on_pass_end``) and receive the finished
    report (``on_run_end``); see ``fusers.manager.Instrument``.

    With ``small`` the per-pass checks of an image model run at a quarter or half of its spatial size when
    the graph runs there alike (:func:`_small_inputs`: every conv and pool still sees each of its taps on
    real data), which is what most of the time goes to. The result is then checked once more at the
    captured size, to the same ``1e-9``; if that check fails, or the small checks rolled anything back (a
    rewrite exact at the captured size may not be at the small one), the whole run is done again at the
    captured size. ``report.proof_shape`` says which size the per-pass checks used.
    """
    args = as_args(example_inputs)
    instruments = list(instruments)  # handed to the redo below as well
    report, times = Report(), {}
    start = time.perf_counter()
    gm = capture(model, args)
    times["capture"] = time.perf_counter() - start
    report.capture = gm.meta.get("captured_by", "")
    report.ops_before = op_counts(gm)
    report.params_before = sum(p.numel() for p in model.parameters())
    report.unused = unused_parameters(model, gm)
    report.dead_ops = drop_dead_code(gm)  # computed in eval mode for no output (YOLOv7 IAuxDetect's aux heads)
    dtype = _float_dtype(model)

    start = time.perf_counter()
    check_inputs, reference, tolerance = _proof_reference(gm, args, dtype, seed, report)
    if verify:
        _check_finite(model, reference)
    guards = _drop_guards(gm) if small and report.proof == "float64" else []
    small_inputs, small_reference = _small_inputs(gm, check_inputs, reference, seed) if guards else (None, None)
    if small_inputs is not None:
        report.proof_shape = [list(t.shape) for t in tensor_leaves(small_inputs)]
        manager = PassManager(resolve_passes(passes), small_inputs, small_reference, tolerance,
                              instruments=instruments)
    else:
        manager = PassManager(resolve_passes(passes), check_inputs, reference, tolerance, instruments=instruments)
    manager.run(gm, report)
    _restore_guards(gm, guards)
    remove_unused_attributes(gm)
    report.leftovers = find_leftovers(gm, report.refusals())
    shared = share_identical_weights(gm)
    if shared:
        log.info("%d weight tensors were identical and are now shared", shared)
    if small_inputs is None and manager.last_error is not None:  # its last check was of this graph, on these inputs
        report.float64_error = manager.last_error
    else:
        with torch.no_grad():
            report.float64_error = max_rel_error(reference, gm(*check_inputs))
    del reference
    tolerance = manager.tolerance  # raised where the graph's own rounding noise is larger
    rolled_back = any(p.rolled_back for p in report.passes)
    if small_inputs is not None and (report.float64_error > tolerance or rolled_back):
        why = (f"the checks at {'x'.join(map(str, report.proof_shape[0]))} rolled back a rewrite" if rolled_back else
               f"the result missed {tolerance:.0e} at the captured size ({report.float64_error:.1e})")
        log.info("%s: again with every check at the captured size", why)
        manager.restart(why)
        return reparameterize(model, example_inputs, passes=passes, verify=verify, seed=seed,
                              instruments=instruments, small=False)
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


def _proof_reference(gm: fx.GraphModule, args, dtype: torch.dtype, seed: int, report: Report):
    """Seeded inputs, the captured graph's outputs on them, and the tolerance every rewrite is held to.

    The graph runs in float64 and rewrites must agree to :data:`TOLERANCE`. A graph that cannot run in
    float64 (a kernel that only takes float32, such as a custom extension op) is checked in its own dtype
    instead, against a bound derived from its size, ``ops * eps(dtype)``: each op rounds once, so a graph
    of ``ops`` ops computes within about that relative error of itself rewritten. ``report.proof`` says so.
    """
    convert_dtype(gm, dtype, torch.float64)
    check_inputs = seeded_like(args, seed, dtype=torch.float64)
    try:
        with torch.no_grad():
            return check_inputs, gm(*check_inputs), TOLERANCE
    except Exception as e:  # noqa: BLE001 - any kernel's refusal of float64 means the same here
        if dtype == torch.float64:
            raise
        reason = first_line(e)
    convert_dtype(gm, torch.float64, dtype)
    check_inputs = seeded_like(args, seed, dtype=dtype)
    with torch.no_grad():
        reference = gm(*check_inputs)
    ops = sum(n.op == "call_function" for n in gm.graph.nodes)
    tolerance = ops * torch.finfo(dtype).eps
    report.proof = (f"{str(dtype).removeprefix('torch.')} with a bound of {ops} ops x eps = {tolerance:.1e} "
                    f"(the graph does not run in float64: {reason})")
    log.warning("rewrites are checked in %s, not float64: %s", dtype, report.proof)
    return check_inputs, reference, tolerance


def _drop_guards(gm: fx.GraphModule) -> list:
    """Take out torch.export's checks of the captured input size for the small checks: the calls of its shape
    guards and its input-constraint hook. :func:`_restore_guards` puts them back."""
    nodes = guard_calls(gm)
    calls = [(n.target, n.args, getattr(gm, n.target)) for n in nodes]
    for node in nodes:
        gm.graph.erase_node(node)
    if nodes:
        gm.recompile()
    hooks = [(k, h) for k, h in gm._forward_pre_hooks.items() if getattr(h, "__name__", "") == _INPUT_HOOK]
    for k, _ in hooks:
        del gm._forward_pre_hooks[k]
    return [calls, hooks]


def _restore_guards(gm: fx.GraphModule, guards: list) -> None:
    if not guards:
        return
    calls, hooks = guards
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}  # a rollback copies the graph
    last = list(placeholders.values())[-1]
    for target, args, module in calls:
        gm.add_submodule(target, module)
        with gm.graph.inserting_after(last):
            gm.graph.call_module(target, tuple(placeholders[a.name] if isinstance(a, fx.Node) else a for a in args))
    gm._forward_pre_hooks.update(hooks)  # the code is generated again by remove_unused_attributes, next


_INPUT_HOOK = "_check_input_constraints_pre_hook"


_WINDOWED = {torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3,
             torch.ops.aten.convolution.default: None}
_POOLS = {torch.ops.aten.avg_pool2d.default, torch.ops.aten.max_pool2d.default, torch.ops.aten.avg_pool1d.default,
          torch.ops.aten.max_pool1d.default}


def _small_inputs(gm: fx.GraphModule, inputs, full, seed: int):
    """Seeded float64 inputs of a quarter (else half) the spatial size and the graph's outputs on them, or
    ``(None, None)``.

    Only for one 4-D floating input of at least 64x64. The smaller input must run through the graph (no
    reshape baked from the captured size), give outputs of the same rank and finite values, and give every
    conv and pool an input at least its kernel's extent plus its stride in each spatial dim, so that every
    tap meets real data at some position and the border and the interior are both checked.
    """
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() != 4:
        return None, None
    n, c, h, w = inputs[0].shape
    for scale in (4, 2):
        if h % scale or w % scale or min(h, w) // scale < 32:
            continue
        small = seeded_like((torch.empty(n, c, h // scale, w // scale, dtype=inputs[0].dtype),), seed)
        if not _may_cover(gm, scale):
            continue
        seen = _Windows(gm)
        try:
            with torch.no_grad():
                out = seen.run(*small)
        except Exception:  # noqa: BLE001 - a shape baked into the graph: not at this size
            continue
        if [t.dim() for t in tensor_leaves(out)] != [t.dim() for t in tensor_leaves(full)] or \
                any(nonfinite(t) for t in tensor_leaves(out)) or not seen.covered:
            continue
        return small, out  # the same leaves, in order, as gm(*small): what max_rel_error compares
    return None, None


class _Windows(fx.Interpreter):
    """Runs the graph and checks that each conv's and pool's input covers its kernel extent plus its stride."""

    def __init__(self, gm):
        super().__init__(gm)
        self.covered = True

    def call_function(self, target, args, kwargs):
        if target in _WINDOWED or target in _POOLS:
            for size, need in zip(args[0].shape[2:], _window_extent(target, args)):
                if size < need:
                    self.covered = False
        return super().call_function(target, args, kwargs)


def _window_extent(target, args) -> list[int]:
    """Per spatial dim, the input size a conv or pool call needs for every tap to meet real data at some position:
    its kernel's extent plus its stride. ``args[1]`` is the weight, a tensor or a node holding one in ``val``."""
    if target in _POOLS:
        kernel, stride = list(args[1]), list(args[2] if len(args) > 2 and args[2] else args[1])
        dilation = [1] * len(kernel)
    else:
        weight = args[1].meta["val"] if isinstance(args[1], fx.Node) else args[1]
        kernel = list(weight.shape[2:])
        stride = list(args[3]) if len(args) > 3 else [1]
        dilation = list(args[5]) if len(args) > 5 else [1]
    nd = len(kernel)
    stride, dilation = stride * nd if len(stride) == 1 else stride, dilation * nd if len(dilation) == 1 else dilation
    return [d * (k - 1) + 1 + st for k, st, d in zip(kernel, stride, dilation)]


def _may_cover(gm: fx.GraphModule, scale: int) -> bool:
    """Whether the windows may be covered at ``1/scale`` of the captured size, judged by the captured shapes
    (``meta["val"]``) divided by ``scale``: a scale that misses by more than the rounding of sizes is not run."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not (node.target in _WINDOWED or node.target in _POOLS):
            continue
        x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        try:
            needs = _window_extent(node.target, node.args)
        except (AttributeError, KeyError, TypeError):  # a weight computed in the graph: no shape to read here
            continue
        if isinstance(x, torch.Tensor) and any(size / scale + 1 < need for size, need in zip(x.shape[2:], needs)):
            return False
    return True


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
