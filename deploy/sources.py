"""Model sources: turn a MODEL argument (and an optional ``--checkpoint``) into a torch module.

    repvgg_a0                   a zoo model (deploy.zoo); repvgg_digits loads its shipped weights
    timm:repvgg_a0              timm.create_model(name, pretrained=False)
    torchvision:resnet18        torchvision.models.get_model(name, weights=None), weights_backbone=None too
    path/to/net.py:build        build() from the user's own file (its folder is put on sys.path)
    path/to/best.pt             a whole pickled model, or a dict holding one under 'ema' / 'model'
                                (YOLOv7 style); --code-path DIR makes its classes importable; loading
                                it runs its code, so it needs --trust-pickle
    path/to/model.pt2           a torch.export program (torch.export.save)

Nothing is downloaded: timm and torchvision models are built with random weights unless a
checkpoint is given, and the record says so. Random-weight models get non-trivial BatchNorm
statistics (``zoo.randomize_batchnorm``) and new values for the parameters their library zero-initializes
(``zoo.randomize_zero_weights``: a zero classifier makes every output its bias) so that verifying them is not
vacuous. Models are built with
torch's generator seeded by ``seed`` (and the caller's generator state restored): two loads of the
same spec and seed are the same network.

A checkpoint (``load_checkpoint``) is a state dict, possibly nested under ``state_dict`` /
``model_state_dict`` / ``model`` / ``ema`` (or a whole module there); ``module.`` and
``_orig_mod.`` prefixes (DataParallel, torch.compile) are stripped. It is loaded strictly: a
missing, unexpected or mis-shaped key stops the load with the first few keys of each kind, since
loading with missing keys is how a converted model silently computes garbage.

Checkpoints: unpickling runs code named in the file, so checkpoints are read with
``runtimes.safe_load.load_checkpoint``: torch's ``weights_only`` loader and an allow-list of the
harmless globals real checkpoints hold (``safe_load.safe_globals``); a file holding anything else (a
whole pickled module, a YOLOv7 checkpoint, or a crafted object) is refused with the global that
stopped the loader, unless ``trust_pickle`` (``--trust-pickle``). A ``.pt2`` is read with
``runtimes.safe_load.load_program``, which refuses an archive holding anything beyond what
``torch.export.save`` writes for one program of plain tensors, unless ``trust_pickle``.

Mode: a model ``deploy`` builds itself (zoo, timm, torchvision, or a factory whose weights come
from ``--checkpoint``) is put in eval mode. A model that arrives with its weights (a factory
without ``--checkpoint``, a pickled model) must already be in eval mode, unless ``allow_train_mode``
(``--eval``): a model left in train mode is the classic cause of conversions that do not match.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from runtimes import safe_load
from runtimes.core import DeployError, UntrustedFile, count_parameters, first_line, set_training

from . import zoo
from .record import sha256

__all__ = ["SourceError", "LoadedModel", "load_model", "load_checkpoint", "read_state_dict", "parse_source",
           "close_matches", "DEFAULT_MODEL", "sha256"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "repvgg_digits"
BUILT_IN = ("zoo", "timm", "torchvision")  # sources that name no file
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "ema")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_SHOW = 5  # keys listed per kind in a mismatch message


class SourceError(ValueError):
    """A model source or checkpoint cannot be used; the message names the problem and the fix."""


@dataclass
class LoadedModel:
    """A model ready for conversion, and where it came from."""

    model: nn.Module
    spec: str
    kind: str  # zoo, timm, torchvision, file, pickle, pt2
    name: str  # short name, used for the default output directory
    input_shape: tuple[int, ...] | None = None
    weights: str = ""  # what the weights are, in words
    trained: bool = False  # False: random weights
    samples: str | None = None  # held-out samples shipped with the source (.npz with input0, labels)
    calibration: str | None = None  # training-split samples shipped for INT8 calibration (.npz with input0)
    preprocess: dict | None = None  # how images become inputs: {"mean": [...], "std": [...]} on [0, 1] pixels
    checkpoint: dict | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        params, buffers = count_parameters(self.model)
        return {"spec": self.spec, "kind": self.kind, "name": self.name, "class": type(self.model).__name__,
                "input_shape": list(self.input_shape) if self.input_shape else None, "weights": self.weights,
                "trained": self.trained, "samples": self.samples, "calibration": self.calibration,
                "preprocess": self.preprocess, "checkpoint": self.checkpoint,
                "params": params, "buffers": buffers, "notes": list(self.notes)}


# ------------------------------------------------------------------------------------------- parsing

def parse_source(spec: str) -> tuple[str, str, str | None]:
    """``(kind, target, factory)`` of a MODEL argument, without loading anything."""
    for prefix in ("timm", "torchvision"):
        if spec.startswith(prefix + ":"):
            name = spec[len(prefix) + 1:]
            if not name:
                raise SourceError(f"{spec!r} names no model; write {prefix}:NAME, e.g. {prefix}:resnet18")
            return prefix, name, None
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py"):
        if not factory.isidentifier():
            raise SourceError(f"{spec!r}: {factory!r} is not a function name; write path/to/file.py:FACTORY")
        return "file", path, factory
    if spec.endswith(".py"):
        raise SourceError(f"{spec!r} names a Python file but no factory; write {spec}:FACTORY (a function "
                          "returning the model)")
    if spec in zoo.names():
        return "zoo", spec, None
    if spec.endswith(".pt2"):
        return "pt2", spec, None
    if os.path.exists(spec) or spec.endswith(PICKLE_SUFFIXES):
        return "pickle", spec, None
    guess = close_matches(spec, zoo.names(), n=1, cutoff=0.75)
    raise SourceError(f"unknown model {spec!r}" + (f" (did you mean {guess[0]}?)" if guess else "")
                      + f": not a zoo model ({', '.join(zoo.names())}), not timm:NAME, torchvision:NAME or "
                      "path/to/file.py:FACTORY, and no such checkpoint file")


def close_matches(name: str, candidates: Sequence[str], n: int = 8, cutoff: float = 0.6) -> list[str]:
    """Names of ``candidates`` close to ``name``: those it is a prefix of (shortest first: ``resnet1`` ->
    resnet18 before resnet101), then the closest by ``difflib``."""
    prefixed = sorted((c for c in candidates if c.startswith(name) and c != name), key=lambda c: (len(c), c))
    similar = difflib.get_close_matches(name, candidates, n=n, cutoff=cutoff)
    return list(dict.fromkeys(prefixed[:n] + similar))[:n]


def _require_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{what} {path} does not exist" + ("" if not p.exists() else " (it is a directory)")
                          + "; check the path")
    return p


# ------------------------------------------------------------------------------------------ checkpoints

def _torch_load(path: Path, *, trust_pickle: bool, what: str, whole_model: bool = False):
    """:func:`runtimes.safe_load.load_checkpoint`, its refusals as :class:`SourceError` with the same text."""
    try:
        return safe_load.load_checkpoint(path, trust_pickle=trust_pickle, what=what, whole_model=whole_model)
    except DeployError as e:
        raise SourceError(str(e)) from e


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    stripped = []
    for prefix in STRIPPED_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            stripped.append(prefix)
    return state, stripped


def read_state_dict(path: str | os.PathLike, key: str | None = None, *,
                    trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict in checkpoint ``path`` (top level, or under ``key`` / one of NESTED_KEYS) and how it was found.
    A checkpoint holding Python objects beyond :func:`runtimes.safe_load.safe_globals` (a whole module, say) is
    refused unless ``trust_pickle``."""
    p = _require_file(os.fspath(path), "checkpoint")
    raw = _torch_load(p, trust_pickle=trust_pickle, what="checkpoint")
    info = {"path": os.fspath(path), "sha256": sha256(p), "key": None, "stripped": []}
    candidates = [key] if key else [None, *NESTED_KEYS]
    for k in candidates:
        if k is None:
            obj = raw
        elif isinstance(raw, Mapping) and k in raw:
            obj = raw[k]
        else:
            continue
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if _is_state_dict(obj):
            state, info["stripped"] = _strip(dict(obj))
            info["key"] = k
            return state, info
    keys = ", ".join(map(str, list(raw)[:10])) if isinstance(raw, Mapping) else type(raw).__name__
    where = f"under key {key!r}" if key else f"at the top level or under {', '.join(map(repr, NESTED_KEYS))}"
    raise SourceError(f"checkpoint {path} holds no state dict {where} (found: {keys}); pass --checkpoint-key KEY "
                      "naming the entry that holds the weights")


