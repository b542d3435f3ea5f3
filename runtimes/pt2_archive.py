"""What a ``.pt2`` (a ``torch.export`` archive) may hold to be loaded without running code from it.

What ``torch.export.load`` (torch 2.14, ``torch/export/pt2_archive/_package.py``) does with the parts of the
zip archive, under its one root folder:

- every entry under ``models/`` is a program, named by cutting ``models/`` and the last five characters off
  the entry's name (``models/evil_json`` is a program ``evil``); each program is loaded with its own parts;
- ``data/weights/weight_N``, ``data/constants/tensor_N``: raw tensor bytes, described by
  ``data/weights/<program>_weights_config.json`` / ``data/constants/<program>_constants_config.json``
  (``use_pickle: false``). A tensor subclass is saved with ``torch.save`` instead (``use_pickle: true``) and
  loaded with ``torch.load(weights_only=False)``: full unpickling;
- ``data/constants/custom_obj_N`` (TorchScript objects, ``torch._C._pickle_load_obj``) and
  ``opaque_obj_N`` (``pickle.loads``): unpickled;
- ``data/weights/<program>.pt`` / ``data/constants/<program>.pt`` (the legacy layout) take the configs'
  place: pickles, loaded with ``weights_only=True`` and, when that refuses, again with ``weights_only=False``;
- ``data/sample_inputs/<program>.pt``: the example inputs, always a ``torch.save`` pickle, loaded with the
  same fallback;
- ``data/aotinductor/``: compiled shared libraries, loaded and run;
- ``extra/<name>``: read as strings (``extra_files``);
- a zip without ``archive_format`` (the pre-2.7 format), and any archive ``load_pt2`` fails on, is read
  again as the pre-2.7 format when its top level holds ``version``: pickles;
- ``models/<program>.json``: the graph, as data, except that symbolic shapes (``expr_str``) are parsed
  with ``sympy.sympify``, which runs them through ``eval``, and tree specs may import a module (a
  ``defaultdict`` factory, an enum).

A list of what runs code misses what it does not name (``models/evil_json`` with a legacy
``data/constants/evil.pt`` did), so :func:`scan` checks an allow-list instead: the archive may hold only
what ``torch.export.save`` writes for one program of plain tensors, which is what ``exporters.pt2`` writes:

- the records ``archive_format`` (``pt2``), ``archive_version``, ``.data/version``, ``byteorder``,
  ``.data/serialization_id``;
- one program, ``models/model.json``, without code in its symbolic shapes or tree specs;
- ``data/weights/model_weights_config.json`` and the ``data/weights/weight_N`` it references, every entry
  ``use_pickle: false``; ``data/constants/model_constants_config.json`` and the ``data/constants/tensor_N``
  it references, likewise;
- ``data/sample_inputs/model.pt`` (never unpickled: see :func:`without_example_inputs`);
- ``extra/<name>`` files.

Anything else (another program, the legacy layout, compiled code, an unknown entry, a config entry whose
file is missing, a file no config references) is named in what :func:`scan` returns. So are what would let
the zip say one thing to this check and another to the loader, or eat memory: an entry outside the root
folder, an entry stored twice, a compressed entry (``torch.export.save`` stores them all), a zip directory
that torch and Python list differently, more than ``MAX_ENTRIES`` entries; and a record read as text here
(a config, the graph, an extra file) larger than ``MAX_TEXT_BYTES`` is refused before it is read.

Loading is :func:`runtimes.safe_load.load_program`: it reads the file once, checks those
bytes and loads those bytes, refused (:class:`UntrustedFile`) when :func:`scan` finds anything, whatever hash
a report records for it; it never loads the example inputs. With ``trust_pickle`` none of this is checked:
the file is loaded as ``torch.export.load`` loads it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from collections import Counter
from functools import lru_cache
from typing import IO

from .core import CorruptArtifact, first_line

__all__ = ["scan", "safe_expression", "without_example_inputs", "MAX_ENTRIES", "MAX_TEXT_BYTES"]

WHAT = "PyTorch program (.pt2)"
PROGRAM = "model"  # the one program name torch.export.save gives a single ExportedProgram
MAX_ENTRIES = 100_000  # a program has a few entries per tensor
MAX_TEXT_BYTES = 256 * 2**20  # a config, the graph or an extra file, read into memory (and parsed) whole
RECORDS = ("archive_format", "archive_version", ".data/version", "byteorder", ".data/serialization_id")
_SHOWN = 12  # findings listed at most

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


def _payload(text: str, config: str, folder: str, prefix: str, names: set[str], found: list[str]) -> set[str]:
    """The files of ``folder`` that the payload config ``text`` names; an entry that is not a raw tensor
    (``use_pickle`` not false, or a file not called ``prefix`` + a number), and one whose file is missing, go in
    ``found``."""
    try:
        entries = json.loads(text)["config"]
        if not isinstance(entries, dict):
            raise ValueError("'config' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config} is not a payload config ({e})") from e
    named = set()
    for fqn, meta in entries.items():
        name = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"{config} has no file name for {fqn}")
        named.add(folder + name)
        if meta.get("use_pickle") is not False or not re.fullmatch(re.escape(prefix) + r"\d+", name):
            found.append(f"a pickled object ({folder}{name}, for {fqn})")
        elif folder + name not in names:
            found.append(f"a config entry whose file is missing ({folder}{name}, for {fqn})")
    return named


def _corrupt(label: str, why: str) -> CorruptArtifact:
    return CorruptArtifact(f"{WHAT} file {label} is corrupt or not a valid {WHAT} model ({why}).")


def _rewound(source: str | IO[bytes]) -> str | IO[bytes]:
    """``source``, at its start when it is a buffer (torch's reader reads a buffer from where it stands)."""
    if not isinstance(source, str):
        source.seek(0)
    return source


def _listing(source: str | IO[bytes], label: str) -> list[zipfile.ZipInfo] | str:
    """The zip's directory; or, when it counts more than ``MAX_ENTRIES`` entries, that finding (the count is
    read from the end record, before the directory is parsed into memory)."""
    try:
        with open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source) as f:
            end = zipfile._EndRecData(f) if hasattr(zipfile, "_EndRecData") else None
        if end and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ENTRIES:
            return f"{end[zipfile._ECD_ENTRIES_TOTAL]} entries (more than {MAX_ENTRIES})"
        with zipfile.ZipFile(_rewound(source)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, AttributeError, IndexError) as e:
        raise _corrupt(label, f"not a zip archive: {e}") from e
    return infos if len(infos) <= MAX_ENTRIES else f"{len(infos)} entries (more than {MAX_ENTRIES})"


