"""Tests for the shapes detection data set, the shipped YOLO-Shapes detector and COCO mAP (runtimes.detection)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from deploy import zoo
from deploy.zoo import shapes
from runtimes.core import MissingDependency

MAP50_BOUND = 0.955  # the shipped weights measured 0.9766 on the held-out split when trained: 0.02 margin


def _real(boxes, classes):
    keep = classes >= 0
    return boxes[keep], classes[keep]


def test_generate_is_deterministic_and_well_formed():
    x, b, c = shapes.generate(12, 3)
    x2, b2, c2 = shapes.generate(12, 3)
    assert np.array_equal(x, x2) and np.array_equal(b, b2) and np.array_equal(c, c2)
    x3, _, _ = shapes.generate(12, 4)
    assert not np.array_equal(x, x3)
    assert np.array_equal(shapes.generate(5, 3)[0], x[:5])  # image i does not depend on n
    assert x.dtype == np.float32 and x.shape == (12, 3, shapes.SIZE, shapes.SIZE)
    assert b.dtype == np.float32 and b.shape == (12, shapes.K, 4)
    assert c.dtype == np.int64 and c.shape == (12, shapes.K)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert ((c >= -1) & (c < len(shapes.CLASSES))).all()
    n = (c >= 0).sum(1)
    assert (n >= 1).all() and (n <= shapes.K).all()
    assert all((c[i, :n[i]] >= 0).all() and (c[i, n[i]:] == -1).all() for i in range(12))  # padding at the end
    assert (b[c < 0] == 0).all()
    real = b[c >= 0]
    w, h = real[:, 2] - real[:, 0], real[:, 3] - real[:, 1]
    assert (real >= 0).all() and (real <= shapes.SIZE).all() and (w >= 6).all() and (h >= 6).all()
    assert (w <= 33).all() and (h <= 33).all()
    assert shapes.TRAIN_SEED != shapes.VAL_SEED


def test_boxes_are_tight_to_the_drawn_objects():
    """Objects are flat colours: every pixel of an object's colour lies in its box, and touches all four edges."""
    x, b, c = shapes.generate(20, shapes.VAL_SEED)
    checked = 0
    for i in range(len(x)):
        for box in _real(b[i], c[i])[0]:
            x0, y0, x1, y1 = box.astype(int)
            assert np.array_equal(box, [x0, y0, x1, y1])  # whole pixels
            colours, counts = np.unique(x[i][:, y0:y1, x0:x1].reshape(3, -1).T, axis=0, return_counts=True)
            colour = colours[counts.argmax()]  # the object's: the background repeats a colour in 2x2 grains at most
            assert counts.max() >= 30 and np.sort(counts)[:-1].max(initial=0) <= 8
            ys, xs = np.nonzero((x[i] == colour[:, None, None]).all(0))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            checked += 1
    assert checked >= 40


def test_every_class_is_drawn():
    _, _, c = shapes.generate(64, 5)
    counts = np.bincount(c[c >= 0], minlength=len(shapes.CLASSES))
    assert len(counts) == len(shapes.CLASSES) and (counts > 20).all()


# ----------------------------------------------------------------------------------------- coco_map

def _truth(*images):
    """gt_boxes, gt_classes for images given as lists of (box, class)."""
    boxes = np.zeros((len(images), shapes.K, 4), dtype=np.float32)
    classes = np.full((len(images), shapes.K), -1, dtype=np.int64)
    for i, objects in enumerate(images):
        for j, (box, cls) in enumerate(objects):
            boxes[i, j], classes[i, j] = box, cls
    return boxes, classes


def _dets(*rows):
    """One image's detections from (box, score, class) rows."""
    if not rows:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    boxes, scores, classes = zip(*rows)
    return np.array(boxes, dtype=np.float64), np.array(scores), np.array(classes)


def test_coco_map_of_ground_truth_is_one():
    pytest.importorskip("pycocotools")
    from runtimes.detection import coco_map

    _, b, c = shapes.generate(10, 1)
    dets = [(bi, np.linspace(0.9, 0.5, len(bi)), ci) for bi, ci in (_real(b[i], c[i]) for i in range(len(b)))]
    assert coco_map(dets, b, c) == {"map50": 1.0, "map50_95": 1.0}


