"""Reading a ``.pt2`` (a ``torch.export`` archive) without running code from it.

What ``torch.export.save`` writes (torch 2.14) is a zip archive whose parts ``torch.export.load``
reads as follows:

- ``data/weights/weight_N``, ``data/constants/tensor_N``: raw tensor bytes, described by
  ``data/weights/model_weights_config.json`` / ``data/constants/model_constants_config.json``
  (``use_pickle: false``). A tensor subclass is saved with ``torch.save`` instead
  (``use_pickle: true``) and loaded with ``torch.load(weights_only=False)``: full unpickling;
- ``data/constants/custom_obj_N`` (TorchScript objects, ``torch._C._pickle_load_obj``) and
  ``opaque_obj_N`` (``pickle.loads``): unpickled;
- ``data/sample_inputs/model.pt``: the example inputs, always a ``torch.save`` pickle; loaded with
  ``weights_only=True`` and, when that refuses, again with ``weights_only=False``;
- ``data/weights/model.pt`` / ``data/constants/model.pt`` (the legacy layout), and a zip without
  ``archive_format`` (the pre-2.7 format): pickles, loaded with the same fallback;
- ``data/aotinductor/``: compiled shared libraries, loaded and run;
- ``models/model.json``: the graph, as data, except that symbolic shapes (``expr_str``) are parsed
  with ``sympy.sympify``, which runs them through ``eval``, and tree specs may import a module (a
  ``defaultdict`` factory, an enum).

:func:`scan` lists the parts of an archive that would run code; :func:`load_program` refuses an
archive with any of them unless ``trust_pickle``, whatever hash a report records for it, and never
loads the example inputs (it drops them: nothing here uses them). ``exporters.pt2`` writes the
run's own ``.pt2`` without example inputs and checks it with :func:`scan`, so loading it unpickles
nothing.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections import Counter
from functools import lru_cache

from .core import CorruptArtifact, UntrustedFile, untrusted_message

__all__ = ["scan", "load_program", "safe_expression"]

WHAT = "PyTorch program (.pt2)"

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<str>'[A-Za-z_]\w*'|\"[A-Za-z_]\w*\")|(?P<op>\*\*|//|[<>=!]=|[-+*/%(),<>!~&|^=]))")
_IMPORTING_KEYS = ("__enum__", "default_factory_module")  # tree-spec contexts that import a module


@lru_cache(maxsize=1)
def _functions() -> frozenset[str]:
    """Names a symbolic shape may call: sympy classes and torch's sympy functions (pure arithmetic)."""
    import sympy
    import torch.utils._sympy.functions as torch_sympy

    names = set()
    for space in (vars(sympy), vars(torch_sympy)):
        names |= {n for n, v in space.items() if isinstance(v, type) and issubclass(v, sympy.Basic)}
    return frozenset(names)


def safe_expression(text: str) -> bool:
    """Whether ``sympy.sympify(text)`` only does arithmetic: numbers, names, names in quotes, operators, keyword
    arguments and calls of sympy classes, as in ``Symbol('s77', positive=True) + FloorDiv(s0, 2)``; no other
    calls, attributes, subscripts or strings, which ``eval`` would run or build code from."""
    pos, prev = 0, None
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return not text[pos:].strip()
        pos = m.end()
        kind, tok = m.lastgroup, m.group(m.lastgroup)
        if kind in ("name", "str") and "__" in tok:
            return False
        if tok == "(" and prev is not None and not (prev[0] == "op" and prev[1] != ")") and \
                not (prev[0] == "name" and prev[1] in _functions()):
            return False
        prev = (kind, tok)
    return True


