"""Verification of a run's stages against the training model's recorded outputs.

``record_reference`` runs the training model once on the seeded input (and on the real samples)
and writes the inputs and outputs into the run's ``verify/`` folder; ``verify_stages`` runs every
stage's artifact on its own runtime (looked up in the target registry) on those same inputs and
returns one :class:`~deploy.record.VerificationRecord` per stage, compared with the reference and
with the stage it was made from (so the stage that introduced a mismatch is named). With labelled
samples it adds accuracy and agreement with the training model (100 % required of fp32 stages).
Nothing here changes the records it is given: ``convert`` and ``verify`` put the results in place.
A NaN or an infinity in the inputs (seeded or ``--inputs`` samples) or in the training model's
outputs is a :class:`PipelineError` naming the array: nothing can be verified against them.

Some models are so sensitive to rounding that their own float32 run is far from their exact function
(a deep EfficientNet with random weights: 3.6e-4 relative from its float64 run). No float32 form of such
a model can meet a fixed ``1e-5`` against the float32 reference, however exact its rewrites. So
``rounding_noise`` measures the training model's float32 run against its float64 run on the seeded
input, and a stage is held to at most :data:`NOISE_FACTOR` times that (when above the precision's default
and no ``--rtol`` was given): a stage exactly as far from the exact function as the training model, on the
other side of it, is twice the noise from the reference; the third share is the stage's own rounding
order, which differs from the model's. The stage's notes say so, with the measured noise.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from fusers.manager import NOISE_FACTOR  # one factor for every rounding-noise floor
from runtimes.core import first_line, nonfinite

from .record import PipelineError, StageRecord, VerificationRecord
from .resources import ResourceError, read_npz
from .stages import GROUND_TRUTH, batch_of, open_stage, run_batched, torch_threads
from .tasks import Classification, Guard, ends_in_nms, judge, task_of

__all__ = ["record_reference", "verify_stages", "run_batched", "read_samples", "torch_threads", "open_stage",
           "check_finite"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def check_finite(arrays, what: str, fix: str) -> None:
    """Raise :class:`PipelineError` when one of ``arrays`` (``{name: array}``) holds a NaN or an infinity:
    "``what`` NAME holds N NaN of M values; ``fix``"."""
    for name, a in arrays.items():
        bad = nonfinite(a)
        if bad:
            raise PipelineError(f"{what} {name!r} holds {bad}; {fix}")


def read_samples(path: str, shape: tuple[int, ...], shipped_with: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Real inputs from an ``.npz``: one input array ``(N, ...)`` plus optional integer ``labels`` ``(N,)``.

    ``shipped_with`` names the model when the samples came with it rather than from ``--inputs``: a
    shape that does not fit then blames ``--input-shape``, not an option the user did not pass.
    """
    if not os.path.isfile(path):
        raise PipelineError(f"--inputs file {path} does not exist; pass an .npz holding the input array "
                            "(and optionally 'labels')")
    try:
        arrays = read_npz(path, "--inputs file")
    except ResourceError:
        raise
    except Exception as e:
        raise PipelineError(f"--inputs file {path} is not a readable .npz ({first_line(e)}); save it with "
                            "numpy.savez(path, input0=images, labels=labels)") from e
    labels = arrays.pop("labels", None)
    for key in GROUND_TRUTH:  # detection ground truth, read by deploy.detection.read_ground_truth
        arrays.pop(key, None)
    if len(arrays) != 1:
        raise PipelineError(f"--inputs file {path} holds {len(arrays)} input arrays ({', '.join(arrays)}); the model "
                            "has one input: save one array (and optionally 'labels')")
    (name, x), = arrays.items()
    if len(x) == 0:
        raise PipelineError(f"--inputs array {name!r} in {path} holds no samples; save at least one")
    if (x.ndim != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:])) and shipped_with:
        per_sample = ",".join(map(str, x.shape[1:]))
        raise PipelineError(f"--input-shape {','.join(map(str, shape))} does not fit the held-out samples shipped "
                            f"with {shipped_with} ({os.path.basename(path)}: {len(x)} samples of {per_sample}); "
                            f"drop --input-shape, use N,{per_sample}, or pass --inputs with samples of your shape")
    if x.ndim != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:]):
        raise PipelineError(f"--inputs array {name!r} has shape {tuple(x.shape)} but the model input is "
                            f"{','.join(map(str, shape))}; samples must be (N, {', '.join(map(str, shape[1:]))})")
    if labels is not None and (labels.shape != (len(x),) or labels.dtype.kind not in "iu"):
        raise PipelineError(f"--inputs 'labels' must be {len(x)} integer class indices, got shape "
                            f"{tuple(labels.shape)} dtype {labels.dtype}")
    with np.errstate(over="ignore"):  # an overflow becomes an infinity, refused below
        x = np.ascontiguousarray(x.astype(np.float32))
    rows = np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))
    which = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
    check_finite({name: x}, f"--inputs file {path}: array", f"samples must be finite float32 values: replace or drop "
                 f"sample{'s' if len(rows) > 1 else ''} {which}")
    return x, labels


