"""The run record: what a ``deploy convert`` run made and proved, as dataclasses; ``report.json`` is their JSON.

A :class:`RunRecord` holds the model, the options, the inputs, the reparameterization report and
one :class:`StageRecord` per stage. A stage is three separate records: how it was made
(:class:`ExportRecord`), its files (:class:`FilesRecord`: paths relative to the run directory,
sizes and sha256 hashes) and how it verified (:class:`VerificationRecord`). ``to_dict`` /
``from_dict`` convert to and from JSON; ``report_version`` is the schema version. Version 1 files
(flat stage dicts, written by reparam-deploy 0.1 before the records were split) and version 2 files
(which did not hash ``verify/``: their ``reference`` is None) are read and upgraded; a newer version
is refused with a sentence saying which version wrote it.

:class:`RunDirectory` is the atomic commit of a run: everything is written into a hidden partial
sibling of the output directory, which replaces the output directory only when the run is done;
on an error (and on Ctrl-C or SIGTERM, which the command line turns into an interrupt) the partial
folder is removed and nothing is left behind; a write that failed for lack of disk space (or over
``ulimit -f``) becomes one :class:`deploy.resources.NoSpace` sentence saying where and how much. A
run killed outright (SIGKILL) cannot clean up: the next run into the same place removes the partial
folders of processes that no longer exist.
A folder that cannot be deleted is reported with a warning, never skipped in silence.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runtimes.core import Artifact, DeployError, first_line

__all__ = ["SCHEMA_VERSION", "TOOL", "REPORT_NAME", "PipelineError", "ExportRecord", "FilesRecord",
           "VerificationRecord", "StageRecord", "RunOptions", "SamplesRecord", "InputsRecord", "RunRecord",
           "RunDirectory", "sha256", "load_record", "is_run_dir", "unlisted_files", "inside", "alive"]

SCHEMA_VERSION = 3  # 3: the recorded reference files (verify/*.npz) are hashed too
TOOL = "reparam-deploy"
REPORT_NAME = "report.json"

log = logging.getLogger(__name__)


class PipelineError(DeployError):
    """A run cannot start or go on; the message names the problem and the fix."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "a file") -> Path:
    """``root / path`` for a ``path`` read from a run record, refused with a :class:`PipelineError` unless it stays
    inside the run directory ``root``: an absolute path, a ``..`` escape or a symbolic link out is refused
    before anything there is opened. Every path ``report.json`` names goes through here."""
    text = os.fspath(path)
    rel = Path(text)
    real_root = Path(os.path.realpath(root))
    escapes = not text or rel.is_absolute() or bool(rel.drive)
    if not escapes:
        real = Path(os.path.realpath(real_root / rel))
        escapes = real != real_root and real_root not in real.parents
    if escapes:
        raise PipelineError(f"{Path(root) / REPORT_NAME} names {what} {text!r}, which is outside the run directory "
                            f"{root}: refused (a run names its own files, relative to its directory); rerun "
                            "deploy convert")
    return Path(root) / rel


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class ExportRecord:
    """How a stage was made: by which target (format), from which stage, at which precision, in how long."""

    format: str  # the target that made it ("torch" for the training model)
    parent: str | None = None
    precision: str = "fp32"
    seconds: float | None = None
    artifact: Artifact | None = None  # its paths relative to the run directory
    notes: list[str] = field(default_factory=list)
    error: str = ""  # the export failed (or could not run)
    main: bool = True  # the stage that stands for its target (what bench times, what converted targets read)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["artifact"] = self.artifact.to_dict() if self.artifact is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExportRecord:
        d = _known(cls, d)
        if d.get("artifact") is not None:
            d["artifact"] = Artifact.from_dict(d["artifact"])
        return cls(**d)

    def artifact_in(self, root: str | os.PathLike) -> Artifact | None:
        """The artifact record with its paths under ``root`` (each checked by :func:`inside`)."""
        if self.artifact is None:
            return None
        art = Artifact.from_dict(self.artifact.to_dict())
        art.path = os.fspath(inside(root, art.path, "an artifact path"))
        if art.parent:
            art.parent = os.fspath(inside(root, art.parent, "an artifact's parent path"))
        return art


