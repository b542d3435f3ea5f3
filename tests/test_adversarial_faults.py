"""Issue 12, items 6-9: leftovers after a kill, one sentence instead of a traceback, options that were
accepted and ignored, and the smaller points (empty ONNX files, replacing the default run, typo
suggestions, data-dependent control flow, corrupt OpenVINO files).

Bad-input cases call ``deploy.cli.main`` in process (the same code as the command line without the
interpreter start-up); the SIGTERM case runs the real command line in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, error_line, leftovers, main_in_process as _main, terminate_when

from deploy import cli, pipeline, record, sources, zoo
from deploy.pipeline import PipelineError, plan_out_dir
from deploy.record import RunDirectory
from exporters.onnx import MIN_OPSET, export_onnx_raw, max_opset
from runtimes.core import CorruptArtifact, ExportError

FACTORY = '''
import time

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


class Slow(Net):
    def forward(self, x):
        time.sleep(120)  # the run sits here (inside its partial folder) until it is killed
        return super().forward(x)


INPUT_SHAPE = (1, 3, 8, 8)


def build():
    return Net().eval()


def data_dependent():
    return DataDependent().eval()


def slow():
    return Slow().eval()
'''


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(FACTORY)
    return path


def _dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    """A finished ``deploy convert`` directory with an ONNX artifact (copy it before changing it)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    base = tmp_path_factory.mktemp("onnx_run")
    (base / "mynet.py").write_text(FACTORY)
    out = base / "run"
    assert cli.main([f"{base / 'mynet.py'}:build", "--targets", "onnx", "--out", str(out), "-q"]) == 0
    return out


# ------------------------------------------------------------------------- 6: leftovers after a kill

@pytest.mark.e2e  # command-line runs
def test_sigterm_mid_run_removes_the_partial_folder(factory, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "deploy", "convert", f"{factory}:slow", "--targets", "none",
                             "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err, _ = terminate_when(proc, str(tmp_path / ".out.partial-*"), 120, poll=0.05)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM); nothing was written" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                 (signal.SIGINT, 130, "interrupted")])
def test_an_interrupt_a_library_wrapped_in_another_error_still_exits_as_the_signal(monkeypatch, capsys, signum,
                                                                                   code, said):
    """A signal that lands inside class creation during an import comes out as ``RuntimeError: Error calling
    __set_name__ ...`` caused by the interrupt: still the signal's exit code and sentence, not an internal error."""
    def command(args):
        try:
            raise cli._Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance 'x' in 'Y'") from e

    monkeypatch.setattr(cli, "cmd_zoo", command)
    assert cli.main(["zoo"]) == code
    err = capsys.readouterr().err
    assert f"deploy zoo: {said}; nothing was written" in err and "internal error" not in err


@pytest.mark.e2e  # command-line runs
def test_a_killed_runs_partial_folder_is_removed_by_the_next_run_but_a_live_ones_is_kept(capsys, tmp_path):
    out = tmp_path / "out"
    dead, live = _dead_pid(), os.getppid()  # the parent of this test process is running
    for name in (f".out.partial-{dead}", f".out.partial-{live}", f".other.partial-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x" * 1000)
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--targets", "none", "--out", str(out), "-q")
    assert rc == 0, err
    assert sorted(leftovers(tmp_path)) == sorted([f".out.partial-{live}", f".other.partial-{dead}"])

    # a killed --force replacement: its old folder goes once the new run is in place
    (tmp_path / f".out.old-{dead}").mkdir()
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--targets", "none", "--out", str(out), "--force", "-q")
    assert rc == 0, err
    assert f".out.old-{dead}" not in leftovers(tmp_path)