_FIX_MODEL = ("nothing can be verified against it: fix the model (a NaN or an overflow in its forward), its "
              "weights or its inputs")


def record_reference(vdir: Path, model, x: np.ndarray, samples: tuple[np.ndarray, np.ndarray | None] | None,
                     ground_truth: dict[str, np.ndarray] | None = None) -> float | None:
    """Write the seeded input, the training model's outputs on it, and the samples (with their detection
    ``ground_truth`` arrays, if any) and their outputs. Returns the model's :func:`rounding_noise` on the input."""
    from runtimes import TorchRunner, save_inputs

    check_finite({"input0": x}, "the seeded input", "pass finite inputs")
    vdir.mkdir(exist_ok=True)
    save_inputs(vdir / "inputs.npz", {"input0": x})
    with TorchRunner(model, threads=torch_threads(x.shape)) as runner:
        ref = list(runner.infer([x]).values())
        check_finite({f"output{i}": o for i, o in enumerate(ref)}, "on the seeded input, the training model's output",
                     _FIX_MODEL)
        np.savez(vdir / "reference.npz", **{f"output{i}": o for i, o in enumerate(ref)})
        if samples is not None:
            xs, labels = samples
            try:  # an eager model takes any batch: fewer, larger calls
                samples_ref = run_batched(runner, xs, min(len(xs), 64))
            except Exception:
                samples_ref = run_batched(runner, xs, x.shape[0])
            check_finite({f"output{i}": o for i, o in enumerate(samples_ref)},
                         "on the --inputs samples, the training model's output", _FIX_MODEL)
            _check_labels(labels, samples_ref[0])
            np.savez(vdir / "samples.npz", input0=xs, **({"labels": labels} if labels is not None else {}),
                     **(ground_truth or {}))
            np.savez(vdir / "samples_reference.npz", **{f"output{i}": o for i, o in enumerate(samples_ref)})
    return rounding_noise(model, x, ref)


def rounding_noise(model, x: np.ndarray, reference: Sequence[np.ndarray]) -> float | None:
    """How far the training model's float32 outputs on ``x`` (``reference``) are from its float64 run, relative
    to each output's largest magnitude; None when the model is not float32 or does not run in float64."""
    import copy

    from runtimes.core import eval_mode, max_rel_error, tensor_leaves

    if any(t.is_floating_point() and t.dtype != torch.float32 for t in [*model.parameters(), *model.buffers()]):
        return None
    try:
        exact = copy.deepcopy(model).double()
        with torch.no_grad(), eval_mode(exact):
            outs = [t.numpy() for t in tensor_leaves(exact(torch.from_numpy(x).double()))]
    except Exception as e:  # noqa: BLE001 - a kernel without float64: no floor, the default tolerance holds
        log.info("no float64 run of the training model (%s); default tolerances", first_line(e))
        return None
    if len(outs) != len(reference) or any(o.shape != r.shape for o, r in zip(outs, reference)):
        return None
    return float(max_rel_error([torch.from_numpy(o) for o in outs],
                               [torch.from_numpy(np.asarray(r, dtype=np.float64)) for r in reference]))


def _check_labels(labels: np.ndarray | None, scores: np.ndarray) -> None:
    """Refuse labels that are not class indices of the model's (N, classes) output: an accuracy over them would be
    0 % for a reason that has nothing to do with the conversion."""
    if labels is None or scores.ndim != 2:
        return
    classes = scores.shape[1]
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(bad):
        raise PipelineError(f"--inputs 'labels' must be class indices 0..{classes - 1} of the model's {classes} "
                            f"outputs, but sample {bad[0]} is labelled {labels[bad[0]]}"
                            + (f" ({len(bad)} samples out of range)" if len(bad) > 1 else "")
                            + "; fix the labels or pass the model they belong to")


