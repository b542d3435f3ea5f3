"""Resource bounds checked before work: memory, threads, disk space and the output path.

Memory. :func:`estimate` predicts what a conversion of ``model`` at an input shape needs, from the
model's parameters and the peak of live activations of one forward pass, run on fake tensors (no
memory is allocated; :func:`peak_activations`). Measured on the 2-core machine (peak resident
memory beyond the ~1.2 GB the libraries take, through every default target): ResNet-50 +1.0 GB
for 102 MB of weights, ViT-B/16 +3.3 GB for 346 MB, YOLOv7-tiny at 640 +0.7 GB for 26 MB of weights
and 56 MB of activations. Hence the estimate

    libraries (1 GiB) + 12 x weight bytes + 10 x peak activation bytes + 3 x input bytes

(the float64 proof holds a double copy of weights and activations, every exporter and runtime a
few more). :func:`check_memory` refuses work whose estimate exceeds :func:`available_memory`: the
least of the kernel's ``MemAvailable``, the cgroup's limit less its usage and the address-space
limit (``ulimit -v``) less what the process maps already. A model whose forward cannot run on fake
tensors (data-dependent shapes) is estimated from its weights and input alone, and the estimate says so.

Threads: at most the CPUs this process may use (:func:`check_threads`).

Disk: :func:`check_disk` refuses a run whose files (about the weights' size per artifact) do not
fit in the free space of the output's device or under the file-size limit (``ulimit -f``).
:func:`disk_failure` recognizes a write that failed for lack of space or over that limit, however
deep a library wrapped it, so the command line can say so in one sentence instead of blaming the
model (the ``SIGXFSZ`` that ``ulimit -f`` sends is ignored by the command line, so such a write
fails with ``EFBIG`` instead of killing the process).

Files: :func:`read_npz` reads every array header of an ``.npz`` before its data, refusing object
arrays and arrays larger than the memory left. Output paths: :func:`check_output_path` refuses,
before any work, a path that is not valid UTF-8 (it could not be written into a report or printed)
or that is a symbolic link to nothing.
"""

from __future__ import annotations

import copy
import errno
import logging
import math
import os
import resource
import shutil
import weakref
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes.core import DeployError, first_line
from runtimes.hardware import usable_cpus

__all__ = ["ResourceError", "NoSpace", "Estimate", "available_memory", "peak_activations", "estimate",
           "check_memory", "check_threads", "check_disk", "disk_failure", "check_output_path", "mb",
           "LIBRARIES", "read_npz", "no_space_message"]

log = logging.getLogger(__name__)

LIBRARIES = 1 << 30  # what the exporters and runtimes load besides the model (measured ~1.2 GB in all)
WEIGHT_COPIES, ACTIVATION_COPIES, INPUT_COPIES = 12, 10, 3
RUNTIME_COPIES = 3  # running artifacts only (deploy bench): the runtime's weights, its arena, the outputs
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_WORDS = ("no space left on device", "file too large", "disk quota exceeded")


class ResourceError(DeployError):
    """Work refused because it would exceed this machine's memory, CPUs or disk; the message says how much."""


class NoSpace(DeployError):
    """A write failed for lack of disk space or over the file-size limit; the message says where and how much."""


