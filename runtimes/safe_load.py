"""Loading torch files that may come from anyone: the one module of the project that calls ``torch.load`` and
``torch.export.load`` (a test reads the sources of ``deploy``, ``fusers``, ``exporters`` and ``runtimes`` to
keep it so).

Both loaders can run code named in the file. Here they are only called where that cannot happen, or where
the caller said it trusts the file's source (``trust_pickle``, the ``--trust-pickle`` flag):

- :func:`load_program`: a ``.pt2``. Unless ``trust_pickle``, the file is read once, its bytes are checked
  against the allow-list of :mod:`runtimes.pt2_archive` (what ``torch.export.save`` writes for one program of
  plain tensors), and those same bytes are loaded, with the example inputs (a pickle) blanked first. An
  archive with anything else is refused (:class:`UntrustedFile`) naming what it holds.
- :func:`load_checkpoint`: a checkpoint (``torch.save``). torch's ``weights_only`` unpickler with the
  allow-list of :func:`safe_globals`, the harmless globals real checkpoints hold; a file holding any other
  global (a whole pickled module, a YOLOv7 checkpoint, a crafted object) is refused (:class:`UntrustedFile`)
  naming the global, unless ``trust_pickle``, which unpickles it fully.
- :func:`load_shipped`: a checkpoint shipped in this package (the zoo's trained weights): the ``weights_only``
  unpickler, no extra globals.

Errors are :mod:`runtimes.core`'s: :class:`UntrustedFile`, :class:`CorruptArtifact` for a file the loader
cannot read, :class:`DeployError` for a trusted pickle whose classes cannot be imported. ``deploy.sources``
turns them into its ``SourceError`` with the same text.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from pathlib import Path

from . import pt2_archive
from .core import CorruptArtifact, DeployError, UntrustedFile, first_line, untrusted_message

__all__ = ["load_program", "load_checkpoint", "load_shipped", "safe_globals", "pickle_globals"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- programs

def load_program(path: str | os.PathLike, *, trust_pickle: bool = False, extra_files: dict | None = None):
    """``torch.export.load(path)``, refused (:class:`UntrustedFile`) when the archive holds anything beyond the
    allow-list of :mod:`runtimes.pt2_archive` (see :func:`runtimes.pt2_archive.scan`), whatever hash a report
    records for it; the example inputs are not loaded. With ``trust_pickle`` nothing is checked: the file is
    loaded as ``torch.export.load`` loads it, example inputs included. ``extra_files`` is filled as
    ``torch.export.load`` fills it."""
    import torch

    path = os.fspath(path)
    extra = extra_files if extra_files is not None else {}
    if trust_pickle:
        return torch.export.load(path, extra_files=extra)
    try:
        with open(path, "rb") as f:  # read once: what is checked is what is loaded
            data = io.BytesIO(f.read())
    except OSError as e:
        raise CorruptArtifact(f"{pt2_archive.WHAT} file {path} cannot be read ({first_line(e)}).") from e
    found = pt2_archive.scan(path, data=data)
    if found:
        raise UntrustedFile(untrusted_message(f"{pt2_archive.WHAT} {path}", "; ".join(found)))
    program = pt2_archive.without_example_inputs(data) or data
    program.seek(0)
    return torch.export.load(program, extra_files=extra)


# ---------------------------------------------------------------------------------------- checkpoints

def safe_globals() -> list:
    """The harmless globals real checkpoints hold besides tensors, allowed to torch's ``weights_only`` loader:
    ``argparse.Namespace`` (the training options of YOLO and timm scripts), numpy scalars and dtypes (best
    fitness, metrics), ``collections.OrderedDict`` and plain paths. Each only builds a value; none runs code."""
    import argparse
    import collections
    import pathlib

    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [argparse.Namespace, collections.OrderedDict, pathlib.PurePosixPath, pathlib.PosixPath,
               pathlib.PureWindowsPath, np.dtype, multiarray.scalar,
               (multiarray.scalar, "numpy.core.multiarray.scalar")]  # the name numpy 1 pickles it under
    allowed += sorted({type(np.dtype(c)) for c in "?bhilqpBHILQPefdgFDG"} - {np.dtype}, key=str)  # numpy 2
    return allowed


def _blocking_global(e: Exception, path: Path) -> str:
    """The global that stopped the ``weights_only`` loader, from its message (or a scan of the file)."""
    import torch

    match = re.search(r"GLOBAL ([\w.]+)", str(e))
    if match:
        return match.group(1)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        found = []
    return ", ".join(found[:3]) or "an object the safe loader refuses"


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False, what: str = "checkpoint",
                    whole_model: bool = False):
    """``torch.load(path)`` on CPU with ``weights_only=True`` and the allow-list of :func:`safe_globals`; full
    unpickling (which runs code from the file) only when ``trust_pickle``. Refused without it
    (:class:`UntrustedFile`), naming the global that stopped the safe loader (and, with ``whole_model``, that a
    whole pickled model is such a file). ``what`` names the file in messages."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a class the safe loader refused: the file itself is bad
            raise CorruptArtifact(f"{what} {path} is not a torch checkpoint torch.load can read "
                                  f"({first_line(e)}); check that the file is complete") from e
        if not trust_pickle:
            found = f"Python objects ({_blocking_global(e, path)})"
            if whole_model:
                found += ", as a whole pickled model does (a YOLOv7 checkpoint, say)"
            raise UntrustedFile(untrusted_message(f"{what} {path}", found)) from e
        log.warning("%s %s holds Python objects besides tensors; unpickling it fully (--trust-pickle): this runs "
                    "code from the file", what, path)
        first = e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptArtifact(f"{what} {path} is not a torch checkpoint torch.load can read "
                              f"({first_line(e)}); check that the file is complete") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
        raise DeployError(f"cannot unpickle {what} {path}: {first_line(e)}; the classes it was saved with must "
                          "be importable: pass --code-path DIR, the repository that defines them") from e
    except Exception as e:
        raise CorruptArtifact(f"{what} {path} cannot be read by torch.load ({first_line(e)}); check that the "
                              "file is complete") from first


def pickle_globals(path: str | os.PathLike) -> list[str]:
    """The globals (``module.name``) the pickle in checkpoint ``path`` names beyond torch's own, read from its
    opcodes without unpickling anything; empty when the file cannot be read that way."""
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))
    except Exception as e:  # noqa: BLE001 - not a torch zip checkpoint: nothing named
        log.info("no globals read from %s: %s", path, first_line(e))
        return []


def load_shipped(path: str | os.PathLike):
    """A checkpoint shipped in this package (the zoo's trained weights), on CPU: torch's ``weights_only``
    unpickler, which builds tensors and plain containers only."""
    import torch

    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