@dataclass
class FilesRecord:
    """The files of a stage, relative to the run directory, with their total size and sha256 hashes."""

    files: list[str] = field(default_factory=list)
    size: int = 0
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str | None:
        return self.files[0] if self.files else None

    @classmethod
    def of(cls, root: str | os.PathLike, files: list[str]) -> FilesRecord:
        """Size and hashes of ``files`` (absolute, or relative to ``root``), recorded relative to ``root``."""
        root = Path(root)
        rel = [os.path.relpath(f, root) if os.path.isabs(f) else f for f in files]
        return cls(rel, sum((root / f).stat().st_size for f in rel), {f: sha256(root / f) for f in rel})

    def check(self, root: str | os.PathLike) -> tuple[list[str], list[str]]:
        """``(missing, changed)`` files under ``root``: absent, or whose sha256 differs from the record. Every
        path is checked by :func:`inside` before any file is opened."""
        paths = {f: inside(root, f, "a stage file") for f in [*self.files, *self.sha256]}
        missing = [f for f in self.files if not paths[f].is_file()]
        changed = [f for f, h in self.sha256.items() if f not in missing and (not paths[f].is_file()
                                                                             or sha256(paths[f]) != h)]
        return missing, changed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FilesRecord:
        return cls(**_known(cls, d))


@dataclass
class VerificationRecord:
    """How a stage compared with the training model (seeded inputs, and samples when there are any)."""

    passed: bool = False
    reason: str = ""
    blame: str | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    parent_max_rel: float | None = None
    samples_max_rel: float | None = None
    accuracy: float | None = None
    agreement: float | None = None
    sqnr_db: float | None = None  # int8 stages: output SQNR against the training model, worst output
    int8: dict = field(default_factory=dict)  # int8 stages: the accuracy guard's numbers and verdict
    detection: dict = field(default_factory=dict)  # detectors: where NMS ran, box matching, mAP (deploy.detection)
    changed: bool = False  # a file's sha256 differs from the one recorded at conversion
    not_run: str = ""  # written but not run on this machine, and why (Core ML off macOS): neither passed nor failed
    seconds: float | None = None
    checks: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VerificationRecord:
        return cls(**_known(cls, d))


