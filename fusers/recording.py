"""Capture by recording: run the model once, in eval mode, and keep every aten op it calls, as a graph.

``torch.export`` traces with fake tensors through proxies, at a cost of about a millisecond per op here (1.7 s
for MobileOne-S0's 676 training-graph ops, where its forward takes 0.05 s), which made the capture of a
multi-branch training graph cost several times the whole reparameterize-then-export path of a hand-written
``switch_to_deploy``. :func:`record` runs the forward once on the real example inputs with a recorder at
torch's pre-dispatch level, the level whose ops ``torch.export`` writes into the graphs this package rewrites
(``aten.conv2d``, ``aten.batch_norm``, ``aten.add_``, not their decompositions), and builds the graph from
what ran: each op a node, each tensor it read the node that made it, a parameter or buffer a ``get_attr`` of
its name in the model, a tensor the model holds as a plain attribute a constant. The same 676 ops of
MobileOne-S0 record in 0.3 s, the graph module and the check below included.

What a recording cannot see, it refuses, and :func:`fusers.capture.capture` uses ``torch.export``:

- Python that read a tensor's value (``.item()``, ``bool(t)``, ``t.tolist()``, ``t.numpy()``): a branch taken on
  one input's values may not be taken on another's, a tensor made from them is not a constant;
- a tensor that no recorded op made and the model does not hold (a module-level global): it may have been
  computed from the input where the recorder could not see;
- a write into a model input, parameter, buffer or tensor constant, or into a view of one (``torch.export``
  makes these explicit outputs; a deploy graph must not have them), an op with an ``out=`` tensor;
- tensors of a subclass, outputs that are not tensors, numbers, ``None`` or tuples, lists and dicts of them;
- the fused kernels ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take without gradients (their
  fast path is turned off while recording, as tracing with gradients turns it off for ``torch.export``);
- anything else the graph does not reproduce: the recorded graph is run on the same inputs and must give the
  recorded outputs bit for bit, else it is not used.

Shapes are baked in, as ``torch.export`` bakes the static shapes it captures. Node names, ``meta["val"]``
(fake tensors) and ``meta["nn_module_stack"]`` follow ``torch.export``'s, so the passes and reports read a
recorded graph as they read an exported one.
"""

from __future__ import annotations

import inspect
import operator

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["record", "NotRecordable"]

aten = torch.ops.aten

# item() / float() / bool(), and the conversions .numpy(), .tolist() and np.asarray start with resolve_conj/neg
_READS_VALUES = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
                 aten.resolve_conj.default, aten.resolve_neg.default}
_LEAVES = (int, float, bool, str, type(None), torch.device, torch.dtype, torch.layout, torch.memory_format)
_LIFTS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
_FAST_PATHS = {aten._transformer_encoder_layer_fwd.default, aten._native_multi_head_attention.default}


class NotRecordable(Exception):
    """The forward did something a recording cannot reproduce; the message says what."""


def _mode_class():
    """A dispatch mode for the pre-dispatch key, which torch lets only its own proxy modes onto (private API:
    any failure here means torch changed, and the caller captures with ``torch.export`` instead)."""
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(ProxyTorchDispatchMode):
        def __init__(self, builder: _Builder):  # noqa: D107 - not ProxyTorchDispatchMode's: no tracer, no proxies
            TorchDispatchMode.__init__(self, torch._C.DispatchKey.PreDispatch)
            self._mode_key = torch._C._TorchDispatchModeKey.PROXY
            self.enter_stack, self.pre_dispatch, self.builder = [], True, builder

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.builder.before(func, args, kwargs)
            out = func(*args, **kwargs)
            self.builder.add(func, args, kwargs, out)
            return out

    return Recorder


