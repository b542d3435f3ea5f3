"""Facts about the machine a benchmark ran on, and an estimate of its peak FLOP/s.

``cpu_facts()`` reads ``/proc/cpuinfo`` (Linux; ``platform`` elsewhere): model, logical CPUs and
those this process may use, physical cores, the SIMD flags that matter for inference, and the
clock. ``peak_flops(cpu, threads)`` estimates the fp32 peak of ``threads`` cores as

    cores x clock x fp32 SIMD lanes x 2 (fused multiply-add) x 2 FMA units per core

capped at the physical core count (hyper-threads share FMA units). The two-FMA-unit assumption
holds for current x86 server and desktop cores and for Arm Neoverse cores; some AVX-512 parts have
one 512-bit unit, so read the achieved fraction as a lower bound there. The clock is the maximum
frequency where the kernel exposes it, else the current one from ``/proc/cpuinfo`` (a VM often
shows only the nominal clock). The estimate and its inputs are recorded, so a reader can redo it.
``gpu_facts()`` names the CUDA devices through torch and the driver through ``nvidia-smi``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["cpu_facts", "gpu_facts", "low_precision", "peak_flops", "SIMD_FLAGS", "usable_cpus"]

# flags worth reporting, in order of width; x86 from /proc/cpuinfo "flags", Arm from "Features"
SIMD_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni",
              "asimd", "asimdhp", "fphp", "asimddp", "i8mm", "bf16", "sve", "sve2")
FMA_UNITS = 2


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(text: str, key: str) -> str | None:
    m = re.search(rf"^{re.escape(key)}\s*:\s*(.*)$", text, re.M)
    return m.group(1).strip() if m else None


def _clock_mhz(text: str, model: str) -> tuple[float | None, str]:
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(max_freq.read_text()) / 1000.0, "cpufreq max"
    except (OSError, ValueError):
        pass
    mhz = _field(text, "cpu MHz")
    if mhz:
        return float(mhz), "/proc/cpuinfo (current)"
    m = re.search(r"@\s*([\d.]+)\s*GHz", model)
    if m:
        return float(m.group(1)) * 1000.0, "model name"
    return None, "unknown"


def _fp32_lanes(flags: set[str]) -> int:
    if "avx512f" in flags:
        return 16
    if "avx" in flags or "avx2" in flags:
        return 8
    if flags & {"sse4_2", "asimd", "sve"}:
        return 4
    return 1


# int8 and bf16 instructions, by what they give inference (x86 names from /proc/cpuinfo, Arm from "Features")
_INT8 = (("amx_int8", "AMX int8 tiles"), ("avx512_vnni", "AVX-512 VNNI int8 dot products"),
         ("avx_vnni", "AVX-VNNI int8 dot products (256-bit)"), ("i8mm", "Arm int8 matrix multiply"),
         ("asimddp", "Arm int8 dot product"))
_BF16 = (("amx_bf16", "AMX bf16 tiles"), ("avx512_bf16", "AVX-512 bf16 dot products"), ("bf16", "Arm bf16"))


def low_precision(flags: set[str]) -> dict:
    """What this CPU offers int8 and bf16 inference: ``{"int8": [...], "bf16": [...], "int8_native": bool}``.
    Without a dot-product instruction int8 still runs (widened to 16-bit multiplies), with a smaller gain."""
    int8 = [text for flag, text in _INT8 if flag in flags]
    if not int8 and "avx512bw" in flags:
        int8 = ["AVX-512BW (no VNNI: int8 widened to int16 multiplies)"]
    elif not int8 and "avx2" in flags:
        int8 = ["AVX2 (no VNNI: int8 widened to int16 multiplies)"]
    return {"int8": int8, "bf16": [text for flag, text in _BF16 if flag in flags],
            "int8_native": any(flag in flags for flag, _ in _INT8)}


def cpu_facts(threads: int | None = None) -> dict:
    """Model, counts, SIMD flags and clock of this CPU, plus the peak estimate for ``threads`` cores."""
    text = _cpuinfo()
    model = _field(text, "model name") or _field(text, "Hardware") or platform.processor() or platform.machine()
    all_flags = set((_field(text, "flags") or _field(text, "Features") or "").split())
    cores = {(m.group(1), m.group(2)) for m in re.finditer(
        r"physical id\s*:\s*(\d+)\s*\n(?:.*\n)*?core id\s*:\s*(\d+)", text)}
    physical = len(cores) or None
    clock, clock_source = _clock_mhz(text, model)
    facts = {
        "model": model,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "physical_cores": physical,
        "simd": [f for f in SIMD_FLAGS if f in all_flags],
        "fp32_lanes": _fp32_lanes(all_flags),
        "fma": "fma" in all_flags or "asimd" in all_flags,
        "low_precision": low_precision(all_flags),
        "clock_mhz": clock,
        "clock_source": clock_source,
    }
    peak = peak_flops(facts, threads)
    facts["threads"] = threads
    facts["peak_gflops"] = round(peak / 1e9, 1) if peak else None
    return facts


def peak_flops(cpu: dict, threads: int | None) -> float | None:
    """Estimated fp32 FLOP/s of ``threads`` cores (all usable ones when None); None without a clock."""
    if not cpu.get("clock_mhz"):
        return None
    cores = min(threads or cpu["usable_cpus"], cpu.get("physical_cores") or cpu["usable_cpus"], cpu["usable_cpus"])
    per_cycle = cpu["fp32_lanes"] * (2 * FMA_UNITS if cpu["fma"] else 1)
    return cores * cpu["clock_mhz"] * 1e6 * per_cycle


def gpu_facts() -> list[dict]:
    """Name, compute capability, memory and driver of each CUDA device (empty without one)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    driver = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            driver = None
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
                     "driver": driver, "cuda_runtime": torch.version.cuda})
    return gpus
