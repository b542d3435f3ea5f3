"""Export a torch module into the artifacts of a set of targets: the export step of ``deploy convert``,
``deploy bench`` (the training form, and the deploy form at another batch) and the tuner.

:func:`check_targets` refuses unknown targets, unsupported precisions and missing packages before
any work; :func:`export_forms` runs each target's export (a target after the one it is converted
from), turning a failed export into a failed stage whose partial files are removed, so the other
targets go on. :func:`derived_form` makes a stage from another stage's artifact the same way (INT8
quantization: :func:`quantize_form`; NMS appended: ``deploy.detection``). Targets are looked up in
the registry (``exporters.targets``); nothing here knows a format by name.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from exporters import targets as registry
from exporters.targets import ExportJob, Product, Target
from runtimes.core import Artifact, DeployError, MissingDependency, first_line

from .record import ExportRecord, FilesRecord, PipelineError, StageRecord
from .resources import disk_failure

__all__ = ["check_targets", "export_forms", "main_stage", "quantize_form", "derived_form"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def without_int8(names: Sequence[str]) -> list[str]:
    """The targets among ``names`` that have no INT8 form (ncnn: its quantization tools are not on PyPI)."""
    return [n for n in names if "int8" not in registry.get(n).precisions]


def check_targets(names: Sequence[str], precision: str) -> list[Target]:
    """The targets to export for ``names`` (with those made in every run and the sources they are converted
    from), in export order; :class:`PipelineError` for an unknown target, a precision it cannot produce, or a
    package or device it lacks. Under int8 a target without an INT8 form is refused only when no other one asked
    for has one (an int8 run makes every fp32 form too: those targets give theirs alone, :func:`without_int8`)."""
    known = registry.names()
    unknown = [t for t in names if t not in known]
    if unknown:
        raise PipelineError(f"unknown target(s) {', '.join(unknown)}; known targets: {', '.join(known)} (or none)")
    precisions = sorted({p for t in registry.all_targets() for p in t.precisions})
    if precision not in precisions:
        raise PipelineError(f"unknown precision {precision!r}; choose one of {', '.join(precisions)}")
    order = registry.export_order(names)
    partial = precision == "int8" and len(without_int8(names)) < len(names)
    for t in order:
        if t.name in names and precision not in t.precisions and not partial:
            able = [o.name for o in registry.all_targets() if precision in o.precisions and not o.always]
            raise PipelineError(f"the {t.name} target cannot produce {precision} (it makes "
                                f"{', '.join(t.precisions)}); the targets that can are {', '.join(able)}: drop "
                                f"{t.name} from --targets or change --precision")
        try:
            registry.check_available(t)
        except MissingDependency as e:
            raise PipelineError(f"{str(e).rstrip('.')}; drop {t.name} from --targets on this machine") from e
    return order


def main_stage(made: Sequence[StageRecord], target: str) -> StageRecord | None:
    """The stage that stands for ``target`` among ``made``: its last main product, else its failed stage."""
    mine = [s for s in made if s.export.format == target]
    mains = [s for s in mine if s.export.main and not s.export.error]
    return (mains or mine or [None])[-1]


def export_forms(module, args: tuple, folder: str | Path, targets: Sequence[Target], *, precision: str = "fp32",
                 dynamic: bool = False, opset: int = 18, metadata: dict | None = None,
                 progress: Progress | None = None) -> list[StageRecord]:
    """Export ``module`` (example inputs ``args``) for ``targets`` (in export order, see :func:`check_targets`)
    into ``folder``: one :class:`StageRecord` per stage made, its files relative to ``folder``.

    A target converted from another one gets that target's main artifact; when that export failed, it
    fails too, saying why. ``metadata`` goes into the artifacts that can hold it (the pt2 archive).
    """
    progress = progress or _noop
    folder = Path(os.path.abspath(folder))
    made: list[StageRecord] = []
    main: dict[str, StageRecord] = {}  # target -> the stage that stands for it
    for target in targets:
        source = main.get(target.source) if target.source != "torch" else None
        parent = source.name if source is not None else ("pt2" if target.name != "pt2" else "training")
        if target.source != "torch" and source is None:
            msg = f"not exported: its source, the {registry.get(target.source).label} export, failed"
            made.append(StageRecord(target.name, ExportRecord(target.name, parent=target.source, precision=precision,
                                                              error=msg)))
            continue
        job = ExportJob(module, args, folder, precision=precision if precision in target.precisions else "fp32",
                        dynamic=dynamic, opset=opset, source=source.export.artifact_in(folder) if source else None,
                        metadata=dict(metadata or {}))
        products, error, seconds = _attempt(target, job, progress)
        if error:
            made.append(StageRecord(target.name, ExportRecord(target.name, parent=parent, precision=job.precision,
                                                              seconds=seconds, error=error)))
            continue
        for i, p in enumerate(products):
            stage = _stage(target, p, parent, folder, seconds if i == 0 else None)
            made.append(stage)
            if p.main and not p.error:
                main[target.name] = stage
    return made


def _attempt(target: Target, job: ExportJob, progress: Progress, what: str = "",
             make: Callable[[], list[Product]] | None = None) -> tuple[list[Product], str, float]:
    """Run ``target``'s export (or ``make``): ``(products, "", seconds)``, or ``([], message, seconds)`` with the
    files it wrote removed."""
    what = what or f"{target.name} ({job.precision})"
    before = set(job.folder.iterdir())
    progress(f"exporting {what} ...")
    start = time.perf_counter()
    try:
        products = make() if make is not None else target.export(job)
    except Exception as e:
        for p in set(job.folder.iterdir()) - before:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if disk_failure(e) is not None:  # the disk, not the model or the target: the run stops, saying so
            raise
        msg = first_line(e) if isinstance(e, DeployError) else f"{type(e).__name__}: {first_line(e)}"
        if not isinstance(e, MissingDependency):
            msg = f"{msg.rstrip('.')}; drop {target.name} from --targets or change the model"
        log.debug("export %s failed", what, exc_info=True)
        progress(f"export {what} FAILED: {msg}")
        return [], msg, time.perf_counter() - start
    seconds = time.perf_counter() - start
    progress(f"exported {what} in {seconds:.1f} s")
    return products, "", seconds


def quantize_form(target: Target, source: StageRecord | None, folder: str | Path, path: str | Path, options,
                  module=None, args: tuple = (), progress: Progress | None = None) -> StageRecord:
    """The stage ``<target>-int8``: ``target.quantize`` run on the fp32 ``source`` stage's artifact with
    ``options`` (``exporters.int8.Int8Options``), written to ``path`` (replacing an earlier attempt)."""
    folder = Path(os.path.abspath(folder))
    name = f"{target.name}-int8"
    if source is None or source.export.error or source.export.artifact is None:
        msg = f"not quantized: its fp32 source, the {target.label} export, failed"
        return StageRecord(name, ExportRecord(target.name, parent=source.name if source else None, precision="int8",
                                              error=msg, main=False))
    for stale in target.files(Artifact(os.fspath(path), target.name, [], [])):
        if os.path.exists(stale):
            os.unlink(stale)
    quantize = registry.resolve(target.quantize)
    fp32 = source.export.artifact_in(folder)
    return derived_form(target, name, source, folder, lambda: quantize(fp32, path, options, module=module, args=args),
                        what=f"{target.name} int8 ({len(options.calibration)} calibration samples)",
                        precision="int8", progress=progress)


def derived_form(target: Target, name: str, parent: StageRecord, folder: str | Path, make: Callable[[], Artifact], *,
                 what: str, precision: str | None = None, progress: Progress | None = None) -> StageRecord:
    """The stage ``name``, made by ``make()`` from the artifact of the stage ``parent`` (an INT8 quantization,
    NMS appended, a conversion of either) into ``folder``, recorded as one of ``target``'s stages (not its main
    one). A failure is recorded as the stage's export error, the files it wrote removed, as for an export;
    ``precision`` (default: the artifact's) is the failed record's."""
    folder = Path(os.path.abspath(folder))
    job = ExportJob(None, (), folder, precision=precision or parent.precision)
    products, error, seconds = _attempt(target, job, progress or _noop, what,
                                        lambda: [Product(name, make(), parent=parent.name, main=False)])
    if error:
        return StageRecord(name, ExportRecord(target.name, parent=parent.name, precision=precision or "fp32",
                                              seconds=seconds, error=error, main=False))
    return _stage(target, products[0], parent.name, folder, seconds)


def _stage(target: Target, p: Product, parent: str, folder: Path, seconds: float | None) -> StageRecord:
    precision = p.precision or (p.artifact.precision if p.artifact is not None else "fp32")
    export = ExportRecord(target.name, parent=p.parent or parent, precision=precision, seconds=seconds, error=p.error,
                          main=p.main)
    if p.artifact is None:
        return StageRecord(p.stage, export)
    art = p.artifact
    files = FilesRecord.of(folder, target.files(art))
    export.notes = list(art.notes)
    export.artifact = _relative(art, folder)
    return StageRecord(p.stage, export, files)


def _relative(art: Artifact, folder: Path) -> Artifact:
    """A copy of ``art`` whose paths under ``folder`` (also those in its metadata) are relative to it."""
    root = str(folder) + os.sep

    def rel(obj):
        if isinstance(obj, str):
            return obj[len(root):] if obj.startswith(root) else obj
        if isinstance(obj, dict):
            return {k: rel(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [rel(v) for v in obj]
        return obj

    return Artifact.from_dict(rel(art.to_dict()))
