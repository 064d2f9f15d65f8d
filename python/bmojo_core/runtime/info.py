"""Facts about the installation and the machine, for ``bmojo info`` and the benchmarks:
versions, thread and SIMD settings, the CPU (model, clock, physical cores, SIMD lanes) and
an assumed peak fp32 rate.

Everything here is information only: a fact that cannot be found is reported as unknown
(``None``, ``"unknown"`` or an empty list), never raised.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from .settings import get_num_threads, simd_level, simd_levels

__all__ = [
    "cpu_max_mhz",
    "cpu_model",
    "describe_peak",
    "machine_info",
    "machine_peak",
    "package_version",
    "physical_cores",
    "simd_lanes",
]


def package_version() -> str:
    """bmojo_core's installed version (``0.0.0+unknown`` in a source tree not installed)."""
    try:
        return version("bmojo_core")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0+unknown"


# --------------------------------------------------------------------------- CPU


def _lscpu() -> dict[str, str]:
    """``lscpu``'s ``key: value`` lines (C locale), or ``{}`` without lscpu."""
    exe = shutil.which("lscpu")
    if exe is None:
        return {}
    try:
        text = subprocess.run(
            [exe], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_max_mhz() -> tuple[float | None, str]:
    """Highest CPU clock available and where it was read: cpufreq's cpuinfo_max_freq,
    lscpu's 'CPU max MHz', or the largest 'cpu MHz' in /proc/cpuinfo (the current clock: a
    lower bound on a machine with turbo); ``(None, "unknown")`` if none is readable."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read().strip()) / 1000.0, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    lscpu = _lscpu()
    if lscpu.get("CPU max MHz"):
        try:
            return float(lscpu["CPU max MHz"]), "lscpu 'CPU max MHz'"
        except ValueError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", f.read(), re.M)]
        if mhz:
            return max(mhz), "/proc/cpuinfo 'cpu MHz'"
    except (OSError, ValueError):
        pass
    return None, "unknown"


def physical_cores() -> int:
    """Physical cores this process may run on: its CPUs (affinity) over lscpu's threads
    per core; at least 1."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical = os.cpu_count() or 1
    try:
        per_core = int(_lscpu().get("Thread(s) per core", "1"))
    except ValueError:
        per_core = 1
    return max(1, logical // max(1, per_core))


def simd_lanes(level: str) -> int:
    """fp32 lanes of one vector register at a SIMD level name."""
    level = level.lower()
    if "512" in level:
        return 16
    if "avx" in level:
        return 8
    if "neon" in level or "sse" in level or "sve" in level:
        return 4
    return 1


def _simd_levels() -> list[str]:
    try:
        return list(simd_levels())
    except Exception:  # noqa: BLE001 - info only
        return []


def _simd_level() -> str:
    try:
        return str(simd_level())
    except Exception:  # noqa: BLE001 - info only
        return "unknown"


# --------------------------------------------------------------------------- peak


def machine_peak(cores: int | None = None) -> dict[str, Any]:
    """Peak fp32 GFLOP/s = cores × GHz × flops/cycle, flops/cycle = 2 FMA units × 2 flops ×
    lanes (16 fp32 lanes for AVX-512, 8 for AVX2, 4 for NEON/SSE), using the widest SIMD
    level usable on this machine, over ``cores`` cores (default: the physical ones). An
    assumption, not a measurement: it ignores clock drops under wide vector load."""
    mhz, mhz_source = cpu_max_mhz()
    levels = _simd_levels() or [_simd_level()]
    widest = max(levels, key=simd_lanes)
    lanes = simd_lanes(widest)
    ncores = cores if cores is not None else physical_cores()
    flops_per_cycle = 2 * 2 * lanes
    peak = ncores * (mhz / 1000.0) * flops_per_cycle if mhz else None
    return {
        "cores": ncores,
        "mhz": mhz,
        "mhz_source": mhz_source,
        "simd_level_for_peak": widest,
        "lanes_fp32": lanes,
        "fma_units": 2,
        "flops_per_cycle": flops_per_cycle,
        "peak_gflops": peak,
    }


def describe_peak(peak: dict[str, Any]) -> str:
    """One line: how the peak of :func:`machine_peak` was computed, and its value."""
    mhz = f"{peak['mhz']:.0f} MHz ({peak['mhz_source']})" if peak["mhz"] else "unknown clock"
    value = f"{peak['peak_gflops']:.1f} GFLOP/s" if peak["peak_gflops"] else "unknown"
    return (
        f"peak fp32 = {peak['cores']} cores × {mhz} × {peak['flops_per_cycle']} flop/cycle "
        f"(2 FMA units × 2 × {peak['lanes_fp32']} lanes, {peak['simd_level_for_peak']}) "
        f"= {value}"
    )


# --------------------------------------------------------------------------- summary


def machine_info() -> dict[str, Any]:
    """Versions, CPU and thread settings (what ``bmojo info`` prints)."""
    try:
        cuda = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install must not crash info
        cuda = False
    try:
        threads = int(get_num_threads())
    except Exception:  # noqa: BLE001
        threads = None
    mhz, mhz_source = cpu_max_mhz()
    return {
        "bmojo_core": package_version(),
        "simd_level": _simd_level(),
        "simd_levels": _simd_levels(),
        "bmojo_threads": threads,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_mhz": mhz,
        "cpu_mhz_source": mhz_source,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "cuda_available": cuda,
    }
