"""A run directory and a ``--code-path`` as a hostile user prepares them: each test fails on the code before
issue 22.

``report.json`` is input from someone else: its ``load`` section never chooses code to run (``deploy bench``
and ``deploy tune`` reload a model file only from the user's own command line, and check it against the
recorded outputs); ``verify/*.npz`` are hashed like the artifacts; a ``--code-path`` folder serves unpickling
only, never shadows an installed module and is forgotten afterwards. Every payload would create a marker file
when run; the tests assert that it was not created.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, error_line, main_in_process, terminate_when

from deploy.pipeline import ConvertOptions, convert
from deploy.sources import SourceError, load_model

pytest.importorskip("onnxruntime")

FAST = ["--isolation", "none", "--min-ms", "1", "--min-iters", "2", "--warmup-ms", "0", "--warmup-iters", "0",
        "--no-chart", "-q"]
EVIL = '''
open({marker!r}, "w").write("ran at import")


def make():
    open({marker!r}, "w").write("ran make()")
'''


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run of a random-weight zoo model (its weights depend on --seed) with an ONNX artifact and held-out samples."""
    base = tmp_path_factory.mktemp("rundir")
    np.savez(base / "samples.npz", input0=np.random.default_rng(0).standard_normal((6, 3, 32, 32), np.float32))
    result = convert(ConvertOptions(model="repvgg_a0", width=0.25, input_shape=(1, 3, 32, 32), seed=3,
                                    targets=("onnx",), inputs=str(base / "samples.npz"), out=str(base / "run")))
    assert result.passed, [(s.name, s.reason) for s in result.failed]
    return base / "run"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _edit_report(run: Path, **load) -> None:
    path = run / "report.json"
    data = json.loads(path.read_text())
    data["load"].update(load)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------- report.json names no code to run

def test_a_report_naming_a_model_file_runs_nothing(capsys, tmp_path, run_dir):
    run, marker = _copy(run_dir, tmp_path), tmp_path / "ran"
    (tmp_path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "onnx.py").write_text(EVIL.format(marker=str(marker)))
    _edit_report(run, spec=f"{tmp_path / 'evil.py'}:make", code_path=[str(tmp_path / "code")])

    rc, out, err = main_in_process(capsys, "bench", str(run), *FAST)  # plain bench: times the artifacts, says why not
    assert rc == 0, err
    assert "cost model of the training form left out" in out and "a run directory never chooses code to run" in out
    assert f"deploy bench {run} --model {tmp_path / 'evil.py'}:make --code-path {tmp_path / 'code'}" in out
    rc, _, err = main_in_process(capsys, "bench", str(run), "--compare-train", *FAST)
    assert rc == 2 and "--compare-train needs the training model" in error_line(err)
    rc, _, err = main_in_process(capsys, "tune", str(run), "--out", str(tmp_path / "tune"))
    assert rc == 2 and f"tune the model itself: deploy tune {tmp_path / 'evil.py'}:make" in error_line(err)
    assert not marker.exists() and not (tmp_path / "tune").exists()


@pytest.mark.e2e
def test_a_built_in_model_is_reloaded_from_the_report_and_checked_against_its_outputs(capsys, tmp_path, run_dir):
    rc, out, err = main_in_process(capsys, "bench", str(run_dir), "--compare-train", *FAST)
    assert rc == 0 and "deploy form" in out and "the training form's speed" in out, err
    run = _copy(run_dir, tmp_path)
    _edit_report(run, seed=4)  # another network than the one converted: its outputs differ
    rc, _, err = main_in_process(capsys, "bench", str(run), "--compare-train", *FAST)
    assert rc == 2 and "does not compute the training outputs recorded in" in error_line(err)
    # the user's own command line decides: the right model passes, a wrong one is refused
    rc, _, err = main_in_process(capsys, "bench", str(run), "--compare-train", "--model", "repvgg_a0", "--width",
                                 "0.25", "--seed", "3", *FAST)
    assert rc == 0, err
    rc, _, err = main_in_process(capsys, "bench", str(run), "--compare-train", "--model", "repvgg_a0", "--width",
                                 "0.25", *FAST)
    assert rc == 2 and "the training model repvgg_a0 does not compute the training outputs" in error_line(err)


# ------------------------------------------------------------------------------ verify/*.npz are hashed

@pytest.mark.parametrize("damage", ["delete", "change"])
def test_the_recorded_reference_is_hashed(capsys, tmp_path, run_dir, damage):
    """Deleting verify/samples.npz used to drop the held-out check silently; changing a recorded output moves the
    bar every stage is judged by."""
    run = _copy(run_dir, tmp_path)
    if damage == "delete":
        (run / "verify" / "samples.npz").unlink()
        words = "verify/samples.npz is missing"
    else:
        target = run / "verify" / "reference.npz"
        with np.load(target) as d:
            arrays = {k: d[k] * 1.5 for k in d.files}
        np.savez(target, **arrays)
        words = "verify/reference.npz changed since convert (sha256 differs)"
    rc, out, _ = main_in_process(capsys, "verify", str(run), "-q")
    assert rc == 1 and f"FAILED the recorded reference: {words}" in out and "reference FAILED its check" in out
    rc, out, _ = main_in_process(capsys, "verify", str(run), "-q", "--allow-changed")
    assert f"note: {words}; verified with the files as they are (--allow-changed)" in out
    assert rc == (0 if damage == "delete" else 1)  # the stages match the training outputs, not outputs x 1.5