def _tolerance(precision: str, rtol: float | None, atol: float, noise: float | None = None):
    """The stage's tolerance and a note when the training model's rounding noise raised it (see the docstring)."""
    from runtimes import Tolerance

    tol, note = Tolerance.for_precision(precision), None
    if rtol is not None:
        tol.rtol = rtol
    elif noise is not None and NOISE_FACTOR * noise > tol.rtol:
        tol.rtol = NOISE_FACTOR * noise
        note = (f"tolerance {tol.rtol:.1e}: {NOISE_FACTOR:g}x the training model's own float32 rounding error "
                f"{noise:.1e} (its float32 run against its float64 run); no {precision} form can agree more closely")
    tol.atol = atol
    return tol, note


def not_run_here(stage: StageRecord) -> str:
    """Why ``stage``'s artifact can be written but not run on this machine (its target's ``not_run_here``), or ''."""
    from exporters import targets as registry

    if stage.export.format not in registry.names(selectable=False):
        return ""
    return registry.get(stage.export.format).not_run_here()


def verify_stages(root: Path, stages: Sequence[StageRecord], rtol: float | None, atol: float,
                  progress: Progress | None = None, *, trust_pickle: bool = False,
                  guard: dict | None = None, outputs: dict | None = None,
                  noise: float | None = None) -> dict[str, VerificationRecord]:
    """Verify ``stages`` (the first one the training reference) from the files in ``root``.

    Stages whose export failed are not run; the result has a record for every other stage. INT8 stages are
    not held to an elementwise tolerance (their errors are still measured): the accuracy guard
    (the task's judgement, ``deploy.tasks.judge`` with the bounds ``guard``) decides, on the samples. Stages
    that end in NMS (``deploy.tasks.ends_in_nms``) are left to ``deploy.detection.verify``. ``outputs``, when given,
    receives every stage's outputs: ``{(stage, "seeded" | "samples"): [arrays]}``. ``noise`` is the training
    model's :func:`rounding_noise`: the floor of every tolerance not given by ``rtol``.
    """
    from runtimes import Stage, verify_chain

    progress = progress or _noop
    vdir = root / "verify"
    inputs = read_npz(vdir / "inputs.npz")
    reference = list(read_npz(vdir / "reference.npz").values())
    samples = read_npz(vdir / "samples.npz") if (vdir / "samples.npz").exists() else None
    samples_ref = list(read_npz(vdir / "samples_reference.npz").values()) if samples else None
    labels = samples.pop("labels", None) if samples else None
    truth = {key: samples.pop(key) for key in GROUND_TRUTH if key in samples} if samples else {}
    x_samples = next(iter(samples.values())) if samples else None
    fix = "the recorded inputs and outputs cannot verify anything: rerun deploy convert"
    check_finite(inputs, "verify/inputs.npz: array", fix)
    check_finite({f"output{i}": o for i, o in enumerate(reference)}, "verify/reference.npz: output", fix)
    if samples:
        check_finite(samples, "verify/samples.npz: array", fix)
        check_finite({f"output{i}": o for i, o in enumerate(samples_ref)}, "verify/samples_reference.npz: output",
                     fix)

    not_run = {s.name: why for s in stages[1:] if not s.export.error and (why := not_run_here(s))}
    training, rest = stages[0], [s for s in stages[1:]
                                 if not s.export.error and not ends_in_nms(s) and s.name not in not_run]
    results = {s.name: VerificationRecord() for s in rest}
    runners, failed_open = {}, {}
    for s in rest:
        try:
            runners[s.name] = open_stage(s, root, trust_pickle=trust_pickle).activate()
        except Exception as e:  # a corrupt or missing file is this stage's failure, not the run's
            failed_open[s.name] = e
    outs_samples: dict[str, list[np.ndarray]] = {}
    outs_seeded: dict[str, list[np.ndarray]] = {}

    def call(s: StageRecord, on_samples: bool):
        def run(feed):
            if s.name in failed_open:
                raise failed_open[s.name]
            start = time.perf_counter()
            if on_samples:
                outs = run_batched(runners[s.name], x_samples, batch_of(s, len(x_samples)))
                outs_samples[s.name] = outs
            else:
                progress(f"verifying {s.name} ({s.path})")
                outs = list(runners[s.name].infer(list(feed.values())).values())
                outs_seeded[s.name] = outs
            r = results[s.name]
            r.seconds = (r.seconds or 0.0) + time.perf_counter() - start
            return outs
        return run

    def tol(s: StageRecord):
        precision = s.precision
        if precision == "int8":  # measured, not judged elementwise: the guard decides
            from runtimes import Tolerance

            return Tolerance(rtol=math.inf, atol=0.0)
        if getattr(runners.get(s.name), "effective_precision", None) == "bf16" and rtol is None:
            precision = "bf16"
            results[s.name].notes.append("OpenVINO ran the f16 hint in bf16 on this CPU (no native fp16); bf16 "
                                         "tolerance used")
        found, note = _tolerance(precision, rtol, atol, noise)
        if note:
            results[s.name].notes.append(note)
        return found

    by_name = {s.name: s for s in stages}
    included = {training.name} | {s.name for s in rest}

    def parent(s: StageRecord) -> str:  # the nearest ancestor that is verified too
        p = s.parent
        while p is not None and p not in included:
            p = by_name[p].parent if p in by_name else None
        return p or training.name

    try:
        tolerances = {s.name: tol(s) for s in rest}
        chain = [Stage(training.name, lambda feed: reference)] + [
            Stage(s.name, call(s, False), parent(s), s.precision, tolerances[s.name]) for s in rest]
        seeded = verify_chain(chain, inputs)
        on_samples = None
        if samples is not None:
            chain = [Stage(training.name, lambda feed: samples_ref)] + [
                Stage(s.name, call(s, True), parent(s), s.precision, tolerances[s.name]) for s in rest]
            on_samples = verify_chain(chain, {"input0": x_samples})
    finally:
        for r in runners.values():
            r.deactivate()
    if outputs is not None:
        outputs.update({(name, "seeded"): outs for name, outs in outs_seeded.items()})
        outputs.update({(name, "samples"): outs for name, outs in outs_samples.items()})

    task = task_of(samples_ref, labels=labels) if samples_ref is not None and labels is not None else None
    labelled = task if isinstance(task, Classification) else None  # a classifier with labels: accuracy too
    results[training.name] = VerificationRecord(passed=True, reason="reference")
    for name, why in not_run.items():
        results[name] = VerificationRecord(reason=f"written, not run: {why}", not_run=why)
    if labelled is not None:
        m = labelled.measure(samples_ref, samples_ref)
        results[training.name].accuracy, results[training.name].agreement = m.get("accuracy"), m.get("agreement")
    for s in rest:
        v, res, reasons = results[s.name], seeded[s.name], []
        v.checks = {"seeded": res.to_dict()}
        v.blame = res.blame
        if res.error:
            reasons.append(res.error)
        elif res.vs_reference is not None:
            vr = res.vs_reference
            v.max_abs, v.max_rel = vr.max_abs, vr.max_rel
            cosines = [o.cosine for o in vr.outputs]
            v.cosine = float("nan") if any(math.isnan(c) for c in cosines) else min(cosines, default=None)
            v.parent_max_rel = res.vs_parent.max_rel if res.vs_parent else None
            if not vr.passed:
                reasons.append(f"seeded inputs: {vr.summary()}")
        ok = res.passed
        if on_samples is not None and not res.error:
            sres = on_samples[s.name]
            v.checks["samples"] = sres.to_dict()
            if sres.error:
                reasons.append(f"samples: {sres.error}")
            elif sres.vs_reference is not None:
                v.samples_max_rel = sres.vs_reference.max_rel
                if not sres.vs_reference.passed:
                    reasons.append(f"samples: {sres.vs_reference.summary()}")
            ok = ok and sres.passed
            if labelled is not None and s.name in outs_samples:
                m = labelled.measure(outs_samples[s.name], samples_ref)
                if "accuracy" in m:
                    v.accuracy, v.agreement = m["accuracy"], m["agreement"]
                    if s.precision == "fp32" and v.agreement < 1.0:
                        ok = False
                        reasons.append(f"fp32 predictions differ from the training model on "
                                       f"{round((1 - v.agreement) * len(labels))} of {len(labels)} samples")
        if s.precision == "int8" and not res.error and (s.name in outs_samples or s.name in outs_seeded):
            held_out = s.name in outs_samples
            bound = Guard.from_dict(guard)
            verdict = judge(outs_samples[s.name] if held_out else outs_seeded[s.name],
                            samples_ref if held_out else reference, labels if held_out else None, bound,
                            truth if held_out else None)
            v.int8 = {**verdict.metrics, "on": "samples" if held_out else "seeded input", "passed": verdict.passed}
            v.sqnr_db, v.agreement = verdict.metrics["sqnr_db"], verdict.metrics.get("agreement", v.agreement)
            ok = ok and verdict.passed
            if not verdict.passed:
                reasons.append(f"INT8 accuracy guard: {verdict.reason}")
        v.passed, v.reason = ok and not reasons, "; ".join(reasons)
        log.info("stage %s: %s", s.name, "pass" if v.passed else f"FAIL: {v.reason}")
    return results