def _mismatch(model_state: dict, state: dict) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in model_state if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_state]
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(model_state[k].shape)})"
              for k in model_state if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)]
    return missing, unexpected, shapes


def _listing(keys: Sequence[str]) -> str:
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_checkpoint(model: nn.Module, path: str | os.PathLike, key: str | None = None, *,
                    trust_pickle: bool = False) -> dict:
    """Load the state dict of checkpoint ``path`` into ``model`` strictly; return how it was found.

    A common leading component on every checkpoint key (``model.`` of a Lightning module, say) is
    stripped only when that makes every key and shape match exactly. ``trust_pickle``: see
    :func:`read_state_dict`.
    """
    state, info = read_state_dict(path, key, trust_pickle=trust_pickle)
    model_state = model.state_dict()
    missing, unexpected, shapes = _mismatch(model_state, state)
    if missing or unexpected or shapes:
        first = {k.split(".", 1)[0] for k in state}
        if len(first) == 1 and all("." in k for k in state):
            prefix = first.pop() + "."
            trimmed = {k[len(prefix):]: v for k, v in state.items()}
            if not any(_mismatch(model_state, trimmed)):
                state, missing, unexpected, shapes = trimmed, [], [], []
                info["stripped"].append(prefix)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes)}")
        raise SourceError(f"checkpoint {path} does not match {type(model).__name__} ({'; '.join(parts)}); it was "
                          "saved from another architecture or configuration: check MODEL, --num-classes and "
                          "--checkpoint-key (loading it partially would give wrong numbers)")
    model.load_state_dict(state, strict=True)
    info["tensors"] = len(state)
    log.info("loaded %d tensors from %s%s", len(state), path, f" (key {info['key']!r})" if info["key"] else "")
    return info


