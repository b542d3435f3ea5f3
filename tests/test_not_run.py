"""A target whose artifacts can be written but not run on this machine (Core ML off macOS): its stage is
"written, not run" with the reason, never verified, never a failure of the run, and ``deploy bench`` and
``deploy tune`` leave it out saying why.

The target here is declared in the test (a file the runner would refuse to open), so the pipeline's handling
is checked without coremltools.
"""

from __future__ import annotations

import json

import pytest

REASON = "no phone is attached to this machine"


def _phone_target():
    from exporters.targets import Product, Target
    from runtimes.core import Artifact, TensorSpec

    def export(job):
        path = job.folder / "model.phone"
        path.write_bytes(b"phone program")
        shape = tuple(job.args[0].shape)
        return [Product("phone", Artifact(str(path), "phone", [TensorSpec("input0", shape, "float32")],
                                          [TensorSpec("output0", (shape[0], 10), "float32")]))]

    return Target(name="phone", runtime="phone-rt", suffixes=(".phone",), source="torch", export=export,
                  runner="runtimes.onnxruntime_runner:OnnxRuntimeRunner", precisions=("fp32",),
                  not_run_here=lambda: REASON)


@pytest.fixture
def phone():
    from exporters import targets

    target = targets.register(_phone_target())
    yield target
    targets.unregister(target.name)


@pytest.mark.e2e
def test_a_stage_written_not_run_is_neither_verified_nor_failed(phone, tmp_path, capsys):
    from deploy.bench import BenchOptions, bench
    from deploy.cli import main
    from deploy.pipeline import PipelineError, verify
    from deploy.tune import _why_not

    out = tmp_path / "run"
    rc = main(["convert", "repvgg_digits", "--targets", "onnx,phone", "--out", str(out), "-q"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "all 3 stages pass; 1 written, not run here" in printed
    report = json.loads((out / "report.json").read_text())
    stage = {s["name"]: s for s in report["stages"]}["phone"]
    v = stage["verification"]
    assert (v["passed"], v["not_run"], v["max_rel"]) == (False, REASON, None)
    assert report["passed"] and report["failed"] == []
    md = (out / "report.md").read_text()
    assert "| phone | phone | model.phone |" in md and "| written, not run |" in md
    assert f"- **phone** (model.phone): {REASON}" in md and "Failures:" not in md

    again = verify(out)  # deploy verify of the run directory: the same verdict, the stage still not run
    assert again.passed and {s.name: s for s in again.stages}["phone"].verification.not_run == REASON

    with pytest.raises(PipelineError, match=f"the phone-rt runtime cannot run here \\({REASON}\\); drop phone-rt"):
        bench(BenchOptions(str(out), runtimes=["phone-rt"], chart=False))
    assert _why_not("phone-rt", "fp32", {}) == REASON