def mb(n: float) -> str:
    """``n`` bytes in words: ``12.3 MB``, ``4.56 GB``, ``7.8e+03 TB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size or unit == "MB":
            value = n / size
            return f"{value:.3g} {unit}" if value < 1e4 else f"{value:.2g} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------- memory

def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _mapped() -> int | None:
    """The virtual memory this process maps now (``VmSize``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> tuple[int, str] | None:
    """``(bytes, what bounds them)``: the memory this process can still take, the least of the machine's available
    memory, its cgroup's limit less usage, and the address-space limit less what it maps; None when unknown."""
    found: list[tuple[int, str]] = []
    avail = _meminfo("MemAvailable")
    if avail is not None:
        found.append((avail, "available memory"))
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:
            found.append((max(cap - used, 0), "the memory left under this container's limit"))
            break
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    mapped = _mapped()
    if soft != resource.RLIM_INFINITY and mapped is not None:
        found.append((max(soft - mapped, 0), "the address space left under the limit (ulimit -v)"))
    return min(found) if found else None


class _LiveBytes:
    """A dispatch mode that adds up the bytes of the tensors each op makes and that are still alive."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return counter.saw(func(*args, **(kwargs or {})), (args, kwargs))

        self.mode, self.live, self.peak = Mode(), 0, 0

    def _free(self, n: int) -> None:
        self.live -= n

    def saw(self, out, inputs):
        import torch
        from torch.utils._pytree import tree_leaves

        given = {id(t) for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in given and not t._is_view():
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def peak_activations(model, shapes: Iterable[tuple[int, ...]]) -> int | None:
    """The peak bytes of tensors alive during one eval forward of ``model`` on float32 inputs of ``shapes``, run
    on fake tensors (nothing is allocated) and on a copy of the module that shares its weights (``model`` is left
    as it was); None when the forward cannot run on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from runtimes.core import eval_mode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    counter = _LiveBytes()
    try:
        # a forward may cache tensors on its module (a YOLO head's grid): it runs on a copy whose weights are shared
        # with the model, so no fake tensor is left behind in the model itself
        clone = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})
        with fake:
            args = [torch.empty(s) for s in shapes]
        with torch.no_grad(), eval_mode(clone), fake, counter.mode:
            clone(*args)
    except Exception as e:  # noqa: BLE001 - data-dependent shapes, ops without a fake kernel: no estimate
        log.info("no activation estimate for %s on fake tensors: %s", type(model).__name__, first_line(e))
        return None
    return counter.peak


@dataclass
class Estimate:
    """The memory a piece of work needs, and its parts in words."""

    bytes: int
    parts: str

    def __str__(self) -> str:
        return f"about {mb(self.bytes)} ({self.parts})"


