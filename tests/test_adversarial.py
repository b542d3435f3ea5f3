"""Crafted inputs, as an adversarial user would make them: each test fails on the code before issue 12's fixes.

Security: a checkpoint whose pickle runs code, ``.pt2`` archives with a pickled entry, a code string
in a symbolic shape or a malicious example-inputs pickle, a ``report.json`` naming files outside its
run directory; and a 1-ulp edit of one ONNX weight, which still computes the same numbers but is
not the artifact that was verified. Every crafted pickle would create a marker file when unpickled;
the tests assert that the marker was *not* created.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import main_in_process as _main, run_deploy

from deploy.pipeline import ConvertOptions, PipelineError, convert, verify
from deploy.sources import SourceError, load_model, read_state_dict
from deploy.zoo import digits
from runtimes.core import UntrustedFile
from runtimes.pt2_archive import scan
from runtimes.safe_load import load_program

onnx = pytest.importorskip("onnx")


class MakesMarker:
    """Unpickling this creates the file ``path``: code from the file, run by the loader."""

    def __init__(self, path: Path):
        self.path = os.fspath(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A deploy run of the shipped digits model: model.deploy.pt2, model.onnx (and model.sim.onnx)."""
    out = tmp_path_factory.mktemp("adversarial") / "digits"
    result = convert(ConvertOptions(model="repvgg_digits", targets=("onnx",), out=str(out)))
    assert result.passed, [(s.name, s.reason) for s in result.failed]
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# -------------------------------------------------------------------------- 1. a pickle in --checkpoint

def test_checkpoint_with_code_is_refused_without_trust_pickle(tmp_path, capsys):
    marker = tmp_path / "ran"
    state = digits.RepVGGDigits().state_dict()
    torch.save({"state_dict": state, "meta": MakesMarker(marker)}, tmp_path / "evil.pt")
    for argv in (["convert", "repvgg_digits", "--checkpoint", str(tmp_path / "evil.pt"), "--targets", "none",
                  "--out", str(tmp_path / "out")],
                 ["inspect", "repvgg_digits", "--checkpoint", str(tmp_path / "evil.pt")]):
        rc, _, err = _main(capsys, *argv)
        assert rc == 2, err
        assert "holds Python objects (io.open); loading it runs code from it; pass --trust-pickle if you " \
               "trust its source" in err
        assert not marker.exists()
    assert not (tmp_path / "out").exists()

    # the harmless globals real checkpoints hold load without the flag
    import argparse

    torch.save({"state_dict": state, "opt": argparse.Namespace(lr=0.01), "best_fitness": np.float64(0.9),
                "dtype": np.dtype("float32"), "epoch": np.int64(3)}, tmp_path / "real.pt")
    assert read_state_dict(tmp_path / "real.pt")[1]["key"] == "state_dict"

    # a whole pickled model (a YOLOv7 checkpoint) is code by definition: it needs the flag too, and says so
    torch.save({"model": digits.RepVGGDigits().eval(), "epoch": 3}, tmp_path / "best.pt")
    with pytest.raises(SourceError, match=r"holds Python objects \(deploy\.zoo\.digits\.RepVGGDigits\), as a whole "
                       r"pickled model does .*pass --trust-pickle"):
        load_model(str(tmp_path / "best.pt"))
    assert load_model(str(tmp_path / "best.pt"), trust_pickle=True).kind == "pickle"

    # the flag is what allows it
    read_state_dict(tmp_path / "evil.pt", trust_pickle=True)
    assert marker.exists()


# ------------------------------------------------------------------------------- 2. a pickle in a .pt2

