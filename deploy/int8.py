"""``--precision int8``: calibrated INT8 artifacts, the accuracy guard, per-layer blame and fallback.

The steps ``deploy.pipeline.convert`` runs under int8, after the fp32 forms are exported:

1. **Quantize** (:func:`quantize_stages`): every requested target that declares ``quantize`` in its
   record (``exporters.targets.Target``) makes ``<target>-int8`` from its verified fp32 artifact
   with the calibration data (``deploy.calibration``), through the library made for its format.
2. **Guard** (``deploy.tasks``: the task's judgement, asked by ``deploy.verification`` for every int8
   stage): on held-out samples, never the calibration ones, the int8 outputs are compared with the training model's
   (the fp32 stages match it to 1e-5): top-1 agreement, accuracy and its drop when labels exist,
   SQNR (dB) and max relative error per output. The stage passes when the drop is at most
   ``max_drop`` points and (when given) the agreement at least ``min_agreement``. Without labels
   the agreement must reach ``min_agreement`` (default :data:`UNLABELLED_AGREEMENT`); a model
   whose first output is not a ``(N, classes)`` score is judged by SQNR (``min_sqnr``, default
   :data:`DEFAULT_MIN_SQNR` dB).
3. **Blame** (:func:`blame`): every Conv/Gemm/MatMul of the ONNX Runtime QDQ model is compared with
   the fp32 ONNX model at its input and output (``runtimes.int8.layer_errors``): the SQNR at its
   output and the dB it loses itself (input SQNR minus output SQNR), with the merged kernel's
   statistics (per-channel range, max/median ratio, kurtosis). The worst layers lose the most dB.
4. **Fallback** (:func:`fallback`, ``--int8-fallback auto``, the default): a stage that fails the guard, or
   whose measured drop is above half the bound (``--max-drop``: the margin is for the held-out split's
   sampling noise), is quantized again with the 1, 2, 4, ... worst layers kept in float until it passes
   within that aim (at most half the layers are kept); the best form tried is kept, and the report says how
   many layers were kept, the drop, and what it cost in speed.
5. **Equalize** (:func:`choose_equalize`): with the default passes, the exact ``equalize`` pass
   (cross-layer range equalization) is kept when it raises the ONNX Runtime INT8 model's output
   SQNR on the held-out samples; the report gives both numbers.
6. **Float scope** (:func:`decode_scope`, before quantizing): every op after the last convolution or linear
   layer of an output (a detector's decode) stays in float in every INT8 form; the report lists it.
7. **Bias correction** (:func:`choose_bias_correction`, before quantizing): the mean error of each layer's
   int8-rounded weights on the calibration data, subtracted from its bias in the INT8 forms, kept when it
   raises the ONNX Runtime INT8 output SQNR on held-out samples; the report gives both numbers.
8. **Weight rounding** (:func:`choose_weight_rounding`, ``--weight-rounding mse``, before bias correction): each
   output channel's int8 weight grid chosen by an MSE search over clipping ranges, kept under the same rule.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporters import targets as registry
from exporters.int8 import Int8Options
from runtimes.core import first_line

from .report import fallback_note
from .tasks import DEFAULT_MIN_SQNR, UNLABELLED_AGREEMENT, Guard, GuardResult, judge, sqnr

__all__ = ["Guard", "GuardResult", "judge", "quantize_stages", "blame", "fallback", "choose_equalize",
           "choose_weight_rounding", "choose_bias_correction", "quick_latency", "UNLABELLED_AGREEMENT",
           "DEFAULT_MIN_SQNR", "WORST"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

WORST = 5  # layers named in the report and in a failure
DECISION_SAMPLES = 32  # calibration (and held-out) samples the equalize decision quantizes and measures with


# --------------------------------------------------------------------------------------------- quantize

def _int8_path(target, folder: Path) -> Path:
    return folder / f"model.int8{target.suffixes[0]}"


def quantize_stages(made, folder: Path, wanted: Sequence[str], options: Int8Options, module, args,
                    progress: Progress) -> list:
    """One ``<target>-int8`` stage per wanted target that can quantize, made from its fp32 main stage."""
    from .forms import main_stage, quantize_form

    out = []
    for name in wanted:
        target = registry.get(name)
        if target.quantize is None:
            continue
        source = main_stage(made, name)
        out.append(quantize_form(target, source, folder, _int8_path(target, folder), options, module, args,
                                 progress))
    return out


# ------------------------------------------------------------------------------------------- float scope

_WEIGHTED = ("conv", "convolution", "linear", "addmm", "matmul", "mm", "bmm")  # aten ops that carry a layer's weights
_MOVES = ("view", "reshape", "permute", "contiguous", "clone", "flatten", "unsqueeze", "squeeze", "getitem",
          "split_with_sizes", "split", "transpose", "expand", "alias", "_to_copy", "slice", "select")


def decode_scope(module) -> dict[str, str]:
    """The ops of the plain graph ``module`` left in float by rule: every op after the last convolution or
    linear layer of each output (no weighted layer reads its result): a detector's decode (sigmoid, grid and
    anchor arithmetic, the concat of the scales), a softmax over a distribution, a classifier's final
    softmax. ``{node name: op}`` in graph order; only ops computing on a layer's output are in it (not a grid
    built from ``arange``), and not those that only move values (view, permute, getitem)."""
    nodes = [n for n in module.graph.nodes if n.op == "call_function"]
    after_layer: dict = {}
    for node in nodes:
        after_layer[node] = any(_op(i).startswith(_WEIGHTED) or after_layer.get(i, False) for i in node.all_input_nodes)
    feeds_layer: dict = {}
    for node in reversed(nodes):
        feeds_layer[node] = any(_op(u).startswith(_WEIGHTED) or feeds_layer.get(u, False) for u in node.users)
    return {n.name: _op(n) for n in nodes if after_layer[n] and not feeds_layer[n]
            and not _op(n).startswith(_WEIGHTED) and _op(n) not in _MOVES and not _op(n).startswith("_")}


def _op(node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


# ------------------------------------------------------------------------------------------------ blame

def blame(folder: Path, stages, x: np.ndarray, batch: int, progress: Progress) -> list[dict]:
    """Per-layer errors of the ONNX Runtime int8 stage (``onnx-int8``) against its fp32 parent, worst first
    (most dB lost in the layer); empty when there is no such stage."""
    from runtimes.int8 import layer_errors

    by_name = {s.name: s for s in stages}
    q = by_name.get("onnx-int8")
    if q is None or q.export.error or q.export.artifact is None:
        return []
    fp32 = by_name[q.parent].export.artifact_in(folder)
    progress(f"per-layer INT8 errors of the ONNX Runtime QDQ model on {len(x)} held-out samples ...")
    layers = layer_errors(fp32.path, q.export.artifact_in(folder).path, x, batch)
    rows = [layer.to_dict() for layer in layers]
    return sorted(rows, key=lambda r: -_finite(r["lost_db"]))


def _finite(v) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else (-1e9 if v is None or v < 0 else 1e9)


def worst_text(layers: Sequence[dict], n: int = WORST) -> str:
    return ", ".join(f"{r['name']} (loses {r['lost_db']:.1f} dB, output SQNR {r['sqnr_out_db']:.1f} dB)"
                     for r in layers[:n] if r.get("lost_db") is not None)


# --------------------------------------------------------------------------------------------- fallback

def quick_latency(runner, x: np.ndarray, iters: int = 30) -> float:
    """Median ms of ``iters`` calls on one input batch, after 3 warm-up calls: a rough cost, not a benchmark."""
    feed = [np.ascontiguousarray(x)]
    for _ in range(3):
        runner.infer(feed)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.infer(feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _drop(stage) -> float | None:
    """The stage's accuracy (or mAP@0.5) drop in points, when it was measured with labels (or ground truth)."""
    d = (stage.verification.int8 or {}).get("drop")
    return d if isinstance(d, (int, float)) and math.isfinite(d) else None