def test_a_killed_replacement_keeps_the_previous_run_it_had_moved_aside(tmp_path, caplog):
    out, old = tmp_path / "out", tmp_path / f".out.old-{_dead_pid()}"
    old.mkdir()  # killed between its two renames: the old folder is all that is left of the previous run
    (old / "report.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="deploy.record"):
        with RunDirectory(out, False) as run:
            run.commit()
    assert old.is_dir() and any(str(old) in r.getMessage() and "previous run" in r.getMessage()
                                for r in caplog.records)


def test_a_replaced_folder_that_cannot_be_deleted_is_reported(tmp_path, caplog, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, onerror=None, **kwargs):  # root may delete anything: simulate the refusal
        if ".old-" in str(path):
            onerror(os.rmdir, str(path), (PermissionError, PermissionError(13, "Permission denied"), None))
            return None
        return real_rmtree(path, *args, onerror=onerror, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with caplog.at_level(logging.WARNING, logger="deploy.record"):
        with RunDirectory(out, True) as run:
            (run.tmp / "report.json").write_text("{}")
            run.commit()
    old = tmp_path / f".out.old-{os.getpid()}"
    assert (out / "report.json").is_file() and old.is_dir()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(old) in m and "could not be deleted" in m and "permission denied" in m for m in messages)
    assert run.warnings


# ------------------------------------------------------------- 7: one sentence instead of a traceback

def test_an_output_parent_that_is_a_file_or_not_writable_is_one_sentence(capsys, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--targets", "none", "--out", str(tmp_path / "afile" / "o"))
    assert rc == 2 and "is a file, not a folder" in error_line(err)

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits: answer as the kernel would for a user
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(locked)
                                else real_access(p, mode, **kw))
        rc, _, err = _main(capsys, "convert", "repvgg_digits", "--targets", "none", "--out", str(locked / "o"))
        line = error_line(err)
        assert rc == 2 and "not writable" in line and str(locked) in line and "loading" not in err
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_a_permission_error_mid_run_is_one_sentence_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    def refuse(report, out_dir):
        raise PermissionError(13, "Permission denied", str(out_dir))

    monkeypatch.setattr(pipeline, "write_reports", refuse)
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--targets", "none", "--out", str(tmp_path / "o"))
    assert rc == 2 and "permission denied" in error_line(err)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_a_run_directory_that_cannot_be_created_is_a_pipeline_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(PipelineError, match="cannot create the output directory"):
        with RunDirectory(tmp_path / "afile" / "out", False):
            pass


@pytest.mark.parametrize("shape", ["list", "stages string"])
def test_a_malformed_report_is_one_sentence_for_verify_bench_and_inspect(onnx_run, capsys, tmp_path, shape):
    run = tmp_path / "run"
    shutil.copytree(onnx_run, run)
    data = json.loads((run / "report.json").read_text())
    if shape == "list":
        data = [data]
    else:
        data["stages"] = "training"
    (run / "report.json").write_text(json.dumps(data))
    for argv in (["verify", str(run)], ["bench", str(run), "--no-chart", "--isolation", "none"]):
        rc, _, err = _main(capsys, *argv)
        line = error_line(err)
        assert rc == 2 and "report.json" in line and ("not a deploy report" in line or "malformed" in line)
    rc, out, err = _main(capsys, "inspect", str(run / "model.onnx"))  # the artifact itself is fine
    assert rc == 0 and "Traceback" not in err and "Conv" in out


def test_negative_num_classes_is_one_sentence(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", "repvgg_a0", "--num-classes", "-3", "--out", str(tmp_path / "o"))
    assert rc == 2 and "--num-classes" in err and "integer >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(sources.SourceError, match="--num-classes must be an integer >= 1"):
        sources.load_model("repvgg_a0", num_classes=-3)


def test_out_dot_with_force_inside_a_run_directory_is_refused_before_converting(onnx_run, capsys, tmp_path,
                                                                               monkeypatch, factory):
    run = tmp_path / "run"
    shutil.copytree(onnx_run, run)
    before = sorted(p.name for p in run.iterdir())
    monkeypatch.chdir(run)
    rc, _, err = _main(capsys, "convert", f"{factory}:build", "--targets", "none", "--out", ".", "--force")
    line = error_line(err)
    assert rc == 2 and "current directory" in line and "loading" not in err
    monkeypatch.chdir(tmp_path)
    shutil.copy(factory, run / "inside.py")  # a model file the run would read, inside what it replaces
    rc, _, err = _main(capsys, "convert", f"{run / 'inside.py'}:build", "--targets", "none", "--out", str(run),
                       "--force")
    assert rc == 2 and "inside.py, which this run reads" in error_line(err)
    assert sorted(p.name for p in run.iterdir()) == sorted(before + ["inside.py"]) and leftovers(tmp_path) == []


# ------------------------------------------------------------------ 8: options accepted and ignored

@pytest.mark.parametrize("argv, words", [
    (["convert", "--opset", "99"], f"choose one in {MIN_OPSET}.."),
    (["convert", "--opset", "-1"], f"choose one in {MIN_OPSET}.."),
    (["convert", "--rtol", "nan"], "finite number >= 0"),
    (["convert", "--rtol", "inf"], "finite number >= 0"),
    (["convert", "--atol", "nan"], "finite number >= 0"),
    (["verify", ".", "--rtol", "nan"], "finite number >= 0"),
    (["convert", "--num-classes", "0"], "integer >= 1"),
    (["convert", "--input-shape", "1,,1,8,8"], "empty entry"),
    (["convert", "--input-shape", "1,0,8,8"], "positive integers"),
    (["convert", "--input-shape", "1,-3,8,8"], "positive integers"),
    (["convert", "--width", "0"], "finite number > 0"),
    (["convert", "--width", "nan"], "finite number > 0"),
    (["convert", "--seed", "99999999999999999999999"], "integer in 0.."),
    (["bench", "--threads", "0"], "integer >= 1"),
    (["bench", "--batch", "1,0"], "batch sizes must be positive"),
])
def test_every_option_is_checked_against_its_valid_range(capsys, tmp_path, argv, words):
    extra = {"convert": ["--targets", "none", "--out", str(tmp_path / "o")], "bench": ["--out", str(tmp_path / "o")],
             "verify": []}[argv[0]]
    rc, _, err = _main(capsys, *argv, *extra)
    lines = [ln for ln in err.splitlines() if ln.startswith("deploy ")]
    assert rc == 2 and len(lines) == 1 and words in lines[0] and argv[-2] in lines[0], err
    assert not (tmp_path / "o").exists()


def test_the_opset_range_is_what_the_installed_onnx_defines(capsys, tmp_path):
    pytest.importorskip("onnx")
    rc, _, err = _main(capsys, "convert", "--opset", str(max_opset() + 1), "--targets", "none", "--out",
                       str(tmp_path / "o"))
    assert rc == 2 and f"{MIN_OPSET}..{max_opset()}" in err


def test_an_opset_the_exporter_silently_did_not_convert_to_fails_the_export(tmp_path):
    pytest.importorskip("onnxscript")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(2)).eval()

    class Mean(torch.nn.Module):  # ReduceMean: the opset-18 -> 17 conversion of its axes input fails
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body(x).mean(2)

    with pytest.raises(ExportError, match="opset 17 was requested but the exporter wrote opset 18"):
        export_onnx_raw(Mean().eval(), (torch.randn(1, 3, 4, 4),), tmp_path / "m.onnx", opset=17)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ExportError, match=f"choose an opset in {MIN_OPSET}.."):
        export_onnx_raw(Mean().eval(), (torch.randn(1, 3, 4, 4),), tmp_path / "m.onnx", opset=99)