# ---------------------------------------------------------------------------------------- --code-path

CLASS = '''
import torch

VERSION = {version!r}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * float(VERSION == "b")
'''


def _package(root: Path, version: str) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "net.py").write_text(CLASS.format(version=version))
    return root


def _is_models(name: str) -> bool:
    return name == "models" or name.startswith("models.")


@pytest.fixture
def pickled(tmp_path):
    """A whole pickled ``models.net.Net`` whose code lives in ``tmp_path/a`` (and another version in ``b``); the
    package is imported only while the file is written."""
    a, b = _package(tmp_path / "a", "a"), _package(tmp_path / "b", "b")
    saved = {n: sys.modules.pop(n) for n in [n for n in sys.modules if _is_models(n)]}
    sys.path.insert(0, str(a))
    try:
        import models.net

        torch.save({"model": models.net.Net().eval()}, tmp_path / "net.pt")
    finally:
        sys.path.remove(str(a))
        for n in [n for n in sys.modules if _is_models(n)]:
            del sys.modules[n]
    yield tmp_path / "net.pt", a, b
    sys.modules.update(saved)


def _from(folder: Path) -> list[str]:
    return [n for n, m in list(sys.modules.items()) if str(folder) in (getattr(m, "__file__", None) or "")]


def test_code_path_needs_trust_pickle_and_never_shadows_an_installed_module(capsys, tmp_path, pickled):
    path, a, _ = pickled
    marker = tmp_path / "ran"
    (a / "onnx.py").write_text(EVIL.format(marker=str(marker)))  # would run when the exporter imports onnx
    rc, _, err = main_in_process(capsys, "convert", "repvgg_digits", "--code-path", str(a), "--targets", "onnx",
                                 "--out", str(tmp_path / "out"))
    assert rc == 2 and "--code-path only supplies the classes a pickled model is unpickled with" in error_line(err)
    path_before = list(sys.path)
    loaded = load_model(str(path), code_path=[str(a)], trust_pickle=True)
    assert type(loaded.model).__module__ == "models.net"
    import onnx

    assert Path(onnx.__file__).parent.name == "onnx" and not marker.exists()
    assert sys.path == path_before and _from(a) == []  # the folder is forgotten after the load


def test_a_second_load_with_another_code_path_gets_the_other_code(pickled):
    path, a, b = pickled
    first = load_model(str(path), code_path=[str(a)], trust_pickle=True).model
    second = load_model(str(path), code_path=[str(b)], trust_pickle=True).model
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert float(first(x).abs().max()) == 0.0 and float(second(x).abs().max()) > 0.0


def test_a_needed_module_that_exists_elsewhere_is_refused_by_name(tmp_path, monkeypatch):
    """A pickle naming ``json.Net`` with a folder holding a ``json`` package: unpickling would take the standard
    library's json, not the folder's, so the load is refused naming both."""
    import json as std_json

    code = tmp_path / "code"
    (code / "json").mkdir(parents=True)
    (code / "json" / "__init__.py").write_text(CLASS.format(version="a"))

    class Net(torch.nn.Module):
        pass

    Net.__module__, Net.__qualname__ = "json", "Net"
    monkeypatch.setattr(std_json, "Net", Net, raising=False)
    torch.save({"model": Net().eval()}, tmp_path / "net.pt")
    with pytest.raises(SourceError, match=r"--code-path holds modules the pickled model needs that this Python "
                                          r"already has: json \(.*code/json\) is also .*json/__init__.py"):
        load_model(str(tmp_path / "net.pt"), code_path=[str(code)], trust_pickle=True)


# ------------------------------------------------------------------------------------- bench and SIGTERM

@pytest.mark.e2e  # a command-line run killed mid-way
def test_sigterm_stops_a_bench_and_removes_its_temporary_folders(tmp_path, run_dir):
    stale = tmp_path / "tmp" / f"deploy-bench-{_dead_pid()}-x"
    stale.mkdir(parents=True)  # left by a bench killed outright
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path / "tmp"))
    proc = subprocess.Popen([sys.executable, "-m", "deploy", "bench", str(run_dir), "--min-ms", "600000",
                             "--no-chart", "--batch", "1,2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err, seconds = terminate_when(proc, str(tmp_path / "tmp" / f"deploy-bench-{proc.pid}-*" / "job-*.json"), 300,
                                  settle=1.0)  # the runtime's process is timing by then
    assert proc.returncode == 128 + signal.SIGTERM and seconds < 30, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert os.listdir(tmp_path / "tmp") == []  # its own folder and the stale one


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_imported_namespace_package_of_the_same_name_is_set_aside(pickled, tmp_path, monkeypatch):
    """onnxruntime.transformers puts a folder holding a code-less ``models`` on sys.path; once something imported
    it, a code path's regular ``models`` package must still load, and the namespace package come back after."""
    path, a, _ = pickled
    (tmp_path / "lib" / "models").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.delitem(sys.modules, "models", raising=False)  # an earlier test's comes back afterwards
    import models

    assert getattr(models, "__file__", None) is None  # a namespace package
    loaded = load_model(str(path), code_path=[str(a)], trust_pickle=True)
    assert type(loaded.model).__module__ == "models.net" and sys.modules["models"] is models
    del sys.modules["models"]  # this test's namespace package, which must not outlive it