def _directory(infos: list[zipfile.ZipInfo], root: str) -> list[str]:
    """What in the zip's directory would let this check and torch's reader see different archives."""
    listed = [i.filename for i in infos]
    twice = [n for n, k in Counter(listed).items() if k > 1]
    if twice:  # which copy a reader takes is up to the reader: what is checked may not be what is loaded
        return [f"entries stored twice ({', '.join(twice[:3])})"]
    outside = [n for n in listed if not n.startswith(root)]
    if outside:  # torch's reader refuses them, and its pre-2.7 fallback reads the top level
        return [f"entries outside the root folder {root} ({', '.join(outside[:3])})"]
    return []


def _text(reader, sizes: dict[str, int], name: str, found: list[str]) -> str | None:
    """Record ``name`` as text; None, noted in ``found`` and not read, when larger than ``MAX_TEXT_BYTES``."""
    if sizes[name] > MAX_TEXT_BYTES:
        found.append(f"an entry too large to read ({name}, {sizes[name]:,} bytes; at most {MAX_TEXT_BYTES:,})")
        return None
    return reader.read_string(name)


def _allowed(reader, sizes: dict[str, int], found: list[str], c) -> set[str]:
    """The entries of the allow-list, from the program ``PROGRAM``'s configs; what they and the graph hold
    beyond it goes in ``found``."""
    program = c.MODELS_FILENAME_FORMAT.format(PROGRAM)
    configs = {c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(PROGRAM): (c.WEIGHTS_DIR, c.WEIGHT_FILENAME_PREFIX),
               c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(PROGRAM): (c.CONSTANTS_DIR,
                                                                    c.TENSOR_CONSTANT_FILENAME_PREFIX)}
    known = set(_required(c))
    for config, (folder, prefix) in configs.items():
        if config in sizes and (text := _text(reader, sizes, config, found)) is not None:
            known |= _payload(text, config, folder, prefix, set(sizes), found)
    if program in sizes and (text := _text(reader, sizes, program, found)) is not None:
        _walk(json.loads(text), found, program)
    for name in sizes:
        if name.startswith(c.EXTRA_DIR) and name != c.EXTRA_DIR:  # read by torch as strings
            known.add(name)
            if sizes[name] > MAX_TEXT_BYTES:
                _text(reader, sizes, name, found)
    return known


