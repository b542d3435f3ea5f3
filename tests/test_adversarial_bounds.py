"""Resource bounds and option gaps, as a hostile tester tries them: each test fails on the code before issue 22.

Memory is estimated before work (weights counted on the meta device, activations by one forward on fake
tensors) and refused in one sentence that names the estimate; threads are bounded by the CPUs; a full disk or
``ulimit -f`` is one sentence and exit 1 with no partial folder; every option out of range is one sentence and
exit 2 before any work.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, leftovers, main_in_process, run_deploy

from deploy import resources
from runtimes.hardware import usable_cpus

GB = 1 << 30


@pytest.fixture
def little_memory(monkeypatch):
    """This process may take 2 GB more (whatever the machine has): the estimates, not the machine, decide."""
    monkeypatch.setattr(resources, "available_memory", lambda: (2 * GB, "available memory"))


# ------------------------------------------------------------------------------------------- memory

def test_peak_activations_count_live_tensors_and_leave_the_model_as_it_was():
    class Caches(torch.nn.Module):  # a YOLO head caches a grid on itself during forward
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.grid = [torch.zeros(1)]

        def forward(self, x):
            self.grid[0] = torch.ones(x.shape[-1])
            return self.conv(x).relu() + self.grid[0]

    model = Caches().eval()
    peak = resources.peak_activations(model, [(2, 3, 16, 16)])
    conv_out = 2 * 8 * 16 * 16 * 4
    assert conv_out <= peak <= 3 * conv_out + 16 * 4  # conv, relu and the sum; no more than three alive at once
    assert type(model.grid[0]) is torch.Tensor and model.grid[0].shape == (1,)  # no fake tensor left behind
    model(torch.randn(1, 3, 16, 16))  # and the model still runs for real


def test_a_huge_input_shape_is_refused_before_any_tensor_is_made(capsys, tmp_path, little_memory):
    rc, _, err = main_in_process(capsys, "convert", "repvgg_a0", "--width", "0.25", "--input-shape", "1,3,2048,2048",
                                 "--targets", "none", "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 2 and "needs about" in line and "of activations at the peak of one forward" in line
    assert "more than the 2.15 GB this process can take (available memory); pass a smaller --input-shape" in line
    assert "capturing" not in err and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("option, value, words", [
    ("--width", "1000", "converting repvgg_a0 with --width 1000.0 ("),
    ("--num-classes", "2000000000", "converting repvgg_a0 with --num-classes 2000000000 ("),
])
def test_weights_too_large_for_memory_are_refused_before_they_are_built(capsys, tmp_path, little_memory, option,
                                                                         value, words):
    rc, _, err = main_in_process(capsys, "convert", "repvgg_a0", option, value, "--targets", "none",
                                 "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 2 and words in line and "TB of weights) needs about" in line and "pass a smaller --width" in line


def test_an_address_space_limit_is_read(monkeypatch):
    monkeypatch.setattr(resources, "_meminfo", lambda key: 64 * GB)
    monkeypatch.setattr(resources, "_mapped", lambda: 3 * GB)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (4 * GB, resource.RLIM_INFINITY)
                        if which == resource.RLIMIT_AS else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert resources.available_memory() == (GB, "the address space left under the limit (ulimit -v)")


def test_an_npz_declaring_more_than_memory_is_refused_before_it_is_read(capsys, tmp_path, little_memory):
    """A few compressed bytes can declare terabytes: the header is read first."""
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header["shape"] = (10**12,)
    npy = tmp_path / "input0.npy"
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(npy, "input0.npy")
    rc, _, err = main_in_process(capsys, "convert", "repvgg_digits", "--inputs", str(tmp_path / "bomb.npz"),
                                 "--targets", "none", "--out", str(tmp_path / "out"))
    assert rc == 2 and "declares 4 TB of arrays, more than half the 2.15 GB this process can take" in error_line(err)
    with pytest.raises(ValueError, match="holds Python objects"):
        np.savez(tmp_path / "objects.npz", input0=np.array([{"a": 1}], dtype=object))
        resources.read_npz(tmp_path / "objects.npz")


# ------------------------------------------------------------------------------------------ threads

def test_threads_are_bounded_by_the_cpus(capsys, tmp_path):
    cpus = usable_cpus()
    for argv in (["bench", str(tmp_path), "--threads", "100000"], ["tune", "--threads", "1,100000"]):
        rc, _, err = main_in_process(capsys, *argv)
        assert rc == 2, err
        assert f"--threads 100000 is more than the {cpus} CPU(s) this process may use; pass --threads {cpus} or " \
               "fewer" in error_line(err)
    rc, _, err = main_in_process(capsys, "tune", "--threads", "0")
    assert rc == 2 and "thread counts must be positive integers" in err and "batch sizes" not in err


# ---------------------------------------------------------------------------------------------- disk

def test_a_disk_without_room_is_refused_before_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: type("U", (), {"free": 100_000})())
    rc, _, err = main_in_process(capsys, "convert", "repvgg_digits", "--targets", "onnx",
                                 "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 1 and "no space for the run into" in line and "MB and the device holding" in line
    assert "0.1 MB free" in line and "capturing" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Failed to write model.onnx: No space left on device"),
])
def test_a_write_that_runs_out_of_space_mid_run_is_one_sentence_not_the_models_fault(capsys, tmp_path, monkeypatch,
                                                                                      failure):
    import dataclasses

    from exporters import targets as registry

    def export(job):
        (job.folder / "model.onnx").write_bytes(b"partial")
        raise failure

    monkeypatch.setitem(registry._REGISTRY, "onnx", dataclasses.replace(registry.get("onnx"), export=export))
    rc, out, err = main_in_process(capsys, "convert", "repvgg_digits", "--targets", "onnx",
                                   "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 1 and "no space left on the device holding" in line and "nothing was kept" in line
    assert "the run had written" in line and "change the model" not in err + out and "FAILED" not in out
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.e2e  # a command-line run under ulimit -f
def test_a_file_size_limit_is_one_sentence_not_a_core_dump(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1")
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "deploy", "convert", "repvgg_digits", "--targets", "onnx", "--out",
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          preexec_fn=limit, timeout=600)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # not -SIGXFSZ
    line = error_line(proc.stderr)
    assert "file size limit" in line and "ulimit -f" in line and "change the model" not in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("argv, words", [
    (["convert", "--num-classes", "1000000000000000000000"], "--num-classes: must be an integer <= 2147483647"),
    (["convert", "repvgg_a0", "--width", "1e30"], "building repvgg_a0 failed (TypeError"),
    (["convert", "--input-shape", "1,1,99999999999999999999,8"], "input shape must be integers up to 2147483647"),
    (["convert", "--precision", "int8", "--min-sqnr", "nan"], "--min-sqnr: expected a finite number, got 'nan'"),
    (["convert", "--precision", "int8", "--std", "0"], "--std: a standard deviation divides the pixels"),
    (["convert", "--precision", "int8", "--std", "-1"], "each must be > 0, got '-1'"),
    (["convert", "--targets", ""], "--targets: '' names no target; list formats like onnx,openvino, or write none"),
    (["convert", "--targets", ","], "--targets: ',' names no target"),
    (["convert", "--targets", "onnx,,openvino"], "has an empty entry"),
    (["bench", "--min-iters", "1000000000000"], "--min-iters: must be an integer <= 100000"),
    (["bench", "--warmup-iters", "-1"], "--warmup-iters: must be an integer >= 0"),
    (["convert", "--precision", "int8", "--calibration-size", "10000000000"], "must be an integer <= 100000"),
])
def test_options_out_of_range_are_one_sentence(capsys, tmp_path, argv, words):
    rc, _, err = main_in_process(capsys, *argv, "--out", str(tmp_path / "out"))
    assert rc == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_labels_outside_the_models_classes_are_refused(capsys, tmp_path):
    from deploy.zoo import samples

    with np.load(samples("repvgg_digits")) as d:
        x, labels = d["input0"][:20], d["labels"][:20].copy()
    labels[3] = 12  # the digits model has 10 classes
    np.savez(tmp_path / "s.npz", input0=x, labels=labels)
    rc, _, err = main_in_process(capsys, "convert", "repvgg_digits", "--inputs", str(tmp_path / "s.npz"), "--targets",
                                 "none", "--out", str(tmp_path / "out"))
    assert rc == 2 and "'labels' must be class indices 0..9 of the model's 10 outputs, but sample 3 is labelled " \
        "12" in error_line(err)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_out_that_is_not_utf8_or_a_dangling_link_is_refused_before_any_work(capsys, tmp_path):
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff")
    rc, _, err = main_in_process(capsys, "convert", "--out", bad)
    assert rc == 2 and "is not valid UTF-8 text" in error_line(err) and "loading" not in err
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    rc, _, err = main_in_process(capsys, "convert", "--out", str(tmp_path / "link"))
    assert rc == 2 and "is a symbolic link to" in error_line(err) and "which does not exist" in err
    assert "loading" not in err and not (tmp_path / "nowhere").exists()


def test_forked_children_get_the_default_sigterm(tmp_path):
    """A library's helper process forked during a command (OpenVINO's telemetry did) dies of SIGTERM."""
    import time

    from deploy import cli

    with cli._sigterm_as_interrupt():
        pid = os.fork()
        if pid == 0:  # the child: sleep until killed
            time.sleep(30)
            os._exit(7)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
