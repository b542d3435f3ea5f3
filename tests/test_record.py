"""The typed run record: JSON round trip, version-1 reports upgraded, newer or malformed ones refused."""

from __future__ import annotations

import json

import pytest

from deploy.record import (SCHEMA_VERSION, ExportRecord, FilesRecord, InputsRecord, PipelineError, RunDirectory,
                           RunOptions, RunRecord, SamplesRecord, StageRecord, VerificationRecord, load_record)
from runtimes.core import Artifact, TensorSpec

V1_STAGE = {  # a stage as report_version 1 wrote it: one flat dict of 25 fields
    "name": "onnx", "format": "onnx", "path": "model.onnx", "files": ["model.onnx"], "parent": "pt2",
    "precision": "fp32", "size": 123, "sha256": {"model.onnx": "ab" * 32}, "export_seconds": 1.5,
    "artifact": {"path": "model.onnx", "format": "onnx", "inputs": [{"name": "input0", "shape": [1, 3, 8, 8],
                                                                     "dtype": "float32"}],
                 "outputs": [{"name": "output0", "shape": [1, 10], "dtype": "float32"}], "precision": "fp32",
                 "parent": None, "notes": [], "metadata": {}},
    "notes": ["exported"], "error": "", "passed": True, "blame": None, "reason": "", "max_abs": 1e-7,
    "max_rel": 2e-7, "cosine": 1.0, "parent_max_rel": 1e-8, "samples_max_rel": 3e-7, "accuracy": 0.9,
    "agreement": 1.0, "changed": False, "verify_seconds": 0.2, "checks": {"seeded": {"passed": True}},
}


def _v1_report() -> dict:
    return {"tool": "reparam-deploy", "report_version": 1, "command": "deploy", "created": "2026-11-01T00:00:00",
            "out_dir": "runs/m", "passed": True, "failed": [], "model": {"spec": "repvgg_digits", "params": 10},
            "load": {"spec": "repvgg_digits"},
            "options": {"targets": ["onnx"], "precision": "fp32", "dynamic": False, "passes": ["fold_bn"], "seed": 0,
                        "opset": 18},
            "inputs": {"shape": [1, 3, 8, 8], "verified_shape": [1, 3, 8, 8], "dtype": "float32",
                       "seeded": {"seed": 0}, "samples": {"path": "s.npz", "count": 4, "labels": True,
                                                          "shipped_with_model": False}},
            "tolerance": {"rtol": None, "atol": 0.0}, "reparameterize": {"merged": {}},
            "stages": [{**V1_STAGE, "name": "training", "format": "torch", "files": [], "path": None,
                        "artifact": None, "reason": "reference"}, V1_STAGE],
            "timings": {"total": 1.0}, "versions": {}, "machine": {}, "notes": [], "benchmarks": [{"x": 1}]}


def test_version_1_reports_are_upgraded_field_by_field():
    record = RunRecord.from_dict(_v1_report())
    onnx = record.stage("onnx")
    assert (onnx.format, onnx.parent, onnx.precision, onnx.path) == ("onnx", "pt2", "fp32", "model.onnx")
    assert onnx.export.seconds == 1.5 and onnx.export.notes == ["exported"]
    assert onnx.export.artifact.inputs[0] == TensorSpec("input0", (1, 3, 8, 8))
    assert (onnx.files.size, onnx.files.sha256) == (123, {"model.onnx": "ab" * 32})
    v = onnx.verification
    assert (v.passed, v.max_rel, v.samples_max_rel, v.accuracy, v.seconds) == (True, 2e-7, 3e-7, 0.9, 0.2)
    assert record.inputs.samples == SamplesRecord("s.npz", 4, True, False) and record.options.opset == 18
    assert record.benchmarks == [{"x": 1}] and record.passed
    again = RunRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.to_dict() == record.to_dict() and again.report_version == SCHEMA_VERSION == 3
    assert record.reference is None  # version 1 and 2 reports did not hash verify/


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(report_version=4), "written by a newer reparam-deploy (report_version 4)"),
    (lambda d: d.update(tool="other"), "is not a deploy report"),
    (lambda d: d.update(stages="training"), "is malformed (report_version 1"),
    (lambda d: d["stages"].append(["not", "a", "dict"]), "is malformed"),
    (lambda d: d.pop("inputs"), "is malformed"),
])
def test_unreadable_reports_are_refused_with_a_sentence(tmp_path, edit, words):
    data = _v1_report()
    edit(data)
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(PipelineError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_record(tmp_path)


def test_a_json_list_is_not_a_report(tmp_path):
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(PipelineError, match="is not a deploy report"):
        load_record(tmp_path)


def test_stage_records_round_trip_and_find_their_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    art = Artifact("a.bin", "onnx", [TensorSpec("input0", ("batch", 3))], [], notes=["n"])
    stage = StageRecord("onnx", ExportRecord("onnx", parent="pt2", artifact=art),
                        FilesRecord.of(tmp_path, [str(tmp_path / "a.bin")]), VerificationRecord(passed=True))
    assert stage.files.files == ["a.bin"] and stage.files.size == 5 and stage.path == "a.bin"
    assert StageRecord.from_dict(json.loads(json.dumps(stage.to_dict()))) == stage
    assert stage.export.artifact_in(tmp_path).path == str(tmp_path / "a.bin")
    assert stage.files.check(tmp_path) == ([], [])
    (tmp_path / "a.bin").write_bytes(b"12346")
    assert stage.files.check(tmp_path) == ([], ["a.bin"])
    (tmp_path / "a.bin").unlink()
    assert stage.files.check(tmp_path) == (["a.bin"], [])


def test_run_directory_commits_atomically(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with RunDirectory(out, False) as run:
            (run.tmp / "x").write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with RunDirectory(out, False) as run:
        (run.tmp / "x").write_text("one")
        run.commit()
    with RunDirectory(out, True) as run:
        (run.tmp / "y").write_text("two")
        run.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and [p.name for p in out.iterdir()] == ["y"]


def test_a_record_written_is_read_back(tmp_path):
    record = RunRecord(model={"spec": "m", "kind": "zoo", "class": "M", "params": 1, "weights": "random"},
                       load={"spec": "m"}, options=RunOptions(targets=[]), reparameterize={},
                       inputs=InputsRecord([1, 3], [1, 3]), tolerance={}, stages=[
                           StageRecord("training", ExportRecord("torch"), verification=VerificationRecord(True))])
    (tmp_path / "report.json").write_text(json.dumps(record.to_dict()))
    assert load_record(tmp_path).to_dict() == record.to_dict()