def test_coco_map_known_values():
    """COCO interpolates precision at 101 recall points 0, 0.01, ..., 1."""
    pytest.importorskip("pycocotools")
    from runtimes.detection import coco_map

    b, c = _truth([((0, 0, 10, 10), 0), ((20, 20, 30, 30), 0)])
    # One of two found: precision 1 up to recall 0.5 (51 points), 0 above.
    assert coco_map([_dets(((0, 0, 10, 10), 0.9, 0))], b, c)["map50"] == pytest.approx(51 / 101, abs=1e-12)
    # A false positive ranked between the two hits: precision 1 up to recall 0.5, 2/3 up to 1.
    dets = _dets(((0, 0, 10, 10), 0.9, 0), ((40, 40, 50, 50), 0.8, 0), ((20, 20, 30, 30), 0.7, 0))
    assert coco_map([dets], b, c)["map50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    # IoU 0.72 with both boxes: a hit at thresholds 0.50 ... 0.70 (5 of 10), a miss at 0.75 ... 0.95.
    dets = _dets(((0, 0, 10, 7.2), 0.9, 0), ((20, 20, 30, 27.2), 0.8, 0))
    assert coco_map([dets], b, c) == pytest.approx({"map50": 1.0, "map50_95": 0.5}, abs=1e-12)
    # Two images, one class each: mAP is the mean over classes (class 1 missed entirely).
    b2, c2 = _truth([((0, 0, 10, 10), 0)], [((5, 5, 20, 20), 1)])
    assert coco_map([_dets(((0, 0, 10, 10), 0.5, 0)), _dets()], b2, c2)["map50"] == pytest.approx(0.5, abs=1e-12)


def test_coco_map_of_wrong_classes_is_zero():
    pytest.importorskip("pycocotools")
    from runtimes.detection import coco_map

    _, b, c = shapes.generate(10, 1)
    wrong = [(bi, np.ones(len(bi)), (ci + 1) % 3) for bi, ci in (_real(b[i], c[i]) for i in range(len(b)))]
    assert set(np.unique(c[c >= 0])) == {0, 1, 2}  # every wrong class has ground truth elsewhere: all count
    assert coco_map(wrong, b, c) == {"map50": 0.0, "map50_95": 0.0}
    assert coco_map([_dets() for _ in range(len(b))], b, c) == {"map50": 0.0, "map50_95": 0.0}


def test_coco_map_refuses_mismatched_inputs():
    pytest.importorskip("pycocotools")
    from runtimes.detection import coco_map

    b, c = _truth([((0, 0, 10, 10), 0)])
    with pytest.raises(ValueError, match="detections holds 2 images but the ground truth 1"):
        coco_map([_dets(), _dets()], b, c)
    with pytest.raises(ValueError, match="no boxes"):
        coco_map([_dets()], b, np.full_like(c, -1))


def test_coco_map_without_pycocotools_names_the_install(monkeypatch):
    from runtimes.detection import coco_map

    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)  # the import fails as if not installed
    b, c = _truth([((0, 0, 10, 10), 0)])
    with pytest.raises(MissingDependency, match="pip install pycocotools"):
        coco_map([_dets()], b, c)


# ------------------------------------------------------------------------------------ the shipped detector

def test_zoo_entry_and_shipped_files():
    assert zoo.has_weights("yolo_shapes") and zoo.input_shape("yolo_shapes") == (1, 3, 64, 64)
    with np.load(zoo.samples("yolo_shapes")) as val, np.load(zoo.calibration("yolo_shapes")) as train:
        assert set(val.files) == set(train.files) == {"input0", "gt_boxes", "gt_classes"}
        assert val["input0"].dtype == np.float16 and val["input0"].shape == (128, 3, 64, 64)
        x, b, c = shapes.generate(128, shapes.VAL_SEED)
        assert np.array_equal(val["input0"], x.astype(np.float16))  # regenerated bit for bit
        assert np.array_equal(val["gt_boxes"], b) and np.array_equal(val["gt_classes"], c)
        xt = shapes.generate(len(train["input0"]), shapes.TRAIN_SEED)[0]
        assert np.array_equal(train["input0"], xt.astype(np.float16))  # training images, not held-out ones
    with pytest.raises(ValueError, match="width=0.25"):
        shapes.yolo_shapes(width=0.5, pretrained=True)


def test_shipped_weights_reach_the_stated_map():
    pytest.importorskip("pycocotools")
    pytest.importorskip("torchvision")
    from deploy.zoo.train_shapes import evaluate

    torch.manual_seed(0)
    model = zoo.create("yolo_shapes", pretrained=True)
    assert not model.training
    x, b, c = shapes.load_split()
    with torch.no_grad():
        decoded, maps = model(torch.from_numpy(x[:2]))
    assert decoded.shape == (2, 3 * (8 * 8 + 4 * 4 + 2 * 2), 5 + len(shapes.CLASSES))
    result = evaluate(model, x, b, c)
    record = shapes.training_record()
    assert result["map50"] >= MAP50_BOUND, result
    assert result["map50"] == pytest.approx(record["map50"], abs=0.01)  # what the training run measured
    assert result["map50_95"] == pytest.approx(record["map50_95"], abs=0.01)
