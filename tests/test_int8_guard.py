"""The INT8 accuracy guard (deploy.int8.judge): accuracy drop, agreement, SQNR, and which bound applies."""

from __future__ import annotations

import numpy as np

from deploy.int8 import DEFAULT_MIN_SQNR, UNLABELLED_AGREEMENT, Guard, judge


def _scores(labels: np.ndarray, classes: int = 10, margin: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((len(labels), classes)).astype(np.float32)
    s[np.arange(len(labels)), labels] += margin
    return s


def test_drop_within_bound_passes_and_beyond_fails():
    labels = np.arange(200) % 10
    ref = _scores(labels)
    test = ref.copy()
    flip = np.arange(3)  # 3 of 200 predictions wrong: 1.5 points
    test[flip, labels[flip]] -= 20
    result = judge([test], [ref], labels, Guard(max_drop=1.0))
    assert not result.passed and "1.50 points" in result.reason
    assert abs(result.metrics["drop"] - 1.5) < 1e-9 and abs(result.metrics["agreement"] - 0.985) < 1e-9
    assert judge([test], [ref], labels, Guard(max_drop=2.0)).passed


def test_min_agreement_applies_with_labels_too():
    labels = np.arange(100) % 10
    ref = _scores(labels)
    test = ref.copy()
    test[np.arange(2), labels[:2]] -= 20
    assert judge([test], [ref], labels, Guard(max_drop=5.0)).passed
    failed = judge([test], [ref], labels, Guard(max_drop=5.0, min_agreement=0.99))
    assert not failed.passed and "agreement" in failed.reason


def test_without_labels_the_default_agreement_decides():
    labels = np.arange(100) % 10
    ref = _scores(labels)
    test = ref.copy()
    wrong = round(100 * (1 - UNLABELLED_AGREEMENT)) + 1
    test[np.arange(wrong), labels[:wrong]] -= 20
    result = judge([test], [ref], None, Guard())
    assert not result.passed and "default without labels" in result.reason
    assert "accuracy" not in result.metrics


def test_sqnr_is_measured_and_judges_outputs_that_are_not_scores():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4, 8, 5, 5)).astype(np.float64)
    noise = rng.standard_normal(ref.shape)
    noise *= np.sqrt(np.sum(ref ** 2) / np.sum(noise ** 2)) * 10 ** (-30 / 20)  # exactly 30 dB
    result = judge([ref + noise], [ref], None, Guard())
    assert abs(result.metrics["sqnr_db"] - 30.0) < 1e-6 and result.passed
    low = judge([ref + noise * 10 ** (15 / 20)], [ref], None, Guard())  # 15 dB < the default 20 dB
    assert not low.passed and f"{DEFAULT_MIN_SQNR:g} dB" in low.reason
    assert judge([ref + noise], [ref], None, Guard(min_sqnr=40)).passed is False


def test_guard_round_trips_through_its_dict():
    g = Guard(max_drop=0.5, min_agreement=0.99, min_sqnr=25)
    assert Guard.from_dict(g.to_dict()) == g


def test_the_stage_table_names_the_measures_that_judged_each_stage():
    """An int8 stage with max rel 0.865 passes on accuracy: the table says so, not "max rel 8.65e-01 ... pass"."""
    from deploy.record import ExportRecord, StageRecord, VerificationRecord
    from deploy.report import stage_table

    labels = np.arange(100) % 10
    ref = _scores(labels)
    labelled, unlabelled = judge([ref], [ref], labels, Guard()), judge([ref], [ref], None, Guard())
    regression = judge([ref[:, :, None]], [ref[:, :, None]], None, Guard())  # not scores: SQNR decides
    assert labelled.metrics["judged_by"] == ["accuracy drop"]
    assert unlabelled.metrics["judged_by"] == ["agreement"]
    assert regression.metrics["judged_by"] == ["SQNR"]
    assert judge([ref], [ref], labels, Guard(min_agreement=0.9, min_sqnr=10)).metrics["judged_by"] == [
        "accuracy drop", "agreement", "SQNR"]

    def stage(name, precision, int8):
        return StageRecord(name, ExportRecord(format="onnx", precision=precision),
                           verification=VerificationRecord(passed=True, max_rel=0.865 if int8 else 1e-7, int8=int8))

    headers, rows = stage_table([stage("training", "fp32", {}), stage("onnx", "fp32", {}),
                                 stage("onnx-int8", "int8", labelled.metrics)], files=False)
    judged = headers.index("judged by")
    assert [r[judged] for r in rows] == ["-", "max rel error", "accuracy drop"] and rows[2][-1] == "pass"
    assert "judged by" not in stage_table([stage("training", "fp32", {}), stage("onnx", "fp32", {})])[0]


def test_the_task_is_read_from_the_outputs_and_judges_a_detector_by_its_map_drop(monkeypatch):
    from deploy.tasks import Classification, Detection, Tensors, task_of

    scores, raw = np.zeros((4, 10)), np.zeros((4, 50, 7))
    truth, nms = {"gt_boxes": np.zeros((4, 1, 4)), "gt_classes": np.zeros((4, 1), int)}, {"conf": 0.25}
    assert type(task_of([scores])) is Classification and type(task_of([raw])) is Tensors
    assert type(task_of([raw], truth=truth)) is Tensors  # ground truth without NMS settings scores nothing
    detector = task_of([raw], truth=truth, nms=nms)
    assert type(detector) is Detection

    rng = np.random.default_rng(3)
    ref = rng.standard_normal((4, 50, 7))
    test = ref + 1e-3 * rng.standard_normal(ref.shape)
    monkeypatch.setattr(Detection, "score", lambda self, outs: 0.50 if outs[0] is ref else 0.48)  # 2 points lost
    verdict = detector.judge([test], [ref], Guard(max_drop=1.0, nms=nms))
    assert not verdict.passed and "mAP@0.5 0.4800 is 2.00 points below" in verdict.reason
    assert verdict.metrics["judged_by"] == ["mAP@0.5 drop"] and verdict.metrics["sqnr_db"] > 50
    assert detector.judge([test], [ref], Guard(max_drop=2.5, nms=nms)).passed
