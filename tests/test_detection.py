"""Detection in ``deploy``: the ``--nms`` refusals, ground-truth files, pictures, unreadable images (fast); the
trained default detector converted with ``--nms``: mAP of every stage, ``deploy verify``, ``deploy bench`` with
the share NMS takes, ``deploy detect`` drawing the boxes (e2e)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import error_line, main_in_process as _main

from deploy.detection import COLOURS, draw, find_head, read_ground_truth, read_image
from deploy.record import PipelineError


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("flag, value", [("--conf", "1.5"), ("--iou", "-0.1"), ("--max-det", "0")])
def test_thresholds_outside_their_range_exit_2(capsys, tmp_path, flag, value):
    rc, _, err = _main(capsys, "convert", "yolov7_tiny_rep", "--nms", flag, value, "--out", str(tmp_path / "o"))
    assert rc == 2 and flag in err
    assert not (tmp_path / "o").exists()


def test_nms_options_without_nms_are_refused(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", "yolov7_tiny_rep", "--conf", "0.3", "--out", str(tmp_path / "o"))
    assert rc == 2 and "--conf applies to --nms only" in error_line(err)


def test_nms_on_a_classifier_names_the_missing_head(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--nms", "--out", str(tmp_path / "o"))
    line = error_line(err)
    assert rc == 2 and "--nms needs a YOLO-style detection head" in line and "repvgg_digits has none" in line
    assert not (tmp_path / "o").exists()


def test_nms_needs_the_onnx_target(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", "yolov7_tiny_rep", "--nms", "--targets", "tflite", "--out",
                       str(tmp_path / "o"))
    assert rc == 2 and "add onnx to --targets" in error_line(err)


def test_the_zoo_detector_has_a_recognised_head_and_a_classifier_has_none():
    from deploy import zoo

    assert find_head(zoo.create("yolov7_tiny_rep", num_classes=7, width=0.25)).nc == 7
    assert find_head(zoo.create("repvgg_digits")) is None


# ---------------------------------------------------------------------------------------------- files

def test_ground_truth_is_read_and_checked(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, input0=np.zeros((2, 3, 8, 8), np.float32), gt_boxes=np.zeros((2, 4, 4), np.float32),
             gt_classes=np.full((2, 4), -1))
    truth = read_ground_truth(str(path), 2)
    assert truth["gt_boxes"].shape == (2, 4, 4) and truth["gt_classes"].dtype == np.int64
    np.savez(path, input0=np.zeros((2, 3, 8, 8), np.float32), labels=np.zeros(2, np.int64))
    assert read_ground_truth(str(path), 2) is None
    np.savez(path, input0=np.zeros((2, 3, 8, 8), np.float32), gt_boxes=np.zeros((3, 4, 4), np.float32),
             gt_classes=np.full((3, 4), -1))
    with pytest.raises(PipelineError, match=r"gt_boxes must be \(2, K, 4\)"):
        read_ground_truth(str(path), 2)


def test_an_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(PipelineError, match=r"cannot read image .*broken\.png .*pass a PNG, JPEG or BMP file"):
        read_image(bad, (32, 32))


def test_images_are_resized_and_scaled_to_unit_range(tmp_path):
    from PIL import Image

    path = tmp_path / "white.png"
    Image.new("RGB", (40, 20), (255, 255, 255)).save(path)
    original, x = read_image(path, (16, 32))
    assert original.shape == (20, 40, 3) and x.shape == (3, 16, 32) and x.dtype == np.float32
    assert float(x.min()) == pytest.approx(1.0)


def test_draw_puts_the_box_outline_where_the_detection_is():
    image = np.zeros((3, 32, 32), np.float32)
    pic = np.asarray(draw(image, np.array([[4.0, 8.0, 20.0, 24.0]]), np.array([0.9]), np.array([1]), ["a", "b"],
                          scale=2))
    assert pic.shape == (64, 64, 3)
    colour = COLOURS[1]
    edge = pic[16:48, 8]  # the left side of the box, x0 = 4 * 2
    assert np.all(edge == colour)
    assert np.all(pic[60:, 50:] == 0)  # far from the box and its label: untouched


# ---------------------------------------------------------------------------------------- deploy detect

@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """The trained default detector converted with --nms and a dynamic batch (ONNX and OpenVINO): (exit status,
    run directory)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    pytest.importorskip("pycocotools")
    from deploy import cli

    out = tmp_path_factory.mktemp("det") / "run"
    rc = cli.main(["convert", "yolo_shapes", "--targets", "onnx,openvino", "--nms", "--dynamic", "--out", str(out),
                   "-q"])
    return rc, out


