"""``deploy convert yolov7.pt --nms --dynamic`` on a yolov7-tiny checkpoint written the way the repository's
``train.py`` writes it (``tests/yolov7_checkpoints.py``; 320x320, nc=80, random weights with non-trivial BatchNorm
statistics): the ONNX and OpenVINO artifacts with NMS inside return the torch training model's detections at batch
1 and batch 4, their graphs hold no BatchNormalization and no ScatterND, and the report puts the ONNX node counts
of the model's own ``fuse()`` form beside ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from yolov7_checkpoints import write_checkpoint, write_code

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

SIZE, NC = 320, 80
CONF = 2e-3  # random weights: IDetect's priors keep scores low; here the 300 best per image pass (max_det)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from deploy import cli

    root = tmp_path_factory.mktemp("yolov7_nms")
    code = write_code(root / "repo")
    ck = write_checkpoint(root / "yolov7-tiny.pt", code, "yolov7-tiny", nc=NC, width_multiple=0.25)
    out = root / "run"
    rc = cli.main(["convert", str(ck.path), "--code-path", str(code), "--trust-pickle", "--input-shape",
                   f"1,3,{SIZE},{SIZE}", "--nms", "--dynamic", "--conf", str(CONF), "--targets", "onnx,openvino",
                   "--out", str(out), "-q"])
    return rc, out, ck


@pytest.mark.e2e
def test_nms_artifacts_match_the_training_model_at_batch_1_and_4(converted):
    import onnx
    import openvino as ov
    import onnxruntime as ort

    from deploy.sources import load_model
    from runtimes.detection import match_detections, nms

    rc, out, ck = converted
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["onnx-nms"]["verification"]["passed"] and stages["openvino-nms"]["verification"]["passed"]
    for name in ("model.onnx", "model.nms.onnx"):
        ops = {n.op_type for n in onnx.load(out / name).graph.node}
        assert not ops & {"BatchNormalization", "ScatterND"}, (name, ops)

    model = load_model(str(ck.path), code_path=[str(ck.code)], trust_pickle=True).model.eval()
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(str(out / "model.nms.onnx"), providers=["CPUExecutionProvider"])
    compiled = ov.Core().compile_model(str(out / "model.nms.xml"), "CPU")
    for batch in (1, 4):
        xb = x[:batch]
        with torch.no_grad():
            pred = model(xb)[0]
        ref = nms(pred, conf=CONF, iou=0.45, max_det=300)
        got_ort = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input0": xb.numpy()})))
        got_ov = {k.get_any_name(): v for k, v in compiled(xb.numpy()).items()}
        for got in (got_ort, got_ov):
            match = match_detections(ref, got, conf=CONF, iou=0.45, max_det=300, candidates=pred)
            assert match.passed and match.matched >= 20 * batch, match.summary()
            assert np.asarray(got["boxes"]).shape == (batch, 300, 4)


@pytest.mark.e2e
def test_report_puts_the_own_fuse_node_counts_beside_ours(converted):
    rc, out, ck = converted
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    fuse = report["detection"]["own_fuse"]
    assert "error" not in fuse, fuse
    assert fuse["ours"].get("BatchNormalization", 0) == 0 and fuse["ours"].get("ScatterND", 0) == 0
    assert fuse["ours"]["Conv"] <= fuse["fuse"]["Conv"] and fuse["ours_nodes"] <= fuse["fuse_nodes"]
    md = (out / "report.md").read_text()
    assert "the model's own `fuse()` form exported the same way" in md
    notes = " ".join(report["notes"])
    assert "not used by the eval forward" in notes and "anchors" in notes  # IDetect's anchors feed only the loss
    assert "ema" in report["model"]["weights"] and "half-precision" in notes
