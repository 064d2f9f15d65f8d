"""Benchmark suite of bmojo_core, as plain functions.

Used by ``bmojo bench`` (:mod:`bmojo_core.cli`) and by the pytest-benchmark files in
``benches/``; nothing here depends on pytest.

Groups of cases (``--quick`` uses smaller shapes everywhere):

* ``scan``: :func:`bmojo_core.selective_scan_fn` forward and forward+backward against
  :func:`bmojo_core.reference.selective_scan` (a Python loop over time; its backward is torch
  autograd) at (B=1, D=1536, N=16, L=2048) and (B=8, D=768, N=16, L=512), every option on
  (D, z, delta_bias, delta_softplus=True), B/C variable ``(batch, N, L)``. The reference
  takes seconds and is timed once. The extra column reports the parity of the two results.
* ``scaling``: forward and forward+backward time per token for L = 512 … 16384 at
  (B=1, D=1536, N=16) -- it should stay flat -- plus the memory of the backward: the bytes
  of the tensors the op saves for backward (beyond its inputs) and the peak resident memory
  of forward+backward measured in a fresh child process.
* ``decode``: :func:`bmojo_core.selective_state_update` (no grad), µs per call from Python
  at B=1 and B=64 (D=1536, N=16), against the reference step.
* ``lm_decode``: streaming decode of a 4-layer d_model=256 ``BMojoLM`` (vocab 512, window
  128, 4 fading and 32 eidetic tokens) at batch 1 and 32, one and two threads: tokens per
  second of ``Stream.feed`` through the fused native step (:mod:`bmojo_core.decode`), against
  the Python step path (``stream.fused_decode = False``, one torch thread).
* ``throughput``: state updates per second and GFLOP/s of the forward, one thread and all
  threads, against the machine's peak (see :func:`machine_peak`).
* ``companion``: :func:`bmojo_core.companion_scan` forward and forward+backward
  (time-invariant alpha, beta, c, D) at (B=8, D=64, L=4096, n=4) and (B=1, D=1024, L=4096,
  n=8), against the reference loop and against ``scipy.signal.lfilter`` looped over channels.
* ``conv``: :func:`bmojo_core.causal_conv1d_fn` (bias, SiLU) forward and forward+backward
  against ``torch.nn.functional.conv1d`` (depthwise, left-padded) at (B=8, D=1536, L=2048,
  K=4), in GB/s; :func:`bmojo_core.causal_conv1d_update` µs per call at D=1536.
* ``bilinear``: :func:`bmojo_core.bilinear_scan` forward, sequential and parallel paths,
  against the reference loop, n in {4, 16, 64}, L in {256, 4096}, batch 1, m = 2.
* ``peer``: other implementations measured in the same run when importable
  (``mamba_ssm.ops.selective_scan_interface.selective_scan_ref``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import bmojo_core

__all__ = [
    "FLOP_PER_UPDATE",
    "Case",
    "Result",
    "build_cases",
    "machine_info",
    "machine_peak",
    "make_scan_inputs",
    "make_step_inputs",
    "format_seconds",
    "format_table",
    "run_case",
    "run_suite",
    "SavedBytes",
    "saved_tensor_bytes",
    "time_call",
]

#: Floating-point operations counted per state update h[d, n] of the forward:
#: Δ·A (1 mul) + exp (counted as 1) + h = a·h + b (1 FMA = 2) + y += C·h (1 FMA = 2).
FLOP_PER_UPDATE = 6

# Shapes of the issue, and the smaller ones of --quick.
SCAN_SHAPES = ((1, 1536, 16, 2048), (8, 768, 16, 512))
SCAN_SHAPES_QUICK = ((1, 256, 16, 512), (2, 128, 16, 256))
SCALING_LS = (512, 1024, 2048, 4096, 8192, 16384)
SCALING_LS_QUICK = (256, 512, 1024, 2048)
SCALING_BDN = (1, 1536, 16)
SCALING_BDN_QUICK = (1, 256, 16)
DECODE_SHAPES = ((1, 1536, 16), (64, 1536, 16))
DECODE_SHAPES_QUICK = ((1, 256, 16), (8, 256, 16))


# ---------------------------------------------------------------------------------------
# data classes
# ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmark: build inputs with ``setup()``, then time ``bmojo(inputs)`` against
    ``reference(inputs)`` (optional).

    ``inner`` calls make one timed sample (for calls of a few µs); the reported time is the
    median over ``repeat`` samples, divided by ``inner``. ``grad=False`` runs the calls under
    ``torch.no_grad()``. ``threads`` (if set) is passed to ``bmojo_core.set_num_threads``
    for the duration of the case. ``finish(case, inputs, result, bmojo_out, ref_out)`` may
    add metrics to the result.
    """

    name: str
    group: str
    description: str
    setup: Callable[[], dict[str, Any]]
    bmojo: Callable[[dict[str, Any]], Any]
    reference: Callable[[dict[str, Any]], Any] | None = None
    reference_label: str = "bmojo_core.reference"
    repeat: int = 7
    warmup: int = 1
    inner: int = 1
    ref_repeat: int = 1
    ref_warmup: int = 0
    ref_inner: int = 1
    grad: bool = False
    threads: int | None = None
    count_saved: bool = False  # count the bytes the reference saves for backward
    updates: int = 0  # state updates per call (B·D·N·L)
    tokens: int = 0  # sequence positions per call (B·L)
    finish: Callable[..., None] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """Outcome of one case; times are seconds per call (median)."""

    name: str
    group: str
    description: str
    bmojo_s: float | None = None
    reference_s: float | None = None
    reference_label: str = ""
    speedup: float | None = None
    extra: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------