class _Builder:
    """Builds the graph while the forward runs: tensors map to the nodes that made them (weakly, so the
    forward frees what it frees and a freed tensor's id cannot alias a new one)."""

    def __init__(self, model: torch.nn.Module, inputs: tuple):
        self.graph = fx.Graph()
        self.nodes = WeakTensorKeyDictionary()
        self.named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.state = {}  # id -> name of each parameter and buffer (the model holds them for the whole capture)
        for name, t in self.named.items():
            self.state.setdefault(id(t), name)
        modules = list(model.named_modules())
        held = [t for _, m in modules for t in _tensor_attributes(m)]  # plain tensor attributes: constants
        self.held = {id(t) for t in held}
        self.guarded = {t.untyped_storage().data_ptr() for t in (*inputs, *self.named.values(), *held) if t.numel()}
        self.constants: dict[str, torch.Tensor] = {}
        self.attrs: dict[str, fx.Node] = {}
        self.paths = {id(m): (path, f"{type(m).__module__}.{type(m).__qualname__}") for path, m in modules}
        self.stack: list[tuple[str, str]] = []
        names = _input_names(model, len(inputs))
        for name, t in zip(names, inputs):
            node = self.graph.placeholder(name)
            node.meta["val"] = _Shape.of(t)
            self.nodes[t] = node

    def node_of(self, t: torch.Tensor, fresh: bool = False) -> fx.Node:
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise NotRecordable(f"a tensor of type {type(t).__name__}")
        node = self.nodes.get(t)
        if node is not None:
            return node
        name = self.state.get(id(t))
        if name is None:  # a tensor the forward did not compute: a constant of the graph, if it is the model's
            if id(t) not in self.held and not fresh:
                raise NotRecordable("the forward used a tensor that no recorded op made and the model does not hold")
            name = f"_tensor_constant{len(self.constants)}"
            self.constants[name] = t
        node = self.attrs.get(name)
        if node is None:
            node = self.attrs[name] = self.graph.get_attr(name)
            node.meta["val"] = _Shape.of(t)
        self.nodes[t] = node
        return node

    def before(self, func, args, kwargs) -> None:
        if func in _READS_VALUES:
            raise NotRecordable(f"the forward reads a tensor's value in Python ({func})")
        if func in _FAST_PATHS:
            raise NotRecordable(f"{func} is an inference fast path that torch.export does not take")
        if "out" in kwargs:
            raise NotRecordable(f"{func} writes into an out= tensor")
        schema = func._schema
        values = [*zip(schema.arguments, args), *((a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs)]
        for arg, value in values:
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor) \
                    and value.untyped_storage().data_ptr() in self.guarded:
                raise NotRecordable(f"{func} writes into a model input, parameter, buffer or constant")

    def add(self, func, args, kwargs, out) -> None:
        if func in _LIFTS:  # torch.tensor(...) in the forward: a constant made there, lifted
            self.node_of(args[0], fresh=True)
        node = self.graph.call_function(func, _map(self._arg, args), _map(self._arg, kwargs),
                                        name=func.overloadpacket.__name__)
        node.meta["val"] = _map(_Shape.of, out)  # fake tensors once the forward is done (make_fakes)
        node.meta["nn_module_stack"] = {f"L__self__{path}": (path, kind) for path, kind in self.stack}
        if isinstance(out, torch.Tensor):
            self.nodes[out] = node  # after an in-place op, its input is this node's result
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    with self.graph.inserting_after(node):
                        item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta.update(val=node.meta["val"][i], nn_module_stack=node.meta["nn_module_stack"])
                    self.nodes[t] = item
        elif not isinstance(out, _LEAVES):
            raise NotRecordable(f"{func} returned a {type(out).__name__}")

    def _arg(self, v):
        if isinstance(v, torch.Tensor):
            return self.node_of(v)
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise NotRecordable("a symbolic size")
        return v

    def enter(self, module, _args) -> None:
        self.stack.append(self.paths.get(id(module), ("", type(module).__qualname__)))

    def leave(self, _module, _args, _out) -> None:
        self.stack.pop()

    def output(self, out) -> None:
        leaves, _ = tree_flatten(out)
        if not all(isinstance(v, (torch.Tensor, *_LEAVES)) for v in leaves) or _named(out):
            raise NotRecordable("the model returns something other than tensors, numbers and None in tuples, "
                                "lists and dicts")
        result = _map(self._arg, out)
        if any(isinstance(v, torch.Tensor) for v in tree_flatten(result)[0]):  # a container _map does not open
            raise NotRecordable(f"the model returns a {type(out).__name__} the recording cannot rebuild")
        self.graph.output(result)
        first = next(n for n in self.graph.nodes if n.op != "placeholder")
        for node in self.attrs.values():  # tensors first, in order of use, as torch.export's lifted inputs are
            first.prepend(node)


class _Shape(tuple):
    """What a fake tensor needs of a recorded one: (shape, stride, dtype, device)."""

    @classmethod
    def of(cls, v):
        return cls((tuple(v.shape), v.stride(), v.dtype, v.device)) if isinstance(v, torch.Tensor) else v


