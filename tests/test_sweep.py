"""``deploy sweep``: pattern expansion, failure classes, the job supervisor, resume, a killed job, Ctrl-C, Ray.

The fast lane checks the pieces on their own (expansion against timm's tiny ``test_*`` models counted
on the meta device, failure classes on strings, the supervisor on small Python processes, the table
from made-up records, bad input). The end-to-end tests run the command line in a subprocess on two
models that convert in seconds: the zoo's repvgg_digits and a conv + BatchNorm model from a file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, error_line, main_in_process
from deploy import sweep_report
from deploy.sweep import Model, SweepError, SweepOptions, expand, parse_count, plan, read_list
from deploy.sweep_jobs import failure_line, run_process
from deploy.sweep_report import cell, failure_class, report_fields, summary, summary_lines

TINY = """
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build():
    torch.manual_seed(0)
    model = Tiny()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    return model.eval()
"""

KILLER = """
import os
import signal

from torch import nn

INPUT_SHAPE = (1, 3, 8, 8)


class Killer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)  # the job's process dies as under the kernel's OOM killer
        return self.conv(x)


def build():
    return Killer().eval()
"""

SPECS = ("repvgg_digits", "tiny.py:build")


# ------------------------------------------------------------------------------------------- fast lane

def test_pattern_expansion_is_deterministic_and_bounded_by_max_params():
    pytest.importorskip("timm")
    first = expand(["timm:test_*"], sample=3, seed=1)
    assert [m.spec for m in first] == [m.spec for m in expand(["timm:test_*"], sample=3, seed=1)]
    assert len(first) == 3 and all(m.spec.startswith("timm:test_") for m in first)
    larger = {m.spec for m in expand(["timm:test_*"], sample=5, seed=1)}
    assert {m.spec for m in first} <= larger  # a larger sample with the same seed keeps the smaller one
    draws = {tuple(m.spec for m in expand(["timm:test_*"], sample=3, seed=s)) for s in range(4)}
    assert len(draws) > 1  # the seed draws

    every = expand(["timm:test_*"], max_params=10**9)
    assert all(m.params and m.params > 0 for m in every)
    bound = sorted(m.params for m in every)[len(every) // 2]
    small = expand(["timm:test_*"], max_params=bound)
    assert {m.spec for m in small} == {m.spec for m in every if m.params <= bound} != {m.spec for m in every}
    # named specs pass through as given, in order, without duplicates
    assert [m.spec for m in expand(["repvgg_digits", "timm:test_vit", "repvgg_digits"])] == ["repvgg_digits",
                                                                                            "timm:test_vit"]
    with pytest.raises(SweepError, match="matches no timm model"):
        expand(["timm:no_such_model_*"])
    assert parse_count("25M") == 25_000_000 and parse_count("1.5k") == 1500 and parse_count("300") == 300
    with pytest.raises(ValueError):
        parse_count("25Q")


def test_list_file_skips_comments_and_blank_lines(tmp_path):
    listed = tmp_path / "models.txt"
    listed.write_text("# the zoo\nrepvgg_digits  # trained\n\n  timm:resnet*\n")
    assert read_list(str(listed)) == ["repvgg_digits", "timm:resnet*"]
    with pytest.raises(SweepError, match="does not exist"):
        read_list(str(tmp_path / "absent.txt"))


@pytest.mark.parametrize("argv, words", [
    (["sweep", "--out", "{tmp}/o"], "no models to sweep"),
    (["sweep", "--list", "{tmp}/absent.txt", "--out", "{tmp}/o"], "--list"),
    (["sweep", "timm:no_such_model_*", "--out", "{tmp}/o"], "matches no timm model"),
    (["sweep", "repvgg_digits", "--out", "{tmp}/taken"], "not a deploy sweep directory"),
    (["sweep", "repvgg_digits", "--sample", "3", "--out", "{tmp}/o"], "apply to patterns"),
    (["sweep", "no_such_model", "--out", "{tmp}/o"], "unknown model"),
])
def test_bad_input_is_one_sentence_and_exit_2(capsys, tmp_path, argv, words):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    rc, _, err = main_in_process(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert rc == 2 and words in error_line(err)
    assert not (tmp_path / "o").exists()  # nothing written before the input is known to be good


def test_bad_option_value_exits_2(capsys, tmp_path):
    rc, _, err = main_in_process(capsys, "sweep", "timm:*", "--max-params", "25Q", "--out", str(tmp_path / "o"))
    assert rc == 2 and "--max-params" in err


def test_resume_plans_only_missing_jobs_and_rerun_failed_also_the_failed_ones(tmp_path):
    models = [Model("a"), Model("b"), Model("c")]
    done = {"a|onnx|fp32": {"spec": "a", "status": "pass", "peer": {"status": "pass"}},
            "b|onnx|fp32": {"spec": "b", "status": "killed", "peer": {"status": "killed"}},
            "c|onnx|fp16": {"spec": "c", "status": "pass", "peer": {"status": "pass"}}}
    opts = SweepOptions(targets=("onnx",), precisions=("fp32", "fp16"))
    jobs = plan(models, opts, done, tmp_path, None)
    assert [(j.spec, j.precision, j.peer) for j in jobs] == [("a", "fp16", False), ("b", "fp16", False),
                                                             ("c", "fp32", False)]
    opts.rerun_failed = True  # b's fp32 job runs again, and the peer path with it (its record is replaced)
    jobs = plan(models, opts, done, tmp_path, None)
    assert [(j.spec, j.precision, j.peer) for j in jobs] == [("a", "fp16", False), ("b", "fp32", True),
                                                             ("b", "fp16", False), ("c", "fp32", False)]
    assert len({j.job_dir for j in jobs}) == 4 and all(Path(j.job_dir).is_absolute() for j in jobs)


def test_failure_classes_group_the_same_failure_across_models():
    a = failure_class("deploy convert: error: capture of timm:resnet18 failed at node layer1.0.bn1 (batch_norm_3): "
                      "shape (1, 64, 56, 56) is data-dependent", "timm:resnet18")
    b = failure_class("deploy convert: error: capture of timm:regnetx_002 failed at node s2.b1.conv2.bn "
                      "(batch_norm_17): shape (1, 24, 28, 28) is data-dependent", "timm:regnetx_002")
    assert a == b
    assert "resnet18" not in a and "<model>" in a and "batch_norm_N" in a
    fail_a = failure_class("FAILED onnx (model.onnx): max rel error 3.20e-02 > rtol 1e-05", "timm:a")
    fail_b = failure_class("FAILED onnx (model.onnx): max rel error 7.1e-03 > rtol 1e-05", "timm:b")
    assert fail_a == fail_b and "FAILED onnx" in fail_a
    paths = [failure_class(f"deploy convert: error: no space left on device: /tmp/{d}/jobs/x/convert", "m")
             for d in ("a1", "b2")]
    assert paths[0] == paths[1]
    # different failures stay apart; so do different signals
    assert len({a, fail_a, paths[0]}) == 3
    assert failure_class("killed by signal 9 (SIGKILL)") != failure_class("killed by signal 11 (SIGSEGV)")


def test_report_fields_take_only_well_typed_values():
    report = {"stages": [{"name": "training", "export": {"format": "torch"}, "verification": {"passed": True}},
                         {"name": "onnx", "export": {"format": "onnx", "precision": "fp32"},
                          "verification": {"passed": True, "max_rel": 1e-7}},
                         {"name": "openvino", "export": {"format": "openvino"}, "verification": {"passed": "yes"}},
                         {"name": "coreml", "export": {"format": "coreml"},
                          "verification": {"passed": False, "not_run": "coremltools runs models only on macOS"}},
                         "not a stage", {"name": 5}],
              "reparameterize": {"ops_before": {"batch_norm": 4, "conv2d": 4, "_native_batch_norm_legit": 1},
                                 "ops_after": {"conv2d": 4}, "left_unfused": [{}, {}]},
              "timings": {"total": float("nan")}, "model": {"params": -3}}
    got = report_fields(report, ["onnx", "openvino", "tflite", "coreml"])
    assert [s["name"] for s in got["stages"]] == ["training", "onnx", "openvino", "coreml"]
    # "yes" is not True; a stage written and not run here (Core ML off macOS) is neither pass nor fail
    assert got["target_status"] == {"onnx": "pass", "openvino": "fail", "coreml": "written"}
    lines = summary_lines([{"spec": "timm:a", "status": "pass", "targets": ["onnx", "coreml"], "precision": "fp32",
                            **got}])
    assert lines[:2] == ["onnx fp32: 1/1 pass", "coreml fp32: 0/1 pass, 1 written, not run here"]
    assert (got["batchnorms_before"], got["batchnorms_after"], got["leftovers"]) == (5, 0, 2)
    assert "convert_seconds" not in got and "params" not in got
    assert report_fields({"stages": "x", "reparameterize": [], "timings": None}, ["onnx"]) == {}
    record = {"status": "fail", "targets": ["onnx", "tflite"], **got}
    assert (cell(record, "onnx"), cell(record, "tflite")) == ("pass", "fail")
    assert cell({**record, "status": "oom"}, "onnx") == "oom"


def test_supervisor_kills_the_group_on_timeout_memory_and_reports_signals(tmp_path):
    python = sys.executable
    started = time.monotonic()
    slow = run_process([python, "-c", "import time; time.sleep(60)"], cwd=str(tmp_path), log_prefix=tmp_path / "t",
                       timeout=1.0, memory=None)
    assert slow.status == "timeout" and time.monotonic() - started < 10
    # the memory is the whole group's: a grandchild holds it while the child sleeps
    pid_file = tmp_path / "grandchild.pid"
    grandchild = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); b = b'x' * (400 << 20); "
                  "time.sleep(60)")
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    big = run_process([python, "-c", child], cwd=str(tmp_path), log_prefix=tmp_path / "m", timeout=60,
                      memory=200 << 20)
    assert big.status == "oom" and "over the --memory cap" in failure_line(big, tmp_path / "m")
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text() \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text()

    killed = run_process([python, "-c", "import os; os.kill(os.getpid(), 9)"], cwd=str(tmp_path),
                         log_prefix=tmp_path / "k", timeout=60, memory=None)
    assert killed.status == "killed" and failure_line(killed, tmp_path / "k") == "killed by signal 9 (SIGKILL)"
    refused = run_process([python, "-c", "import sys; print('deploy convert: error: unknown model x.', "
                           "file=sys.stderr); sys.exit(2)"], cwd=str(tmp_path), log_prefix=tmp_path / "e",
                          timeout=60, memory=None)
    assert (refused.status, refused.exit_code) == ("fail", 2)
    assert failure_line(refused, tmp_path / "e") == "deploy convert: error: unknown model x."


def _record(spec, status, peer, first_line="", **extra):
    return {"key": f"{spec}|onnx|fp32", "spec": spec, "targets": ["onnx"], "precision": "fp32", "status": status,
            "first_line": first_line, "seconds": 1.0, "peer": {"status": peer, "max_rel": 1e-7}, **extra}


def test_summary_and_table_count_peer_only_models_and_failure_classes(tmp_path):
    line = "deploy convert: error: capture of {} failed at blocks.{}.attn: unsupported op aten.foo"
    records = [_record("timm:a", "pass", "pass", batchnorms_before=10, batchnorms_after=0, convert_seconds=2.0),
               _record("timm:b", "fail", "pass", line.format("timm:b", 3)),
               _record("timm:c", "fail", "fail", line.format("timm:c", 11)),
               _record("timm:d", "timeout", "pass", "no result after 900 s (--timeout); killed")]
    s = summary(records)
    assert s["pass_rates"] == {"onnx fp32": [1, 4]}
    assert s["converted"] == 1 and s["peer_only"] == ["timm:b", "timm:d"] and s["ours_only"] == []
    assert (s["batchnorms_before"], s["batchnorms_after"], s["median_convert_seconds"]) == (10, 0, 2.0)
    assert [(n, examples) for _, n, examples in s["failure_classes"]] == [(2, ["timm:b", "timm:c"]),
                                                                        (1, ["timm:d"])]
    table = sweep_report.write_table(tmp_path, records).read_text()
    assert "| timm:b | - | fail | pass (1.0e-07) |" in table
    assert "peer-only (peer works, ours does not): 2: timm:b, timm:d" in table
    assert sweep_report.job_line(3, 4, records[1]).startswith("[3/4] timm:b: fail (1.0 s); peer pass: deploy")


def test_unreachable_ray_cluster_exits_2_at_once(capsys, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    rc, _, err = main_in_process(capsys, "sweep", "repvgg_digits", "--ray", f"127.0.0.1:{port}", "--out",
                                 str(tmp_path / "o"))
    assert rc == 2 and "no Ray cluster answers" in error_line(err)
    assert time.monotonic() - started < 20 and not (tmp_path / "o").exists()


def test_missing_ray_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    rc, _, err = main_in_process(capsys, "sweep", "repvgg_digits", "--ray", "auto", "--out", str(tmp_path / "o"))
    assert rc == 2 and "pip install 'reparam-deploy[ray]'" in error_line(err)


# ------------------------------------------------------------------------------------------ end to end

def _sweep(cwd: Path, *args: str, ray_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", **(ray_env or {}))
    return subprocess.run([sys.executable, "-m", "deploy", "sweep", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _statuses(table: str) -> dict[str, list[str]]:
    """{model: [status of each target column, peer status]} from the first table of sweep.md."""
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    keep = [i for i, h in enumerate(head) if h.endswith(" fp32") or h == "peer"]
    rows = {}
    for ln in lines[2:]:
        if ln.startswith("| target"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        rows[cells[0]] = [cells[i].split()[0] for i in keep]
    return rows


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("sweep")
    (cwd / "tiny.py").write_text(textwrap.dedent(TINY))
    (cwd / "killer.py").write_text(textwrap.dedent(KILLER))
    return cwd


@pytest.fixture(scope="module")
def pool_sweep(models):
    pytest.importorskip("onnxruntime")
    started = time.monotonic()
    proc = _sweep(models, *SPECS, "--out", "pool", "--workers", "2")
    return proc, models / "pool", time.monotonic() - started


@pytest.mark.e2e
def test_pool_sweep_writes_records_table_chart_and_peer_column(pool_sweep):
    proc, out, _ = pool_sweep
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and all(ln.startswith(("[1/2] ", "[2/2] ")) and ": pass (" in ln for ln in lines)
    records = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["spec"] for r in records) == sorted(SPECS)
    by_spec = {r["spec"]: r for r in records}
    digits = by_spec["repvgg_digits"]
    assert digits["status"] == "pass" and digits["target_status"] == {"onnx": "pass"}
    assert digits["batchnorms_before"] > 0 and digits["batchnorms_after"] == 0 and digits["leftovers"] == 0
    assert digits["peer"]["status"] == "pass" and 0 <= digits["peer"]["max_rel"] <= 1e-3
    assert by_spec["tiny.py:build"]["batchnorms_before"] == 1
    assert _statuses((out / "sweep.md").read_text()) == {s: ["pass", "pass"] for s in SPECS}
    assert (out / "sweep.png").stat().st_size > 0


@pytest.mark.e2e
def test_rerun_into_the_same_out_skips_finished_jobs(pool_sweep, models):
    _, out, _ = pool_sweep
    results = (out / "results.jsonl").read_bytes()
    reports = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/convert/report.json")}
    assert len(reports) == 2
    proc = _sweep(models, *SPECS, "--out", "pool", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "(0 job(s) run, 2 already recorded)" in proc.stdout
    assert (out / "results.jsonl").read_bytes() == results  # no job ran again
    assert {p: p.stat().st_mtime_ns for p in reports} == reports


def _sigint_by_default() -> None:
    """Give the sweep Ctrl-C's default disposition: a test run started in the background (``nohup``, ``&`` in a
    script) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def interrupted_sweep(models):
    """A sweep of a model whose forward kills its process, the tiny model, then repvgg_digits, sent SIGINT once
    the first two jobs are recorded: (exit status, stderr, OUT)."""
    out = models / "interrupted"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "deploy", "sweep", "killer.py:build", "tiny.py:build",
                             "repvgg_digits", "--out", str(out)], cwd=models, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_by_default)
    try:
        deadline = time.monotonic() + 300
        while not (out / "results.jsonl").is_file() or len((out / "results.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        while not _processes_of(out, "convert", "repvgg_digits"):  # its job has started (not merely been queued)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, out


def _processes_of(out: Path, *words: str) -> list[str]:
    """The ids of the processes whose command line names ``out`` and every one of ``words``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace") if entry.name.isdigit() else ""
        except OSError:
            continue
        if str(out) in cmdline and all(w in cmdline for w in words):
            found.append(entry.name)
    return found


@pytest.mark.e2e
def test_a_killed_job_is_recorded_and_the_sweep_goes_on(interrupted_sweep):
    _, _, out = interrupted_sweep
    records = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [r["spec"] for r in records] == ["killer.py:build", "tiny.py:build"]
    killed, tiny = records
    assert killed["status"] == "killed" and killed["first_line"] == "killed by signal 9 (SIGKILL)"
    assert killed["exit_code"] == -9 and killed["peer"]["status"] == "killed"
    assert tiny["status"] == "pass"


@pytest.mark.e2e
def test_ctrl_c_keeps_the_table_kills_the_running_job_and_exits_130(interrupted_sweep):
    rc, err, out = interrupted_sweep
    assert rc == 130, err
    assert [ln for ln in err.splitlines() if ln.startswith("deploy sweep:")] == [
        f"deploy sweep: interrupted; the running jobs were killed, the finished ones are in {out / 'sweep.md'}: run "
        "the same command again to go on"]
    assert "Traceback" not in err
    assert _statuses((out / "sweep.md").read_text()) == {"killer.py:build": ["killed", "killed"],
                                                         "tiny.py:build": ["pass", "pass"]}
    assert not _processes_of(out)  # no job process of this sweep outlives it


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (a Ray head started here and its daemons and workers), by id."""
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_bytes()
            if entry.name.isdigit() and int(stat[stat.rindex(b")") + 2:].split()[3]) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


@pytest.mark.e2e
def test_ray_cluster_gives_the_same_table_as_the_pool(pool_sweep, models):
    """The same two jobs as Ray tasks on a local cluster give the pool's table. The head runs with --block in a
    session of its own, so that the test ends exactly the processes it started (``ray stop`` would end every Ray
    process on the machine)."""
    pytest.importorskip("ray")
    ray_bin = shutil.which("ray") or pytest.skip("the ray command is not on PATH")
    proc, out, _ = pool_sweep
    assert proc.returncode == 0, proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path("/tmp") / f"ray-sweep-{os.getpid()}"  # short: the cluster's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(temp))
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None and time.monotonic() < deadline, head.communicate()[1]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        on_ray = _sweep(models, *SPECS, "--out", "ray", "--ray", f"127.0.0.1:{port}", ray_env={"RAY_TMPDIR": str(temp)})
        assert on_ray.returncode == 0, on_ray.stderr
    finally:
        _kill_session(head.pid)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)
    pool_table, ray_table = (out / "sweep.md").read_text(), (models / "ray" / "sweep.md").read_text()
    assert _statuses(ray_table) == _statuses(pool_table) == {s: ["pass", "pass"] for s in SPECS}
    assert len((models / "ray" / "results.jsonl").read_text().splitlines()) == 2
