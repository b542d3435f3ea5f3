"""``reparameterize``: capture, rewrite in float64 under proof, round once, check in float32.

Ops no output depends on are dropped right after capture (``capture.drop_dead_code``); the report lists them
(``dead_ops``) and the model's tensors that only they, or nothing, read (``unused``).

The result is the captured ``GraphModule`` (recorded, or ``ep.module()``: ``capture.capture``) rewritten,
returned as an ordinary module: ``.eval()``/``.train()``, ``deepcopy``, ``state_dict``, ``.to()`` and
``torch.compile`` work, and it exports again with ``torch.export`` / ``torch.onnx.export``. Its graph is the deploy form
whatever its ``training`` flag says (no op in it depends on the mode).
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from runtimes.core import eval_mode, first_line, max_rel_error, nonfinite, set_training, tensor_leaves

from .batch import guard_calls
from .capture import InputError, as_args, capture, drop_dead_code, unused_parameters
from .graph import aten, fetch_attr, op_counts, remove_unused_attributes, share_identical_weights
from .leftovers import find_leftovers
from .manager import PassManager, Report
from .numerics import convert_dtype, float64_kernels, seeded_like
from .passes import REGISTRY
from .rules import Pass

__all__ = ["DEFAULT_PASSES", "reparameterize", "last_report", "resolve_passes"]

log = logging.getLogger(__name__)

DEFAULT_PASSES: tuple[str, ...] = ("slice_writes", "drop_noops", "fold_constants", "constant_pad", "affine_chain",
                                   "merge_linear", "fold_bn", "push_affine", "fold_into_next", "merge_sequence",
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
    for t in itertools.chain(model.parameters(), model.buffers()):
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
    compared with ``model`` itself in its own dtype (``report.float32_error``) on other seeded inputs (the
    forward the capture recorded runs on them: the model runs once), and a model whose
    outputs on the seeded inputs hold NaN or infinities is refused (:class:`InputError`): nothing
    can be verified against them.

    ``instruments`` observe the passes (``on_pass_start``, ``on_pass_end``) and receive the finished
    report (``on_run_end``); see ``fusers.manager.Instrument``.

    With ``small`` (and ``verify``) the float64 checks of an image model run at a quarter or half of its spatial
    size where no rewrite can tell the two sizes apart (:func:`_alike_proof`): every op of the graph computes
    the same function of its window at both sizes (pointwise and per-channel ops, BatchNorm, convs and pools,
    global means and the head after them, nothing else) and every conv and pool meets, at the smaller size,
    every kind of border it meets at the captured one (:func:`_same_borders`), with each of its taps on real
    data. A rewrite exact there is exact at the captured size. The deploy graph must meet the same condition,
    and its float32 error against the model at the captured size stay within its ops x eps; else, or when a
    check at the smaller size rolled a rewrite back, the whole run is done again at the captured size.
    Any other graph is checked at the captured size: a round whose one check holds, the common case, has
    that check as the final one; when a round misses and its passes are redone one at a time (many checks),
    those checks run at a smaller size where every conv and pool still sees each of its taps on real data
    (:func:`_small_inputs`), and the result is checked once more at the captured size, to the same ``1e-9``
    (the same redo if it misses). ``report.proof_shape`` says which size the checks used (None: the captured).
    """
    args = as_args(example_inputs)
    instruments = list(instruments)  # handed to the redo below as well
    report, times = Report(), {}
    start = time.perf_counter()
    verify_inputs = seeded_like(args, seed + 1)
    gm = capture(model, args, record_on=verify_inputs)  # the model's outputs on them are the verify's expected
    expected = gm.meta.pop("recorded_outputs", None)
    times["capture"] = time.perf_counter() - start
    report.capture = gm.meta.get("captured_by", "")
    report.ops_before = op_counts(gm)
    report.params_before = sum(p.numel() for p in model.parameters())
    report.unused = unused_parameters(model, gm)
    report.dead_ops = drop_dead_code(gm)  # computed in eval mode for no output (YOLOv7 IAuxDetect's aux heads)
    dtype = _float_dtype(model)

    start = time.perf_counter()
    alike = _alike_proof(gm, args, expected, dtype, seed) if small and verify and expected is not None else None
    if alike is not None:  # the proof at a smaller size where no rewrite can tell the sizes apart
        check_inputs, reference = alike
        tolerance, report.proof_shape = TOLERANCE, [list(t.shape) for t in tensor_leaves(check_inputs)]
        _check_finite(model, expected)
        guards = None
    else:
        check_inputs, reference, tolerance = _proof_reference(gm, args, dtype, seed, report)
        if verify:
            _check_finite(model, reference)
        guards = _drop_guards(gm) if small and report.proof == "float64" else None
    smaller = (lambda g: _small_inputs(g, check_inputs, reference, seed)) if guards is not None else None
    manager = PassManager(resolve_passes(passes), check_inputs, reference, tolerance, instruments=instruments,
                          smaller=smaller)
    manager.run(gm, report)
    _restore_guards(gm, guards)
    remove_unused_attributes(gm)
    report.leftovers = find_leftovers(gm, report.refusals())
    shared = share_identical_weights(gm)
    if shared:
        log.info("%d weight tensors were identical and are now shared", shared)
    if manager.shrunk:
        report.proof_shape = [list(t.shape) for t in tensor_leaves(manager.inputs)]
    still_alike = alike is None or _still_alike(gm, check_inputs)  # the result too, at the smaller size
    if not manager.shrunk and manager.last_error is not None:  # its last check was of this graph, on these inputs
        report.float64_error = manager.last_error
    else:
        with torch.no_grad(), float64_kernels():
            report.float64_error = max_rel_error(reference, gm(*check_inputs))
    tolerance = manager.tolerance  # raised where the graph's own rounding noise is larger
    rolled_back = any(p.rolled_back for p in report.passes)
    if (manager.shrunk or alike is not None) and (report.float64_error > tolerance or rolled_back or not still_alike):
        size = "x".join(map(str, report.proof_shape[0]))
        why = (f"the checks at {size} rolled back a rewrite" if rolled_back else
               f"the result does not meet the same borders at {size}" if not still_alike else
               f"the result missed {tolerance:.0e} at {size if alike is not None else 'the captured size'} "
               f"({report.float64_error:.1e})")
        return _again(model, example_inputs, passes, verify, seed, instruments, manager, why)
    convert_dtype(gm, torch.float64, dtype)
    times["passes"] = time.perf_counter() - start

    if verify:
        start = time.perf_counter()
        with torch.no_grad(), eval_mode(model):
            if expected is None:  # captured by torch.export: no forward of the model ran yet
                expected = model(*verify_inputs)
            report.float32_error = max_rel_error(expected, gm(*verify_inputs))
        times["verify"] = time.perf_counter() - start
        bound = sum(report.ops_before.values()) * torch.finfo(dtype).eps
        if alike is not None and report.float32_error > bound:
            return _again(model, example_inputs, passes, verify, seed, instruments, manager,
                          f"the result, proven at {'x'.join(map(str, report.proof_shape[0]))}, is "
                          f"{report.float32_error:.1e} from the model at the captured size in {dtype} "
                          f"(over {bound:.1e}, its ops x eps)")
    report.ops_after = op_counts(gm)
    report.params_after = sum(p.numel() for p in gm.parameters())
    report.seconds = times
    _ordinary_module(gm, report)
    _LAST[:] = [report]
    log.info("reparameterized %s: %d rewrites, %d refused, %d left unfused, float64 error %.1e",
             type(model).__name__, report.count(), len(report.refusals()), len(report.leftovers), report.float64_error)
    manager.finish(report)
    return gm