# ------------------------------------------------------------------------------------------- sources

def _zoo(name: str, num_classes: int | None, width: float | None, checkpoint: str | None) -> LoadedModel:
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("width", width)) if v is not None}
    pretrained = zoo.has_weights(name) and checkpoint is None and not kwargs
    model = zoo.create(name, pretrained=pretrained, **kwargs)
    loaded = LoadedModel(model, name, "zoo", name, zoo.input_shape(name))
    if pretrained:
        loaded.weights, loaded.trained = "trained weights shipped with deploy", True
        loaded.samples, loaded.calibration = zoo.samples(name), zoo.calibration(name)
        if name == "repvgg_digits":
            from .zoo.digits import training_record

            rec = training_record()
            loaded.preprocess = {"mean": [0.0], "std": [1.0]}  # grey levels scaled to [0, 1]
            loaded.notes.append(f"shipped weights: {rec['epochs']} epochs, seed {rec['seed']}, held-out accuracy "
                                f"{100 * rec['test_accuracy']:.2f}% on {rec['test_samples']} digits when trained "
                                "(retrain with python -m deploy.zoo.train_digits)")
    return loaded


def _timm(name: str, num_classes: int | None) -> LoadedModel:
    timm = _import("timm", "timm:NAME models", "models")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if not timm.is_model(name):
        close = close_matches(name.split(".")[0], timm.list_models())
        raise SourceError(f"timm has no model {name!r}" + (f" (close: {', '.join(close)})" if close else "")
                          + "; see timm.list_models()")
    model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or (3, 224, 224)
    preprocess = {"mean": list(cfg["mean"]), "std": list(cfg["std"])} if cfg.get("mean") and cfg.get("std") else None
    return LoadedModel(model, f"timm:{name}", "timm", name.replace("/", "_"), (1, *size), preprocess=preprocess)


def build_torchvision(tv, name: str, **kwargs) -> nn.Module:
    """``torchvision.models`` model ``name`` with random weights, its backbone's too: the segmentation and
    detection builders take ImageNet weights for their backbone by default (``weights_backbone``), which they
    would download. A ``ValueError`` for a name torchvision does not have."""
    builder = tv.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    return builder(weights=None, **kwargs)


def _torchvision(name: str, num_classes: int | None) -> LoadedModel:
    tv = _import("torchvision", "torchvision:NAME models", "models")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        model = build_torchvision(tv, name, **kwargs)
    except ValueError as e:
        close = close_matches(name, tv.models.list_models())
        raise SourceError(f"torchvision has no model {name!r}" + (f" (close: {', '.join(close)})" if close else "")
                          + "; see torchvision.models.list_models()") from e
    shape, preprocess = _torchvision_input(tv, name)
    return LoadedModel(model, f"torchvision:{name}", "torchvision", name, shape, preprocess=preprocess)