def _map(fn, v):
    """``fn`` on every leaf of nested tuples, lists and dicts (a leaner ``tree_map`` for op arguments)."""
    if isinstance(v, list):  # also fx's immutable_list
        return [_map(fn, x) for x in v]
    if isinstance(v, tuple) and not isinstance(v, _Shape):  # also torch.return_types
        return tuple(_map(fn, x) for x in v)
    if isinstance(v, dict):
        return {k: _map(fn, x) for k, x in v.items()}
    return fn(v)


def _named(v) -> bool:
    """Whether ``v`` holds a named tuple (or another tuple with its own constructor) at any depth."""
    if isinstance(v, tuple):
        return hasattr(v, "_fields") or any(_named(x) for x in v)
    if isinstance(v, list):
        return any(_named(x) for x in v)
    if isinstance(v, dict):
        return any(_named(x) for x in v.values())
    return False


def _make_fakes(graph: fx.Graph) -> None:
    """Replace each node's recorded :class:`_Shape` by a fake tensor of that shape, stride, dtype and device."""
    made: dict[_Shape, torch.Tensor] = {}  # one fake per shape: nodes only read them

    with FakeTensorMode(allow_non_fake_inputs=True):
        def fake(v):
            if not isinstance(v, _Shape):
                return v
            if v not in made:
                made[v] = torch.empty_strided(v[0], v[1], dtype=v[2], device=v[3])
            return made[v]

        for node in graph.nodes:
            if "val" in node.meta:
                node.meta["val"] = _map(fake, node.meta["val"])


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


def _tensor_attributes(module: torch.nn.Module):
    """The tensors a module holds as plain attributes, also in lists, tuples and dicts (YOLO's anchor grids)."""
    for key, value in vars(module).items():
        if isinstance(value, torch.Tensor):
            yield value
        elif key not in _MODULE_INTERNALS and isinstance(value, (list, tuple, dict)) and not _numbers(value):
            yield from (v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor))


def _numbers(value) -> bool:
    """A flat tuple or list of numbers (a conv's kernel_size, stride, ...): no tensor to look for."""
    return isinstance(value, (tuple, list)) and all(type(v) in (int, float, bool) for v in value)


def _input_names(model: torch.nn.Module, count: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:count] if len(params) >= count else [f"arg{i}" for i in range(count)]


def record(model: torch.nn.Module, inputs: tuple) -> fx.GraphModule:
    """Record ``model`` (already in eval mode) on ``inputs`` (a tuple of tensors) as a graph module whose
    ``get_attr`` targets are the model's own parameter and buffer names; raise :class:`NotRecordable` with
    the reason when the recording would not be the model's function (see the module docstring). The outputs
    the forward gave are in ``gm.meta["recorded_outputs"]``."""
    if not all(type(t) is torch.Tensor for t in inputs):
        raise NotRecordable("the inputs are not all plain tensors")
    builder = _Builder(model, inputs)
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(builder.enter),
             torch.nn.modules.module.register_module_forward_hook(builder.leave, always_call=True)]
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # under no_grad, attention layers take fused kernels export does not
    try:
        with torch.no_grad(), enable_python_dispatcher(), _mode_class()(builder):
            out = model(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for hook in hooks:
            hook.remove()
    builder.output(out)
    _make_fakes(builder.graph)
    state = {**builder.named, **builder.constants}
    gm = fx.GraphModule({name: state[name] for name in builder.attrs}, builder.graph, class_name=type(model).__name__)
    for name, t in builder.named.items():  # the tensors no op read too, as ep.module() holds the whole state
        if name not in builder.attrs:
            _hold(gm, name, t)
    for name, t in builder.constants.items():  # constants are plain attributes, not state, as in ep.module()
        del gm._buffers[name]
        setattr(gm, name, t)
    with torch.no_grad():
        again = gm(*inputs)
    if not _same(out, again):
        raise NotRecordable("the recorded graph does not give the outputs the forward gave")
    gm.meta["recorded_outputs"] = out
    return gm


def _hold(gm: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    """Register ``t`` on ``gm`` under the dotted ``name`` (a parameter as a parameter), making the modules on
    the way."""
    *path, field = name.split(".")
    owner = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if isinstance(t, torch.nn.Parameter):
        owner.register_parameter(field, t)
    else:
        owner.register_buffer(field, t)


def _same(a, b) -> bool:
    """The same leaves, bit for bit (NaN where NaN), in the same order."""
    (la, _), (lb, _) = tree_flatten(a), tree_flatten(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            if x != y:
                return False
        elif x.shape != y.shape or x.dtype != y.dtype or not bool(((x == y) | (x.isnan() & y.isnan())).all()):
            return False
    return True
