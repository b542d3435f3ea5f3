"""Detection post-processing and metrics on numpy arrays, for any runtime's outputs.

- :func:`coco_map`: COCO mAP@0.5 and mAP@0.5:0.95 of per-image detections against padded ground-truth
  arrays, computed by pycocotools (``pip install pycocotools``; imported when called). The ground truth
  and the detections are built in memory as ``COCO`` objects (no json files); images are numbered from
  1, annotations from 1 (COCOeval treats a matched annotation id 0 as "unmatched"), categories are the
  class index + 1. COCO's rules apply: 101-point interpolated precision, at most 100 detections per image
  (the highest scores), and a class without ground truth in the whole set is left out of the mean, so
  detections of such a class cost nothing.

Boxes are xyxy in pixels everywhere; pycocotools' xywh is an internal detail.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .core import MissingDependency
from .core import as_numpy

__all__ = ["coco_map"]


# ------------------------------------------------------------------------------------------ metrics

def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise MissingDependency("Python package 'pycocotools' (needed for the COCO mAP of detections) is not "
                                "installed; install it with pip install pycocotools.") from e
    return COCO, COCOeval


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), axis=1)


def coco_map(detections: Sequence[tuple], gt_boxes: np.ndarray, gt_classes: np.ndarray) -> dict[str, float]:
    """COCO mAP of ``detections`` against the ground truth: ``{"map50": AP@0.5, "map50_95": AP@[0.5:0.95]}``.

    ``detections`` holds one ``(boxes (k, 4) xyxy, scores (k,), classes (k,))`` per image (numpy arrays or
    CPU tensors; ``k`` may be 0). ``gt_boxes`` ``(N, K, 4)`` xyxy and ``gt_classes`` ``(N, K)`` integer class
    indices, padded with class -1 (those rows are ignored).
    """
    COCO, COCOeval = _pycocotools()
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64)
    gt_classes = np.asarray(gt_classes)
    if gt_boxes.ndim != 3 or gt_boxes.shape[2] != 4 or gt_classes.shape != gt_boxes.shape[:2]:
        raise ValueError(f"gt_boxes must be (N, K, 4) and gt_classes (N, K); got {gt_boxes.shape} and "
                         f"{gt_classes.shape}")
    if len(detections) != len(gt_boxes):
        raise ValueError(f"detections holds {len(detections)} images but the ground truth {len(gt_boxes)}; pass one "
                         "(boxes, scores, classes) per image, empty arrays where nothing was detected")
    keep = gt_classes >= 0
    if not keep.any():
        raise ValueError("the ground truth holds no boxes (every class is -1); mAP is undefined")

    images = [{"id": i + 1} for i in range(len(gt_boxes))]
    gt_anns, dt_anns, categories = [], [], set(int(c) for c in gt_classes[keep])
    for i in range(len(gt_boxes)):
        for box, cls in zip(_xywh(gt_boxes[i][keep[i]]), gt_classes[i][keep[i]]):
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": int(cls) + 1,
                            "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0})
    for i, (boxes, scores, classes) in enumerate(detections):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores, classes = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(classes).reshape(-1)
        if not len(boxes) == len(scores) == len(classes):
            raise ValueError(f"image {i}: {len(boxes)} boxes, {len(scores)} scores and {len(classes)} classes; "
                             "each detection needs one of each")
        categories.update(int(c) for c in classes)
        for box, score, cls in zip(_xywh(boxes), scores, classes):
            dt_anns.append({"id": len(dt_anns) + 1, "image_id": i + 1, "category_id": int(cls) + 1,
                            "bbox": box.tolist(), "area": float(box[2] * box[3]), "score": float(score),
                            "iscrowd": 0})
    cats = [{"id": c + 1, "name": str(c)} for c in sorted(categories)]

    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": cats}
        dt.dataset = {"images": images, "annotations": dt_anns, "categories": cats}
        gt.createIndex()
        dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats[0]: AP@[.5:.95], stats[1]: AP@.5, both over all areas with 100 detections; -1 means "no data",
    # which cannot happen with ground truth present, but keep it out of a caller's arithmetic.
    stats = [max(float(s), 0.0) for s in evaluator.stats[:2]]
    return {"map50": stats[1], "map50_95": stats[0]}


# ------------------------------------------------------------------------------ NMS on the host and matching
#
# nms: the host twin of the NMS tail that exporters.nms.add_nms appends to an ONNX detector: the same outputs
# (num_dets, boxes, scores, classes, zero-padded) and the same decisions, float32 operation for float32
# operation. It post-processes runtimes whose artifact ends before NMS and is the reference that
# verification compares an artifact's NMS against. match_detections compares two such outputs detection
# by detection and says which differences a decision within tolerance of a threshold explains.
#
# Semantics of nms (those of exporters/nms.py, whose docstring lists the ONNX ops):
#   boxes x1y1 = cxcy - wh * 0.5, x2y2 = cxcy + wh * 0.5; score(i, c) = obj_i * p_ic (float32);
#   multi-label: every (box, class) pair with score > conf is a candidate of its class; agnostic: one
#   candidate per box, score max_c, class the first argmax, a single group;
#   per image and group, greedy in descending score (ties: lower box index): a candidate is dropped when
#   its IoU with a kept box is > iou (IoU in float32 the way ONNX Runtime's NonMaxSuppression computes it);
#   at most max_det kept per group; an image's kept pairs ranked by descending score, ties by the lower
#   flat index c * N + i (TopK's order); the first max_det are written, the rest of each row is zero.

__all__ += ["nms", "check_nms_thresholds", "match_detections", "MatchReport", "IOU_TOL"]

IOU_TOL = 1e-3  # an IoU this close to the threshold may fall either side of it in another runtime


def check_nms_thresholds(conf: float, iou: float, max_det: int) -> None:
    """``ValueError`` unless conf and iou are in [0, 1] and max_det is an integer >= 1."""
    for name, value in (("conf", conf), ("iou", iou)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"NMS {name} must be a number in [0, 1], got {value!r}.")
    if isinstance(max_det, bool) or not isinstance(max_det, (int, np.integer)) or max_det < 1:
        raise ValueError(f"NMS max_det must be an integer >= 1, got {max_det!r}.")


def _suppresses(box: np.ndarray, others: np.ndarray, iou: np.float32) -> np.ndarray:
    """Whether kept ``box`` (4,) suppresses each of ``others`` (K, 4): ONNX Runtime's ``SuppressByIOU`` in
    float32 (coordinates ordered per axis; no positive intersection or area: no suppression)."""
    lo = np.minimum(box[:2], box[2:]), np.minimum(others[:, :2], others[:, 2:])
    hi = np.maximum(box[:2], box[2:]), np.maximum(others[:, :2], others[:, 2:])
    inter_lo = np.maximum(lo[0], lo[1])
    inter_hi = np.minimum(hi[0], hi[1])
    overlap = np.all(inter_hi > inter_lo, axis=1)
    side = inter_hi - inter_lo
    inter = side[:, 0] * side[:, 1]
    area1 = (hi[0][0] - lo[0][0]) * (hi[0][1] - lo[0][1])
    area2 = (hi[1][:, 0] - lo[1][:, 0]) * (hi[1][:, 1] - lo[1][:, 1])
    union = area1 + area2 - inter
    ok = overlap & (inter > 0) & (area1 > 0) & (area2 > 0) & (union > 0)
    return ok & (inter / np.where(ok, union, np.float32(1)) > iou)


def _greedy(boxes: np.ndarray, scores: np.ndarray, conf: np.float32, iou: np.float32, limit: int) -> np.ndarray:
    """Indices kept by greedy NMS of one group, in the order kept (descending score)."""
    candidates = np.flatnonzero(scores > conf)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    alive = np.ones(len(order), dtype=bool)
    kept = []
    for k in range(len(order)):
        if not alive[k]:
            continue
        kept.append(order[k])
        if len(kept) == limit:
            break
        rest = k + 1 + np.flatnonzero(alive[k + 1:])
        alive[rest[_suppresses(boxes[order[k]], boxes[order[rest]], iou)]] = False
    return np.asarray(kept, dtype=np.int64)


def nms(pred, conf: float = 0.25, iou: float = 0.45, max_det: int = 300,
        agnostic: bool = False) -> dict[str, np.ndarray]:
    """Decode + NMS of a YOLO-style prediction ``pred`` (B, N, 5 + nc): cx, cy, w, h, objectness, class
    probabilities (numpy array or tensor). Returns ``num_dets`` (B, 1) int32, ``boxes`` (B, max_det, 4)
    float32 xyxy, ``scores`` (B, max_det) float32, ``classes`` (B, max_det) int32, zero past ``num_dets``,
    by descending score. Semantics: the comment above (those of ``exporters.nms.add_nms``)."""
    check_nms_thresholds(conf, iou, max_det)
    pred = np.asarray(as_numpy(pred), dtype=np.float32)
    if pred.ndim != 3 or pred.shape[2] < 6:
        raise ValueError(f"nms expects a (batch, boxes, 5 + classes) prediction with at least one class, "
                         f"got shape {pred.shape}.")
    n_img, n_box = pred.shape[:2]
    half = pred[..., 2:4] * np.float32(0.5)
    boxes = np.concatenate([pred[..., 0:2] - half, pred[..., 0:2] + half], axis=-1)
    scores = pred[..., 4:5] * pred[..., 5:]
    best = None
    if agnostic:
        best = scores.argmax(axis=-1)
        scores = scores.max(axis=-1, keepdims=True)
    conf32, iou32 = np.float32(conf), np.float32(iou)
    out = {"num_dets": np.zeros((n_img, 1), np.int32), "boxes": np.zeros((n_img, max_det, 4), np.float32),
           "scores": np.zeros((n_img, max_det), np.float32), "classes": np.zeros((n_img, max_det), np.int32)}
    for b in range(n_img):
        cells, cell_scores = [], []
        for c in range(scores.shape[2]):
            kept = _greedy(boxes[b], scores[b, :, c], conf32, iou32, max_det)
            cells.append(c * n_box + kept)
            cell_scores.append(scores[b, kept, c])
        cells, cell_scores = np.concatenate(cells), np.concatenate(cell_scores)
        rank = np.lexsort((cells, -cell_scores))[:max_det]
        cells, n = cells[rank], len(rank)
        box_idx = cells % n_box
        out["num_dets"][b, 0] = n
        out["boxes"][b, :n] = boxes[b, box_idx]
        out["scores"][b, :n] = cell_scores[rank]
        out["classes"][b, :n] = best[b, box_idx] if agnostic else cells // n_box
    return out


@dataclass
class MatchReport:
    """Detections of ``got`` matched against ``ref``. ``counts``: (ref, got) detections per image; ``missing``:
    in ref and not got; ``extra``: in got and not ref; ``borderline``: how many of those are explained by a
    decision within tolerance of a threshold (``passed`` when all are); ``worst_iou`` / ``worst_score_diff``
    over matched pairs (1.0 / 0.0 when none matched); ``unexplained``: the first few unexplained ones, in words."""

    passed: bool
    counts: list[tuple[int, int]]
    matched: int
    missing: int
    extra: int
    borderline: int
    worst_iou: float
    worst_score_diff: float
    unexplained: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ref, got = sum(c[0] for c in self.counts), sum(c[1] for c in self.counts)
        text = (f"{'passed' if self.passed else 'FAILED'}: {len(self.counts)} image(s), {ref} reference / {got} "
                f"detections, {self.matched} matched (worst IoU {self.worst_iou:.6f}, worst score diff "
                f"{self.worst_score_diff:.2e}), {self.missing} missing, {self.extra} extra, "
                f"{self.borderline} borderline")
        return text + (f"; unexplained: {self.unexplained[0]}" if self.unexplained else "")


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain IoU (float64) of xyxy boxes ``a`` (n, 4) against ``b`` (m, 4)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]

    def area(x):
        return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)

    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _image(d: dict, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(np.asarray(d["num_dets"])[b].reshape(-1)[0])
    return (np.asarray(d["boxes"])[b, :n], np.asarray(d["scores"], dtype=np.float64)[b, :n],
            np.asarray(d["classes"])[b, :n])


def match_detections(ref: dict, got: dict, *, conf: float, iou: float, max_det: int, iou_min: float = 0.99,
                     score_atol: float = 1e-3, agnostic: bool = False, iou_tol: float = IOU_TOL,
                     candidates=None) -> MatchReport:
    """Match the NMS outputs ``got`` against ``ref`` (both as :func:`nms` returns them), image by image.

    Matching: per image and class, reference detections in descending score each take the unmatched
    ``got`` detection of the same class with the highest IoU among those with IoU >= ``iou_min`` and
    |score difference| <= ``score_atol``. An unmatched detection d (present on side X, absent on Y) is
    *borderline* when a decision about it was within tolerance of a threshold:

    1. conf: |score - conf| <= score_atol;
    2. max_det: a full side (max_det detections) whose last score is within score_atol of d's;
    3. iou: a detection of d's group (its class; every class when ``agnostic``) on either side with a
       score >= d's - score_atol whose IoU with d is within ``iou_tol`` of ``iou``;

    and, by cascade (repeated until nothing changes; a box kept on one side only changes what that side
    suppresses and what fits in max_det):

    4. a borderline unmatched detection e on Y of d's group with score >= d's - score_atol and IoU with
       d > iou - iou_tol (e suppressed d on Y; or e, absent from X, did not suppress d there);
    5. Y is full, d's score <= Y's last score + score_atol, and Y holds at least as many borderline
       unmatched detections as X has detections explained only this way (they took d's slot).

    ``passed`` when every unmatched detection is borderline. Not explained from the outputs alone: two
    overlapping boxes of a class whose scores are so close that the runtimes rank them in opposite orders
    (each keeps one and suppresses the other) look like a box that moved. ``candidates``, the reference's
    pre-NMS predictions (``(B, N, 5 + nc)``, as :func:`nms` takes them), settle it:

    6. order tie: d is one of the reference's candidates (same class, IoU >= ``iou_min``, score within
       ``score_atol``), and another candidate of its group that scores within ``score_atol`` of it and
       overlaps it with IoU > ``iou - iou_tol`` is an unmatched detection of the other side: each side
       kept one of two boxes that suppress each other, and which one is a coin toss at this tolerance.
       A box that moved is no reference candidate, nor the partner of one, so this never excuses it.
    """
    check_nms_thresholds(conf, iou, max_det)
    n_img = np.asarray(ref["num_dets"]).shape[0]
    if np.asarray(got["num_dets"]).shape[0] != n_img:
        raise ValueError(f"match_detections: ref has {n_img} image(s) but got has "
                         f"{np.asarray(got['num_dets']).shape[0]}.")
    counts, matched, missing, extra, borderline = [], 0, 0, 0, 0
    worst_iou, worst_diff, unexplained = 1.0, 0.0, []
    pool = _candidates(candidates, agnostic) if candidates is not None else None
    for b in range(n_img):
        sides = (_image(ref, b), _image(got, b))
        counts.append((len(sides[0][1]), len(sides[1][1])))
        cross = _iou_matrix(sides[0][0], sides[1][0])
        pairs = _match(sides, cross, iou_min, score_atol)
        for r, g in pairs:
            worst_iou = min(worst_iou, float(cross[r, g]))
            worst_diff = max(worst_diff, abs(float(sides[0][1][r] - sides[1][1][g])))
        unmatched = [np.setdiff1d(np.arange(len(sides[s][1])), [p[s] for p in pairs]) for s in (0, 1)]
        explained = _borderline(sides, unmatched, conf=conf, iou=iou, max_det=max_det, score_atol=score_atol,
                                iou_tol=iou_tol, agnostic=agnostic, iou_min=iou_min,
                                pool=None if pool is None else (pool[0][b], pool[1][b]))
        matched += len(pairs)
        missing, extra = missing + len(unmatched[0]), extra + len(unmatched[1])
        borderline += sum(len(e) for e in explained)
        for s, label in ((0, "missing"), (1, "extra")):
            for k in unmatched[s]:
                if k not in explained[s] and len(unexplained) < 5:
                    box, score, cls = sides[s][0][k], sides[s][1][k], sides[s][2][k]
                    unexplained.append(f"image {b} {label} class {int(cls)} score {score:.6f} box "
                                       f"[{', '.join(f'{v:.2f}' for v in box)}]")
    return MatchReport(passed=missing + extra == borderline, counts=counts, matched=matched, missing=missing,
                       extra=extra, borderline=borderline, worst_iou=worst_iou, worst_score_diff=worst_diff,
                       unexplained=unexplained)


def _match(sides, cross: np.ndarray, iou_min: float, score_atol: float) -> list[tuple[int, int]]:
    (_, r_scores, r_cls), (_, g_scores, g_cls) = sides
    taken = np.zeros(len(g_scores), dtype=bool)
    pairs = []
    for r in np.argsort(-r_scores, kind="stable"):
        ok = (~taken & (g_cls == r_cls[r]) & (cross[r] >= iou_min)
              & (np.abs(g_scores - r_scores[r]) <= score_atol))
        if ok.any():
            g = int(np.flatnonzero(ok)[np.argmax(cross[r, ok])])
            taken[g] = True
            pairs.append((int(r), g))
    return pairs


def _candidates(pred, agnostic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (B, N, 4) xyxy and per-group scores (B, N, G) of pre-NMS predictions, as :func:`nms` forms them."""
    pred = np.asarray(as_numpy(pred), dtype=np.float32)
    xy, wh = pred[..., 0:2], pred[..., 2:4]
    boxes = np.concatenate([xy - wh * np.float32(0.5), xy + wh * np.float32(0.5)], -1)
    scores = pred[..., 4:5] * pred[..., 5:]
    return boxes, (scores.max(-1, keepdims=True) if agnostic else scores)


