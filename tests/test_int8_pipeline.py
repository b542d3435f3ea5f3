"""``deploy convert --precision int8``: the default with every CPU format, repvgg_a0 with its five worst layers,
the guard failing with exit 1, ``deploy verify`` and ``deploy bench`` of an int8 run, and the bad-input sentences.

The conversions are end-to-end (``e2e``); the refusals happen before any work and stay in the fast lane.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import error_line, leftovers, main_in_process as _main

pytest.importorskip("onnxruntime")

INT8 = ["onnx-int8", "openvino-int8", "tflite-int8"]


@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory):
    """The built-in default converted with --precision int8 (every default target): (exit status, stdout, dir)."""
    pytest.importorskip("nncf")
    pytest.importorskip("litert_torch")
    from deploy import cli

    out = tmp_path_factory.mktemp("int8") / "digits"
    rc = cli.main(["convert", "--precision", "int8", "--out", str(out), "-q"])
    return rc, out


@pytest.mark.e2e
def test_default_int8_artifacts_stay_within_a_point_and_agree(digits_int8):
    rc, out = digits_int8
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    reference = stages["training"]["verification"]["accuracy"]
    assert reference == pytest.approx(1.0)
    for name in INT8:
        v = stages[name]["verification"]
        assert stages[name]["export"]["precision"] == "int8" and v["passed"], (name, v["reason"])
        assert 100 * (reference - v["accuracy"]) <= 1.0 and v["agreement"] >= 0.98, (name, v)
        assert v["int8"]["on"] == "samples" and 15 < v["sqnr_db"] < 60, (name, v["sqnr_db"])  # quantized, not float
        assert stages[name]["files"]["size"] < 0.5 * stages[stages[name]["export"]["parent"]]["files"]["size"]
    q = report["int8"]
    assert q["calibration"]["kind"] == "shipped" and q["calibration"]["count"] == 128
    assert "360 held-out samples with labels" in q["evaluation"]
    assert len(q["layers"]) == 7 and q["layers"][0]["lost_db"] >= q["layers"][-1]["lost_db"]  # 6 convs + Gemm
    assert "sqnr_db" in q["equalize"]  # measured, whichever way it went
    md = (out / "report.md").read_text()
    assert "## INT8" in md and "| layer | op | SQNR out dB | dB lost |" in md and "Δ points" in md


@pytest.mark.e2e
def test_verify_and_bench_an_int8_run(digits_int8, capsys):
    rc, out = digits_int8
    assert rc == 0
    rc, stdout, _ = _main(capsys, "verify", str(out))
    assert rc == 0 and "onnx-int8" in stdout
    rc, stdout, _ = _main(capsys, "bench", str(out), "--runtimes", "onnxruntime", "--min-ms", "100",
                          "--min-iters", "10", "--no-chart", "-q")
    assert rc == 0, stdout
    entry = json.loads((out / "report.json").read_text())["benchmarks"][-1]
    forms = {(r["form"], r["variant"]) for r in entry["results"] if "p50" in r}
    assert forms == {("deploy", "fp32"), ("int8", "int8")}
    assert [s["runtime"] for s in entry["int8_speedups"]] == ["onnxruntime"]
    assert entry["hardware"]["cpu"]["low_precision"]["int8"] is not None
    assert "INT8" in stdout and "x the fp32 deploy form's speed" in stdout
    (ratio,) = entry["int8_speedups"]  # an INT8 form no faster than fp32 is reported, whichever way it went here
    slower = [n for n in entry["notes"] if n.startswith("INT8 is not faster than fp32 on onnxruntime")]
    assert len(slower) == (ratio["speedup"] <= 1.0) and all(f"note: {n}" in stdout for n in slower)


def test_an_int8_form_not_faster_than_fp32_is_reported():
    from deploy.bench import int8_speedups, slower_int8_notes

    rows = [{"runtime": rt, "batch": 1, "form": form, "p50": p50}
            for rt, form, p50 in (("onnxruntime", "deploy", 1.0), ("onnxruntime", "int8", 1.0),
                                  ("openvino", "deploy", 1.0), ("openvino", "int8", 0.25))]
    ratios = int8_speedups(rows)
    assert [(s["runtime"], s["speedup"]) for s in ratios] == [("onnxruntime", 1.0), ("openvino", 4.0)]
    assert slower_int8_notes(ratios) == ["INT8 is not faster than fp32 on onnxruntime at batch 1 (p50 1.000 -> 1.000 "
                                         "ms): keep the fp32 artifact there; deploy tune never chooses such a form"]


@pytest.mark.e2e
def test_repvgg_a0_int8_on_onnxruntime_and_openvino_lists_five_worst_layers(tmp_path, capsys):
    pytest.importorskip("nncf")
    out = tmp_path / "a0"
    # at its own 224x224 (at 64x64 the random network's logits nearly tie and top-1 agreement means little);
    # --passes default leaves out the equalize trial, which the default int8 test covers
    rc, stdout, _ = _main(capsys, "convert", "repvgg_a0", "--precision", "int8", "--targets", "onnx,openvino",
                          "--calibration-size", "32", "--passes", "default", "--out", str(out), "-q")
    assert rc == 0, stdout
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["onnx-int8"]["verification"]["passed"] and stages["openvino-int8"]["verification"]["passed"]
    q = report["int8"]
    assert q["calibration"]["kind"] == "seeded" and "no labels" in q["evaluation"]
    assert len(q["layers"]) == 23  # 22 merged 3x3 convs and the classifier
    worst = q["layers"][:5]
    assert all(set(r["weights"]) >= {"max_median_ratio", "kurtosis", "channel_absmax_max"} for r in worst)
    assert "worst layers" in stdout and all(r["name"] in stdout for r in worst)
    md = (out / "report.md").read_text()
    assert all(f"| {r['name']} |" in md for r in worst)


@pytest.mark.e2e
def test_a_bound_no_artifact_meets_exits_1_naming_the_worst_layers(tmp_path, capsys):
    out = tmp_path / "strict"
    rc, stdout, _ = _main(capsys, "convert", "--precision", "int8", "--targets", "onnx", "--min-sqnr", "80",
                          "--int8-fallback", "auto", "--out", str(out), "-q")
    assert rc == 1
    assert "FAILED onnx-int8" in stdout and "output SQNR" in stdout and "worst layers: conv2d" in stdout
    q = json.loads((out / "report.json").read_text())["int8"]
    (fb,) = q["fallbacks"]
    assert not fb["passed"] and [t["kept"] for t in fb["tried"]] == [0, 1, 2]  # 1, 2, 4, ... up to half of 7
    assert "still not met" in stdout


# --------------------------------------------------------------------------------------------- bad input

def test_int8_options_without_int8_precision_exit_2(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", "--calibration", "x.npz", "--max-drop", "2", "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "--calibration, --max-drop apply to --precision int8 only" in error_line(err)


def test_a_target_without_int8_lists_those_that_can(capsys, tmp_path, monkeypatch):
    from dataclasses import replace

    from exporters import targets as registry

    tflite = registry.get("tflite")
    registry.register(replace(tflite, precisions=("fp32", "fp16"), quantize=None), replace=True)
    try:
        rc, _, err = _main(capsys, "convert", "--precision", "int8", "--targets", "tflite", "--out",
                           str(tmp_path / "o"))
    finally:
        registry.register(tflite, replace=True)
    line = error_line(err)
    assert rc == 2 and "tflite target cannot produce int8" in line and "the targets that can are onnx, openvino" in line


FACTORY = '''
import torch


def net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 2)).eval()
'''


def _factory(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(FACTORY)
    return f"{path}:net"


def test_trained_weights_without_calibration_data_exit_2_naming_the_option(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", _factory(tmp_path), "--input-shape", "1,3,8,8", "--precision", "int8",
                       "--targets", "onnx", "--out", str(tmp_path / "o"))
    line = error_line(err)
    assert rc == 2 and "needs calibration data" in line and "--calibration PATH" in line
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_calibration_of_the_wrong_shape_names_both_shapes(capsys, tmp_path):
    cal = tmp_path / "cal.npz"
    np.savez(cal, input0=np.zeros((5, 3, 16, 16), np.float32))
    rc, _, err = _main(capsys, "convert", _factory(tmp_path), "--input-shape", "1,3,8,8", "--precision", "int8",
                       "--targets", "onnx", "--calibration", str(cal), "--out", str(tmp_path / "o"))
    line = error_line(err)
    assert rc == 2 and "(5, 3, 16, 16)" in line and "1,3,8,8" in line
    assert not (tmp_path / "o").exists()


def test_min_agreement_above_one_is_refused_by_argparse(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", "--precision", "int8", "--min-agreement", "98", "--out", str(tmp_path))
    assert rc == 2 and "fraction in 0..1" in err


def test_a_target_without_int8_beside_one_with_it_gives_its_fp32_stage_alone():
    from deploy.forms import check_targets, without_int8
    from deploy.record import PipelineError

    assert without_int8(["onnx", "ncnn", "tflite"]) == ["ncnn"]
    assert [t.name for t in check_targets(["onnx", "ncnn"], "int8")] == ["pt2", "onnx", "ncnn"]
    with pytest.raises(PipelineError, match="the ncnn target cannot produce int8"):
        check_targets(["ncnn"], "int8")  # no INT8 form asked for at all: refused, naming those that have one


def test_the_fallback_note_says_what_was_kept_the_aim_and_a_mixed_form_not_faster_than_fp32():
    from deploy.report import fallback_note

    f = {"stage": "onnx-int8", "passed": True, "aim_points": 0.5, "kept_in_float": ["conv2d"], "drop": 0.1,
         "latency_ms": {"int8": 1.0, "int8_fallback": 1.2, "fp32": 3.0}}
    assert fallback_note(f) == "--int8-fallback auto: 1 layer(s) kept in float (conv2d), drop 0.10 points"
    f["latency_ms"]["fp32"] = 1.1
    assert fallback_note(f).endswith("; this mixed form is not faster than fp32 (1.200 vs 1.100 ms, a rough "
                                     "median): deploy tune will not choose it, deploy bench times it")
    f.update(drop=0.7, latency_ms={})
    assert fallback_note(f).endswith("drop 0.70 points; the aim of 0.5 points is not met (the best form tried is "
                                     "kept)")
    f.update(passed=False, kept_in_float=[], drop=None)
    assert fallback_note(f) == "--int8-fallback auto: no layer kept in float; the bound is still not met"