def _torchvision_input(tv, name: str) -> tuple[tuple[int, ...], dict]:
    """The input shape and normalization of torchvision's default weights for ``name``, from their record (nothing
    is downloaded): the crop size of their transforms (299 for Inception-v3, 600 for EfficientNet-B7) and, for a
    video model, a clip of 16 frames, or the weights' minimum where that is more (batch, channels, frames, height,
    width); a 224x224 image with ImageNet's normalization where the record has none."""
    crop, mean, std, frames = 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None
    try:
        weights = tv.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        weights = None
    if weights is not None:
        transform = weights.transforms  # a functools.partial of a preset class: its defaults, then its keywords
        given = {k: p.default for k, p in inspect.signature(getattr(transform, "func", transform)).parameters.items()
                 if p.default is not inspect.Parameter.empty}
        given.update(getattr(transform, "keywords", None) or {})
        crop = given.get("crop_size", crop)
        mean, std = given.get("mean", mean), given.get("std", std)
        if tv.models.get_model_builder(name).__module__.startswith("torchvision.models.video"):
            frames = max(16, int(weights.meta.get("min_temporal_size", 1)))
    h, w = (crop, crop) if isinstance(crop, int) else tuple(crop)
    shape = (1, 3, h, w) if frames is None else (1, 3, frames, h, w)
    return shape, {"mean": list(mean), "std": list(std)}


def _import(module: str, purpose: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SourceError(f"Python package '{module}' (needed for {purpose}) is not installed; install it with "
                          f"pip install 'reparam-deploy[{extra}]'") from e


def _file(path: str, factory: str, num_classes: int | None) -> LoadedModel:
    p = _require_file(path, "model file").resolve()
    mod_name = f"_deploy_user_{p.stem}_{abs(hash(str(p))) % 10**8}"
    spec = importlib.util.spec_from_file_location(mod_name, p)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(p.parent))  # so the file can import its neighbours
    try:
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise SourceError(f"importing {path} failed: {type(e).__name__}: {first_line(e)}; fix the file (it must "
                          "import without arguments)") from e
    finally:
        sys.path.remove(str(p.parent))
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == mod_name]
        raise SourceError(f"{path} defines no function {factory!r} (it defines: {', '.join(found) or 'none'}); "
                          f"write {path}:NAME with the function that returns the model")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        model = fn(**kwargs)
    except TypeError as e:
        if kwargs and "num_classes" in str(e):
            raise SourceError(f"{path}:{factory}() takes no num_classes argument; drop --num-classes") from e
        raise SourceError(f"calling {path}:{factory}() failed: {first_line(e)}; it must take no required "
                          "arguments") from e
    except Exception as e:
        raise SourceError(f"calling {path}:{factory}() failed: {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise SourceError(f"{path}:{factory}() returned a {type(model).__name__}, not a torch.nn.Module; return "
                          "the model")
    shape = getattr(model, "input_shape", None) or getattr(module, "INPUT_SHAPE", None)
    return LoadedModel(model, f"{path}:{factory}", "file", f"{p.stem}_{factory}",
                       tuple(shape) if shape else None, weights="as returned by the factory", trained=True)