def _again(model, example_inputs, passes, verify, seed, instruments, manager, why) -> fx.GraphModule:
    """The whole run again with every check at the captured size (``why`` is logged and told to instruments)."""
    log.info("%s: again with every check at the captured size", why)
    manager.restart(why)
    return reparameterize(model, example_inputs, passes=passes, verify=verify, seed=seed, instruments=instruments,
                          small=False)


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
        with torch.no_grad(), float64_kernels():
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


def _small_inputs(gm: fx.GraphModule, inputs, full, seed: int, alike: bool = False):
    """Seeded float64 inputs of a quarter (else half) the spatial size and the graph's outputs on them, or
    ``(None, None)``.

    Only for one 4-D floating input of at least 64x64. The smaller input must run through the graph (no
    reshape baked from the captured size), give outputs of the same rank as ``full`` and finite values, and give
    every conv and pool an input at least its kernel's extent plus its stride in each spatial dim, so that every
    tap meets real data at some position and the border and the interior are both checked. With ``alike`` the
    graph must also be one no rewrite of which can tell the two sizes apart (:class:`_Windows`).
    """
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() != 4:
        return None, None
    n, c, h, w = inputs[0].shape
    for scale in (4, 2):
        if h % scale or w % scale or min(h, w) // scale < 32:
            continue
        small = seeded_like((torch.empty(n, c, h // scale, w // scale, dtype=torch.float64),), seed)
        if not _may_cover(gm, scale):
            continue
        seen = _Windows(gm, alike)
        try:
            with torch.no_grad(), float64_kernels():
                out = seen.run(*small)
        except Exception:  # noqa: BLE001 - a shape baked into the graph: not at this size
            continue
        if [t.dim() for t in tensor_leaves(out)] != [t.dim() for t in tensor_leaves(full)] or \
                any(nonfinite(t) for t in tensor_leaves(out)) or not seen.covered or not seen.alike:
            continue
        return small, out  # the same leaves, in order, as gm(*small): what max_rel_error compares
    return None, None


def _alike_proof(gm: fx.GraphModule, args, expected, dtype: torch.dtype, seed: int):
    """Seeded float64 inputs at a quarter or half of the captured size at which no rewrite can tell the sizes
    apart, and the graph's outputs on them, or None (``gm`` is in float64 from here either way).

    Every op of the graph is one whose value at a position does not depend on the spatial size (pointwise
    and per-channel ops, BatchNorm, global means, the head after them: :data:`_SIZE_FREE`), and every conv
    and pool meets the same borders at both sizes (:func:`_same_borders`). Each op then computes the same
    function of its window at both sizes, at every kind of position, border or interior, that the captured
    size has; a rewrite exact on seeded inputs at the smaller size is exact at the captured one, and checking
    there costs a quarter or a sixteenth of the float64 arithmetic.
    """
    convert_dtype(gm, dtype, torch.float64)
    if not all(_size_free(n) for n in gm.graph.nodes if n.op == "call_function"):
        return None
    small, out = _small_inputs(gm, seeded_like(args, seed, dtype=torch.float64), expected, seed, alike=True)
    return None if small is None else (small, out)


# ops whose value at each position does not depend on the spatial size (the convs and pools are checked apart)
_SIZE_FREE = {getattr(aten, name) for name in (
    "batch_norm", "_native_batch_norm_legit_no_training", "relu", "relu_", "gelu", "gelu_", "silu", "silu_",
    "sigmoid", "sigmoid_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "tanh", "tanh_", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "mish",
    "mish_", "softplus", "neg", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "dropout", "clone",
    "contiguous", "alias", "detach", "_assert_tensor_metadata") if hasattr(aten, name)} | {operator.getitem}
# not constant_pad_nd: an explicit pad (TensorFlow's "same", one column on the right) makes the conv after it read the
# pad at one size and not at another, which that conv's own padding, zero, does not show
_HEAD = {aten.linear, aten.addmm, aten.t, aten.flatten, aten.view, aten.reshape, aten._unsafe_view}


def _still_alike(gm: fx.GraphModule, inputs) -> bool:
    """Whether the rewritten graph too is one no rewrite can tell apart at the size of ``inputs``: run on shapes
    alone (the meta device), since its values there were just checked."""
    seen = _Windows(gm, alike=True, shapes_only=True)
    try:
        seen.run(*[torch.empty_like(t, device="meta") for t in inputs])
    except Exception:  # noqa: BLE001 - an op without shapes alone: not shown alike
        return False
    return seen.covered and seen.alike


class _Windows(fx.Interpreter):
    """Runs the graph and checks that each conv's and pool's input covers its kernel extent plus its stride;
    with ``alike``, also that every op is size-free and every conv and pool meets the same borders as at the
    captured size (``alike`` stays true only then). With ``shapes_only`` the weights are read as meta tensors."""

    def __init__(self, gm, alike: bool = False, shapes_only: bool = False):
        super().__init__(gm)
        self.covered, self.alike, self.check_alike, self.shapes_only = True, True, alike, shapes_only

    def run(self, *args):
        weights = {n: fetch_attr(self.module, n.target) for n in self.graph.nodes if n.op == "get_attr"}
        if self.shapes_only:
            weights = {n: torch.empty_like(w, device="meta") if isinstance(w, torch.Tensor) else w
                       for n, w in weights.items()}
        return super().run(*args, initial_env=weights)  # read once, not node by node

    def run_node(self, n):
        out = super().run_node(n)
        if self.check_alike and self.alike and n.op == "call_function":
            self.alike = _size_free(n, self.env)
        return out

    def call_function(self, target, args, kwargs):
        if target in _WINDOWED or target in _POOLS:
            for size, need in zip(args[0].shape[2:], _window_extent(target, args)):
                if size < need:
                    self.covered = False
        return super().call_function(target, args, kwargs)


def _size_free(node: fx.Node, env: dict | None = None) -> bool:
    """Whether ``node`` computes the same function of its window at the size it ran at (``env``) as at the
    captured size (``meta["val"]``); without ``env``, whether it may (its op and arguments alone)."""
    target, out = node.target, node.meta.get("val")
    packet = getattr(target, "overloadpacket", target)
    if packet in _SIZE_FREE:
        return True
    if packet in _HEAD:  # only once the spatial dims are gone (a flattened, globally pooled map)
        return isinstance(out, torch.Tensor) and out.dim() <= 2
    captured = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
    if not isinstance(captured, torch.Tensor) or captured.dim() != 4:
        return False
    if target == aten.adaptive_avg_pool2d.default:  # global means only
        return list(_arg(node, 1, "output_size", ())) == [1, 1]
    if target == aten.mean.dim:
        dims = _arg(node, 1, "dim", None)
        return dims is None or {d % 4 for d in dims} >= {2, 3}
    if target == aten.cat.default:  # along the channels
        return _arg(node, 1, "dim", 0) % 4 == 1
    if target == aten.conv2d.default:
        padding = _arg(node, 4, "padding", [0])
    elif target == aten.avg_pool2d.default:
        if _arg(node, 4, "ceil_mode", False) or _arg(node, 6, "divisor_override", None) is not None:
            return False
        padding = _arg(node, 3, "padding", [0])
    elif target == aten.max_pool2d.default:
        if _arg(node, 5, "ceil_mode", False) or any(d != 1 for d in _arg(node, 4, "dilation", [1])):
            return False
        padding = _arg(node, 3, "padding", [0])
    else:
        return False
    if isinstance(padding, str):
        return False
    if env is None:
        return True
    args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]  # the weight as it is now
    extents, strides = _window(target, args)
    padding = list(padding) * (len(extents) // len(padding))
    return all(_same_borders(full, now, e, st, p) for full, now, e, st, p in
               zip(captured.shape[2:], args[0].shape[2:], extents, strides, padding))


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _same_borders(full: int, small: int, extent: int, stride: int, pad: int) -> bool:
    """Whether a window of ``extent`` moved by ``stride`` over a dim padded by ``pad`` meets, at the smaller size,
    every kind of position it meets at the captured size: the left border, an interior position that touches
    neither border, and the right border, where the last window overhangs the end by ``pad`` minus the
    remainder of the stride (the same overhang at both sizes, when it has one at the captured size)."""
    overhang = [pad - (n + 2 * pad - extent) % stride for n in (full, small)]
    if overhang[0] > 0 and overhang[1] != overhang[0]:
        return False
    left = -(-pad // stride)
    return all((n + 2 * pad - extent) // stride + 1 >= left + -(-max(o, 0) // stride) + 1
               for n, o in zip((full, small), overhang))


def _window(target, args) -> tuple[list[int], list[int]]:
    """Per spatial dim, a conv's or pool's window extent (its dilated kernel) and its stride. ``args[1]`` is the
    weight, a tensor or a node holding one in ``val``."""
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
    return [d * (k - 1) + 1 for k, d in zip(kernel, dilation)], stride


def _window_extent(target, args) -> list[int]:
    """Per spatial dim, the input size a conv or pool call needs for every tap to meet real data at some position:
    its window's extent plus its stride."""
    return [e + st for e, st in zip(*_window(target, args))]


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
