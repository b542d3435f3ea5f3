"""Decode + NMS inside the ONNX file (``exporters/nms.py``) against its host twin ``runtimes.detection.nms``,
and ``match_detections``.

The host NMS is checked on hand-made cases; the ONNX tail on an Identity graph over random predictions
(ONNX Runtime and OpenVINO must equal the host exactly), and end to end on an exported YOLOv7-tiny with
a dynamic batch.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from exporters import ExportError  # noqa: E402
from exporters.nms import NmsOptions, add_nms  # noqa: E402
from exporters.onnx import op_counts  # noqa: E402
from runtimes import OnnxRuntimeRunner, OpenVINORunner  # noqa: E402
from runtimes.detection import match_detections, nms  # noqa: E402

OUTPUTS = ["num_dets", "boxes", "scores", "classes"]


def det(x1, y1, x2, y2, obj, *probs):
    """One prediction row (cx, cy, w, h, obj, p...) for the box x1 y1 x2 y2."""
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, obj, *probs]


def pred_of(*rows):
    return np.asarray([rows], dtype=np.float32)


def detections(out, b=0):
    """(box, score, class) tuples of image ``b``, rounded for comparison."""
    n = int(out["num_dets"][b, 0])
    return [(tuple(np.round(out["boxes"][b, k], 3)), round(float(out["scores"][b, k]), 4), int(out["classes"][b, k]))
            for k in range(n)]


# ------------------------------------------------------------------------------------------ host nms

def test_overlap_suppressed_within_a_class_not_across_classes_unless_agnostic():
    pred = pred_of(det(0, 0, 10, 10, 1.0, 0.9, 0.0),
                   det(1, 0, 11, 10, 1.0, 0.8, 0.0),  # IoU 0.82 with the first, same class: suppressed
                   det(0, 1, 10, 11, 1.0, 0.0, 0.7))  # IoU 0.82 with the first, other class: kept
    assert detections(nms(pred, 0.25, 0.45, 10)) == [((0, 0, 10, 10), 0.9, 0), ((0, 1, 10, 11), 0.7, 1)]
    assert detections(nms(pred, 0.25, 0.45, 10, agnostic=True)) == [((0, 0, 10, 10), 0.9, 0)]
    assert len(detections(nms(pred, 0.25, 0.9, 10))) == 3  # IoU 0.82 is not > 0.9


def test_conf_is_strict_and_scores_are_objectness_times_class_probability():
    pred = pred_of(det(0, 0, 10, 10, 0.5, 0.6), det(20, 20, 30, 30, 1.0, 0.3), det(40, 40, 50, 50, 1.0, 0.2))
    assert [d[1] for d in detections(nms(pred, 0.25, 0.45, 10))] == [0.3, 0.3]
    assert [d[0] for d in detections(nms(pred, 0.25, 0.45, 10))] == [(0, 0, 10, 10), (20, 20, 30, 30)]
    assert detections(nms(pred, 0.3, 0.45, 10)) == []  # 0.3 is not > 0.3 (float32 on both sides)
    assert nms(pred, 0.3, 0.45, 10)["num_dets"].tolist() == [[0]]


def test_max_det_keeps_the_highest_scores_in_descending_order():
    scores = [0.3, 0.9, 0.5, 0.7, 0.4, 0.8, 0.6]
    pred = pred_of(*[det(20 * k, 0, 20 * k + 10, 10, 1.0, s) for k, s in enumerate(scores)])  # disjoint
    out = nms(pred, 0.25, 0.45, 4)
    assert out["num_dets"].tolist() == [[4]]
    assert out["scores"][0].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert out["boxes"][0, :, 0].tolist() == [20, 100, 60, 120]


def test_multi_label_keeps_a_box_for_each_class_that_passes_and_agnostic_keeps_one():
    pred = pred_of(det(0, 0, 10, 10, 1.0, 0.6, 0.5, 0.1))
    assert detections(nms(pred, 0.25, 0.45, 10)) == [((0, 0, 10, 10), 0.6, 0), ((0, 0, 10, 10), 0.5, 1)]
    assert detections(nms(pred, 0.25, 0.45, 10, agnostic=True)) == [((0, 0, 10, 10), 0.6, 0)]


def test_outputs_are_padded_with_zeros_past_num_dets():
    pred = np.concatenate([pred_of(det(0, 0, 10, 10, 1.0, 0.2, 0.9), det(30, 30, 40, 40, 1.0, 0.8, 0.1)),
                           pred_of(det(0, 0, 10, 10, 0.1, 0.5, 0.5), det(5, 5, 8, 8, 0.1, 0.1, 0.1))])
    out = nms(pred, 0.25, 0.45, 5)
    assert {k: (v.shape, v.dtype.name) for k, v in out.items()} == {
        "num_dets": ((2, 1), "int32"), "boxes": ((2, 5, 4), "float32"), "scores": ((2, 5), "float32"),
        "classes": ((2, 5), "int32")}
    assert out["num_dets"].tolist() == [[2], [0]]
    assert out["classes"][0, :2].tolist() == [1, 0]
    assert not out["boxes"][0, 2:].any() and not out["scores"][0, 2:].any() and not out["classes"][0, 2:].any()
    assert not out["boxes"][1].any() and not out["scores"][1].any()


@pytest.mark.parametrize("kwargs, message", [
    ({"conf": 1.5}, "conf must be a number in \\[0, 1\\]"), ({"iou": -0.1}, "iou must be"),
    ({"max_det": 0}, "max_det must be an integer >= 1"), ({"max_det": 2.5}, "max_det must be an integer")])
def test_thresholds_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NmsOptions(**kwargs)
    args = {"conf": 0.25, "iou": 0.45, "max_det": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        nms(pred_of(det(0, 0, 1, 1, 1, 1)), **args)


# ------------------------------------------------------------------------------------------ add_nms

def identity_model(nc: int, batch="batch", opset: int = 18, extra_output: bool = True):
    """pred (batch, N, 5 + nc) -> Identity -> output ``pred_out`` (and an unrelated second output)."""
    pred = helper.make_tensor_value_info("pred", TensorProto.FLOAT, [batch, None, 5 + nc])
    outs = [helper.make_tensor_value_info("pred_out", TensorProto.FLOAT, [batch, None, 5 + nc])]
    nodes = [helper.make_node("Identity", ["pred"], ["pred_out"], name="identity")]
    if extra_output:
        outs.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, [batch, None, 5 + nc]))
        nodes.append(helper.make_node("Relu", ["pred"], ["aux"], name="aux"))
    graph = helper.make_graph(nodes, "pred", [pred], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def random_pred(batch: int, n: int, nc: int, seed: int) -> np.ndarray:
    """Boxes 10-40 px wide in a 100 x 100 field (many overlap), objectness 0.3-1, class probabilities 0-1."""
    r = np.random.default_rng(seed)
    return np.concatenate([r.uniform(0, 100, (batch, n, 2)), r.uniform(10, 40, (batch, n, 2)),
                           r.uniform(0.3, 1, (batch, n, 1)), r.uniform(0, 1, (batch, n, nc))], -1).astype(np.float32)


def run(runner_cls, model, tmp_path, pred, name="nms.onnx") -> dict[str, np.ndarray]:
    path = tmp_path / name
    onnx.save(model, str(path))
    with runner_cls(path) as r:
        return r.infer({r.get_input_specs()[0].name: pred})


def assert_same(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    for k in ("num_dets", "classes"):
        assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
    for k in ("boxes", "scores"):
        assert got[k].dtype == np.float32 and np.abs(got[k] - ref[k]).max() <= 1e-6, k


@pytest.mark.parametrize("agnostic", [False, True], ids=["per-class", "agnostic"])
@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_runtime_equals_host_nms(tmp_path, batch, agnostic):
    opts = NmsOptions(conf=0.2, iou=0.45, max_det=1000, agnostic=agnostic)
    model = add_nms(identity_model(3), opts)
    pred = random_pred(batch, 400, 3, seed=batch)
    ref = nms(pred, opts.conf, opts.iou, opts.max_det, agnostic)
    scores = pred[..., 4:5] * pred[..., 5:]
    candidates = (scores.max(-1, keepdims=True) if agnostic else scores) > opts.conf
    assert (100 < ref["num_dets"][:, 0]).all() and (ref["num_dets"][:, 0] < candidates.sum((1, 2)) * 0.6).all()
    assert_same(run(OnnxRuntimeRunner, model, tmp_path, pred), ref)


@pytest.mark.parametrize("agnostic", [False, True], ids=["per-class", "agnostic"])
def test_max_det_cap_fixed_batch_and_no_detections(tmp_path, agnostic):
    capped = NmsOptions(conf=0.05, iou=0.6, max_det=40, agnostic=agnostic)
    pred = random_pred(3, 200, 4, seed=7)
    model = add_nms(identity_model(4, batch=3), capped)
    assert [d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim] == [3, 40, 4]
    ref = nms(pred, capped.conf, capped.iou, capped.max_det, agnostic)
    assert (ref["num_dets"] == 40).all()
    assert_same(run(OnnxRuntimeRunner, model, tmp_path, pred), ref)
    # max_det above the number of candidates (C * N < max_det) and a conf nothing passes
    for opts in (NmsOptions(conf=0.1, max_det=1000, agnostic=agnostic), NmsOptions(conf=1.0, agnostic=agnostic)):
        small = random_pred(2, 7, 4, seed=3)
        out = run(OnnxRuntimeRunner, add_nms(identity_model(4), opts), tmp_path, small)
        assert_same(out, nms(small, opts.conf, opts.iou, opts.max_det, agnostic))
    assert not out["num_dets"].any() and not out["boxes"].any()


@pytest.mark.parametrize("agnostic", [False, True], ids=["per-class", "agnostic"])
def test_openvino_equals_host_nms(tmp_path, agnostic):
    pytest.importorskip("openvino")
    opts = NmsOptions(conf=0.2, iou=0.45, max_det=100, agnostic=agnostic)
    model = add_nms(identity_model(3), opts)
    for batch in (1, 4):
        pred = random_pred(batch, 300, 3, seed=10 + batch)
        assert_same(run(OpenVINORunner, model, tmp_path, pred, f"ov{batch}.onnx"),
                    nms(pred, opts.conf, opts.iou, opts.max_det, agnostic))


@pytest.mark.parametrize("agnostic", [False, True], ids=["per-class", "agnostic"])
def test_graph_structure(agnostic):
    model = add_nms(identity_model(3), NmsOptions(max_det=50, agnostic=agnostic))
    onnx.checker.check_model(model, full_check=True)
    ops = op_counts(model)
    assert ops["NonMaxSuppression"] == 1 and ops["TopK"] == 1 and ops["ScatterElements"] == 1
    assert not {"ScatterND", "Loop", "If", "Scan", "Relu"} & ops.keys()  # Relu: the aux output is pruned
    assert ("ArgMax" in ops) == ("ReduceMax" in ops) == agnostic
    assert [n.name for n in model.graph.node if not n.name.startswith("nms/")] == ["identity"]
    expected = {"num_dets": (TensorProto.INT32, ["batch", 1]), "boxes": (TensorProto.FLOAT, ["batch", 50, 4]),
                "scores": (TensorProto.FLOAT, ["batch", 50]), "classes": (TensorProto.INT32, ["batch", 50])}
    found = {o.name: (o.type.tensor_type.elem_type,
                      [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in model.graph.output}
    assert list(found) == OUTPUTS and found == expected


def test_output_is_chosen_by_name_and_bad_inputs_are_refused():
    model = identity_model(3)
    assert [o.name for o in add_nms(model, NmsOptions(), output="aux").graph.output] == OUTPUTS
    assert [o.name for o in model.graph.output] == ["pred_out", "aux"]  # the input model is not modified
    with pytest.raises(ExportError, match="has no output 'logits'"):
        add_nms(model, NmsOptions(), output="logits")
    with pytest.raises(ExportError, match="opset >= 13"):
        add_nms(identity_model(3, opset=11), NmsOptions())
    with pytest.raises(ExportError, match="NMS was added before"):
        add_nms(add_nms(model, NmsOptions()), NmsOptions(), output="boxes")
    flat = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 85])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 85])]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match=r"shape \(1, 85\).*\(batch, boxes, 5 \+ classes\)"):
        add_nms(flat, NmsOptions())


# ------------------------------------------------------------------------------------------ match_detections

CONF, IOU, MAX_DET = 0.25, 0.45, 20


def drop(out: dict, b: int, k: int) -> dict:
    """``out`` without detection ``k`` of image ``b`` (rows shifted up, zero at the end)."""
    out = {name: v.copy() for name, v in out.items()}
    for name in ("boxes", "scores", "classes"):
        row = out[name][b]
        row[k:-1] = row[k + 1:].copy()
        row[-1] = 0
    out["num_dets"][b, 0] -= 1
    return out


def separated_pred() -> np.ndarray:
    """Six disjoint boxes of two classes, scores far from every threshold except the 0.25 + 1e-5 one."""
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, CONF + 1e-5]
    return pred_of(*[det(30 * k, 0, 30 * k + 20, 20, 1.0, s * (k % 2 == 0), s * (k % 2 == 1))
                     for k, s in enumerate(scores)])


def match(ref, got, **kwargs):
    return match_detections(ref, got, conf=CONF, iou=IOU, max_det=MAX_DET, **kwargs)


def test_identical_outputs_match():
    ref = nms(separated_pred(), CONF, IOU, MAX_DET)
    report = match(ref, ref)
    assert report.passed and report.matched == 6 and report.missing == report.extra == report.borderline == 0
    assert report.counts == [(6, 6)] and report.worst_iou == 1.0 and report.worst_score_diff == 0.0
    assert report.summary().startswith("passed: 1 image(s), 6 reference / 6 detections, 6 matched")


def test_dropped_detection_far_from_thresholds_fails():
    ref = nms(separated_pred(), CONF, IOU, MAX_DET)
    report = match(ref, drop(ref, 0, 1))  # score 0.8
    assert not report.passed and report.missing == 1 and report.extra == 0 and report.borderline == 0
    assert report.matched == 5 and "image 0 missing class 1 score 0.800000" in report.summary()


def test_dropped_detection_at_conf_is_borderline():
    ref = nms(separated_pred(), CONF, IOU, MAX_DET)
    assert ref["scores"][0, 5] == np.float32(CONF + 1e-5)
    report = match(ref, drop(ref, 0, 5))
    assert report.passed and report.missing == 1 and report.borderline == 1, report.summary()
    assert not match(ref, drop(ref, 0, 5), score_atol=1e-6).passed  # the tolerance decides


def test_moved_box_fails():
    ref = nms(separated_pred(), CONF, IOU, MAX_DET)
    got = {k: v.copy() for k, v in ref.items()}
    got["boxes"][0, 2] += np.float32([1.5, 0, 1.5, 0])  # IoU 0.86 < iou_min 0.99, same score
    report = match(ref, got)
    assert not report.passed and report.matched == 5 and report.missing == 1 and report.extra == 1
    assert report.borderline == 0
    assert match(ref, got, iou_min=0.8).passed


def test_a_cascade_from_a_borderline_iou_is_borderline():
    """K suppresses A in ref (IoU just above 0.45) and keeps it in got (just below); A then suppresses B in got
    only. A is borderline by the IoU rule; B, which A's presence removed, by the cascade."""
    s = 10 * (1 - IOU) / (1 + IOU)  # K = [0, 10], A = [s, s + 10]: IoU(K, A) = 0.45 exactly

    def pred(a_shift):
        a = s + a_shift
        return pred_of(det(0, 0, 10, 10, 1.0, 0.9), det(a, 0, a + 10, 10, 1.0, 0.8),
                       det(a + 1, 0, a + 11, 10, 1.0, 0.7))  # B: IoU(A, B) 0.82, IoU(K, B) 0.35

    ref, got = nms(pred(-0.004), CONF, IOU, MAX_DET), nms(pred(0.004), CONF, IOU, MAX_DET)
    assert [d[1] for d in detections(ref)] == [0.9, 0.7] and [d[1] for d in detections(got)] == [0.9, 0.8]
    report = match(ref, got)
    assert report.passed and report.matched == 1 and report.missing == report.extra == 1, report.summary()
    assert report.borderline == 2
    assert not match(ref, got, iou_tol=1e-5).passed  # without the IoU rule, neither is explained