def _weights(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def estimate(model, shape: tuple[int, ...], *, batch: int | None = None, conversion: bool = True) -> Estimate:
    """The memory a conversion of ``model`` at input ``shape`` needs (see the module docstring), or with
    ``conversion=False`` what running its artifacts on their runtimes needs (no float64 proof, no exporters: three
    copies of weights and activations). ``batch``: the largest batch the model also runs at (samples run in chunks,
    benchmarks at several batches), which scales the input and the activations."""
    n = max(batch or shape[0], shape[0])
    weights = _weights(model)
    inputs = math.prod(shape[1:]) * n * 4
    act = peak_activations(model, [tuple(shape)])
    if act is not None:
        act = act * n // shape[0]
    copies = (WEIGHT_COPIES, ACTIVATION_COPIES) if conversion else (RUNTIME_COPIES, RUNTIME_COPIES)
    need = LIBRARIES + copies[0] * weights + INPUT_COPIES * inputs + copies[1] * (act or 0)
    parts = f"{mb(weights)} of weights, {mb(inputs)} of input" + (
        f", {mb(act)} of activations at the peak of one forward" if act is not None else
        ", activations not estimated (the forward does not run on fake tensors)")
    return Estimate(need, parts)


def check_memory(need: Estimate | int, what: str, fix: str) -> tuple[int, str] | None:
    """Refuse (:class:`ResourceError`) ``what`` when it needs more than :func:`available_memory`; the memory
    available, or None when unknown."""
    have = available_memory()
    n = need.bytes if isinstance(need, Estimate) else need
    if have is not None and n > have[0]:
        raise ResourceError(f"{what} needs {need if isinstance(need, Estimate) else 'about ' + mb(n)}, more than "
                            f"the {mb(have[0])} this process can take ({have[1]}); {fix}")
    return have


# --------------------------------------------------------------------------------------------- threads

def check_threads(threads: Iterable[int] | int | None, option: str = "--threads") -> None:
    """Refuse a thread count above the CPUs this process may use: more threads than CPUs only contend, and a
    runtime makes a thread pool (and its memory) of that size."""
    cpus = usable_cpus()
    values = [threads] if isinstance(threads, int) else list(threads or ())
    over = [n for n in values if n > cpus]
    if over:
        raise ResourceError(f"{option} {max(over)} is more than the {cpus} CPU(s) this process may use; pass "
                            f"{option} {cpus} or fewer")


# ------------------------------------------------------------------------------------------------ disk

def check_disk(folder: str | os.PathLike, need: int, largest: int, what: str) -> None:
    """Refuse (:class:`NoSpace`) ``what`` when ``need`` bytes do not fit in the free space of ``folder``'s device,
    or a file of ``largest`` bytes exceeds the file-size limit (``ulimit -f``)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and need > free:
        raise NoSpace(f"no space for {what}: it writes about {mb(need)} and the device holding {folder} has "
                      f"{mb(free)} free; free some space or choose another --out")
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and largest > soft:
        raise NoSpace(f"file size limit: {what} writes a file of about {mb(largest)}, over this shell's limit of "
                      f"{mb(soft)} (ulimit -f); raise the limit (ulimit -f unlimited)")


def disk_failure(exc: BaseException | None) -> BaseException | None:
    """The error in ``exc``'s chain that is a failed write for lack of space or over the file-size limit, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NoSpace):
            return exc
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc
        if any(w in str(exc).lower() for w in _DISK_WORDS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:
                pass
    return total


def no_space_message(exc: BaseException, out_dir: str | os.PathLike | None = None, written: Path | None = None) -> str:
    """One sentence for the disk failure ``exc`` (see :func:`disk_failure`) of a run into ``out_dir``: what ran
    out, where, how much the run had written (the partial folder ``written``) and how much is free."""
    if isinstance(exc, NoSpace):
        return str(exc)
    file = getattr(exc, "filename", None)
    done = _size(written) if written is not None and written.exists() else None
    wrote = f"; the run had written {mb(done)} when it failed" if done is not None else ""
    subject = f"the run into {out_dir}" if out_dir is not None else (f"{file}" if file else "a file")
    into = f" ({file})" if file and out_dir is not None else ""
    where = Path(os.path.abspath(out_dir if out_dir is not None else (file or "."))).parent
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG or "file too large" in str(exc).lower():
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = mb(soft) if soft != resource.RLIM_INFINITY else "the file system's largest file"
        return (f"writing {subject}{into} went over the file-size limit of {limit}{wrote}; raise the limit "
                "(ulimit -f unlimited) or convert fewer --targets; nothing was kept")
    try:
        free = f"{mb(shutil.disk_usage(where).free)} free"
    except OSError:
        free = "free space unknown"
    return (f"no space left on the device holding {where} while writing {subject}{into}{wrote} ({free}); free "
            "some space or choose another --out; nothing was kept")


# ------------------------------------------------------------------------------------------ npz files

def read_npz(path: str | os.PathLike, what: str = "file") -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path``, each header read first: an entry that is not a numeric ``.npy``
    array (an object array would unpickle) is refused, and arrays larger than half the memory this process can
    take (a few compressed bytes can declare terabytes) are refused before anything is allocated."""
    import numpy.lib.format as fmt

    have = available_memory()
    limit = have[0] // 2 if have else 16 << 30
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"entry {info.filename!r} is not a .npy array")
            with z.open(info) as f:
                version = fmt.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = fmt.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = fmt.read_array_header_2_0(f)
                else:
                    raise ValueError(f"entry {info.filename!r} has .npy format version {version}, not 1.0 or 2.0")
            if dtype.hasobject:
                raise ValueError(f"entry {info.filename!r} holds Python objects, which loading would unpickle")
            total += math.prod(shape) * dtype.itemsize
    if total > limit:
        raise ResourceError(f"{what} {path} declares {mb(total)} of arrays, more than half the {mb(limit * 2)} "
                            "this process can take; pass a smaller file")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# ---------------------------------------------------------------------------------------------- paths

def check_output_path(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse an output path that is not valid UTF-8 or is a dangling symbolic link, before any work."""
    text = os.fspath(path)
    raw = os.fsencode(text)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw.decode("utf-8", "backslashreplace")
        raise ResourceError(f"{option} {shown} is not valid UTF-8 text, so the report could not name it; choose a "
                            "path of UTF-8 characters") from None
    if os.path.islink(text) and not os.path.exists(text):
        raise ResourceError(f"{option} {text} is a symbolic link to {os.readlink(text)}, which does not exist; remove "
                            f"the link or choose another {option}")