def _walk(node, found: list[str], where: str) -> None:
    """Collect what in a parsed ``model.json`` would run code: unsafe ``expr_str`` and importing tree specs."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _IMPORTING_KEYS:
                found.append(f"a tree spec that imports a module ({k} in {where})")
            elif k == "expr_str" and isinstance(v, str) and not safe_expression(v):
                found.append(f"a symbolic shape that is Python code ({v[:60]!r} in {where})")
            else:
                _walk(v, found, where)
    elif isinstance(node, list):
        for v in node:
            _walk(v, found, where)
    elif isinstance(node, str) and node[:1] in "[{":
        try:
            inner = json.loads(node)
        except ValueError:
            return
        _walk(inner, found, where)


def _payload(reader, config: str, folder: str, tensor_prefix: str, found: list[str]) -> None:
    try:
        entries = json.loads(reader.read_string(config)).get("config", {})
    except Exception as e:
        raise ValueError(f"{config} is not readable JSON ({e})") from e
    for fqn, meta in entries.items():
        name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or not name.startswith(tensor_prefix):
            found.append(f"a pickled object ({folder}{name}, for {fqn})")


def scan(path: str | os.PathLike) -> list[str]:
    """What in the archive at ``path`` would run code when ``torch.export.load`` reads it (empty: nothing);
    :class:`CorruptArtifact` when it is not a ``.pt2`` archive at all. The example inputs are not counted:
    :func:`load_program` drops them."""
    from torch.export.pt2_archive import constants as c
    from torch.export.pt2_archive._package import PT2ArchiveReader

    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as z:
            listed = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptArtifact(f"{WHAT} file {path} is corrupt or not a valid {WHAT} model (not a zip archive: "
                              f"{e}).") from e
    twice = [n for n, k in Counter(listed).items() if k > 1]
    if twice:  # which copy a reader takes is up to the reader: what is checked may not be what is loaded
        return [f"entries stored twice ({', '.join(twice[:3])})"]
    try:
        reader = PT2ArchiveReader(path)
    except Exception:
        if any(n.rsplit("/", 1)[-1] in ("version", "serialized_exported_program.json") for n in listed):
            return ["the pre-2.7 archive format, whose parts are unpickled"]
        raise CorruptArtifact(f"{WHAT} file {path} is corrupt or not a valid {WHAT} model (no archive_format "
                              f"'{c.ARCHIVE_FORMAT_VALUE}' record).") from None
    names = reader.get_file_names()
    found = [f"compiled code ({n})" for n in names if n.startswith(c.AOTINDUCTOR_DIR)][:1]
    prefix, suffix = c.MODELS_FILENAME_FORMAT.split("{}")
    models = [n[len(prefix):-len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)]
    try:
        for model in models:
            for legacy in (f"{c.WEIGHTS_DIR}{model}.pt", f"{c.CONSTANTS_DIR}{model}.pt"):
                if legacy in names:
                    found.append(f"pickled tensors in the legacy layout ({legacy})")
            weights = c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model)
            if weights in names:
                _payload(reader, weights, c.WEIGHTS_DIR, c.WEIGHT_FILENAME_PREFIX, found)
            constants = c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model)
            if constants in names:
                _payload(reader, constants, c.CONSTANTS_DIR, c.TENSOR_CONSTANT_FILENAME_PREFIX, found)
            graph = c.MODELS_FILENAME_FORMAT.format(model)
            _walk(json.loads(reader.read_string(graph)), found, graph)
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CorruptArtifact(f"{WHAT} file {path} is corrupt or not a valid {WHAT} model ({e}).") from e
    return found


def _without_example_inputs(path: str) -> io.BytesIO | None:
    """The archive with empty example inputs (which ``torch.export.load`` then does not unpickle), in memory;
    None when they are empty already."""
    from torch.export.pt2_archive import constants as c
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    reader = PT2ArchiveReader(path)
    names = reader.get_file_names()
    samples = [n for n in names if n.startswith(c.SAMPLE_INPUTS_DIR)]
    if not any(reader.archive_file.get_record_size(n) for n in samples):
        return None
    written_by_writer = {c.ARCHIVE_FORMAT_PATH, c.ARCHIVE_VERSION_PATH, ".data/version", "byteorder",
                         ".data/serialization_id"}
    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        for n in names:
            if n not in written_by_writer:
                writer.write_bytes(n, b"" if n in samples else reader.read_bytes(n))
    buffer.seek(0)
    return buffer


def load_program(path: str | os.PathLike, *, trust_pickle: bool = False, extra_files: dict | None = None):
    """``torch.export.load(path)``, refused (:class:`UntrustedFile`) when the archive holds anything that would
    run code (see :func:`scan`) unless ``trust_pickle``; the example inputs are not loaded unless
    ``trust_pickle``. ``extra_files`` is filled as ``torch.export.load`` fills it."""
    import torch

    path = os.fspath(path)
    extra = extra_files if extra_files is not None else {}
    if trust_pickle:
        return torch.export.load(path, extra_files=extra)
    found = scan(path)
    if found:
        raise UntrustedFile(untrusted_message(f"{WHAT} {path}", "; ".join(found)))
    return torch.export.load(_without_example_inputs(path) or path, extra_files=extra)