def needs_fallback(stage, aim: float) -> bool:
    """A verified INT8 stage that fails the guard, or whose measured drop is above ``aim`` points."""
    drop = _drop(stage)
    return not stage.passed or (drop is not None and drop > aim + 1e-9)


def fallback(stage, source, folder: Path, ranking: Sequence[str], options: Int8Options, module, args, reverify,
             progress: Progress, aim: float = 0.0):
    """Quantize ``stage``'s target again from its fp32 ``source`` stage, keeping the 1, 2, 4, ... worst layers
    of ``ranking`` in float (at most half of them), until ``reverify(stage) -> StageRecord`` passes the guard with
    a drop of at most ``aim`` points (or passes, when no drop is measured). The form kept is the best one tried,
    the first stage included: passing, then the smallest drop (the highest SQNR without labels), then the fewest
    layers in float. Returns ``(stage, summary)``: that stage and what was kept, with a rough latency of the full
    and the kept int8 form and of the fp32 form (a mixed form no faster than fp32 is named in the note)."""
    from .forms import quantize_form

    target = registry.get(stage.format)
    limit = max(1, len(ranking) // 2)
    summary = {"stage": stage.name, "passed": stage.passed, "aim_points": aim, "kept_in_float": [],
               "tried": [{"kept": 0, "passed": stage.passed, "drop": _drop(stage), "reason": stage.reason}],
               "latency_ms": {"int8": _latency(stage, folder, args)}}

    def quantize(k):
        opts = Int8Options(**{**options.__dict__, "exclude": tuple(ranking[:k])})
        return quantize_form(target, source, folder, _int8_path(target, folder), opts, module, args, progress)

    def score(k, s):  # lower is better: passing, then the drop (the SQNR without labels), then fewer in float
        drop, db = _drop(s), (s.verification.int8 or {}).get("sqnr_db")
        return not s.passed, drop if drop is not None else -db if isinstance(db, (int, float)) else math.inf, k

    best, current, k = (0, stage), stage, 1
    while k <= limit:
        progress(f"{stage.name}: keeping the {k} most sensitive layer(s) in float ({', '.join(ranking[:k])}) ...")
        candidate = quantize(k)
        if candidate.export.error:
            summary["tried"].append({"kept": k, "error": candidate.export.error})
            current = None  # what the failed export left at the path is not a form tried
            break
        current = reverify(candidate)
        summary["tried"].append({"kept": k, "passed": current.passed, "drop": _drop(current),
                                 "reason": current.reason})
        if score(k, current) < score(*best):
            best = (k, current)
        if not needs_fallback(current, aim):
            break
        k *= 2
    kept, chosen = best
    if chosen is not current:  # the file holds the last form tried: make the best one again
        progress(f"{stage.name}: the best form kept {kept} layer(s) in float; quantizing it again ...")
        chosen = reverify(quantize(kept))
    summary.update(passed=chosen.passed, kept_in_float=list(ranking[:kept]), drop=_drop(chosen))
    summary["latency_ms"].update(int8_fallback=_latency(chosen, folder, args), fp32=_latency(source, folder, args))
    return chosen, summary


def _latency(stage, folder: Path, args) -> float | None:
    from .stages import open_stage

    try:
        with open_stage(stage, folder, bench=True) as runner:  # the runtime's benchmark options: int8 kernels
            return quick_latency(runner, args[0].numpy())
    except Exception as e:  # noqa: BLE001 - a cost estimate must not fail the run
        log.info("could not time %s: %s", stage.name, first_line(e))
        return None


# --------------------------------------------------------------------------------------------- equalize

def choose_equalize(plain, equalized, args, options: Int8Options, x_eval: np.ndarray, reference: Sequence[np.ndarray],
                    progress: Progress) -> dict:
    """Quantize both plain models with ONNX Runtime (the same first :data:`DECISION_SAMPLES` calibration samples)
    and measure their output SQNR against the training model on ``x_eval``; equalize is chosen when it gains more
    than 0.1 dB. Returns ``{"chosen": bool, "sqnr_db": {"default": ..., "equalize": ...}}``."""
    from exporters.onnx import export_onnx
    from exporters.onnx_int8 import quantize_onnx

    from .stages import run_batched

    scores = {}
    options = Int8Options(**{**options.__dict__, "calibration": options.calibration[:DECISION_SAMPLES]})
    with tempfile.TemporaryDirectory(prefix="deploy-equalize-") as tmp:
        for key, module in (("default", plain), ("equalize", equalized)):
            art = export_onnx(module, args, Path(tmp) / f"{key}.onnx", simplify=False)
            q = quantize_onnx(art, Path(tmp) / f"{key}.int8.onnx", options)
            target = registry.get("onnx")
            with target.open(q) as runner:
                outs = run_batched(runner, x_eval, args[0].shape[0])
            scores[key] = min(sqnr(r, o) for r, o in zip(reference, outs))
    chosen = scores["equalize"] > scores["default"] + 0.1
    progress(f"equalize: ONNX Runtime INT8 output SQNR {scores['default']:.2f} dB without, {scores['equalize']:.2f} "
             f"dB with: {'applied' if chosen else 'not applied'}")
    return {"chosen": bool(chosen), "sqnr_db": scores}


def _ort_scores(plain, args, variants: dict[str, Int8Options], reference_model, x: np.ndarray) -> dict[str, float]:
    """The ONNX Runtime INT8 output SQNR (dB, the worst output) against ``reference_model`` on ``x`` of ``plain``
    quantized with each of ``variants`` (``{key: options}``)."""
    import torch

    from exporters.onnx import export_onnx
    from exporters.onnx_int8 import quantize_onnx
    from runtimes.compare import flatten

    from .stages import run_batched

    with torch.no_grad():
        reference = flatten(reference_model(torch.from_numpy(x)))
    scores = {}
    with tempfile.TemporaryDirectory(prefix="deploy-int8-choice-") as tmp:
        art = export_onnx(plain, args, Path(tmp) / "plain.onnx", simplify=False)
        for key, opts in variants.items():
            q = quantize_onnx(art, Path(tmp) / f"{key}.int8.onnx", opts)
            with registry.get("onnx").open(q) as runner:
                outs = run_batched(runner, x, args[0].shape[0])
            scores[key] = min(sqnr(r, o) for r, o in zip(reference, outs))
    return scores


def choose_weight_rounding(plain, args, quant: Plan, reference_model, progress: Progress) -> None:
    """``--weight-rounding mse``: search each layer's weight clipping (``exporters.weight_rounding``) on the plain
    graph and keep it (in ``quant.options``) when it raises the ONNX Runtime INT8 output SQNR on the first
    :data:`DECISION_SAMPLES` held-out samples by more than 0.1 dB; both numbers go to the report."""
    from exporters._torch import recaptured
    from exporters.weight_rounding import mse_clips

    try:
        registry.check_available(registry.get("onnx"), "choosing the weight rounding under int8")
        options = quant.options
        clips = mse_clips(recaptured(plain, args), options.per_channel)
        if not clips:
            quant.weight_rounding = {"method": "mse", "chosen": False,
                                     "reason": "the search clips no channel: nearest rounding is the MSE optimum"}
            return
        scores = _ort_scores(plain, args, {"nearest": options,
                                           "mse": Int8Options(**{**options.__dict__, "weight_clips": clips})},
                             reference_model, quant.evaluation[:DECISION_SAMPLES])
    except Exception as e:  # noqa: BLE001 - an option; the run goes on with nearest rounding
        log.info("weight rounding not measured", exc_info=True)
        quant.weight_rounding = {"method": "mse", "chosen": False, "reason": f"not measured: {first_line(e)}"}
        return
    chosen = scores["mse"] > scores["nearest"] + 0.1
    if chosen:
        quant.options.weight_clips = clips
    quant.weight_rounding = {"method": "mse", "chosen": bool(chosen), "sqnr_db": scores, "layers": len(clips)}
    progress(f"MSE weight rounding ({len(clips)} layers clipped): ONNX Runtime INT8 output SQNR "
             f"{scores['nearest']:.2f} dB nearest, {scores['mse']:.2f} dB MSE: "
             f"{'applied' if chosen else 'not applied'}")


def choose_bias_correction(plain, args, quant: Plan, reference_model, progress: Progress) -> None:
    """Measure the bias corrections of ``plain`` (``exporters.bias_correction``; of the clipped weights when
    :func:`choose_weight_rounding` kept a clipping) on the calibration data and keep them (in ``quant.options``)
    when they raise the ONNX Runtime INT8 output SQNR against ``reference_model`` on the first
    :data:`DECISION_SAMPLES` held-out samples by more than 0.1 dB; both numbers go to the report."""
    import torch

    from exporters._torch import recaptured
    from exporters.bias_correction import corrections

    try:
        registry.check_available(registry.get("onnx"), "choosing bias correction under int8")
        options = quant.options
        batches = (torch.from_numpy(b) for b in options.batches())
        fixes = corrections(recaptured(plain, args), batches, options.per_channel, options.weight_clips)
        if not fixes:
            quant.bias_correction = {"chosen": False, "reason": "no convolution or linear layer with a bias"}
            return
        scores = _ort_scores(plain, args, {"without": options,
                                           "with": Int8Options(**{**options.__dict__, "bias_correction": fixes})},
                             reference_model, quant.evaluation[:DECISION_SAMPLES])
    except Exception as e:  # noqa: BLE001 - an optimization; the run goes on without it
        log.info("bias correction not measured", exc_info=True)
        quant.bias_correction = {"chosen": False, "reason": f"not measured: {first_line(e)}"}
        return
    chosen = scores["with"] > scores["without"] + 0.1
    if chosen:
        quant.options.bias_correction = fixes
    quant.bias_correction = {"chosen": bool(chosen), "sqnr_db": scores, "layers": len(fixes)}
    progress(f"bias correction ({len(fixes)} layers): ONNX Runtime INT8 output SQNR {scores['without']:.2f} dB "
             f"without, {scores['with']:.2f} dB with: {'applied' if chosen else 'not applied'}")


# ------------------------------------------------------------------------------------------ the pipeline

@dataclass
class Plan:
    """What an int8 run decided before the work: calibration, held-out evaluation data, options, bounds; and,
    as it goes, the equalize decision, the per-layer table and the fallbacks (``record()`` -> report.json)."""

    calibration: object  # deploy.calibration.Calibration
    evaluation: np.ndarray
    evaluation_source: str
    options: Int8Options
    guard: Guard
    fallback_mode: str = "off"
    equalize: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    scope: dict = field(default_factory=dict)  # the float scope by rule: {op name: op} (decode_scope)
    bias_correction: dict = field(default_factory=dict)  # choose_bias_correction's decision and numbers
    weight_rounding: dict = field(default_factory=dict)  # choose_weight_rounding's decision and numbers

    def record(self) -> dict:
        o = self.options
        return {"calibration": self.calibration.to_dict(), "evaluation": self.evaluation_source,
                "method": o.method, "per_channel": o.per_channel, "guard": self.guard.to_dict(),
                "fallback": self.fallback_mode, "equalize": self.equalize, "layers": self.layers,
                "fallbacks": self.fallbacks, "float_scope": self.float_scope(),
                "bias_correction": self.bias_correction,
                "weight_rounding": self.weight_rounding or {"method": "nearest"}}

    def float_scope(self) -> list[dict]:
        """Every op kept in float and why: the decode by rule, then the layers a fallback kept (worst first)."""
        rule = [{"name": n, "op": op, "why": "after the last conv/linear layer of its output (decode)"}
                for n, op in self.scope.items()]
        lost = {r["name"]: r.get("lost_db") for r in self.layers if "name" in r}
        kept = dict.fromkeys(n for f in self.fallbacks for n in f.get("kept_in_float", ()))
        return rule + [{"name": n, "op": "layer", "why": f"loses {lost[n]:.1f} dB under INT8 (--int8-fallback auto)"
                        if isinstance(lost.get(n), float) else "kept by --int8-fallback auto"} for n in kept]

    def set_scope(self, module, args) -> None:
        """Keep ``module``'s decode (:func:`decode_scope`) in float in every INT8 form, its ops named as the
        exporters name them (the plain module captured again, as the ONNX, TFLite and ExecuTorch exports do)."""
        from exporters._torch import recaptured

        try:
            self.scope = decode_scope(recaptured(module, args))
        except Exception as e:  # noqa: BLE001 - without a scope every op is the quantizers' to choose, as before
            log.info("no float scope: %s", first_line(e))
            self.scope = {}
        self.options.float_scope = tuple(self.scope)


def plan(opts, loaded, shape, samples, progress: Progress) -> Plan:
    """The int8 plan of a ``ConvertOptions`` run: calibration data (refused before any work when missing or of
    the wrong shape) and held-out evaluation data (the samples, else seeded inputs)."""
    from .calibration import load_calibration, seeded_eval, seeded_eval_count

    calibration = load_calibration(opts.calibration, shape, size=opts.calibration_size, seed=opts.seed,
                                   loaded=loaded, mean=opts.mean, std=opts.std)
    progress(f"INT8 calibration: {calibration.source}")
    if samples is not None:
        evaluation = samples[0]
        source = f"{len(evaluation)} held-out samples" + (" with labels" if samples[1] is not None else "")
    else:
        count = seeded_eval_count(shape)
        evaluation = seeded_eval(shape, count, opts.seed)
        source = (f"{count} seeded standard-normal inputs (seed {opts.seed + 1}, no labels: top-1 agreement and "
                  "SQNR against the fp32 model)")
    options = Int8Options(calibration.x, method=opts.int8_method, per_channel=not opts.per_tensor,
                          batch=(2 if opts.dynamic and shape[0] == 1 else shape[0]))
    guard = Guard(max_drop=opts.max_drop, min_agreement=opts.min_agreement, min_sqnr=opts.min_sqnr)
    return Plan(calibration, evaluation, source, options, guard, opts.int8_fallback)


def maybe_equalize(plain, model, args, quant: Plan, seed: int, progress: Progress):
    """``plain``, or the same passes plus ``equalize`` when that raises the INT8 output SQNR (recorded in
    ``quant.equalize``)."""
    import fusers
    import torch

    from runtimes.compare import flatten

    try:
        registry.check_available(registry.get("onnx"), "choosing equalize under int8")
    except Exception as e:  # noqa: BLE001
        quant.equalize = {"chosen": False, "reason": f"not measured: {first_line(e)}"}
        return plain
    progress("trying the exact equalize pass for INT8 (cross-layer range equalization) ...")
    equalized = fusers.reparameterize(model, args, passes=[*fusers.DEFAULT_PASSES, "equalize"], seed=seed)
    rewrites = equalized.reparam_report.count("equalize")
    if not rewrites:
        quant.equalize = {"chosen": False, "reason": "no conv -> ReLU -> conv pair to rescale"}
        progress("equalize: nothing to rescale")
        return plain
    x = quant.evaluation[:DECISION_SAMPLES]
    with torch.no_grad():
        reference = flatten(model(torch.from_numpy(x)))
    try:
        decision = choose_equalize(plain, equalized, args, quant.options, x, reference, progress)
    except Exception as e:  # noqa: BLE001 - the choice is an optimization; the run goes on without it
        log.info("equalize not measured", exc_info=True)
        quant.equalize = {"chosen": False, "reason": f"not measured: {first_line(e)}"}
        return plain
    quant.equalize = {**decision, "pairs": rewrites}
    return equalized if decision["chosen"] else plain


def guard_stages(quant: Plan, folder: Path, stages: list, module, args, rtol, atol, progress: Progress,
                 rescore: Callable | None = None) -> list:
    """After verification: the per-layer table, the worst layers named in failing int8 stages, and with
    ``--int8-fallback auto`` the failing stages quantized again with their worst layers in float. ``rescore(folder,
    stages, results, outputs)`` adds a detector's metrics to a stage verified again."""
    import dataclasses

    from .verification import verify_stages

    try:
        quant.layers = blame(folder, stages, quant.evaluation[:64], quant.options.batch, progress)
    except Exception as e:  # noqa: BLE001 - the table explains a failure; it must not cause one
        log.info("per-layer errors not measured", exc_info=True)
        quant.layers = [{"error": first_line(e)}]
    ranking = [r["name"] for r in quant.layers if r.get("quantized", True) and "name" in r]
    training = stages[0]
    by_name = {s.name: s for s in stages}

    def reverify(stage):
        outputs: dict = {}
        results = verify_stages(folder, [training, stage], rtol, atol, guard=quant.guard.to_dict(), outputs=outputs)
        if rescore is not None:
            rescore(folder, [training, stage], results, outputs)
        return dataclasses.replace(stage, verification=results[stage.name])

    aim = quant.guard.max_drop / 2
    out = []
    for s in stages:
        if s.precision == "int8" and not s.export.error and needs_fallback(s, aim) and quant.fallback_mode == "auto":
            if ranking:
                s, summary = fallback(s, by_name[s.parent], folder, ranking, quant.options, module, args, reverify,
                                      progress, aim)
                quant.fallbacks.append(summary)
                s.verification.notes.append(fallback_note(summary))
            else:
                s.verification.notes.append("--int8-fallback auto: no per-layer ranking (it is measured on the "
                                            "onnx-int8 stage; add onnx to --targets)")
        if s.precision == "int8" and not s.passed and not s.export.error and quant.layers and ranking:
            s.verification.reason += f"; worst layers: {worst_text(quant.layers)}"
        out.append(s)
    return out