def _required(c) -> tuple[str, ...]:
    """The entries ``torch.export.save`` writes for every program ``PROGRAM``."""
    return (*RECORDS, c.MODELS_FILENAME_FORMAT.format(PROGRAM), c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(PROGRAM),
            c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(PROGRAM), c.SAMPLE_INPUTS_FILENAME_FORMAT.format(PROGRAM))


def _unknown(name: str, c) -> str:
    """Why an entry outside the allow-list is refused."""
    if name.startswith(c.AOTINDUCTOR_DIR):
        return f"compiled code ({name})"
    if name.startswith(c.MODELS_DIR):
        return f"another program ({name}), loaded with its own parts"
    if name.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)) and name.endswith(".pt"):
        return f"pickled tensors in the legacy layout ({name})"
    tensor_file = "|".join(re.escape(folder + prefix) for folder, prefix in (
        (c.WEIGHTS_DIR, c.WEIGHT_FILENAME_PREFIX), (c.CONSTANTS_DIR, c.TENSOR_CONSTANT_FILENAME_PREFIX)))
    if re.fullmatch(rf"({tensor_file})\d+", name):
        return f"a tensor file no config names ({name})"
    return f"an entry torch.export.save does not write for one program of tensors ({name})"


def scan(path: str | os.PathLike, *, data: IO[bytes] | None = None) -> list[str]:
    """What the archive at ``path`` holds beyond the allow-list of this module (empty: nothing), each named;
    :class:`CorruptArtifact` when it is not a ``.pt2`` archive at all. ``data``: the file's bytes, already
    read (then checked instead of the file; ``path`` only names it in messages)."""
    from torch.export.pt2_archive import constants as c
    from torch.export.pt2_archive._package import PT2ArchiveReader

    label = os.fspath(path)
    source = data if data is not None else label
    infos = _listing(source, label)
    if isinstance(infos, str):
        return [infos]
    listed = [i.filename for i in infos]
    root = listed[0].split("/", 1)[0] + "/" if listed else ""  # as torch's reader takes it
    if root + c.ARCHIVE_FORMAT_PATH not in listed:
        if any(n.rsplit("/", 1)[-1] in ("version", "serialized_exported_program.json") for n in listed):
            return ["the pre-2.7 archive format, whose parts are unpickled"]
        raise _corrupt(label, f"no archive_format '{c.ARCHIVE_FORMAT_VALUE}' record")
    found = _directory(infos, root)
    if found:
        return found
    sizes = {i.filename[len(root):]: i.file_size for i in infos}
    found = [f"a compressed entry ({i.filename[len(root):]}), which torch.export.save does not write"
             for i in infos if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size]
    try:
        reader = PT2ArchiveReader(_rewound(source))
        names = reader.get_file_names()
    except Exception as e:
        why = f"archive_format is not '{c.ARCHIVE_FORMAT_VALUE}'" if isinstance(e, AssertionError) else first_line(e)
        raise _corrupt(label, why) from e
    if sorted(names) != sorted(sizes):
        return ["a zip directory that torch and Python read differently"]
    try:
        known = _allowed(reader, sizes, found, c)
    except (ValueError, UnicodeDecodeError, RuntimeError) as e:
        raise _corrupt(label, first_line(e)) from e
    found += [_unknown(n or root, c) for n in sizes if n not in known]
    missing = [n for n in _required(c) if n not in sizes]
    if missing and not found:
        raise _corrupt(label, f"no {', '.join(missing)}")
    return found if len(found) <= _SHOWN else found[:_SHOWN - 1] + [f"{len(found) - _SHOWN + 1} more"]


def without_example_inputs(source: str | IO[bytes]) -> io.BytesIO | None:
    """The archive with empty example inputs (which ``torch.export.load`` then does not unpickle), in memory;
    None when they are empty already."""
    from torch.export.pt2_archive import constants as c
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    reader = PT2ArchiveReader(_rewound(source))
    names = reader.get_file_names()
    samples = [n for n in names if n.startswith(c.SAMPLE_INPUTS_DIR)]
    if not any(reader.archive_file.get_record_size(n) for n in samples):
        return None
    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        for n in names:
            if n not in RECORDS:  # the writer writes these itself
                writer.write_bytes(n, b"" if n in samples else reader.read_bytes(n))
    buffer.seek(0)
    return buffer
