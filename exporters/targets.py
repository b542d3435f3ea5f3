"""The target registry: one :class:`Target` record per artifact format, declared in the format's module.

A target says everything the pipeline, ``deploy verify``, ``deploy inspect`` and ``deploy bench``
need to know about a format, so none of them holds a table of its own:

- ``name`` (what ``--targets`` takes, and the stage name of its artifact), ``runtime`` (what
  ``deploy bench --runtimes`` takes), the file ``suffixes`` its artifacts have;
- ``source``: ``"torch"`` when it is exported from the plain torch module, or the name of the
  target whose artifact it is converted from (OpenVINO and TensorRT read the ONNX file);
- ``export(job) -> [Product]``: the artifacts it writes, each a stage of the run;
- ``runner``: the runner class that runs its files (``"module:Class"``, imported when used), the
  keyword arguments it gets for a given precision (``runner_options``) and when timed
  (``bench_options``, described in ``bench_note``);
- ``requires``: the ``(module, pip extra)`` pairs it cannot run without, and ``check`` for what a
  package cannot tell (a GPU); ``not_run_here``: why its artifacts can be written but not run on this
  machine (Core ML off macOS: the stage is "written, not run", never verified); ``files``: the files
  beside the artifact that belong to it;
- ``function``: the plain export function ``exporters.export(name, ...)`` calls;
- ``inspect``: the reader ``deploy inspect`` uses (``"module:function"``, ``(path, summary)``);
- ``precisions`` it can produce, ``hints`` those its runner applies to the fp32 artifact, and ``native``
  why a precision does not run natively on a CPU (``deploy tune`` prunes with that reason); ``quantize``:
  how it makes an INT8 artifact from its fp32 one
  (``"module:function"``, see ``exporters.int8``); ``mobile``: a phone's runtime (its timings here are this
  machine's CPU, said so by :func:`phone_note`); ``default``: in the default ``--targets``; ``always``: made in
  every run (the plain model, ``pt2``).

The built-in targets are declared at the bottom of ``exporters.pt2``, ``exporters.onnx``,
``exporters.openvino``, ``exporters.tflite``, ``exporters.tensorrt``, ``exporters.executorch``, ``exporters.ncnn``,
``exporters.mnn`` and ``exporters.coreml``; more can
be added with :func:`register` (or a ``reparam_deploy.targets`` entry point naming a module that registers
them). Adding a format is one module; adding a precision to a format is an edit of its record.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.core import Artifact, MissingDependency, require_installed

__all__ = ["Target", "ExportJob", "Product", "register", "get", "names", "all_targets", "by_runtime", "by_suffix",
           "runtimes", "phone_note", "requirements", "check_available", "resolve", "export_order", "BUILTIN_MODULES"]

log = logging.getLogger(__name__)

BUILTIN_MODULES = ("exporters.pt2", "exporters.onnx", "exporters.openvino", "exporters.tflite", "exporters.tensorrt",
                   "exporters.executorch", "exporters.ncnn", "exporters.mnn", "exporters.coreml")
ENTRY_POINT_GROUP = "reparam_deploy.targets"


@dataclass
class ExportJob:
    """What an export step gets: the plain module, example inputs, the folder to write into, the run's options,
    and (for a target converted from another one) the ``source`` artifact."""

    module: Any
    args: tuple
    folder: Path
    precision: str = "fp32"
    dynamic: bool = False
    opset: int = 18
    source: Artifact | None = None
    metadata: dict = field(default_factory=dict)  # extra facts stored in the artifact where the format can


@dataclass
class Product:
    """One stage an export step produced: its name, its artifact and the stage it was made from.

    ``parent`` None means the target's source stage. ``main`` marks the stage that stands for the
    target (the one targets converted from it read and ``deploy bench`` times); ``error`` a stage
    that failed (its artifact is then None).
    """

    stage: str
    artifact: Artifact | None
    parent: str | None = None
    main: bool = True
    error: str = ""
    precision: str | None = None  # default: the artifact's


def _default_files(art: Artifact) -> list[str]:
    return [art.path]


@dataclass(frozen=True, repr=False)
class Target:
    """Everything about one artifact format; see the module docstring."""

    name: str
    runtime: str
    suffixes: tuple[str, ...]
    source: str
    export: Callable[[ExportJob], list[Product]]
    runner: str
    requires: tuple[tuple[str, str], ...] = ()
    precisions: tuple[str, ...] = ("fp32", "fp16")
    files: Callable[[Artifact], list[str]] = _default_files
    inspect: str | None = None
    function: str | None = None  # the library function behind ``exporters.export(name, ...)``: "module:function"
    quantize: str | None = None  # "module:function": (fp32 artifact, path, Int8Options) -> int8 Artifact
    runner_options: Callable[[str], dict] = lambda precision: {}
    hints: tuple[str, ...] = ()  # precisions its runner applies to the fp32 artifact (OpenVINO's bf16 hint)
    native: Callable[[str, dict], str] = lambda precision, cpu: ""  # why it cannot run it natively here ("": it can)
    bench_options: dict = field(default_factory=dict)
    bench_note: dict = field(default_factory=dict)
    check: Callable[[str], None] | None = None  # raises MissingDependency (e.g. no GPU); arg: purpose
    not_run_here: Callable[[], str] = lambda: ""  # why its artifacts cannot run on this machine ("": they can)
    mobile: bool = False  # a phone's runtime: its timings here are this machine's CPU, never a phone's
    device: str = "cpu"  # where its runner computes: "cpu" or "cuda"
    default: bool = False
    always: bool = False
    description: str = ""
    title: str = ""  # how messages name it ("ONNX"); default: the name

    @property
    def label(self) -> str:
        return self.title or self.name

    def __repr__(self) -> str:
        return f"Target({self.name!r}, runtime={self.runtime!r}, source={self.source!r})"

    def runner_class(self) -> type:
        return resolve(self.runner)

    def open(self, artifact: Artifact | str | os.PathLike, *, bench: bool = False, precision: str | None = None,
             **kwargs):
        """A runner for ``artifact`` (a record or a path) with this target's options (and bench options)."""
        if isinstance(artifact, Artifact):
            path, precision = artifact.path, precision or artifact.precision
            kwargs.setdefault("artifact", artifact)
        else:
            path = os.fspath(artifact)
        options = {**self.runner_options(precision or "fp32"), **(self.bench_options if bench else {}), **kwargs}
        return self.runner_class()(path, **options)