def _pickle(path: str, trust_pickle: bool = False) -> LoadedModel:
    """A whole pickled model (or a dict holding one under 'ema' / 'model'): unpickling it runs its code, so it is
    refused unless ``trust_pickle``; a file that holds only weights is pointed to ``--checkpoint``."""
    p = _require_file(path, "model checkpoint")
    raw = _torch_load(p, trust_pickle=trust_pickle, what="model checkpoint", whole_model=True)
    holds_module = isinstance(raw, nn.Module) or (isinstance(raw, Mapping) and any(
        isinstance(v, nn.Module) for v in raw.values()))
    if not holds_module and (_is_state_dict(raw) or (isinstance(raw, Mapping) and any(
            _is_state_dict(raw.get(k)) for k in NESTED_KEYS))):
        raise SourceError(f"{path} holds only weights (a state dict), not a model; pass the architecture as "
                          f"MODEL (a zoo name, timm:NAME, torchvision:NAME or file.py:FACTORY) and --checkpoint "
                          f"{path}")
    model, key = raw, None
    if isinstance(raw, Mapping):
        key = next((k for k in ("ema", "model") if isinstance(raw.get(k), nn.Module)), None)
        if key is None:
            raise SourceError(f"{path} holds a dict without a model under 'ema' or 'model' (keys: "
                              f"{', '.join(map(str, list(raw)[:10]))}); pass the architecture as MODEL and this "
                              "file as --checkpoint")
        model = raw[key]
    if not isinstance(model, nn.Module):
        raise SourceError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module")
    loaded = LoadedModel(model, path, "pickle", p.stem, None, weights=f"pickled model in {path}"
                         + (f" (key {key!r})" if key else ""), trained=True,
                         checkpoint={"path": path, "sha256": sha256(p), "key": key, "stripped": []})
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in model.state_dict().values()):
        model.float()
        loaded.notes.append("the checkpoint stores half-precision weights; converted to float32")
    return loaded


def _pt2(path: str, trust_pickle: bool = False) -> LoadedModel:
    p = _require_file(path, "program")
    try:
        ep = safe_load.load_program(p, trust_pickle=trust_pickle)
    except UntrustedFile as e:
        raise SourceError(str(e)) from e
    except Exception as e:
        raise SourceError(f"{path} is not a torch.export program ({first_line(e)}); save one with "
                          "torch.export.save") from e
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
    shape = tuple(user[0].meta["val"].shape) if len(user) == 1 and "val" in user[0].meta else None
    return LoadedModel(ep.module(), path, "pt2", p.stem.split(".")[0], shape,
                       weights=f"weights in {path}", trained=True)


def _in_train_mode(model: nn.Module) -> list[str]:
    return [name or type(model).__name__ for name, m in model.named_modules() if m.training]


# ------------------------------------------------------------------------------------------- code path

def _top_level_names(folder: Path) -> dict[str, Path]:
    """The modules a folder on ``sys.path`` would provide: ``X.py``, packages ``X/__init__.py`` and extension
    modules ``X*.so``, by name (a folder without ``__init__.py`` is a namespace portion, which never shadows)."""
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and (entry / "__init__.py").is_file() and entry.name.isidentifier():
            found[entry.name] = entry
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyd"):
            name = entry.name.split(".")[0]
            if name.isidentifier():
                found.setdefault(name, entry)
    return found


def _imports(path: Path) -> set[str]:
    """The top-level modules the Python files at ``path`` (a file, or a package's files) import absolutely."""
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.suffix == ".py" else []
    names: set[str] = set()
    for f in files:
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _under(place: str, folders: Sequence[Path]) -> bool:
    return any(Path(place).resolve().is_relative_to(f) for f in folders)


def _elsewhere(name: str, folders: Sequence[Path]) -> str | None:
    """Where module ``name`` comes from without ``folders`` (already imported, or installed), or None."""
    module = sys.modules.get(name)
    if module is not None:
        if _from_folders(module, folders) or _namespace(module):  # a namespace package is set aside meanwhile
            return None
        place = getattr(module, "__file__", None) or ", ".join(getattr(module, "__path__", None) or [])
        return f"already imported from {place}" if place else f"the built-in module {name}"
    if name in sys.builtin_module_names:
        return f"the built-in module {name}"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "namespace"):  # a namespace package shadows nothing
        return None
    return None if _under(spec.origin, folders) else spec.origin


def _namespace(module) -> bool:
    """Whether ``module`` is a namespace package: folders without code (onnxruntime.transformers puts one named
    ``models`` on ``sys.path``), which a regular package of the same name found later on the path overrides."""
    return getattr(module, "__file__", None) is None and getattr(module, "__path__", None) is not None


def _from_folders(module, folders: Sequence[Path]) -> bool:
    """Whether ``module`` was imported from ``folders``: its file, or every folder of a namespace package."""
    place = getattr(module, "__file__", None)
    if place:
        return _under(place, folders)
    paths = list(getattr(module, "__path__", None) or [])
    return bool(paths) and all(_under(p, folders) for p in paths)