@dataclass
class StageRecord:
    """One stage of a run: how it was made, its files, how it verified."""

    name: str
    export: ExportRecord
    files: FilesRecord = field(default_factory=FilesRecord)
    verification: VerificationRecord = field(default_factory=VerificationRecord)

    # the facts every reader wants, without knowing which record holds them
    @property
    def format(self) -> str:
        return self.export.format

    @property
    def parent(self) -> str | None:
        return self.export.parent

    @property
    def precision(self) -> str:
        return self.export.precision

    @property
    def path(self) -> str | None:
        """The artifact (a file, or a folder such as a Core ML package), relative to the run directory."""
        return self.export.artifact.path if self.export.artifact is not None else self.files.path

    @property
    def passed(self) -> bool:
        return self.verification.passed

    @property
    def failed(self) -> bool:
        """Not verified, and not a stage written but not runnable here (``verification.not_run``)."""
        return not self.passed and not (self.verification.not_run and not self.export.error)

    @property
    def reason(self) -> str:
        return self.verification.reason or self.export.error

    @property
    def notes(self) -> list[str]:
        return self.export.notes + [n for n in self.verification.notes if n not in self.export.notes]

    def to_dict(self) -> dict:
        return {"name": self.name, "export": self.export.to_dict(), "files": self.files.to_dict(),
                "verification": self.verification.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> StageRecord:
        return cls(d["name"], ExportRecord.from_dict(d["export"]), FilesRecord.from_dict(d.get("files") or {}),
                   VerificationRecord.from_dict(d.get("verification") or {}))

    @classmethod
    def from_v1(cls, d: dict) -> StageRecord:
        """A stage of a version-1 report (one flat dict)."""
        export = ExportRecord.from_dict({**d, "seconds": d.get("export_seconds")})
        verification = VerificationRecord.from_dict({**d, "seconds": d.get("verify_seconds"), "notes": []})
        return cls(d["name"], export, FilesRecord.from_dict(d), verification)


@dataclass
class RunOptions:
    targets: list[str] = field(default_factory=list)
    precision: str = "fp32"
    dynamic: bool = False
    passes: list[str] = field(default_factory=list)
    seed: int = 0
    opset: int = 18


@dataclass
class SamplesRecord:
    """Real samples the run verified on: where they came from (relative to the working directory of the run,
    or the package that shipped them) and how many."""

    path: str
    count: int
    labels: bool
    shipped_with_model: bool = False


@dataclass
class InputsRecord:
    shape: list[int]
    verified_shape: list[int]
    dtype: str = "float32"
    seeded: dict = field(default_factory=dict)
    samples: SamplesRecord | None = None


@dataclass
class RunRecord:
    """Everything ``report.json`` holds; see the module docstring."""

    model: dict
    load: dict
    options: RunOptions
    inputs: InputsRecord
    tolerance: dict
    reparameterize: dict
    stages: list[StageRecord]
    timings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    command: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    out_dir: str = ""
    benchmarks: list[dict] = field(default_factory=list)
    int8: dict = field(default_factory=dict)  # --precision int8: calibration, guard, per-layer table, fallbacks
    detection: dict = field(default_factory=dict)  # detectors: NMS settings, class names, pictures (deploy.detection)
    reference: FilesRecord | None = None  # verify/*.npz: the inputs and training outputs every stage is judged by
    tool: str = TOOL
    report_version: int = SCHEMA_VERSION

    @property
    def failed(self) -> list[str]:
        return [s.name for s in self.stages if s.failed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["options"], d["inputs"] = asdict(self.options), asdict(self.inputs)
        d["stages"] = [s.to_dict() for s in self.stages]
        d["reference"] = self.reference.to_dict() if self.reference is not None else None
        d["passed"], d["failed"] = self.passed, self.failed
        for optional in ("benchmarks", "int8", "detection"):
            if not d[optional]:
                del d[optional]
        head = {k: d.pop(k) for k in ("tool", "report_version", "command", "created", "out_dir", "passed", "failed")}
        return {**head, **d}

    @classmethod
    def from_dict(cls, d: Any, where: str = REPORT_NAME) -> RunRecord:
        if not isinstance(d, dict) or d.get("tool") != TOOL:
            raise PipelineError(f"{where} is not a deploy report; pass the output directory of deploy convert")
        version = d.get("report_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise PipelineError(f"{where} was written by a newer reparam-deploy (report_version {version}); this "
                                f"version reads report versions up to {SCHEMA_VERSION}: upgrade reparam-deploy or "
                                "rerun deploy convert")
        try:
            stages_in = d["stages"]
            if not isinstance(stages_in, list) or not all(isinstance(s, dict) for s in stages_in):
                raise TypeError("'stages' is not a list of stage records")
            stages = [StageRecord.from_v1(s) if version == 1 else StageRecord.from_dict(s) for s in stages_in]
            inputs = dict(d["inputs"])
            if inputs.get("samples"):
                inputs["samples"] = SamplesRecord(**_known(SamplesRecord, inputs["samples"]))
            return cls(
                model=dict(d["model"]), load=dict(d.get("load") or {"spec": d["model"]["spec"]}),
                options=RunOptions(**_known(RunOptions, d["options"])),
                inputs=InputsRecord(**_known(InputsRecord, inputs)), tolerance=dict(d.get("tolerance") or {}),
                reparameterize=dict(d.get("reparameterize") or {}), stages=stages,
                timings=dict(d.get("timings") or {}), versions=dict(d.get("versions") or {}),
                machine=dict(d.get("machine") or {}), notes=list(d.get("notes") or []), command=d.get("command"),
                created=d.get("created", ""), out_dir=d.get("out_dir", ""),
                benchmarks=list(d.get("benchmarks") or []), int8=dict(d.get("int8") or {}),
                detection=dict(d.get("detection") or {}),
                reference=FilesRecord.from_dict(d["reference"]) if d.get("reference") is not None else None,
                report_version=SCHEMA_VERSION)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PipelineError(f"{where} is malformed (report_version {version}: {first_line(e)}); rerun deploy "
                                "convert") from e

def is_run_dir(path: str | os.PathLike) -> bool:
    try:
        with open(Path(path) / REPORT_NAME) as f:
            return json.load(f).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def unlisted_files(out_dir: str | os.PathLike) -> list[str]:
    """Files under the run directory ``out_dir`` that its report does not list (relative paths, sorted): files
    someone added after the run, which replacing the directory would delete. The report is read leniently
    (a malformed one lists nothing, so every artifact counts as unlisted)."""
    root = Path(out_dir)
    try:
        with open(root / REPORT_NAME) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None
    data = data if isinstance(data, dict) else {}
    listed = {REPORT_NAME, "report.md"}
    stages = data.get("stages")
    for s in stages if isinstance(stages, list) else []:
        files = s.get("files") if isinstance(s, dict) else None
        files = files.get("files") if isinstance(files, dict) else files  # version 2 / version 1
        listed.update(os.path.normpath(f) for f in files or [] if isinstance(f, str))
    benchmarks = data.get("benchmarks")
    for b in benchmarks if isinstance(benchmarks, list) else []:
        if isinstance(b, dict) and isinstance(b.get("chart"), str):
            listed.add(os.path.normpath(b["chart"]))
    detection = data.get("detection")
    pictures = detection.get("pictures") if isinstance(detection, dict) else None
    listed.update(os.path.normpath(f) for f in (pictures or {}).values() if isinstance(pictures, dict)
                  and isinstance(f, str))
    found = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        if rel == "verify" or rel.startswith("verify" + os.sep):  # the recorded reference outputs
            continue
        found += [os.path.normpath(os.path.join(rel, f)) for f in files]
    return sorted(f for f in found if f not in listed)


def load_record(out_dir: str | os.PathLike) -> RunRecord:
    """The run record of a ``deploy convert`` output directory; a :class:`PipelineError` says what is wrong."""
    root = Path(out_dir)
    path = root / REPORT_NAME
    if not root.is_dir():
        raise PipelineError(f"{out_dir} is not a directory; pass the output directory of deploy convert")
    if not path.is_file():
        raise PipelineError(f"{out_dir} holds no {REPORT_NAME}; pass the output directory of deploy convert")
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise PipelineError(f"{path} is not valid JSON ({first_line(e)}); rerun deploy convert") from e
    return RunRecord.from_dict(data, str(path))


class RunDirectory:
    """The atomic commit of a run into ``out_dir`` (see the module docstring).

        with RunDirectory(out_dir, replaces) as run:
            ... write into run.tmp ...
            run.commit()
    """

    def __init__(self, out_dir: str | os.PathLike, replaces: bool):
        self.out_dir = Path(out_dir)
        self.replaces = replaces
        self.tmp = Path(os.path.abspath(self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"))
        self.committed = False
        self.warnings: list[str] = []  # what could not be cleaned up (also logged)

    def __enter__(self) -> RunDirectory:
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.remove_stale()
            _remove_tree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise PipelineError(f"cannot create the output directory {self.out_dir}: "
                                f"{(e.strerror or str(e)).lower()} ({e.filename or self.tmp}); choose another "
                                "--out") from e
        return self

    def _leftovers(self) -> list[tuple[Path, str, int]]:
        """``(folder, kind, pid)`` of the partial and old folders of other runs into ``out_dir``."""
        prefix = f".{self.out_dir.name}."
        found = []
        for p in self.out_dir.parent.glob(f"{glob.escape(prefix)}*-*"):
            kind, _, pid = p.name[len(prefix):].rpartition("-")
            if kind in ("partial", "old") and pid.isdigit() and int(pid) != os.getpid() and p.is_dir():
                found.append((p, kind, int(pid)))
        return found

    def remove_stale(self) -> list[Path]:
        """Delete the partial (and superseded old) folders of runs whose process is gone (killed, say, by
        SIGKILL); a live process's folders are never touched. Returns the folders removed."""
        removed = []
        for path, kind, pid in self._leftovers():
            if alive(pid):
                continue
            if kind == "old" and not self.out_dir.exists():  # the run died between its two renames: this is
                self._warn(f"{path} holds the previous run of {self.out_dir} (its replacement was killed); "
                           f"kept: rename it to {self.out_dir.name} or delete it")
                continue
            problem = _remove_tree(path)
            if problem:
                self._warn(f"could not remove the stale folder {path} of a killed run ({problem}); delete it")
            else:
                log.info("removed %s, left by process %d which no longer runs", path, pid)
                removed.append(path)
        return removed

    def commit(self) -> None:
        """Move the finished run into place, replacing the previous one when ``replaces``."""
        try:
            if self.replaces and self.out_dir.exists():
                old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
                self.out_dir.rename(old)
                try:
                    self.tmp.rename(self.out_dir)
                except OSError:
                    old.rename(self.out_dir)  # put the previous run back
                    raise
                problem = _remove_tree(old)
                if problem:
                    self._warn(f"the previous run was replaced but its folder {old} could not be deleted "
                               f"({problem}); delete it")
            else:
                self.tmp.rename(self.out_dir)
        except OSError as e:
            raise PipelineError(f"cannot move the finished run into {self.out_dir}: "
                                f"{(e.strerror or str(e)).lower()}; choose another --out") from e
        self.committed = True

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            from .resources import NoSpace, disk_failure, no_space_message

            full = disk_failure(exc)
            message = no_space_message(full, self.out_dir, self.tmp) if full is not None else None
            problem = _remove_tree(self.tmp)
            if problem:
                self._warn(f"could not remove the partial folder {self.tmp} ({problem}); delete it")
            if message is not None and not isinstance(exc, NoSpace):
                raise NoSpace(message) from exc


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_tree(path: Path) -> str | None:
    """Delete ``path`` if it exists; the first problem in words, or None when it is gone."""
    problems: list[str] = []

    def note(_func, where, exc_info):
        e = exc_info[1]
        problems.append(f"{where}: {(getattr(e, 'strerror', None) or str(e)).lower()}")

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=note)
    return problems[0] if problems else None