def _rewrite(src: Path, dst: Path, replace: dict[str, bytes] = {}, add: dict[str, bytes] = {}) -> None:
    """Copy the zip archive ``src`` to ``dst`` with the entries ending in a key of ``replace`` replaced, and the
    entries of ``add`` added (names relative to the archive's root folder): still a valid archive."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = next((v for k, v in replace.items() if info.filename.endswith("/" + k)), zin.read(info))
            zout.writestr(info.filename, data)
        for name, data in add.items():
            zout.writestr(f"{root}/{name}", data)


def _entry(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/" + name)))


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.e2e  # converts the default model first
def test_crafted_pt2_is_refused_and_the_runs_own_pt2_never_unpickles(run_dir, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran"
    pt2 = run_dir / "model.deploy.pt2"
    # a weight replaced by a pickle (torch.export.load reads it with torch.load(weights_only=False))
    config = json.loads(_entry(pt2, "data/weights/model_weights_config.json"))
    fqn, meta = next(iter(config["config"].items()))
    meta["use_pickle"] = True
    evil = tmp_path / "evil.pt2"
    _rewrite(pt2, evil, replace={f"data/weights/{meta['path_name']}": _pickled(MakesMarker(marker)),
                                 "data/weights/model_weights_config.json": json.dumps(config).encode()})
    # an opaque object added to the constants (torch.export.load reads it with pickle.loads)
    constants = json.loads(_entry(pt2, "data/constants/model_constants_config.json"))
    constants["config"]["extra"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                    "tensor_meta": None}
    opaque = tmp_path / "opaque.pt2"
    _rewrite(pt2, opaque, replace={"data/constants/model_constants_config.json": json.dumps(constants).encode()},
             add={"data/constants/opaque_obj_0": _pickled(MakesMarker(marker))})

    for crafted, found in ((evil, f"a pickled object (data/weights/{meta['path_name']}, for {fqn})"),
                           (opaque, "a pickled object (data/constants/opaque_obj_0, for extra)")):
        with pytest.raises(UntrustedFile, match=r"holds .*loading it runs code from it; pass --trust-pickle"):
            load_program(crafted)
        assert scan(crafted) == [found]
        rc, _, err = _main(capsys, "inspect", str(crafted))
        assert rc == 2 and "pass --trust-pickle if you trust its source" in err, err
        with pytest.raises(SourceError, match="pass --trust-pickle"):
            load_model(str(crafted))
        assert not marker.exists()

    # in a run directory, a pt2 whose hash changed is not even opened by deploy verify and deploy inspect
    copy = _copy(run_dir, tmp_path)
    shutil.copy(evil, copy / "model.deploy.pt2")
    rc, _, err = _main(capsys, "inspect", str(copy / "model.deploy.pt2"))
    assert rc == 2 and "changed since deploy convert wrote it" in err and "--trust-pickle" in err, err
    pt2_stage = next(s for s in verify(copy).stages if s.name == "pt2")
    assert not pt2_stage.passed and "changed since convert (sha256 differs) and was not loaded" in pt2_stage.reason
    assert not marker.exists()

    # deploy verify: a crafted pt2 whose hash the report matches (whoever edits one edits the other) is refused
    report = json.loads((copy / "report.json").read_text())
    from deploy.record import sha256

    for stage in report["stages"]:
        if "model.deploy.pt2" in stage["files"]["sha256"]:
            stage["files"]["sha256"]["model.deploy.pt2"] = sha256(copy / "model.deploy.pt2")
    (copy / "report.json").write_text(json.dumps(report))
    rc, out, err = _main(capsys, "verify", str(copy))
    assert rc == 1 and "FAILED pt2 (model.deploy.pt2)" in out and "pass --trust-pickle" in out, out + err
    assert not marker.exists()

    # the example inputs are a pickle in every torch.export.save file: dropped, never unpickled
    samples = tmp_path / "samples.pt2"
    _rewrite(pt2, samples, replace={"data/sample_inputs/model.pt": _pickled(((MakesMarker(marker),), {}))})
    assert load_program(samples).example_inputs is None and not marker.exists()

    # a symbolic shape is parsed with sympy.sympify, which eval()s: a code string in model.json is refused
    class Batch(torch.nn.Module):
        def forward(self, x):
            return x * 2

    ep = torch.export.export(Batch(), (torch.ones(2, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "dynamic.pt2")
    graph = _entry(tmp_path / "dynamic.pt2", "models/model.json").decode()
    code = f"(__import__('builtins').open({os.fspath(marker)!r}, 'w') and 0) + Symbol('s77')"
    assert "Symbol('s77', positive=True, integer=True)" in graph
    graph = graph.replace("Symbol('s77', positive=True, integer=True)", code.replace("'", "\\u0027"), 1)
    _rewrite(tmp_path / "dynamic.pt2", tmp_path / "sympy.pt2", replace={"models/model.json": graph.encode()})
    with pytest.raises(UntrustedFile, match=r"a symbolic shape that is Python code"):
        load_program(tmp_path / "sympy.pt2")
    assert load_program(tmp_path / "dynamic.pt2").module()(torch.ones(5, 3)).shape == (5, 3)
    assert not marker.exists()

    # the run's own pt2: weights as raw bytes, no example inputs; loading it unpickles nothing at all
    assert _entry(pt2, "data/sample_inputs/model.pt") == b"" and scan(pt2) == []

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    monkeypatch.setattr("pickle.Unpickler", no_unpickling)
    x = torch.zeros(1, 1, 8, 8)
    assert load_program(pt2).module()(x).shape == (1, 10)


# ------------------------------------------------------------------ 2. paths outside the run directory

@pytest.mark.parametrize("where", ["/etc/hostname", "../outside.onnx", "symlink"])
def test_report_naming_a_file_outside_the_run_is_refused_before_opening_it(run_dir, tmp_path, capsys, monkeypatch,
                                                                           where):
    copy = _copy(run_dir, tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "model.onnx", outside)
    report = json.loads((copy / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["name"] == "onnx")
    if where == "symlink":  # the report is intact; the file in the run directory links out of it
        (copy / "model.onnx").unlink()
        (copy / "model.onnx").symlink_to(outside)
        named = "model.onnx"
    else:
        named = where
        stage["files"] = {"files": [where], "size": 1, "sha256": {where: "0" * 64}}
        stage["export"]["artifact"]["path"] = where
        (copy / "report.json").write_text(json.dumps(report))

    import deploy.pipeline
    import deploy.record

    opened = []
    real_sha256 = deploy.record.sha256
    monkeypatch.setattr(deploy.record, "sha256", lambda p: opened.append(os.fspath(p)) or real_sha256(p))
    monkeypatch.setattr(deploy.pipeline, "verify_stages", lambda *a, **k: opened.append("verify_stages"))
    with pytest.raises(PipelineError, match=rf"names an? [a-z ]+ '{re.escape(named)}', which is outside the run "
                       "directory"):
        verify(copy)
    forbidden = {outside.resolve(), Path("/etc/hostname").resolve()}
    assert "verify_stages" not in opened and not any(Path(p).resolve() in forbidden for p in opened), opened
    rc, _, err = _main(capsys, "verify", str(copy))
    assert rc == 2 and "outside the run directory" in err and "rerun deploy convert" in err


# ------------------------------------------------------------------------------- 4. a 1-ulp tamper

def _one_ulp(path: Path) -> None:
    """Move one float of one ONNX initializer to the next float up; the file stays a valid model."""
    from onnx import numpy_helper

    model = onnx.load(path)
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1)
    weights = numpy_helper.to_array(init).copy()
    flat = weights.reshape(-1)
    flat[0] = np.nextafter(flat[0], np.float32(np.inf))
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, path)
    onnx.checker.check_model(onnx.load(path))


@pytest.mark.e2e  # convert, verify and bench on a run
def test_one_ulp_edit_of_an_onnx_weight_fails_verify_unless_allowed(run_dir, tmp_path):
    from deploy.bench import BenchOptions, bench
    from runtimes.bench import BenchSettings

    copy = _copy(run_dir, tmp_path)
    _one_ulp(copy / "model.onnx")
    result = verify(copy)
    v = next(s for s in result.stages if s.name == "onnx").verification
    assert not result.passed and [s.name for s in result.failed] == ["onnx"]
    assert v.changed and v.max_rel is not None and v.max_rel <= 1e-5  # the numbers still pass
    assert "not the artifact that was verified" in v.reason and "--allow-changed" in v.reason

    proc = run_deploy("verify", str(copy), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "changed since convert (sha256 differs): onnx" in proc.stdout
    proc = run_deploy("verify", str(copy), "--allow-changed", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "changed since convert (sha256 differs): onnx; verified again as they are now (--allow-changed)" \
        in proc.stdout

    # deploy bench refuses to time a changed artifact (ONNX Runtime times the simplified file) unless allowed
    _one_ulp(copy / "model.sim.onnx")
    opts = dict(runtimes=["onnxruntime"], isolation="none", chart=False,
                settings=BenchSettings(warmup_iters=0, warmup_ms=0, min_iters=2, min_ms=0))
    with pytest.raises(PipelineError, match=r"changed since convert \(sha256 differs\): onnx-simplified "
                       r"\(model\.sim\.onnx\).*pass --allow-changed"):
        bench(BenchOptions(str(copy), **opts))
    entry = bench(BenchOptions(str(copy), allow_changed=True, **opts)).entry
    assert any("model.sim.onnx changed since convert (sha256 differs); timed as it is now (--allow-changed)" in n
               for n in entry["notes"])