def test_a_borderline_detection_that_takes_the_last_slot_pushes_one_out():
    """max_det 3. K suppresses A in ref (IoU just above 0.45) and keeps it in got; A (0.85) then takes a slot in
    got, and D (0.7, far from every threshold) no longer fits. A is borderline by the IoU rule, D by the cascade."""
    s = 10 * (1 - IOU) / (1 + IOU)

    def pred(a_shift):
        a = s + a_shift
        return pred_of(det(0, 0, 10, 10, 1.0, 0.9), det(a, 0, a + 10, 10, 1.0, 0.85),
                       det(100, 0, 120, 20, 1.0, 0.8), det(200, 0, 220, 20, 1.0, 0.7))

    ref, got = nms(pred(-0.004), CONF, IOU, 3), nms(pred(0.004), CONF, IOU, 3)
    assert [d[1] for d in detections(ref)] == [0.9, 0.8, 0.7] and [d[1] for d in detections(got)] == [0.9, 0.85, 0.8]
    report = match_detections(ref, got, conf=CONF, iou=IOU, max_det=3)
    assert report.passed and report.missing == report.extra == 1 and report.borderline == 2, report.summary()
    assert not match_detections(ref, got, conf=CONF, iou=IOU, max_det=4).passed  # room for D: not explained


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def yolo_onnx(tmp_path_factory):
    """YOLOv7-tiny (80 classes, width 0.25, random BatchNorm), exported to ONNX with a dynamic batch.

    The convolutions get Kaiming-normal weights: with PyTorch's default initialisation the signal fades
    through the network, every image gets the same predictions and scores stay below 1e-3."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from deploy import zoo
    from exporters import export

    torch.manual_seed(0)
    model = zoo.yolov7.yolov7_tiny_rep(num_classes=80, width=0.25)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
    model = zoo.randomize_batchnorm(model).eval()
    x = torch.randn(2, 3, 160, 160)
    batch = torch.export.Dim("batch")
    graph = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False).module()
    art = export("onnx", graph, tmp_path_factory.mktemp("yolo") / "yolo.onnx", args=(x,), dynamic=True)
    assert art.inputs[0].shape[0] == "batch" and art.outputs[0].shape == ("batch", 1575, 85)
    return model, onnx.load(art.path)


@pytest.mark.e2e
@pytest.mark.parametrize("agnostic", [False, True], ids=["per-class", "agnostic"])
def test_exported_yolo_with_nms_matches_host_nms(yolo_onnx, tmp_path, agnostic):
    import torch

    model, exported = yolo_onnx
    opts = NmsOptions(conf=0.5, iou=0.45, max_det=100, agnostic=agnostic)
    with_nms = add_nms(exported, opts)
    assert [o.name for o in with_nms.graph.output] == OUTPUTS and "ScatterND" not in op_counts(with_nms)
    path = tmp_path / "yolo_nms.onnx"
    onnx.save(with_nms, str(path))
    pytest.importorskip("openvino")
    for runner in (OnnxRuntimeRunner(path), OpenVINORunner(path)):
        with runner:
            for batch in (1, 4):
                x = torch.randn(batch, 3, 160, 160, generator=torch.Generator().manual_seed(batch))
                with torch.no_grad():
                    ref = nms(model(x)[0], opts.conf, opts.iou, opts.max_det, agnostic)
                got = runner.infer({"input0": x.numpy()})
                report = match_detections(ref, got, conf=opts.conf, iou=opts.iou, max_det=opts.max_det,
                                          agnostic=agnostic)
                assert report.passed and report.matched >= 10 * batch, f"{runner.runtime}: {report.summary()}"
                assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}


def _tie_preds():
    """Two candidates of class 0 overlapping with IoU 0.6 (> iou 0.45), scores 0.5000 and 0.5001: the reference
    keeps the second, a runtime that ranked them the other way keeps the first."""
    pred = np.zeros((1, 2, 6), np.float32)
    pred[0, 0] = [20, 20, 20, 20, 1.0, 0.5000]  # box [10, 10, 30, 30]
    pred[0, 1] = [25, 20, 20, 20, 1.0, 0.5001]  # box [15, 10, 35, 30]
    return pred


def test_an_order_tie_is_borderline_only_with_the_reference_candidates():
    pred = _tie_preds()
    ref = nms(pred, conf=0.25, iou=0.45, max_det=10)
    flipped = nms(_swap_scores(pred), conf=0.25, iou=0.45, max_det=10)
    assert ref["boxes"][0, 0, 0] == 15 and flipped["boxes"][0, 0, 0] == 10  # each side kept the other box
    kw = dict(conf=0.25, iou=0.45, max_det=10)
    assert not match_detections(ref, flipped, **kw).passed  # from the outputs alone: a box that moved
    tie = match_detections(ref, flipped, **kw, candidates=pred)
    assert tie.passed and tie.borderline == 2, tie.summary()
    moved = {k: v.copy() for k, v in ref.items()}
    moved["boxes"][0, 0] += np.float32(3.0)  # the kept box shifted: no reference candidate is there
    assert not match_detections(ref, moved, **kw, candidates=pred).passed


def _swap_scores(pred):
    """``pred`` with the two candidates' class scores exchanged: the other ranking of the tie."""
    out = pred.copy()
    out[..., 5] = pred[..., 5][:, ::-1]
    return out