@contextlib.contextmanager
def _code_path(dirs: Sequence[str], pickles: Sequence[str]):
    """The modules of the ``--code-path`` folders importable while the pickles are loaded, and only then.

    The folders go last on ``sys.path``, so they never shadow an installed or imported module. A module the
    pickles need from them (the top-level modules of the globals they name, and what those import from the
    folders) that also exists elsewhere is refused, naming both places: unpickling would get the other one; an
    imported namespace package of that name is set aside meanwhile (it holds no code, and a regular package
    overrides it). Afterwards ``sys.path`` is restored and the modules imported from the folders are forgotten,
    so a later load with another ``--code-path`` gets its own code."""
    folders = [Path(d).resolve() for d in dirs]
    if not folders:
        yield
        return
    provided: dict[str, Path] = {}
    for folder in reversed(folders):  # the first folder given wins, as on sys.path
        provided.update(_top_level_names(folder))
    needed = {g.split(".")[0] for p in pickles for g in safe_load.pickle_globals(p)} & set(provided)
    todo = list(needed)
    while todo:
        for name in _imports(provided[todo.pop()]) & set(provided) - needed:
            needed.add(name)
            todo.append(name)
    clashes = [(n, where) for n in sorted(needed) if (where := _elsewhere(n, folders))]
    if clashes:
        listed = "; ".join(f"{n} ({provided[n]}) is also {where}" for n, where in clashes)
        raise SourceError(f"--code-path holds modules the pickled model needs that this Python already has: {listed}; "
                          "unpickling would import those, not yours: uninstall or rename them, or run deploy in an "
                          "environment without them")
    added = [os.fspath(f) for f in folders if os.fspath(f) not in sys.path]
    foreign = {n for n in needed if n in sys.modules and _namespace(sys.modules[n])
               and not _from_folders(sys.modules[n], folders)}
    aside = {n: m for n, m in sys.modules.items() if n.split(".")[0] in foreign}
    for name in aside:
        del sys.modules[name]
    before = set(sys.modules)
    sys.path.extend(added)
    try:
        yield
    finally:
        for entry in added:
            sys.path.remove(entry)
        for name in [n for n in sys.modules if n not in before]:
            if _from_folders(sys.modules[name], folders):
                del sys.modules[name]
        sys.modules.update(aside)


# ------------------------------------------------------------------------------------------- loading

def _build(kind: str, target: str, factory: str | None, spec: str, num_classes: int | None, width: float | None,
           checkpoint: str | None, trust_pickle: bool) -> LoadedModel:
    """The model of a parsed source; a built-in one that torch cannot build at these sizes is a :class:`SourceError`."""
    try:
        if kind == "zoo":
            return _zoo(target, num_classes, width, checkpoint)
        if kind == "timm":
            return _timm(target, num_classes)
        if kind == "torchvision":
            return _torchvision(target, num_classes)
    except SourceError:
        raise
    except (OverflowError, MemoryError, RuntimeError, TypeError, ValueError) as e:  # sizes torch cannot take
        raise SourceError(f"building {spec} failed ({type(e).__name__}: {first_line(e)}); check --num-classes and "
                          "--width") from e
    if kind == "file":
        return _file(target, factory, num_classes)
    if kind == "pt2":
        return _pt2(target, trust_pickle)
    return _pickle(target, trust_pickle)


def _check_size(kind: str, target: str, spec: str, num_classes: int | None, width: float | None) -> None:
    """Refuse a built-in model whose weights alone (counted on the meta device: nothing allocated) would not fit
    in this process's memory for a conversion (``--width 1000``, ``--num-classes 1000000000``)."""
    from .resources import LIBRARIES, WEIGHT_COPIES, check_memory, mb

    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = _build(kind, target, None, spec, num_classes, width, "meta", False).model
    except Exception as e:  # noqa: BLE001 - the real build says what is wrong
        log.info("no meta build of %s: %s", spec, first_line(e))
        return
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    options = " ".join(f"{k} {v}" for k, v in (("--width", width), ("--num-classes", num_classes)) if v is not None)
    check_memory(LIBRARIES + WEIGHT_COPIES * weights,
                 f"converting {spec}{' with ' + options if options else ''} ({mb(weights)} of weights)",
                 "pass a smaller --width or --num-classes" if options else "convert a smaller model")