def resolve(ref: str | Callable) -> Any:
    """The object a ``"module:attribute"`` reference names (imported now), or ``ref`` itself."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


_REGISTRY: dict[str, Target] = {}
_loaded = False


def register(target: Target, *, replace: bool = False) -> Target:
    """Add ``target`` to the registry (``replace`` to redefine a name); returns it."""
    _load_builtins()
    return _add(target, replace)


def unregister(name: str) -> None:
    _load_builtins()
    _REGISTRY.pop(name, None)


def _add(target: Target, replace: bool) -> Target:
    if target.name in _REGISTRY and not replace:
        raise ValueError(f"target {target.name!r} is already registered")
    clash = [t.name for t in _REGISTRY.values() if t.runtime == target.runtime and t.name != target.name]
    if clash:
        raise ValueError(f"target {target.name!r} declares runtime {target.runtime!r}, which target {clash[0]!r} "
                         "already uses; deploy bench needs one target per runtime name")
    if target.source != "torch" and target.source not in _REGISTRY:
        raise ValueError(f"target {target.name!r} is converted from {target.source!r}, which is not registered")
    _REGISTRY[target.name] = target
    return target


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        _add(importlib.import_module(module).TARGET, False)
    try:
        from importlib.metadata import entry_points

        plugins = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - a broken environment must not stop the built-in targets
        plugins = ()
    for ep in plugins:
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001
            log.warning("target plugin %s could not be loaded: %s", ep.name, e)


def all_targets() -> list[Target]:
    """Every registered target, in registration order (a target after its source)."""
    _load_builtins()
    return list(_REGISTRY.values())


def names(*, selectable: bool = True) -> list[str]:
    """Target names; ``selectable`` leaves out those made in every run (pt2)."""
    return [t.name for t in all_targets() if not (selectable and t.always)]


def get(name: str) -> Target:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown target {name!r}; known targets: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def runtimes() -> list[str]:
    return [t.runtime for t in all_targets()]


def by_runtime(runtime: str) -> Target:
    for t in all_targets():
        if t.runtime == runtime:
            return t
    raise KeyError(f"unknown runtime {runtime!r}; known runtimes: {', '.join(runtimes())}")


def by_suffix(path: str | os.PathLike) -> Target | None:
    """The target whose suffix ends ``path`` (the longest one that does), or None."""
    name = os.fspath(path).lower()
    best = None
    for t in all_targets():
        for suffix in t.suffixes:
            if name.endswith(suffix) and (best is None or len(suffix) > best[0]):
                best = (len(suffix), t)
    return best[1] if best else None


def requirements(target: Target) -> list[tuple[str, str]]:
    """The ``(module, extra)`` pairs ``target`` needs, its sources' included."""
    out = list(target.requires)
    if target.source != "torch":
        out += [r for r in requirements(get(target.source)) if r not in out]
    return out


def check_available(target: Target, purpose: str | None = None) -> None:
    """Raise :class:`MissingDependency` naming the package (and pip extra) or device ``target`` lacks."""
    purpose = purpose or f"the {target.name} target"
    for module, extra in requirements(target):
        require_installed(module, extra, purpose)
    chain = [target]
    while chain[-1].source != "torch":
        chain.append(get(chain[-1].source))
    for t in chain:
        if t.check is not None:
            t.check(purpose)


def export_order(wanted: Sequence[str]) -> list[Target]:
    """The targets to export for ``wanted`` names: the ones made in every run, the wanted ones and their
    sources, in registration order (a source before the targets converted from it)."""
    needed = set(wanted)
    for name in list(wanted):
        t = get(name)
        while t.source != "torch":
            needed.add(t.source)
            t = get(t.source)
    return [t for t in all_targets() if t.always or t.name in needed]


def phone_note(timed: Sequence[str]) -> str:
    """The caveat for the phone runtimes among the runtimes ``timed`` on this machine, or ''."""
    import platform

    phones = [r for r in dict.fromkeys(timed) if r in runtimes() and by_runtime(r).mobile]
    if not phones:
        return ""
    many = len(phones) > 1
    return (f"{', '.join(phones)}: phone runtime{'s' if many else ''} timed on this machine's {platform.machine()} "
            f"CPU, not on a phone: no claim about {'their' if many else 'its'} speed on a phone's ARM CPU")


def missing_message(e: MissingDependency) -> str:
    return str(e).rstrip(".")