@pytest.mark.e2e
def test_every_stage_keeps_the_trained_detectors_map(shapes_run, capsys):
    rc, out = shapes_run
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    reference = stages["training"]["verification"]["detection"]
    assert reference["map50"] >= 0.95 and reference["map50_95"] >= 0.6  # the shipped weights: 0.977 / 0.676
    for name, s in stages.items():
        d = s["verification"]["detection"]
        assert s["verification"]["passed"] or name == "training", (name, s["verification"]["reason"])
        assert abs(d["map50"] - reference["map50"]) <= 0.005 and abs(d["map50_95"] - reference["map50_95"]) <= 0.005
        assert d["nms"] == ("graph" if name.endswith("-nms") else "host"), name
    for name in ("onnx-nms", "openvino-nms"):
        checks = stages[name]["verification"]["checks"]
        assert checks["samples"]["matched"] >= 250 and checks["samples"]["passed"], checks["samples"]
    import onnx

    ops = {n.op_type for n in onnx.load(out / "model.nms.onnx").graph.node}
    assert "NonMaxSuppression" in ops and not ops & {"BatchNormalization", "ScatterND", "Loop"}
    assert report["detection"]["names"] == ["circle", "square", "triangle"]
    assert set(report["detection"]["pictures"]) == set(stages)
    md = (out / "report.md").read_text()
    assert "## Detection" in md and "![openvino-nms](detections/openvino-nms.png)" in md

    rc, stdout, _ = _main(capsys, "verify", str(out))
    assert rc == 0 and "openvino-nms" in stdout


@pytest.mark.e2e
def test_bench_times_the_artifact_with_nms_and_its_share(shapes_run, capsys):
    rc, out = shapes_run
    assert rc == 0
    rc, stdout, _ = _main(capsys, "bench", str(out), "--runtimes", "onnxruntime", "--batch", "1,4",
                          "--min-iters", "5", "--min-ms", "50", "--no-chart", "-q")
    assert rc == 0
    shares = {s["batch"]: s for s in json.loads((out / "report.json").read_text())["benchmarks"][-1]["nms_shares"]}
    assert set(shares) == {1, 4} and all(s["nms_p50"] > 0 and s["share"] < 1 for s in shares.values())
    assert "NMS takes" in stdout


@pytest.mark.e2e
def test_deploy_detect_draws_the_boxes(shapes_run, capsys, tmp_path):
    from PIL import Image

    from deploy.detection import detect_images
    from deploy.zoo import shapes

    rc, out = shapes_run
    assert rc == 0
    x, gt_boxes, gt_classes = shapes.load_split()
    image = tmp_path / "held_out.png"
    Image.fromarray((x[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(image)
    png = tmp_path / "drawn.png"
    rc, stdout, _ = _main(capsys, "detect", str(out), str(image), "--runtime", "openvino", "--out", str(png), "-q")
    assert rc == 0 and "openvino-nms" in stdout
    drawn = np.asarray(Image.open(png).convert("RGB"))
    assert drawn.shape == (64 * 8, 64 * 8, 3)  # enlarged 512 // 64 = 8 times

    _, found, names = detect_images(out, str(image), runtime="onnxruntime", out=tmp_path / "again.png")
    from runtimes.detection import _iou_matrix

    truth = gt_classes[0] >= 0
    overlap = _iou_matrix(gt_boxes[0][truth], found[0].boxes)
    same = gt_classes[0][truth][:, None] == found[0].classes[None, :]
    assert ((overlap >= 0.5) & same).any(1).all(), (overlap, same)  # every object found, with its class
    assert names == ["circle", "square", "triangle"] and any(n in stdout for n in names)
    for box, cls in zip(found[0].boxes, found[0].classes):
        x0, y0, x1, y1 = np.minimum((box * 8).astype(int), drawn.shape[0] - 1)
        colour = COLOURS[int(cls) % len(COLOURS)]
        edge = max((drawn[y0:y1 + 1, x] == colour).all(-1).mean() for x in (max(x0 - 1, 0), x0, x0 + 1))
        assert edge > 0.8, (box, cls)  # the left side of each box is drawn in its class colour

    rc, _, err = _main(capsys, "detect", str(out), str(image), "--out", str(png))
    assert rc == 2 and "exists; pass --force" in error_line(err)
    (tmp_path / "bad.jpg").write_bytes(b"\x00" * 10)
    rc, _, err = _main(capsys, "detect", str(out), str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "b.png"))
    assert rc == 2 and "cannot read image" in error_line(err) and "bad.jpg" in error_line(err)