def load_model(spec: str = DEFAULT_MODEL, *, checkpoint: str | None = None, checkpoint_key: str | None = None,
               code_path: Sequence[str] = (), num_classes: int | None = None, width: float | None = None,
               allow_train_mode: bool = False, seed: int = 0, trust_pickle: bool = False) -> LoadedModel:
    """Build or load the model named by ``spec`` (see the module docstring), in eval mode.

    ``trust_pickle``: allow full unpickling of ``--checkpoint`` and of a whole pickled model, and a ``.pt2``
    that would unpickle; both run code from the file (see "Checkpoints" in the module docstring).
    ``code_path``: folders whose modules the pickles need, importable only while they are loaded (see
    :func:`_code_path`); they need ``trust_pickle``, since they only serve unpickling.
    """
    for d in code_path:
        if not os.path.isdir(d):
            raise SourceError(f"--code-path {d} is not a directory; pass the folder that holds the model's code")
    if code_path and not trust_pickle:
        raise SourceError("--code-path only supplies the classes a pickled model is unpickled with, and unpickling "
                          "runs code from the file: add --trust-pickle if you trust its source, or drop --code-path")
    kind, target, factory = parse_source(spec)
    if width is not None and kind != "zoo":
        raise SourceError(f"--width applies to zoo models only, not {spec!r}")
    if num_classes is not None and num_classes < 1:
        raise SourceError(f"--num-classes must be an integer >= 1 (the classifier's outputs), got {num_classes}")
    if width is not None and not (0 < width < float("inf")):
        raise SourceError(f"--width must be a finite number > 0 (e.g. 0.5), got {width}")
    if checkpoint is not None:
        _require_file(checkpoint, "checkpoint")
        if kind in ("pickle", "pt2"):  # refused before anything is loaded (or unpickled)
            raise SourceError(f"{spec} already holds its weights; drop --checkpoint (or pass the architecture as "
                              "MODEL)")
    if num_classes is not None and kind in ("pickle", "pt2"):
        raise SourceError(f"--num-classes does not apply to {spec!r}: the model is loaded whole")
    if kind in BUILT_IN:
        _check_size(kind, target, spec, num_classes, width)
    pickles = ([target] if kind == "pickle" else []) + ([checkpoint] if checkpoint else [])
    # a model built with random weights draws them from torch's global generator: seeded here (and the caller's
    # generator state restored), so that every load of the same spec and seed is the same network
    with torch.random.fork_rng(devices=[]), _code_path(code_path, pickles):
        torch.manual_seed(seed)
        loaded = _build(kind, target, factory, spec, num_classes, width, checkpoint, trust_pickle)
        if checkpoint is not None:
            loaded.checkpoint = load_checkpoint(loaded.model, checkpoint, checkpoint_key, trust_pickle=trust_pickle)
            loaded.weights, loaded.trained = f"checkpoint {checkpoint}", True
    model = loaded.model
    if checkpoint is None and kind in BUILT_IN and not loaded.trained:
        zoo.randomize_batchnorm(model, seed)
        zeros = zoo.randomize_zero_weights(model, seed)
        loaded.weights = (f"random (no network: {kind} weights are not downloaded; pass --checkpoint for trained "
                          f"weights), BatchNorm statistics randomized with seed {seed}"
                          + (f"; {len(zeros)} all-zero parameter(s) drawn anew so that no output is constant "
                             f"({', '.join(zeros[:3])}{' ...' if len(zeros) > 3 else ''})" if zeros else ""))
        loaded.notes.append(f"{spec} has random weights: pass --checkpoint PATH to convert trained weights")
    user_object = kind in ("pickle", "pt2") or (kind == "file" and checkpoint is None)
    training = _in_train_mode(model)
    if training and user_object and kind != "pt2":
        if not allow_train_mode:
            where = "was saved" if kind == "pickle" else f"is returned by {factory}()"
            raise SourceError(f"the model in {spec} {where} in train mode ({len(training)} module(s), e.g. "
                              f"{training[0]}), so BatchNorm and dropout would not compute what it computes at "
                              "inference; call model.eval() before returning/saving it, or pass --eval to convert "
                              "it in eval mode")
        loaded.notes.append("the model was in train mode; switched to eval mode (--eval)")
    set_training(model, False)
    log.info("loaded %s (%s): %s, %s", spec, kind, type(model).__name__, loaded.weights)
    return loaded
