"""Pictures of detections: where labels go (``label_rectangles``: inside the picture, clear of each other), the
labels ``draw`` puts there, and the shipped sample picture of the README's ``deploy detect`` example."""

from __future__ import annotations

import configparser
import fnmatch
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from deploy.detection import COLOURS, draw, label_rectangles

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_INDEX = 95  # deploy/zoo/data/shapes_sample.png is this image of the held-out split


def _inside(rect, width: int, height: int) -> bool:
    x0, y0, x1, y1 = rect
    return 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def _intersect(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# --------------------------------------------------------------------------------------------- geometry

def test_a_label_goes_just_above_its_box_when_there_is_room():
    (rect,) = label_rectangles(np.array([[20.0, 30.0, 60.0, 70.0]]), [(30, 12)], 100, 100)
    assert rect.tolist() == [20, 18, 50, 30]  # left-aligned with the box, its bottom on the box's top edge


@pytest.mark.parametrize("box, expected", [
    ([10.0, 0.0, 50.0, 40.0], [10, 0, 50, 12]),  # at the top edge: no room above, so inside the box's top
    ([80.0, 0.0, 100.0, 15.0], [60, 0, 100, 12]),  # top-right corner, narrower than its label: moved left
    ([-5.0, -5.0, 30.0, 3.0], [0, 0, 40, 12]),  # reaching past the top-left corner
    ([85.0, 70.0, 100.0, 80.0], [60, 58, 100, 70]),  # bottom-right corner: above it, moved left
])
def test_a_label_at_the_edge_lies_inside_the_picture(box, expected):
    (rect,) = label_rectangles(np.array([box]), [(40, 12)], 100, 80)
    assert _inside(rect, 100, 80) and rect.tolist() == expected


def test_labels_of_overlapping_boxes_do_not_intersect():
    boxes = np.array([[10.0, 2.0, 60.0, 50.0], [12.0, 4.0, 62.0, 52.0], [11.0, 1.0, 58.0, 49.0],
                      [0.0, 0.0, 100.0, 80.0]])
    rects = label_rectangles(boxes, [(45, 12), (50, 12), (30, 14), (60, 12)], 100, 80)
    assert all(_inside(r, 100, 80) for r in rects), rects
    assert not any(_intersect(a, b) for a, b in combinations(rects.tolist(), 2)), rects


def test_labels_overlap_only_when_the_picture_has_no_room_left():
    rects = label_rectangles(np.array([[0.0, 0.0, 20.0, 20.0]] * 3), [(20, 10)] * 3, 20, 20)
    assert not _intersect(rects[0], rects[1])  # two fill the picture
    assert rects[2].tolist() == [0, 0, 20, 10] and _inside(rects[2], 20, 20)  # the third: its first choice


def test_no_boxes_no_labels():
    assert label_rectangles(np.zeros((0, 4)), [], 10, 10).shape == (0, 4)


# ---------------------------------------------------------------------------------------------- pixels

def test_draw_writes_the_label_of_a_box_at_the_top_edge_inside_that_box():
    image = np.zeros((3, 32, 32), np.float32)
    box = np.array([[8.0, 0.0, 28.0, 20.0]])
    pic = np.asarray(draw(image, box, np.array([0.9]), np.array([0]), ["a"], scale=4))  # 128 x 128
    assert COLOURS[0] == (230, 25, 75)  # a dark colour: its label is written in white
    ys, xs = np.nonzero(pic[..., 1] > 150)  # white ink (anti-aliased): the fill's green is 25, the picture's 0
    assert len(ys) > 10  # the text "a 0.90"
    assert ys.min() >= 0 and ys.max() < 24 and xs.min() >= 32 and xs.max() < 112  # in the box's top, not off the top


def test_draw_gives_the_best_score_the_place_above_the_box():
    image = np.zeros((3, 32, 32), np.float32)
    boxes = np.array([[8.0, 16.0, 24.0, 28.0]] * 2)  # two detections of one object, the better one second
    pic = np.asarray(draw(image, boxes, np.array([0.3, 0.9]), np.array([0, 2]), ["a", "b", "c"], scale=4))
    assert tuple(pic[62, 33]) == COLOURS[2]  # the padding corner of the label just above the box (y0 = 64, x0 = 32)


# ---------------------------------------------------------------------------------------- shipped sample

def test_the_sample_picture_is_a_held_out_image_and_ships_with_the_package():
    from PIL import Image

    from deploy.zoo import shapes

    path = shapes.DATA_DIR / "shapes_sample.png"
    x, _, _ = shapes.load_split()  # generate(128, VAL_SEED): never trained on (training draws TRAIN_SEED + epoch)
    expected = (x[SAMPLE_INDEX].transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)
    assert path.stat().st_size < 16_000
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["deploy.zoo"].split(",")]
    assert any(fnmatch.fnmatch("data/shapes_sample.png", p) for p in patterns), patterns


def test_the_trained_detector_finds_every_object_of_the_sample():
    import torch

    from deploy.detection import read_image
    from deploy.zoo import shapes
    from runtimes.detection import _iou_matrix, nms

    _, gt_boxes, gt_classes = shapes.load_split()
    _, x = read_image(shapes.DATA_DIR / "shapes_sample.png", (shapes.SIZE, shapes.SIZE))
    model = shapes.yolo_shapes(pretrained=True)
    with torch.no_grad():
        pred = model(torch.from_numpy(x[None]))[0].numpy()
    dets = nms(pred, conf=0.25, iou=0.45, max_det=300, agnostic=False)
    k = int(dets["num_dets"].reshape(-1)[0])
    truth = gt_classes[SAMPLE_INDEX] >= 0
    overlap = _iou_matrix(gt_boxes[SAMPLE_INDEX][truth], dets["boxes"][0, :k])
    same = gt_classes[SAMPLE_INDEX][truth][:, None] == dets["classes"][0, :k][None, :]
    assert k == truth.sum() == 4 and ((overlap >= 0.5) & same).any(1).all(), (overlap, same)
