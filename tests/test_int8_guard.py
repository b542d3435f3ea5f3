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