def time_call(
    fn: Callable[[], Any],
    *,
    repeat: int = 7,
    warmup: int = 1,
    inner: int = 1,
    grad: bool = False,
) -> tuple[float, list[float], Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` samples of ``inner`` calls
    each (``time.perf_counter``). Returns (median seconds per call, all samples, last
    output). Runs under ``torch.no_grad()`` unless ``grad``."""
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    out = None
    samples: list[float] = []
    with ctx:
        for _ in range(warmup):
            out = fn()
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples), samples, out


class SavedBytes:
    """Context manager that sums the bytes of the distinct storages saved for backward
    inside it (``torch.autograd.graph.saved_tensors_hooks``), not counting the storages of
    ``exclude`` (the inputs, which exist anyway). Read ``nbytes`` afterwards."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
            ptr, nbytes = id(t), t.numel() * t.element_size()
        if ptr not in self._excluded:
            self._seen[ptr] = max(self._seen.get(ptr, 0), nbytes)
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(
    fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> tuple[int, Any]:
    """Run ``fn()`` with grad enabled; return (bytes saved for backward beyond the storages
    of ``exclude``, output of fn). See :class:`SavedBytes`."""
    with torch.enable_grad(), SavedBytes(exclude) as counter:
        out = fn()
    return counter.nbytes, out


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------
# machine description and peak
# ---------------------------------------------------------------------------------------


def _lscpu() -> dict[str, str]:
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_max_mhz() -> tuple[float | None, str]:
    """Highest CPU clock available: cpufreq's cpuinfo_max_freq, lscpu's 'CPU max MHz', or
    the largest 'cpu MHz' in /proc/cpuinfo (the current clock: a lower bound on a machine
    with turbo)."""
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


def _physical_cores() -> int:
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical = os.cpu_count() or 1
    try:
        per_core = int(_lscpu().get("Thread(s) per core", "1"))
    except ValueError:
        per_core = 1
    return max(1, logical // max(1, per_core))


def _lanes(level: str) -> int:
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
        return list(bmojo_core.simd_levels())
    except Exception:  # noqa: BLE001 - info only
        return []


def _simd_level() -> str:
    try:
        return str(bmojo_core.simd_level())
    except Exception:  # noqa: BLE001 - info only
        return "unknown"


def machine_peak(cores: int | None = None) -> dict[str, Any]:
    """Peak fp32 GFLOP/s = cores × GHz × flops/cycle, flops/cycle = 2 FMA units × 2 flops ×
    lanes (16 fp32 lanes for AVX-512, 8 for AVX2, 4 for NEON/SSE), using the widest SIMD
    level usable on this machine. An assumption, not a measurement: it ignores clock drops
    under wide vector load and the cost of exp."""
    mhz, mhz_source = _cpu_max_mhz()
    levels = _simd_levels() or [_simd_level()]
    widest = max(levels, key=_lanes)
    lanes = _lanes(widest)
    ncores = cores if cores is not None else _physical_cores()
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
        "flop_per_update": FLOP_PER_UPDATE,
    }


def describe_peak(peak: dict[str, Any]) -> str:
    mhz = f"{peak['mhz']:.0f} MHz ({peak['mhz_source']})" if peak["mhz"] else "unknown clock"
    value = f"{peak['peak_gflops']:.1f} GFLOP/s" if peak["peak_gflops"] else "unknown"
    return (
        f"peak fp32 = {peak['cores']} cores × {mhz} × {peak['flops_per_cycle']} flop/cycle "
        f"(2 FMA units × 2 × {peak['lanes_fp32']} lanes, {peak['simd_level_for_peak']}) "
        f"= {value}; the forward is counted as {FLOP_PER_UPDATE} flop per state update "
        "(Δ·A 1 + exp 1 + FMA h 2 + FMA y 2)"
    )


def machine_info() -> dict[str, Any]:
    """Versions, CPU and thread settings (what ``bmojo info`` prints)."""
    try:
        cuda = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install must not crash info
        cuda = False
    try:
        threads = int(bmojo_core.get_num_threads())
    except Exception:  # noqa: BLE001
        threads = None
    mhz, mhz_source = _cpu_max_mhz()
    return {
        "bmojo_core": getattr(bmojo_core, "__version__", "unknown"),
        "simd_level": _simd_level(),
        "simd_levels": _simd_levels(),
        "bmojo_threads": threads,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_mhz": mhz,
        "cpu_mhz_source": mhz_source,
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "cuda_available": cuda,
    }


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def make_scan_inputs(
    batch: int,
    dim: int,
    N: int,
    L: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    requires_grad: bool = False,
) -> dict[str, Any]:
    """Mamba-style inputs of ``selective_scan_fn`` with every option on.

    A = -(1, 2, …, N) repeated over channels (S4D-real init, ``A = -exp(A_log)``); B, C
    variable ``(batch, N, L)``; D = 1; z ~ N(0, 1); delta small (``0.1·N(0, 1)``) and
    delta_bias = softplus⁻¹(dt) with dt log-uniform in [1e-3, 1e-1] (Mamba's dt init), with
    delta_softplus=True.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    dt0 = torch.exp(
        torch.rand(dim, generator=g) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3)
    )
    tensors = {
        "u": randn(batch, dim, L),
        "delta": 0.1 * randn(batch, dim, L),
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1),
        "B": randn(batch, N, L),
        "C": randn(batch, N, L),
        "D": torch.ones(dim),
        "z": randn(batch, dim, L),
        "delta_bias": _inverse_softplus(dt0),
    }
    tensors = {
        k: v.to(dtype).contiguous().requires_grad_(requires_grad) for k, v in tensors.items()
    }
    return {**tensors, "delta_softplus": True}


SCAN_TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_step_inputs(
    batch: int, dim: int, N: int, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Any]:
    """Inputs of ``selective_state_update`` (one decode token, every option on)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    return {
        "state": randn(batch, dim, N),
        "x": randn(batch, dim),
        "dt": 0.1 * randn(batch, dim),
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1).to(dtype),
        "B": randn(batch, N),
        "C": randn(batch, N),
        "D": torch.ones(dim, dtype=dtype),
        "z": randn(batch, dim),
        "dt_bias": _inverse_softplus(torch.full((dim,), 0.01)).to(dtype),
        "dt_softplus": True,
    }


def _scan_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: inputs[k] for k in (*SCAN_TENSORS, "delta_softplus")}


def _grad_out(inputs: dict[str, Any]) -> torch.Tensor:
    u = inputs["u"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(u.shape, generator=g, dtype=torch.float32).to(u.dtype)


def _fwd(fn: Callable[..., Any]) -> Callable[[dict[str, Any]], Any]:
    def call(inputs: dict[str, Any]) -> Any:
        return fn(**_scan_kwargs(inputs))

    return call


def _fwd_bwd(fn: Callable[..., Any]) -> Callable[[dict[str, Any]], Any]:
    """forward + backward with respect to every tensor input (torch.autograd.grad, so that
    nothing accumulates between calls)."""

    def call(inputs: dict[str, Any]) -> Any:
        out = fn(**_scan_kwargs(inputs))
        return torch.autograd.grad(out, [inputs[k] for k in SCAN_TENSORS], inputs["grad_out"])

    return call


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    scale = b64.abs().max().item() if b64.numel() else 0.0
    err = (a64 - b64).abs().max().item() if b64.numel() else 0.0
    return err / scale if scale > 0 else err


def _bmojo_scan(**kw: Any) -> Any:
    return bmojo_core.selective_scan_fn(**kw)


def _ref_scan(**kw: Any) -> Any:
    from bmojo_core import reference

    return reference.selective_scan(**kw)


def _bmojo_step(**kw: Any) -> Any:
    return bmojo_core.selective_state_update(**kw)


def _ref_step(**kw: Any) -> Any:
    from bmojo_core import reference

    return reference.selective_state_update(**kw)


# ---------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------


def _shape_name(batch: int, dim: int, N: int, L: int | None = None) -> str:
    s = f"B={batch} D={dim} N={N}"
    return s if L is None else f"{s} L={L}"


def _finish_parity_fwd(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    if ref_out is not None and out is not None:
        err = _rel_err(out, ref_out)
        res.metrics["max_rel_err_vs_reference"] = err
        res.extra = f"max rel err {err:.1e}"
    if case.updates and res.bmojo_s:
        res.metrics["updates_per_s"] = case.updates / res.bmojo_s


def _finish_parity_bwd(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    parts = []
    if ref_out is not None and out is not None:
        errs = {k: _rel_err(a, b) for k, a, b in zip(SCAN_TENSORS, out, ref_out, strict=True)}
        worst = max(errs, key=errs.get)
        res.metrics["grad_rel_err_vs_reference"] = errs
        parts.append(f"grad max rel err {errs[worst]:.1e} (d{worst})")
    # memory saved for backward by each implementation (beyond the inputs themselves)
    scan_inputs = [inputs[k] for k in SCAN_TENSORS]
    saved, _ = saved_tensor_bytes(lambda: _bmojo_scan(**_scan_kwargs(inputs)), scan_inputs)
    res.metrics["saved_for_backward_bytes"] = saved
    msg = f"saved {_mb(saved)}"
    ref_saved = res.metrics.get("reference_saved_for_backward_bytes")
    if ref_saved is not None:  # counted during the timed reference call (run_case)
        msg += f" vs {_mb(ref_saved)}"
    parts.append(msg)
    res.extra = "; ".join(parts)


def _finish_per_token(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    if res.bmojo_s and case.tokens:
        us = res.bmojo_s / case.tokens * 1e6
        res.metrics["us_per_token"] = us
        res.extra = f"{us:.3f} µs/token"
    if case.grad:
        scan_inputs = [inputs[k] for k in SCAN_TENSORS]
        saved, _ = saved_tensor_bytes(lambda: _bmojo_scan(**_scan_kwargs(inputs)), scan_inputs)
        res.metrics["saved_for_backward_bytes"] = saved
        res.extra += f"; saved {_mb(saved)}"


def _finish_decode(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    parts = []
    if res.bmojo_s:
        res.metrics["us_per_call"] = res.bmojo_s * 1e6
        parts.append(f"{res.bmojo_s * 1e6:.1f} µs/call")
    if res.reference_s:
        res.metrics["reference_us_per_call"] = res.reference_s * 1e6
    if res.bmojo_s and case.updates:
        ups = case.updates / res.bmojo_s
        res.metrics["updates_per_s"] = ups
        parts.append(f"{ups / 1e9:.2f} Gupd/s")
    res.extra = "; ".join(parts)


def _finish_throughput(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    if not res.bmojo_s:
        return
    ups = case.updates / res.bmojo_s
    gflops = ups * FLOP_PER_UPDATE / 1e9
    threads = case.params.get("threads_used") or 1
    peak = machine_peak(min(threads, _physical_cores()))
    res.metrics.update(
        updates_per_s=ups, gflops=gflops, peak_gflops=peak["peak_gflops"], threads=threads
    )
    res.extra = f"{ups / 1e9:.2f} Gupd/s, {gflops:.1f} GFLOP/s"
    if peak["peak_gflops"]:
        frac = gflops / peak["peak_gflops"]
        res.metrics["fraction_of_peak"] = frac
        res.extra += f" = {100 * frac:.1f}% of {peak['peak_gflops']:.0f}"


def _grad_inputs(b: int, d: int, n: int, length: int) -> dict[str, Any]:
    """Scan inputs requiring grad, plus the output gradient to backpropagate."""
    inputs = make_scan_inputs(b, d, n, length, requires_grad=True)
    inputs["grad_out"] = _grad_out(inputs)
    return inputs


def _scan_cases(quick: bool) -> list[Case]:
    cases = []
    for batch, dim, N, L in SCAN_SHAPES_QUICK if quick else SCAN_SHAPES:
        shape = _shape_name(batch, dim, N, L)
        params = {"batch": batch, "dim": dim, "N": N, "L": L}
        upd = batch * dim * N * L
        cases.append(
            Case(
                name=f"scan fwd {shape}",
                group="scan",
                description="selective_scan_fn forward, all options, vs reference loop",
                setup=lambda b=batch, d=dim, n=N, l=L: make_scan_inputs(b, d, n, l),
                bmojo=_fwd(_bmojo_scan),
                reference=_fwd(_ref_scan),
                repeat=7,
                updates=upd,
                tokens=batch * L,
                finish=_finish_parity_fwd,
                params=params,
            )
        )

        cases.append(
            Case(
                name=f"scan fwd+bwd {shape}",
                group="scan",
                description="selective_scan_fn forward+backward (all input grads) vs autograd "
                "through the reference loop",
                setup=lambda b=batch, d=dim, n=N, l=L: _grad_inputs(b, d, n, l),
                bmojo=_fwd_bwd(_bmojo_scan),
                reference=_fwd_bwd(_ref_scan),
                repeat=5,
                grad=True,
                count_saved=True,
                updates=upd,
                tokens=batch * L,
                finish=_finish_parity_bwd,
                params=params,
            )
        )
    return cases


def _scaling_cases(quick: bool) -> list[Case]:
    batch, dim, N = SCALING_BDN_QUICK if quick else SCALING_BDN
    cases = []
    for L in SCALING_LS_QUICK if quick else SCALING_LS:
        shape = _shape_name(batch, dim, N, L)
        params = {"batch": batch, "dim": dim, "N": N, "L": L}
        cases.append(
            Case(
                name=f"scaling fwd {shape}",
                group="scaling",
                description="forward time per token (should stay flat in L)",
                setup=lambda b=batch, d=dim, n=N, l=L: make_scan_inputs(b, d, n, l),
                bmojo=_fwd(_bmojo_scan),
                repeat=5,
                updates=batch * dim * N * L,
                tokens=batch * L,
                finish=_finish_per_token,
                params=params,
            )
        )

        cases.append(
            Case(
                name=f"scaling fwd+bwd {shape}",
                group="scaling",
                description="forward+backward time per token; bytes saved for backward",
                setup=lambda b=batch, d=dim, n=N, l=L: _grad_inputs(b, d, n, l),
                bmojo=_fwd_bwd(_bmojo_scan),
                repeat=3,
                grad=True,
                updates=batch * dim * N * L,
                tokens=batch * L,
                finish=_finish_per_token,
                params=params,
            )
        )
    return cases


def _decode_cases(quick: bool) -> list[Case]:
    cases = []
    for batch, dim, N in DECODE_SHAPES_QUICK if quick else DECODE_SHAPES:
        shape = _shape_name(batch, dim, N)
        cases.append(
            Case(
                name=f"decode step {shape}",
                group="decode",
                description="selective_state_update, one token, no grad, µs per Python call",
                setup=lambda b=batch, d=dim, n=N: make_step_inputs(b, d, n),
                bmojo=lambda inp: _bmojo_step(**inp),
                reference=lambda inp: _ref_step(**inp),
                repeat=5,
                warmup=50,
                inner=100 if quick else 400,  # 5 × 400 = 2000 timed calls
                ref_repeat=3,
                ref_warmup=2,
                ref_inner=20 if quick else 50,
                updates=batch * dim * N,
                tokens=batch,
                finish=_finish_decode,
                params={"batch": batch, "dim": dim, "N": N},
            )
        )
    return cases


LM_DECODE_BATCHES = (1, 32)


def make_lm_decode_inputs(batch: int, warm: int = 300) -> dict[str, Any]:
    """A 4-layer d=256 BMojoLM and two streams (fused, Python path) fed ``warm`` tokens."""
    from .layers import BMojoLM

    torch.manual_seed(0)
    model = BMojoLM(vocab_size=512, d_model=256, n_layers=4, window=128, n_fading=4, n_eidetic=32)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 512, (batch, warm), generator=gen)
    fused, ref = model.stream(batch), model.stream(batch)
    fused.fused_decode, ref.fused_decode = True, False
    fused.feed(prompt)
    ref.feed(prompt)
    tok = torch.randint(0, 512, (batch,), generator=gen)
    return {"model": model, "fused": fused, "ref": ref, "tok": tok}


def _python_lm_step(inp: dict[str, Any]) -> Any:
    """The Python step path on one torch thread (its small matmuls lose to OpenMP start-up
    and, on a busy machine, to spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return inp["ref"].feed(inp["tok"])
    finally:
        torch.set_num_threads(n)


def _finish_lm_decode(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    b = case.params["batch"]
    parts = []
    if res.bmojo_s:
        res.metrics["tokens_per_s"] = b / res.bmojo_s
        res.metrics["us_per_step"] = res.bmojo_s * 1e6
        parts.append(f"{b / res.bmojo_s:.0f} tok/s fused")
    if res.reference_s:
        res.metrics["reference_tokens_per_s"] = b / res.reference_s
        parts.append(f"{b / res.reference_s:.0f} tok/s python")
    res.extra = "; ".join(parts)


def _lm_decode_cases(quick: bool) -> list[Case]:
    cases = []
    for batch in LM_DECODE_BATCHES:
        for threads in (1, 2):
            cases.append(
                Case(
                    name=f"lm decode B={batch} threads={threads}",
                    group="lm_decode",
                    description="BMojoLM d=256 x4 streaming decode, one token per slot",
                    setup=lambda b=batch: make_lm_decode_inputs(b),
                    bmojo=lambda inp: inp["fused"].feed(inp["tok"]),
                    reference=_python_lm_step,
                    reference_label="Python step path (1 torch thread)",
                    repeat=5,
                    warmup=10,
                    inner=20 if quick else 100,
                    ref_repeat=3,
                    ref_warmup=2,
                    ref_inner=5 if quick else 20,
                    threads=threads,
                    tokens=batch,
                    finish=_finish_lm_decode,
                    params={"batch": batch, "threads": threads},
                )
            )
    return cases


def _throughput_cases(quick: bool) -> list[Case]:
    cases = []
    shapes = SCAN_SHAPES_QUICK[:1] if quick else SCAN_SHAPES
    try:
        all_threads = int(bmojo_core.get_num_threads())
    except Exception:  # noqa: BLE001
        all_threads = os.cpu_count() or 1
    thread_counts = sorted({1, all_threads})
    for batch, dim, N, L in shapes:
        for threads in thread_counts:
            shape = _shape_name(batch, dim, N, L)
            cases.append(
                Case(
                    name=f"throughput fwd {shape} threads={threads}",
                    group="throughput",
                    description="forward state updates/s and GFLOP/s vs the machine's peak",
                    setup=lambda b=batch, d=dim, n=N, l=L: make_scan_inputs(b, d, n, l),
                    bmojo=_fwd(_bmojo_scan),
                    repeat=7,
                    threads=threads,
                    updates=batch * dim * N * L,
                    tokens=batch * L,
                    finish=_finish_throughput,
                    params={
                        "batch": batch,
                        "dim": dim,
                        "N": N,
                        "L": L,
                        "threads_used": threads,
                    },
                )
            )
    return cases


def _peer_cases(quick: bool) -> list[Case]:
    batch, dim, N, L = (SCAN_SHAPES_QUICK if quick else SCAN_SHAPES)[0]
    shape = _shape_name(batch, dim, N, L)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA-only install
        selective_scan_ref = None

    def peer(**kw: Any) -> Any:
        if selective_scan_ref is None:
            raise ImportError("mamba_ssm is not installed")
        return selective_scan_ref(**kw)

    return [
        Case(
            name=f"peer mamba_ssm selective_scan_ref fwd {shape}",
            group="peer",
            description="forward vs mamba_ssm's pure-torch CPU path",
            setup=lambda: make_scan_inputs(batch, dim, N, L),
            bmojo=_fwd(_bmojo_scan),
            reference=_fwd(peer),
            reference_label="mamba_ssm.selective_scan_ref",
            repeat=7,
            updates=batch * dim * N * L,
            tokens=batch * L,
            finish=_finish_parity_fwd,
            params={"batch": batch, "dim": dim, "N": N, "L": L, "available": peer_available()},
        )
    ]


# ---------------------------------------------------------------------------------------
# realizations: companion, causal conv, bilinear (SPEC §3-§5)
# ---------------------------------------------------------------------------------------

COMPANION_SHAPES = ((8, 64, 4096, 4), (1, 1024, 4096, 8))
COMPANION_SHAPES_QUICK = ((2, 64, 512, 4), (1, 128, 512, 8))
CONV_SHAPE = (8, 1536, 2048, 4)
CONV_SHAPE_QUICK = (2, 256, 512, 4)
CONV_UPDATE_DIM = 1536
BILINEAR_NS = (4, 16, 64)
BILINEAR_LS = (256, 4096)
BILINEAR_NS_QUICK = (4, 16)
BILINEAR_LS_QUICK = (256, 1024)


def _stable_alpha(dim: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Companion coefficients of a stable, well-conditioned filter per channel: poles
    r·exp(±iθ) with radius r in (0.6, 0.95) and angles spread over (0, π) with jitter (one
    real pole when n is odd), alpha = -(coefficients of prod (z - p_i))[1:]. Clustered poles
    would make the companion form ill-conditioned and the fp32 comparison meaningless."""
    k = torch.arange(n // 2, dtype=torch.float64)
    jitter = torch.rand(dim, n // 2, generator=gen, dtype=torch.float64) - 0.5
    theta = (k + 0.5 + 0.6 * jitter) * math.pi / max(1, n // 2 + n % 2)
    r = 0.6 + 0.35 * torch.rand(dim, n // 2, generator=gen, dtype=torch.float64)
    poles = torch.polar(r, theta)
    poles = torch.cat([poles, poles.conj()], dim=1)
    if n % 2:
        real = 0.6 + 0.35 * torch.rand(dim, 1, generator=gen, dtype=torch.float64)
        poles = torch.cat([poles, real.to(poles.dtype)], dim=1)
    coef = torch.zeros(dim, n + 1, dtype=poles.dtype)
    coef[:, 0] = 1.0
    for i in range(n):  # multiply by (z - p_i)
        coef[:, 1:] = coef[:, 1:] - poles[:, i : i + 1] * coef[:, :-1]
    return -coef[:, 1:].real


def make_companion_inputs(
    batch: int,
    dim: int,
    length: int,
    n: int,
    *,
    requires_grad: bool = False,
    varying: bool = False,
) -> dict[str, Any]:
    """Companion scan inputs, float32: fixed alpha (dim, n) from stable poles, or with
    ``varying`` an input-dependent alpha (batch, dim, L, n) that modulates those
    coefficients by ±10% per step."""
    g = torch.Generator().manual_seed(0)
    alpha = _stable_alpha(dim, n, g).float()
    if varying:
        mod = 1 + 0.1 * (2 * torch.rand(batch, dim, length, n, generator=g) - 1)
        alpha = alpha[None, :, None, :] * mod
    inputs = {
        "u": torch.randn(batch, dim, length, generator=g),
        "alpha": alpha.contiguous(),
        "beta": torch.rand(dim, generator=g) + 0.5,
        "c": torch.randn(dim, n, generator=g) / n,
        "D": torch.randn(dim, generator=g),
    }
    for v in inputs.values():
        v.requires_grad_(requires_grad)
    if requires_grad:
        inputs["grad_out"] = torch.randn(batch, dim, length, generator=g)
    return inputs


_COMPANION_ARGS = ("u", "alpha", "beta", "c", "D")


def _companion_call(fn: Callable[..., Any], grad: bool) -> Callable[[dict[str, Any]], Any]:
    def call(inputs: dict[str, Any]) -> Any:
        out = fn(**{k: inputs[k] for k in _COMPANION_ARGS})
        if not grad:
            return out
        return torch.autograd.grad(out, [inputs[k] for k in _COMPANION_ARGS], inputs["grad_out"])

    return call


def _lfilter_companion(inputs: dict[str, Any]) -> Any:
    """The same filter with scipy.signal.lfilter, one call per (batch, channel) row:
    numerator beta*c (ascending powers of z^-1), denominator [1, -alpha], plus D*u."""
    from scipy.signal import lfilter

    u = inputs["u"].detach().numpy()
    alpha = inputs["alpha"].detach().double().numpy()
    num = (inputs["beta"][:, None] * inputs["c"]).detach().double().numpy()
    dskip = inputs["D"].detach().numpy()
    out = u.copy()
    for b in range(u.shape[0]):
        for d in range(u.shape[1]):
            den = [1.0, *(-alpha[d])]
            out[b, d] = lfilter(num[d], den, u[b, d]) + dskip[d] * u[b, d]
    return torch.from_numpy(out)


def _finish_parity_any(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    if ref_out is None or out is None:
        return
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref_out if isinstance(ref_out, (tuple, list)) else (ref_out,)
    err = max(_rel_err(a, b) for a, b in zip(outs, refs, strict=True))
    res.metrics["max_rel_err_vs_reference"] = err
    res.extra = f"max rel err {err:.1e}"


def _companion_cases(quick: bool) -> list[Case]:
    from bmojo_core import reference

    cases = []
    for batch, dim, L, n in COMPANION_SHAPES_QUICK if quick else COMPANION_SHAPES:
        shape = f"B={batch} D={dim} L={L} n={n}"
        params = {"batch": batch, "dim": dim, "L": L, "n": n}
        setup = lambda b=batch, d=dim, l=L, k=n: make_companion_inputs(b, d, l, k)  # noqa: E731
        setup_g = lambda b=batch, d=dim, l=L, k=n: make_companion_inputs(  # noqa: E731
            b, d, l, k, requires_grad=True
        )
        common = {"group": "companion", "params": params, "tokens": batch * L}
        cases += [
            Case(
                name=f"companion fwd {shape}",
                description="companion_scan forward (time-invariant alpha, beta, c, D) vs the "
                "reference loop",
                setup=setup,
                bmojo=_companion_call(bmojo_core.companion_scan, False),
                reference=_companion_call(reference.companion_scan, False),
                finish=_finish_parity_any,
                **common,
            ),
            Case(
                name=f"companion fwd {shape} vs lfilter",
                description="companion_scan forward vs scipy.signal.lfilter looped over channels",
                setup=setup,
                bmojo=_companion_call(bmojo_core.companion_scan, False),
                reference=_lfilter_companion,
                reference_label="scipy.signal.lfilter",
                ref_repeat=3,
                ref_warmup=1,
                finish=_finish_parity_any,
                **common,
            ),
            Case(
                name=f"companion fwd {shape} time-varying alpha",
                description="companion_scan forward with alpha (batch, dim, L, n) vs the "
                "reference loop",
                setup=lambda b=batch, d=dim, l=L, k=n: make_companion_inputs(
                    b, d, l, k, varying=True
                ),
                bmojo=_companion_call(bmojo_core.companion_scan, False),
                reference=_companion_call(reference.companion_scan, False),
                finish=_finish_parity_any,
                **common,
            ),
            Case(
                name=f"companion fwd+bwd {shape}",
                description="companion_scan forward+backward (all input grads) vs autograd "
                "through the reference loop",
                setup=setup_g,
                bmojo=_companion_call(bmojo_core.companion_scan, True),
                reference=_companion_call(reference.companion_scan, True),
                grad=True,
                repeat=5,
                finish=_finish_parity_any,
                **common,
            ),
        ]
    return cases


def make_conv_inputs(
    batch: int, dim: int, length: int, width: int, *, requires_grad: bool = False
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(batch, dim, length, generator=g),
        "weight": torch.randn(dim, width, generator=g) / width,
        "bias": torch.randn(dim, generator=g),
    }
    for v in inputs.values():
        v.requires_grad_(requires_grad)
    if requires_grad:
        inputs["grad_out"] = torch.randn(batch, dim, length, generator=g)
    return inputs


_CONV_ARGS = ("x", "weight", "bias")


def _torch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv with torch: left padding K-1, groups=D, then SiLU."""
    width = weight.shape[1]
    y = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x, (width - 1, 0)), weight[:, None], bias, groups=x.shape[1]
    )
    return torch.nn.functional.silu(y)


def _bmojo_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bmojo_core.causal_conv1d_fn(x, weight, bias, activation="silu")


def _conv_call(fn: Callable[..., Any], grad: bool) -> Callable[[dict[str, Any]], Any]:
    def call(inputs: dict[str, Any]) -> Any:
        out = fn(*(inputs[k] for k in _CONV_ARGS))
        if not grad:
            return out
        return torch.autograd.grad(out, [inputs[k] for k in _CONV_ARGS], inputs["grad_out"])

    return call


def _finish_bandwidth(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    _finish_parity_any(case, inputs, res, out, ref_out)
    nbytes = case.params.get("bytes", 0)
    if res.bmojo_s and nbytes:
        gbs = nbytes / res.bmojo_s / 1e9
        res.metrics["gb_per_s"] = gbs
        res.extra = f"{gbs:.1f} GB/s" + (f"; {res.extra}" if res.extra else "")
        if res.reference_s:
            res.metrics["reference_gb_per_s"] = nbytes / res.reference_s / 1e9


def _conv_cases(quick: bool) -> list[Case]:
    from bmojo_core import reference

    batch, dim, L, K = CONV_SHAPE_QUICK if quick else CONV_SHAPE
    shape = f"B={batch} D={dim} L={L} K={K}"
    act = batch * dim * L * 4  # one float32 activation tensor, bytes
    common = {"group": "conv", "reference_label": "torch F.conv1d", "tokens": batch * L}
    cases = [
        Case(
            name=f"conv fwd {shape}",
            description="causal_conv1d_fn (bias, SiLU) vs F.conv1d depthwise with left padding "
            "(+ SiLU); GB/s counts x read + out written",
            setup=lambda: make_conv_inputs(batch, dim, L, K),
            bmojo=_conv_call(_bmojo_conv, False),
            reference=_conv_call(_torch_conv, False),
            ref_repeat=7,
            ref_warmup=1,
            finish=_finish_bandwidth,
            params={"batch": batch, "dim": dim, "L": L, "K": K, "bytes": 2 * act},
            **common,
        ),
        Case(
            name=f"conv fwd+bwd {shape}",
            description="causal_conv1d_fn forward+backward (dx, dweight, dbias) vs autograd "
            "through F.conv1d; GB/s counts x, dy read (twice: fwd, bwd) + out, dx written",
            setup=lambda: make_conv_inputs(batch, dim, L, K, requires_grad=True),
            bmojo=_conv_call(_bmojo_conv, True),
            reference=_conv_call(_torch_conv, True),
            grad=True,
            ref_repeat=5,
            ref_warmup=1,
            finish=_finish_bandwidth,
            params={"batch": batch, "dim": dim, "L": L, "K": K, "bytes": 5 * act},
            **common,
        ),
    ]

    def update_inputs(b: int, d: int, k: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        return {
            "x": torch.randn(b, d, generator=g),
            "conv_state": torch.randn(b, d, k - 1, generator=g),
            "weight": torch.randn(d, k, generator=g) / k,
            "bias": torch.randn(d, generator=g),
            "activation": "silu",
        }

    for b in (1, 64):
        cases.append(
            Case(
                name=f"conv update B={b} D={CONV_UPDATE_DIM} K={K}",
                group="conv",
                description="causal_conv1d_update, one token, no grad, µs per Python call",
                setup=lambda b=b: update_inputs(b, CONV_UPDATE_DIM, K),
                bmojo=lambda inp: bmojo_core.causal_conv1d_update(**inp),
                reference=lambda inp: reference.causal_conv1d_update(**inp),
                repeat=5,
                warmup=50,
                inner=100 if quick else 400,
                ref_repeat=3,
                ref_warmup=2,
                ref_inner=20,
                tokens=b,
                finish=_finish_decode,
                params={"batch": b, "dim": CONV_UPDATE_DIM, "K": K},
            )
        )
    return cases


def make_bilinear_inputs(batch: int, length: int, n: int, m: int = 2) -> dict[str, Any]:
    """Modulated bilinear scan inputs with p = m inputs (v = u), kept contractive:
    ||A0|| = 0.5 and sum_j ||N_j|| <= 0.2 for |u| of order 1."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g)
    A = 0.5 * A / torch.linalg.matrix_norm(A, ord=2)
    N = torch.randn(m, n, n, generator=g)
    N = 0.1 / m * N / torch.linalg.matrix_norm(N, ord=2)[:, None, None]
    return {
        "u": torch.randn(batch, length, m, generator=g).clamp(-2, 2),
        "A": A,
        "B": torch.randn(n, m, generator=g),
        "C": torch.randn(1, n, generator=g),
        "N": N,
    }


def _bilinear_call(method: str | None) -> Callable[[dict[str, Any]], Any]:
    def call(inputs: dict[str, Any]) -> Any:
        if method is None:
            from bmojo_core import reference

            return reference.bilinear_scan(**inputs)
        return bmojo_core.bilinear_scan(**inputs, method=method)

    return call


def _bilinear_cases(quick: bool) -> list[Case]:
    cases = []
    for n in BILINEAR_NS_QUICK if quick else BILINEAR_NS:
        for L in BILINEAR_LS_QUICK if quick else BILINEAR_LS:
            shape = f"B=1 L={L} n={n} m=2"
            for method in ("sequential", "parallel"):
                cases.append(
                    Case(
                        name=f"bilinear fwd {method} {shape}",
                        group="bilinear",
                        description=f"bilinear_scan forward, method={method!r}, vs the "
                        "reference loop",
                        setup=lambda l=L, k=n: make_bilinear_inputs(1, l, k),
                        bmojo=_bilinear_call(method),
                        reference=_bilinear_call(None),
                        tokens=L,
                        finish=_finish_parity_any,
                        params={"batch": 1, "L": L, "n": n, "m": 2, "method": method},
                    )
                )
    return cases


def peer_available() -> bool:
    """Whether mamba_ssm's reference scan can be imported here."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


GROUPS = (
    "scan",
    "scaling",
    "decode",
    "lm_decode",
    "throughput",
    "companion",
    "conv",
    "bilinear",
    "peer",
)


def build_cases(quick: bool = False, only: str | Sequence[str] | None = None) -> list[Case]:
    """All benchmark cases, in order. ``only`` keeps the cases whose name or group contains
    one of the given substrings (case-insensitive)."""
    cases = (
        _scan_cases(quick)
        + _scaling_cases(quick)
        + _decode_cases(quick)
        + _lm_decode_cases(quick)
        + _throughput_cases(quick)
        + _companion_cases(quick)
        + _conv_cases(quick)
        + _bilinear_cases(quick)
        + _peer_cases(quick)
    )
    if only:
        keys = [only] if isinstance(only, str) else list(only)
        keys = [k.lower() for k in keys]
        cases = [c for c in cases if any(k in c.name.lower() or k == c.group for k in keys)]
    return cases


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    before = bmojo_core.get_num_threads()
    bmojo_core.set_num_threads(n)
    try:
        yield
    finally:
        bmojo_core.set_num_threads(before)


def run_case(case: Case, *, with_reference: bool = True) -> Result:
    """Run one case; exceptions are caught and reported in ``Result.error``."""
    res = Result(
        name=case.name,
        group=case.group,
        description=case.description,
        reference_label=case.reference_label if case.reference else "",
        params=dict(case.params),
    )
    if case.group == "peer" and not case.params.get("available", True):
        res.skipped = f"{case.reference_label}: not installed"
        return res
    try:
        with _threads(case.threads):
            inputs = case.setup()
            res.bmojo_s, samples, out = time_call(
                lambda: case.bmojo(inputs),
                repeat=case.repeat,
                warmup=case.warmup,
                inner=case.inner,
                grad=case.grad,
            )
            res.metrics["bmojo_samples_s"] = samples
            ref_out = None
            if with_reference and case.reference is not None:
                ref_inputs = case.setup()  # fresh inputs: the step updates state in place
                # bytes the reference saves for backward, counted during its (single) timed
                # call: the hooks cost far less than the reference itself
                counting = case.grad and case.count_saved
                ref_tensors = [v for v in ref_inputs.values() if isinstance(v, torch.Tensor)]
                counter = SavedBytes(ref_tensors if counting else ())
                with counter if counting else contextlib.nullcontext():
                    res.reference_s, ref_samples, ref_out = time_call(
                        lambda: case.reference(ref_inputs),
                        repeat=case.ref_repeat,
                        warmup=case.ref_warmup,
                        inner=case.ref_inner,
                        grad=case.grad,
                    )
                if counting:
                    calls = case.ref_warmup + case.ref_repeat * case.ref_inner
                    res.metrics["reference_saved_for_backward_bytes"] = counter.nbytes // calls
                res.metrics["reference_samples_s"] = ref_samples
                res.speedup = res.reference_s / res.bmojo_s if res.bmojo_s else None
            if case.finish is not None:
                case.finish(case, inputs, res, out, ref_out)
    except Exception as exc:  # noqa: BLE001 - report and go on with the next case
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        gc.collect()
    return res


def _progress(items: list[Case], enabled: bool):
    """tqdm over the cases if available, else plain prints to stderr."""
    if not enabled:
        yield from ((c, lambda _s: None) for c in items)
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(items, desc="bmojo bench", unit="case", file=sys.stderr, dynamic_ncols=True)
        for c in bar:
            bar.set_postfix_str(c.name, refresh=True)
            yield c, bar.write
        bar.close()
    else:
        n = len(items)
        for i, c in enumerate(items, 1):
            print(f"[{i}/{n}] {c.name} ...", file=sys.stderr, flush=True)
            yield c, lambda s: print(s, file=sys.stderr, flush=True)


def _warm_up_reference() -> None:
    """One tiny call of each reference path, so that torch's one-time initialisation is not
    charged to the reference timings (which run once, without warm-up)."""
    try:
        inputs = make_scan_inputs(1, 4, 2, 3, requires_grad=True)
        inputs["grad_out"] = _grad_out(inputs)
        with torch.no_grad():
            _fwd(_ref_scan)(inputs)
            _ref_step(**make_step_inputs(1, 4, 2))
        _fwd_bwd(_ref_scan)(inputs)
    except Exception:  # noqa: BLE001 - the cases themselves will report errors
        pass


def run_suite(
    quick: bool = False,
    only: str | Sequence[str] | None = None,
    *,
    progress: bool = True,
    memory: bool = True,
    with_reference: bool = True,
) -> dict[str, Any]:
    """Run the suite. Returns ``{"machine", "peak", "quick", "results", "memory"}`` with
    ``results`` a list of :class:`Result` (also JSON-serialisable through ``to_json``)."""
    cases = build_cases(quick, only)
    if with_reference and any(c.reference is not None for c in cases):
        _warm_up_reference()
    results: list[Result] = []
    for case, write in _progress(cases, progress):
        r = run_case(case, with_reference=with_reference)
        if r.error:
            write(f"  {case.name}: ERROR {r.error}")
        results.append(r)
    mem = None
    if memory and any(r.group == "scaling" and r.error is None for r in results):
        mem = measure_backward_memory(quick)
        _attach_memory(results, mem)
    return {
        "machine": machine_info(),
        "peak": machine_peak(),
        "quick": quick,
        "results": results,
        "memory": mem,
    }


def to_json(report: dict[str, Any]) -> str:
    out = dict(report)
    out["results"] = [asdict(r) for r in report["results"]]
    return json.dumps(out, indent=2, default=str)


# ---------------------------------------------------------------------------------------
# peak memory of forward+backward, in a fresh process
# ---------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def _memory_child(
    batch: int, dim: int, N: int, Ls: list[int], threads: int | None, simd: str | None = None
) -> None:
    """Child process body: for each L, build inputs, then measure the peak RSS of one
    forward+backward above the RSS before it. Prints one JSON line."""
    if threads is not None:
        bmojo_core.set_num_threads(threads)
    if simd is not None and simd != _simd_level():
        bmojo_core.set_simd_level(simd)
    out: dict[str, Any] = {"exact": True, "by_L": {}}
    # warm up code paths and allocator at the smallest size
    warm = make_scan_inputs(batch, dim, N, min(Ls), requires_grad=True)
    warm["grad_out"] = _grad_out(warm)
    _fwd_bwd(_bmojo_scan)(warm)
    del warm
    for L in sorted(Ls):
        inputs = make_scan_inputs(batch, dim, N, L, requires_grad=True)
        inputs["grad_out"] = _grad_out(inputs)
        gc.collect()
        base = _proc_status_kib("VmRSS")
        exact = _reset_peak_rss() and base is not None
        before_peak = _peak_rss_kib()
        grads = _fwd_bwd(_bmojo_scan)(inputs)
        peak = _peak_rss_kib()
        if base is None:
            base = before_peak
        input_bytes = sum(inputs[k].numel() * inputs[k].element_size() for k in SCAN_TENSORS)
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        out_bytes = inputs["u"].numel() * inputs["u"].element_size()
        out["exact"] = out["exact"] and exact
        out["by_L"][str(L)] = {
            "peak_extra_bytes": max(0, peak - base) * 1024,
            "input_bytes": input_bytes,
            "grad_bytes": grad_bytes,
            "out_bytes": out_bytes,
        }
        del inputs, grads
        gc.collect()
    print("BMOJO_MEMORY " + json.dumps(out), flush=True)


def measure_backward_memory(quick: bool = False) -> dict[str, Any] | None:
    """Peak extra resident memory of forward+backward at each scaling length, measured in a
    fresh Python process (torch's allocations are invisible to tracemalloc). Returns
    ``{"exact", "by_L"}``, or ``{"error": message}`` if the child fails."""
    batch, dim, N = SCALING_BDN_QUICK if quick else SCALING_BDN
    Ls = list(SCALING_LS_QUICK if quick else SCALING_LS)
    try:
        threads = int(bmojo_core.get_num_threads())
    except Exception:  # noqa: BLE001
        threads = None
    code = (
        "import sys, json; from bmojo_core.bench import _memory_child; "
        "a = json.loads(sys.argv[1]); _memory_child(**a)"
    )
    simd = _simd_level()
    args = json.dumps(
        {
            "batch": batch,
            "dim": dim,
            "N": N,
            "Ls": Ls,
            "threads": threads,
            "simd": None if simd == "unknown" else simd,
        }
    )
    try:
        # A fixed glibc mmap threshold: every large tensor gets its own mapping, returned to
        # the system when freed, so the resident memory follows the live tensors (glibc's
        # dynamic threshold would otherwise keep freed blocks in the heap and hide reuse).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(
            [sys.executable, "-c", code, args],
            capture_output=True,
            text=True,
            timeout=1800,
            env=env,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    for line in proc.stdout.splitlines():
        if line.startswith("BMOJO_MEMORY "):
            return json.loads(line[len("BMOJO_MEMORY ") :])
    return {"error": (proc.stderr or proc.stdout).strip()[-2000:] or f"exit {proc.returncode}"}


def _attach_memory(results: list[Result], mem: dict[str, Any] | None) -> None:
    if not mem or "by_L" not in mem:
        return
    for r in results:
        if r.group == "scaling" and "fwd+bwd" in r.name and r.error is None:
            m = mem["by_L"].get(str(r.params.get("L")))
            if m:
                r.metrics.update({f"child_{k}": v for k, v in m.items()})
                approx = "" if mem.get("exact") else "≈"
                # the output and the input gradients are O(B·D·L) and unavoidable
                out_grads = m["grad_bytes"] + m.get("out_bytes", 0)
                r.extra += (
                    f"; peak +{approx}{_mb(m['peak_extra_bytes'])} (out+grads {_mb(out_grads)})"
                )


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table: case, bmojo, reference, speed-up, extra."""
    header = ("case", "bmojo", "reference", "speed-up", "extra")
    rows = []
    for r in results:
        if r.skipped:
            rows.append((r.name, "—", "—", "—", f"skipped: {r.skipped}"))
            continue
        if r.error:
            rows.append((r.name, "—", "—", "—", f"ERROR {r.error}"[:120]))
            continue
        speed = f"{r.speedup:.1f}×" if r.speedup else "—"
        rows.append(
            (r.name, format_seconds(r.bmojo_s), format_seconds(r.reference_s), speed, r.extra)
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    widths[-1] = min(widths[-1], 100)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i in (0, 4) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"bmojo_core {m['bmojo_core']} | SIMD {m['simd_level']} | bmojo threads "
        f"{m['bmojo_threads']} | torch {m['torch']} ({m['torch_threads']} threads) | "
        f"Python {m['python']}",
        f"CPU: {m['cpu']} ({m['physical_cores']} cores) | {m['platform']}",
        "",
        format_table(report["results"]),
        "",
        "Notes:",
        "  times are medians of repeated calls (time.perf_counter); the reference "
        "(bmojo_core.reference, a Python loop over time, autograd for backward) is timed once.",
        "  speed-up = reference time / bmojo time; 'max rel err' = max|bmojo − ref| / max|ref|.",
        "  'saved' = bytes saved for backward beyond the inputs (bmojo vs reference);",
        "  'peak +' = peak resident memory of one forward+backward above the resident memory "
        "before it, in a fresh process;",
        "  it includes the output and the input gradients ('out+grads', O(B·D·L)).",
        "  " + describe_peak(report["peak"]),
    ]
    mem = report.get("memory")
    if mem and "error" in mem:
        lines.append(f"  memory measurement failed: {mem['error'][-300:]}")
    return "\n".join(lines)