def test_a_shape_that_does_not_fit_the_shipped_samples_does_not_blame_inputs(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", "repvgg_digits", "--input-shape", "1,1,16,16", "--targets", "none",
                       "--out", str(tmp_path / "o"))
    line = error_line(err)
    assert rc == 2 and "--inputs array" not in line and "shipped with repvgg_digits" in line and "1,8,8" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ 9: smaller points

def test_inspect_of_an_empty_or_graphless_onnx_file_is_an_error(capsys, tmp_path):
    onnx = pytest.importorskip("onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), tmp_path / "nograph.onnx")
    for name, words in (("empty.onnx", "is empty"), ("nograph.onnx", "holds no graph")):
        rc, out, err = _main(capsys, "inspect", str(tmp_path / name))
        line = error_line(err)
        assert rc == 2 and words in line and name in line and "ops (0)" not in out


@pytest.mark.e2e  # command-line runs
def test_rerunning_the_default_run_says_what_it_replaces_and_keeps_files_a_user_added(capsys, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _main(capsys, "--targets", "none", "-q")[0] == 0
    run = tmp_path / "runs" / "repvgg_digits"
    rc, _, err = _main(capsys, "--targets", "none")
    assert rc == 0 and f"replacing the previous run in {os.path.join('runs', 'repvgg_digits')}" in err
    (run / "notes.txt").write_text("mine")
    rc, _, err = _main(capsys, "--targets", "none")
    line = error_line(err)
    assert rc == 2 and "notes.txt" in line and "--force" in line and "loading" not in err
    assert (run / "notes.txt").read_text() == "mine"
    rc, _, err = _main(capsys, "--targets", "none", "--force")
    assert rc == 0 and "1 file(s) it did not write: notes.txt" in err and not (run / "notes.txt").exists()
    assert plan_out_dir(None, "repvgg_digits", False) == (record.Path("runs/repvgg_digits"), True)


def test_zoo_typos_get_a_suggestion(capsys, tmp_path):
    rc, _, err = _main(capsys, "convert", "repvgg_a00", "--out", str(tmp_path / "o"))
    assert rc == 2 and "did you mean repvgg_a0?" in error_line(err)
    with pytest.raises(ValueError, match=r"did you mean repvgg_a0\?"):
        zoo.create("repvgg_a00")
    assert sources.close_matches("resnet1", ["resnet101", "resnet152", "resnet18", "resnet34"], n=2) == \
        ["resnet18", "resnet101"]


def test_timm_close_matches_put_prefix_matches_first():
    pytest.importorskip("timm")
    with pytest.raises(sources.SourceError, match=r"timm has no model 'resnet1' \(close: resnet18, "):
        sources.load_model("timm:resnet1")


def test_data_dependent_control_flow_is_one_sentence_and_the_graph_only_with_verbose(capsys, tmp_path, factory):
    args = ["convert", f"{factory}:data_dependent", "--input-shape", "1,3,8,8", "--out", str(tmp_path / "dd")]
    rc, _, err = _main(capsys, *args)
    line = error_line(err)
    assert rc == 2 and "depends on tensor values" in line and "mynet.py" in line and "-v" in line
    assert "def forward" not in err
    rc, _, err = _main(capsys, *args, "-v")
    assert rc == 2 and "def forward" in err
    assert not (tmp_path / "dd").exists() and leftovers(tmp_path) == []


def test_a_corrupt_openvino_file_names_the_file_and_the_problem(capsys, tmp_path):
    ov = pytest.importorskip("openvino")
    import openvino.opset13 as ops

    x = ops.parameter([1, 4], np.float32, name="x")
    weights = ops.constant(np.arange(64, dtype=np.float32).reshape(4, 16))
    ov.save_model(ov.Model([ops.matmul(x, weights, False, False)], [x], "tiny"), str(tmp_path / "w.xml"),
                  compress_to_fp16=False)
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.bin").read_bytes()[:100])
    (tmp_path / "t.xml").write_text('<net name="x"><layers><layer id="0"')
    (tmp_path / "t.bin").write_bytes(b"xx")
    for name, words in (("t.xml", "its XML is malformed"), ("w.xml", "w.bin (100 bytes)")):
        rc, _, err = _main(capsys, "inspect", str(tmp_path / name))
        line = error_line(err)
        assert rc == 2 and str(tmp_path / name) in line and words in line and "core.cpp" not in line
    from runtimes.openvino_runner import OpenVINORunner

    with pytest.raises(CorruptArtifact, match="its XML is malformed"):
        OpenVINORunner(str(tmp_path / "t.xml")).activate()
