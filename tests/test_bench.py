"""The benchmark harness (statistics, warm-up, thread counts), hardware facts, and ``deploy bench``."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch

from runtimes.bench import BenchJob, BenchSettings, measure, run_job, stats_of
from runtimes.hardware import SIMD_FLAGS, cpu_facts, peak_flops
from tests.conftest import run_deploy


class FakeClock:
    """A timer that returns scripted latencies and counts the calls made through it."""

    def __init__(self, ms_of):
        self.ms_of, self.calls = ms_of, {}

    def __call__(self, call):
        name = call()
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.ms_of(name, self.calls[name])


def test_stats_of_known_values():
    s = stats_of(np.arange(1, 101, dtype=float), batch=4)
    assert (s.iters, s.p50, s.min, s.max) == (100, 50.5, 1.0, 100.0)
    assert s.p90 == pytest.approx(90.1) and s.p99 == pytest.approx(99.01)
    assert s.mean == 50.5 and s.std == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert s.throughput == pytest.approx(4 * 1000 / 50.5)
    with pytest.raises(ValueError):
        stats_of([])


def test_measure_warms_up_by_count_and_time_then_runs_to_the_minimum_duration():
    # "slow" takes 10 ms a call, "fast" 1 ms with one 50 ms outlier every 10 calls
    clock = FakeClock(lambda name, i: 10.0 if name == "slow" else (50.0 if i % 10 == 0 else 1.0))
    settings = BenchSettings(warmup_iters=3, warmup_ms=40, min_iters=5, min_ms=200)
    stats = measure({"slow": lambda: "slow", "fast": lambda: "fast"}, settings, timer=clock)
    # warm-up: slow needs 4 calls for 40 ms (more than 3); fast needs 3 calls (the minimum) ... then 40 ms:
    # 1+1+1+...; its 10th call is the 50 ms outlier, so 10 calls reach 59 ms
    warm_slow, warm_fast = 4, 10
    assert stats["slow"].iters == stats["fast"].iters  # interleaved: one call each per round
    n = stats["slow"].iters
    assert clock.calls["slow"] == warm_slow + n and clock.calls["fast"] == warm_fast + n
    # the fast form needs 200 ms of its own: 1 ms calls with a 50 ms call every 10th (59 ms per 10 calls)
    assert n == 40  # slow reaches 200 ms after 20 calls; fast only after 40
    for s in stats.values():
        assert s.min <= s.p50 <= s.p90 <= s.p99 <= s.max
    assert stats["slow"].p50 == stats["slow"].p99 == 10.0 and stats["slow"].std == 0.0
    assert stats["fast"].p50 == 1.0 and stats["fast"].p99 == 50.0 and stats["fast"].max == 50.0


def test_bench_settings_refuse_nonsense():
    with pytest.raises(ValueError):
        BenchSettings(min_iters=1)
    with pytest.raises(ValueError):
        BenchSettings(min_ms=-1)


def test_peak_flops_estimate():
    cpu = {"clock_mhz": 2000.0, "fp32_lanes": 16, "fma": True, "usable_cpus": 8, "physical_cores": 4}
    assert peak_flops(cpu, 2) == 2 * 2e9 * 16 * 2 * 2
    assert peak_flops(cpu, 8) == peak_flops(cpu, 4)  # hyper-threads share FMA units
    assert peak_flops({**cpu, "fma": False}, 1) == 2e9 * 16
    assert peak_flops({**cpu, "clock_mhz": None}, 1) is None
    facts = cpu_facts(1)
    assert set(facts["simd"]) <= set(SIMD_FLAGS) and facts["usable_cpus"] >= 1 and facts["threads"] == 1
    assert facts["fp32_lanes"] in (1, 4, 8, 16)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from exporters import export

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    folder = tmp_path_factory.mktemp("tiny")
    x = torch.randn(1, 3, 16, 16)
    art = export("onnx", net, folder / "tiny.onnx", args=(x,), simplify=False)
    torch.export.save(torch.export.export(net, (x,)), str(folder / "tiny.pt2"))
    return art.path, str(folder / "tiny.pt2")


def _job(runtime: str, forms: dict, **kwargs) -> BenchJob:
    """A job for ``runtime`` set up the way deploy bench sets it up: runner and options from the target."""
    from exporters import targets

    target = targets.by_runtime(runtime)
    return BenchJob(runtime, forms, [1, 3, 16, 16], runner=target.runner,
                    runner_options={**target.runner_options("fp32"), **target.bench_options}, note=target.bench_note,
                    **kwargs)


def test_runners_honour_the_thread_count(tiny_onnx):
    from runtimes.bench import _runner

    onnx_path, pt2_path = tiny_onnx
    job = _job("onnxruntime", {}, threads=1)
    with _runner(job, onnx_path) as r:
        opts = r.session.get_session_options()
        assert opts.intra_op_num_threads == 1
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert opts.graph_optimization_level.name == "ORT_ENABLE_ALL"
    before = torch.get_num_threads()
    with _runner(_job("torch", {}, threads=1), pt2_path):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    pytest.importorskip("openvino")
    with _runner(_job("openvino", {}, threads=1), onnx_path) as r:
        assert int(r.compiled.get_property("INFERENCE_NUM_THREADS")) == 1


def test_run_job_reports_every_form_and_the_failures(tiny_onnx, tmp_path):
    onnx_path, _ = tiny_onnx
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    job = _job("onnxruntime", {"deploy": onnx_path, "training": str(broken)}, threads=1,
               settings=BenchSettings(warmup_iters=1, warmup_ms=0, min_iters=7, min_ms=0))
    rows = {r["form"]: r for r in run_job(job)["rows"]}
    assert rows["deploy"]["iters"] == 7 and rows["deploy"]["p50"] <= rows["deploy"]["p90"] <= rows["deploy"]["p99"]
    assert "corrupt" in rows["training"]["error"]


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def bench_dir(digits_run, tmp_path_factory):
    """A copy of the default run, benchmarked once with --compare-train on ONNX Runtime and torch, batches 1 and 2."""
    pytest.importorskip("matplotlib")
    _, run_dir = digits_run
    out = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(run_dir, out)
    proc = run_deploy("bench", str(out), "--runtimes", "onnxruntime,torch", "--threads", "1", "--batch", "1,2",
                      "--compare-train", "--min-ms", "50", "--min-iters", "10", "--warmup-ms", "10", cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.e2e
def test_bench_appends_results_costs_and_a_chart(bench_dir):
    out, proc = bench_dir
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and len(report["benchmarks"]) == 1
    entry = report["benchmarks"][0]
    assert entry["threads"] == 1 and entry["batches"] == [1, 2] and entry["runtimes"] == ["onnxruntime", "torch"]
    assert "own Python process" in entry["isolation"] and "spinning off" in entry["isolation"]
    assert entry["settings"]["runtime_settings"]["onnxruntime"]["intra_op_allow_spinning"] == 0
    rows = entry["results"]
    assert {(r["runtime"], r["batch"], r["form"]) for r in rows} == {
        (rt, b, f) for rt in ("torch", "onnxruntime") for b in (1, 2) for f in ("training", "deploy")}
    for r in rows:
        assert r["iters"] >= 10 and r["min"] <= r["p50"] <= r["p90"] <= r["p99"] <= r["max"]
        assert r["throughput"] == pytest.approx(r["batch"] * 1000 / r["mean"])
        assert 0 < r["achieved_fraction"] < 1
    assert len(entry["speedups"]) == 4 and all(s["speedup"] > 0 for s in entry["speedups"])
    cpu = entry["hardware"]["cpu"]
    assert cpu["model"] and cpu["threads"] == 1 and entry["hardware"]["versions"]["onnxruntime"]
    # the cost model: the training form has the BatchNorms and branches the passes removed
    train, deploy = entry["cost"]["training"], entry["cost"]["deploy"]
    assert train["batchnorms"] == 15 and deploy["batchnorms"] == 0
    assert train["branch_groups"] == 6 and deploy["branch_groups"] == 0 and deploy["forks"] == 0
    assert deploy["convolutions"] == 6 and deploy["memory_access"] < train["memory_access"]
    assert sum(layer["flops"] for layer in deploy["layers"]) == deploy["flops"]
    assert sum(layer["bytes"] for layer in train["layers"]) == train["memory_access"]
    assert _png_size(out / entry["chart"])[0] > 300
    md = (out / "report.md").read_text()
    assert "## Benchmark 1" in md and "![latency per runtime](bench-1.png)" in md and "% of peak" in md
    assert "deploy form" in proc.stdout and "speed" in proc.stdout


@pytest.mark.e2e
def test_bench_again_appends_and_keeps_the_verification_valid(bench_dir):
    out, _ = bench_dir
    proc = run_deploy("bench", str(out), "--runtimes", "onnxruntime", "--threads", "1", "--isolation", "none",
                      "--min-ms", "20", "--min-iters", "5", "--warmup-ms", "0", "--no-chart", cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert len(report["benchmarks"]) == 2 and report["benchmarks"][1]["chart"] is None
    assert {r["form"] for r in report["benchmarks"][1]["results"]} == {"deploy"}  # no --compare-train
    assert "one process" in report["benchmarks"][1]["isolation"]
    assert not list(out.glob(".bench-*")) and not (out / "bench-2.png").exists()
    assert run_deploy("verify", str(out), "-q", cwd=out.parent).returncode == 0


@pytest.mark.parametrize("args, words", [
    (["--runtimes", "onnxruntime,fastrt"], "unknown runtime(s) fastrt"),
    (["--runtimes", "tensorrt"], "CUDA GPU"),
    (["--batch", "0"], "batch sizes must be positive"),
    (["--min-iters", "1"], "--min-iters: must be an integer >= 2"),
])
@pytest.mark.e2e
def test_bench_bad_arguments_are_one_sentence(digits_run, args, words, tmp_path):
    if "tensorrt" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the tensorrt refusal is about missing TensorRT instead")
    _, run_dir = digits_run
    proc = run_deploy("bench", str(run_dir), *args, cwd=tmp_path)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 or "usage" in proc.stderr


@pytest.mark.e2e
def test_bench_refuses_a_directory_without_a_report_or_the_artifact(digits_run, tmp_path):
    proc = run_deploy("bench", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "holds no report.json" in proc.stderr
    _, run_dir = digits_run
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    report = json.loads((partial / "report.json").read_text())
    report["stages"] = [s for s in report["stages"] if s["name"] != "openvino"]
    (partial / "report.json").write_text(json.dumps(report))
    proc = run_deploy("bench", str(partial), "--runtimes", "openvino", cwd=tmp_path)
    assert proc.returncode == 2 and "has no openvino artifact" in proc.stderr and "--targets" in proc.stderr
    assert json.loads((partial / "report.json").read_text()).get("benchmarks") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the CUDA-event timing "
                    "of the torch runtime (fp32, fp16, channels-last) is not exercised")
def test_torch_cuda_variants(tiny_onnx):
    _, pt2_path = tiny_onnx
    job = BenchJob("torch", {"deploy": pt2_path}, [1, 3, 16, 16], device="cuda",
                   settings=BenchSettings(warmup_iters=2, warmup_ms=0, min_iters=5, min_ms=0))
    result = run_job(job)
    assert {r["variant"] for r in result["rows"]} == {"fp32", "fp16", "channels_last"}
    assert all(r["p50"] > 0 for r in result["rows"]) and "CUDA events" in result["settings"]["timer"]


@pytest.mark.e2e
def test_bench_a_model_converts_it_first_with_the_runtimes_targets(tmp_path):
    pytest.importorskip("onnxruntime")
    proc = run_deploy("bench", "repvgg_digits", "--runtimes", "onnxruntime", "--out", "run", "--threads", "1",
                      "--min-ms", "20", "--min-iters", "5", "--warmup-ms", "0", "--no-chart", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["training", "pt2", "onnx", "onnx-simplified"]
    assert report["load"]["spec"] == "repvgg_digits"
    assert {r["runtime"] for r in report["benchmarks"][0]["results"]} == {"onnxruntime"}


@pytest.mark.e2e
def test_bench_a_dynamic_run_at_other_batches_uses_its_own_files(tmp_path):
    pytest.importorskip("onnxruntime")
    conv = run_deploy("convert", "repvgg_digits", "--dynamic", "--targets", "onnx", "--out", "dyn", "-q",
                      cwd=tmp_path)
    assert conv.returncode == 0, conv.stderr[-2000:]
    proc = run_deploy("bench", "dyn", "--runtimes", "onnxruntime,torch", "--batch", "1,3", "--threads", "1",
                      "--min-ms", "20", "--min-iters", "5", "--warmup-ms", "0", "--no-chart", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "re-running the passes" not in proc.stderr  # the dynamic artifacts take batch 3 as they are
    entry = json.loads((tmp_path / "dyn" / "report.json").read_text())["benchmarks"][0]
    assert sorted((r["runtime"], r["batch"]) for r in entry["results"]) == [
        ("onnxruntime", 1), ("onnxruntime", 3), ("torch", 1), ("torch", 3)]
    # the cost model of a dynamic program is taken at the run's shape: concrete byte counts
    assert entry["cost"]["deploy"]["memory_access"] > 0 and entry["cost"]["deploy"]["batchnorms"] == 0
