"""The task a model solves, which decides how a stage's outputs are scored and what the stage is judged by.

- :class:`Tensors`: any outputs. Measured by SQNR (dB) and max relative error against the training model;
  an INT8 stage is judged by SQNR.
- :class:`Classification`: a first output of ``(N, classes)`` scores. Top-1 agreement with the training
  model, and with labels the accuracy and its drop in points; an INT8 stage is judged by the drop (with
  labels) and the agreement (without, or when asked).
- :class:`Detection`: a YOLO-style raw head with ground-truth boxes. mAP@0.5 after the host NMS
  (pycocotools), and its drop in points; an INT8 stage is judged by the drop.

:func:`task_of` picks the task from the training model's outputs and what the samples carry.
Verification, the INT8 guard and detection ask the task; this module imports none of them. A new task
(segmentation, say) is one more class here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .record import StageRecord

__all__ = ["Guard", "GuardResult", "sqnr", "Task", "Tensors", "Classification", "Detection", "task_of", "judge",
           "ends_in_nms", "host_nms", "per_image", "map50", "DETECTIONS", "UNLABELLED_AGREEMENT",
           "DEFAULT_MIN_SQNR"]

UNLABELLED_AGREEMENT = 0.9  # top-1 agreement required without labels (and without --min-agreement)
DEFAULT_MIN_SQNR = 20.0  # dB, for outputs that are not class scores, without labels
DETECTIONS = ("num_dets", "boxes", "scores", "classes")  # the outputs of a stage that ends in NMS


@dataclass
class Guard:
    """The accuracy bound of every INT8 stage (see ``deploy.int8``)."""

    max_drop: float = 1.0  # accuracy (or mAP@0.5) points, with labels (or ground truth)
    min_agreement: float | None = None  # top-1 agreement with the fp32 model, 0..1
    min_sqnr: float | None = None  # dB; default DEFAULT_MIN_SQNR where neither accuracy nor agreement applies
    nms: dict | None = None  # a detector with ground truth: judged by mAP@0.5 at these NMS settings (NmsOptions)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Guard:
        return cls(**{k: v for k, v in (d or {}).items() if k in ("max_drop", "min_agreement", "min_sqnr", "nms")})


@dataclass
class GuardResult:
    passed: bool
    reason: str
    metrics: dict = field(default_factory=dict)


def sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    from runtimes.int8 import sqnr_db

    return sqnr_db(ref, test)


# ------------------------------------------------------------------------------------------------ tasks

@dataclass
class Tensors:
    """Outputs compared as tensors: SQNR and max relative error against the training model's."""

    name = "tensors"

    def measure(self, outs: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict:
        """The stage's numbers against the training model's outputs ``ref``."""
        return {"sqnr_db": min(sqnr(r, o) for r, o in zip(ref, outs)),
                "max_rel": max(float(np.max(np.abs(r - o)) / max(float(np.max(np.abs(r))), 1e-30))
                               for r, o in zip(ref, outs))}

    def failures(self, m: dict, guard: Guard) -> list[str]:
        """Why the numbers ``m`` break this task's bounds (empty when they hold)."""
        return []

    def judged_by(self, m: dict, guard: Guard) -> list[str]:
        """The measures this task's bounds hold a stage to (SQNR is added by :meth:`judge` where it applies)."""
        return []

    def judge(self, outs: Sequence[np.ndarray], ref: Sequence[np.ndarray], guard: Guard) -> GuardResult:
        """An INT8 stage's verdict: this task's bounds, and SQNR where asked or where the task has none."""
        m = self.measure(outs, ref)
        reasons = self.failures(m, guard)
        judged = self.judged_by(m, guard)
        if guard.min_sqnr is not None or not judged:
            need = guard.min_sqnr if guard.min_sqnr is not None else DEFAULT_MIN_SQNR
            judged = [*judged, "SQNR"]
            if m["sqnr_db"] < need:
                reasons.append(f"output SQNR {m['sqnr_db']:.1f} dB < {need:g} dB")
        m["judged_by"] = judged
        return GuardResult(not reasons, "; ".join(reasons), m)


@dataclass
class Classification(Tensors):
    """A first output of ``(N, classes)`` scores, with the samples' ``labels`` when they have them."""

    labels: np.ndarray | None = None
    name = "classification"

    def measure(self, outs, ref) -> dict:
        m = super().measure(outs, ref)
        if outs[0].shape != ref[0].shape:  # not comparable as scores: SQNR alone
            return m
        pred, ref_pred = outs[0].argmax(1), ref[0].argmax(1)
        m["agreement"] = float(np.mean(pred == ref_pred))
        # a random-weight network may give one class for every input: then agreement says little, SQNR more
        m["reference_classes"] = int(len(np.unique(ref_pred)))
        if self.labels is not None:
            m["accuracy"], m["reference_accuracy"] = float(np.mean(pred == self.labels)), float(
                np.mean(ref_pred == self.labels))
            m["drop"] = 100.0 * (m["reference_accuracy"] - m["accuracy"])
        return m

    def _agreement_needed(self, guard: Guard) -> float | None:
        return guard.min_agreement if guard.min_agreement is not None else (
            UNLABELLED_AGREEMENT if self.labels is None else None)

    def judged_by(self, m: dict, guard: Guard) -> list[str]:
        if "agreement" not in m:
            return []
        return ((["accuracy drop"] if "drop" in m else [])
                + (["agreement"] if self._agreement_needed(guard) is not None else []))

    def failures(self, m: dict, guard: Guard) -> list[str]:
        out = []
        if "drop" in m and m["drop"] > guard.max_drop + 1e-9:
            out.append(f"accuracy {100 * m['accuracy']:.2f}% is {m['drop']:.2f} points below the fp32 model's "
                       f"{100 * m['reference_accuracy']:.2f}% (--max-drop {guard.max_drop:g})")
        need = self._agreement_needed(guard)
        if "agreement" in m and need is not None and m["agreement"] < need - 1e-12:
            why = " (--min-agreement)" if guard.min_agreement is not None else \
                " (the default without labels; set --min-agreement)"
            out.append(f"top-1 agreement with the fp32 model {100 * m['agreement']:.2f}% < {100 * need:.2f}%{why}")
        return out


@dataclass
class Detection(Tensors):
    """A YOLO-style raw head (output 0: ``(N, anchors, 5 + classes)``) with the samples' ground-truth boxes
    (``gt_boxes``, ``gt_classes``), scored by mAP@0.5 after the host NMS ``nms`` (``NmsOptions`` as a dict)."""

    truth: dict = field(default_factory=dict)
    nms: dict = field(default_factory=dict)
    name = "detection"

    def score(self, outs: Sequence[np.ndarray]) -> float:
        return map50(outs[0], self.truth, self.nms)

    def measure(self, outs, ref) -> dict:
        m = super().measure(outs, ref)
        m["map50"], m["reference_map50"] = self.score(outs), self.score(ref)
        m["drop"] = 100.0 * (m["reference_map50"] - m["map50"])
        return m

    def judged_by(self, m: dict, guard: Guard) -> list[str]:
        return ["mAP@0.5 drop"]

    def failures(self, m: dict, guard: Guard) -> list[str]:
        if m["drop"] > guard.max_drop + 1e-9:
            return [f"mAP@0.5 {m['map50']:.4f} is {m['drop']:.2f} points below the fp32 model's "
                    f"{m['reference_map50']:.4f} (--max-drop {guard.max_drop:g})"]
        return []


Task = Tensors  # every task is a Tensors: it measures at least what a tensor comparison does


def task_of(ref: Sequence[np.ndarray], *, labels: np.ndarray | None = None, truth: dict | None = None,
            nms: dict | None = None) -> Tensors:
    """The task of a model whose outputs on the samples are ``ref``: a detector when the samples carry ground
    truth and the NMS settings are known, a classifier when output 0 is ``(N, classes)``, tensors otherwise."""
    if truth and nms:
        return Detection(truth=truth, nms=nms)
    if ref[0].ndim == 2:
        return Classification(labels=labels)
    return Tensors()


def judge(outs: Sequence[np.ndarray], ref: Sequence[np.ndarray], labels: np.ndarray | None, guard: Guard,
          truth: dict | None = None) -> GuardResult:
    """Judge an INT8 stage's outputs ``outs`` on held-out samples against the training model's ``ref`` by the
    task they belong to (:func:`task_of`, with ``guard.nms`` for a detector with ground ``truth``)."""
    return task_of(ref, labels=labels, truth=truth, nms=guard.nms).judge(outs, ref, guard)


# ------------------------------------------------------------------------------------------- detections

def ends_in_nms(stage: StageRecord) -> bool:
    """Whether ``stage``'s artifact ends in NMS (its outputs are :data:`DETECTIONS`, matched box by box)."""
    art = stage.export.artifact
    return art is not None and "nms" in art.metadata


def host_nms(pred: np.ndarray, nms: dict) -> dict[str, np.ndarray]:
    """A raw head's output ``pred`` after NMS on the host with the settings ``nms`` (``NmsOptions`` as a dict)."""
    from exporters.nms import NmsOptions
    from runtimes.detection import nms as run_nms

    o = NmsOptions(**nms)
    return run_nms(pred, conf=o.conf, iou=o.iou, max_det=o.max_det, agnostic=o.agnostic)


def per_image(dets: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(boxes, scores, classes)`` of each image of padded :data:`DETECTIONS` arrays."""
    n = dets["num_dets"].reshape(-1).astype(int)
    return [(dets["boxes"][i, :k], dets["scores"][i, :k], dets["classes"][i, :k]) for i, k in enumerate(n)]


def map50(pred: np.ndarray, truth: dict[str, np.ndarray], nms: dict) -> float:
    """mAP@0.5 of a detector's output 0 ``pred`` after the host NMS ``nms`` (``NmsOptions`` as a dict)."""
    from runtimes.detection import coco_map

    return coco_map(per_image(host_nms(pred, nms)), truth["gt_boxes"], truth["gt_classes"])["map50"]