def _order_tie(box, score, cls, others, pool, *, iou, iou_min, score_atol, iou_tol) -> bool:
    """Rule 6 of match_detections for one detection, against one image's candidates ``pool``: ``others`` are the
    boxes of the other side's unmatched detections of its group, one of which must be the tie partner."""
    boxes, scores = pool
    column = scores[:, 0 if scores.shape[1] == 1 else int(cls)]
    close = np.flatnonzero(np.abs(column - score) <= score_atol)
    if len(close) < 2 or not len(others):
        return False
    itself = close[_iou_matrix(box[None], boxes[close])[0] >= iou_min]
    if not len(itself):
        return False
    partners = np.setdiff1d(close, itself[:1])
    partners = partners[_iou_matrix(boxes[itself[:1]], boxes[partners])[0] > iou - iou_tol]
    return bool(len(partners)) and bool(np.any(_iou_matrix(boxes[partners], others) >= iou_min))


def _borderline(sides, unmatched, *, conf, iou, max_det, score_atol, iou_tol, agnostic, iou_min=0.99,
                pool=None) -> list[set[int]]:
    """The unmatched detections of each side (0: ref, 1: got) explained by rules 1-6 of match_detections."""
    ious = [[_iou_matrix(sides[x][0], sides[y][0]) for y in (0, 1)] for x in (0, 1)]

    def group(x, y):  # (len x, len y): same class, or all True when agnostic
        cx, cy = sides[x][2], sides[y][2]
        return np.ones((len(cx), len(cy)), bool) if agnostic else cx[:, None] == cy[None, :]

    same = [[group(x, y) for y in (0, 1)] for x in (0, 1)]
    full = [len(s[1]) >= max_det for s in sides]
    last = [s[1][-1] if len(s[1]) else np.inf for s in sides]
    explained = [set(), set()]
    for x in (0, 1):
        scores = sides[x][1]
        for d in unmatched[x]:
            s = scores[d]
            near_cap = any(full[z] and abs(s - last[z]) <= score_atol for z in (0, 1))
            near_iou = any(np.any(same[x][z][d] & (sides[z][1] >= s - score_atol)
                                  & (np.abs(ious[x][z][d] - iou) <= iou_tol)
                                  & ~((z == x) & (np.arange(len(sides[z][1])) == d))) for z in (0, 1))
            if pool is not None:
                y = 1 - x
                kin = [k for k in unmatched[y] if agnostic or sides[y][2][k] == sides[x][2][d]]
                tie = _order_tie(sides[x][0][d], s, sides[x][2][d], sides[y][0][kin].reshape(-1, 4), pool, iou=iou,
                                 iou_min=iou_min, score_atol=score_atol, iou_tol=iou_tol)
            else:
                tie = False
            if abs(s - conf) <= score_atol or near_cap or near_iou or tie:
                explained[x].add(int(d))
    changed = True
    while changed:  # the cascade rules 4 and 5, until nothing changes
        changed = False
        for x in (0, 1):
            y, scores = 1 - x, sides[x][1]
            e = np.asarray(sorted(explained[y]), dtype=np.int64)
            pushed = []
            for d in unmatched[x]:
                if d in explained[x]:
                    continue
                s = scores[d]
                if len(e) and np.any(same[x][y][d, e] & (sides[y][1][e] >= s - score_atol)
                                     & (ious[x][y][d, e] > iou - iou_tol)):
                    explained[x].add(int(d))
                    changed = True
                elif full[y] and s <= last[y] + score_atol:
                    pushed.append(int(d))
            if pushed and len(pushed) <= len(explained[y]):
                explained[x].update(pushed)
                changed = True
    return explained
