"""Selective-scan cases (groups ``scan`` and ``scaling``, design §2.2), their inputs, the
memory of the backward measured in a child process, and the scan helpers that
:mod:`.throughput`, :mod:`.peer` and :mod:`.step` share.

* ``scan``: :func:`~bmojo_core.ops.selective_scan_fn` forward and forward+backward against
  :func:`bmojo_core.ops.reference.selective_scan` (a Python loop over time; its backward is
  torch autograd) at (B=1, D=1536, N=16, L=2048) and (B=8, D=768, N=16, L=512), every
  option on (D, z, delta_bias, delta_softplus=True), B/C variable ``(batch, N, L)``. The
  reference takes seconds and is timed once. The extra column reports the parity of the
  two results and the bytes each saves for backward.
* ``scaling``: forward and forward+backward time per token for L = 512 … 16384 at
  (B=1, D=1536, N=16) -- it should stay flat -- plus the memory of the backward: the bytes
  of the tensors the op saves for backward (beyond its inputs) and the peak resident memory
  of forward+backward measured in a fresh child process (:func:`measure_backward_memory`).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..ops import reference, selective_scan_fn
from ..runtime import get_num_threads, set_num_threads, set_simd_level, simd_level
from .harness import (
    Case,
    Result,
    format_mib,
    peak_extra_kib,
    rel_err,
    report_to_parent,
    run_child,
    saved_tensor_bytes,
)

__all__ = [
    "FLOP_PER_UPDATE",
    "SCAN_TENSORS",
    "attach_memory",
    "make_scan_inputs",
    "measure_backward_memory",
    "scaling_cases",
    "scan_cases",
    "warm_up_reference",
]

#: Floating-point operations counted per state update h[d, n] of the forward:
#: Δ·A (1 mul) + exp (counted as 1) + h = a·h + b (1 FMA = 2) + y += C·h (1 FMA = 2).
FLOP_PER_UPDATE = 6

# (batch, dim, N, L): a long single sequence and a batch of shorter ones at Mamba-1's
# inner width; --quick uses the smaller ones.
SCAN_SHAPES = ((1, 1536, 16, 2048), (8, 768, 16, 512))
SCAN_SHAPES_QUICK = ((1, 256, 16, 512), (2, 128, 16, 256))
SCALING_LS = (512, 1024, 2048, 4096, 8192, 16384)
SCALING_LS_QUICK = (256, 512, 1024, 2048)
SCALING_BDN = (1, 1536, 16)
SCALING_BDN_QUICK = (1, 256, 16)

SCAN_TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


# ---------------------------------------------------------------------------------------
# inputs and calls
# ---------------------------------------------------------------------------------------


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
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
        "delta_bias": inverse_softplus(dt0),
    }
    tensors = {
        k: v.to(dtype).contiguous().requires_grad_(requires_grad) for k, v in tensors.items()
    }
    return {**tensors, "delta_softplus": True}


def _scan_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: inputs[k] for k in (*SCAN_TENSORS, "delta_softplus")}


def _grad_out(inputs: dict[str, Any]) -> torch.Tensor:
    u = inputs["u"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(u.shape, generator=g, dtype=torch.float32).to(u.dtype)


def grad_inputs(b: int, d: int, n: int, length: int) -> dict[str, Any]:
    """Scan inputs requiring grad, plus the output gradient to backpropagate."""
    inputs = make_scan_inputs(b, d, n, length, requires_grad=True)
    inputs["grad_out"] = _grad_out(inputs)
    return inputs


def fwd(fn: Callable[..., Any]) -> Callable[[dict[str, Any]], Any]:
    """The forward of a scan implementation, called on a dict of inputs."""

    def call(inputs: dict[str, Any]) -> Any:
        return fn(**_scan_kwargs(inputs))

    return call


def fwd_bwd(fn: Callable[..., Any]) -> Callable[[dict[str, Any]], Any]:
    """forward + backward with respect to every tensor input (torch.autograd.grad, so that
    nothing accumulates between calls)."""

    def call(inputs: dict[str, Any]) -> Any:
        out = fn(**_scan_kwargs(inputs))
        return torch.autograd.grad(out, [inputs[k] for k in SCAN_TENSORS], inputs["grad_out"])

    return call


def bmojo_scan(**kw: Any) -> Any:
    return selective_scan_fn(**kw)


def ref_scan(**kw: Any) -> Any:
    return reference.selective_scan(**kw)


def shape_name(batch: int, dim: int, N: int, L: int | None = None) -> str:
    s = f"B={batch} D={dim} N={N}"
    return s if L is None else f"{s} L={L}"


def warm_up_reference() -> None:
    """One tiny forward and forward+backward of the reference scan, so that torch's one-time
    initialisation is not charged to the reference timings (which run once, without
    warm-up)."""
    inputs = grad_inputs(1, 4, 2, 3)
    with torch.no_grad():
        fwd(ref_scan)(inputs)
    fwd_bwd(ref_scan)(inputs)


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------


def finish_parity_fwd(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    if ref_out is not None and out is not None:
        err = rel_err(out, ref_out)
        res.metrics["max_rel_err_vs_reference"] = err
        res.extra = f"max rel err {err:.1e}"
    if case.updates and res.bmojo_s:
        res.metrics["updates_per_s"] = case.updates / res.bmojo_s


def _saved_bytes(inputs: dict[str, Any]) -> int:
    """Bytes selective_scan_fn saves for backward beyond its inputs."""
    scan_inputs = [inputs[k] for k in SCAN_TENSORS]
    saved, _ = saved_tensor_bytes(lambda: bmojo_scan(**_scan_kwargs(inputs)), scan_inputs)
    return saved


def _finish_parity_bwd(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    parts = []
    if ref_out is not None and out is not None:
        errs = {k: rel_err(a, b) for k, a, b in zip(SCAN_TENSORS, out, ref_out, strict=True)}
        worst = max(errs, key=errs.get)
        res.metrics["grad_rel_err_vs_reference"] = errs
        parts.append(f"grad max rel err {errs[worst]:.1e} (d{worst})")
    # memory saved for backward by each implementation (beyond the inputs themselves)
    saved = _saved_bytes(inputs)
    res.metrics["saved_for_backward_bytes"] = saved
    msg = f"saved {format_mib(saved)}"
    ref_saved = res.metrics.get("reference_saved_for_backward_bytes")
    if ref_saved is not None:  # counted during the timed reference call (run_case)
        msg += f" vs {format_mib(ref_saved)}"
    parts.append(msg)
    res.extra = "; ".join(parts)


def _finish_per_token(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    if res.bmojo_s and case.tokens:
        us = res.bmojo_s / case.tokens * 1e6
        res.metrics["us_per_token"] = us
        res.extra = f"{us:.3f} µs/token"
    if case.grad:
        saved = _saved_bytes(inputs)
        res.metrics["saved_for_backward_bytes"] = saved
        res.extra += f"; saved {format_mib(saved)}"


# ---------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------


def scan_cases(quick: bool) -> list[Case]:
    cases = []
    for batch, dim, N, L in SCAN_SHAPES_QUICK if quick else SCAN_SHAPES:
        shape = shape_name(batch, dim, N, L)
        params = {"batch": batch, "dim": dim, "N": N, "L": L}
        upd = batch * dim * N * L
        cases.append(
            Case(
                name=f"scan fwd {shape}",
                group="scan",
                description="selective_scan_fn forward, all options, vs reference loop",
                setup=lambda b=batch, d=dim, n=N, l=L: make_scan_inputs(b, d, n, l),
                bmojo=fwd(bmojo_scan),
                reference=fwd(ref_scan),
                repeat=7,
                updates=upd,
                tokens=batch * L,
                finish=finish_parity_fwd,
                params=params,
            )
        )

        cases.append(
            Case(
                name=f"scan fwd+bwd {shape}",
                group="scan",
                description="selective_scan_fn forward+backward (all input grads) vs autograd "
                "through the reference loop",
                setup=lambda b=batch, d=dim, n=N, l=L: grad_inputs(b, d, n, l),
                bmojo=fwd_bwd(bmojo_scan),
                reference=fwd_bwd(ref_scan),
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


def scaling_cases(quick: bool) -> list[Case]:
    batch, dim, N = SCALING_BDN_QUICK if quick else SCALING_BDN
    cases = []
    for L in SCALING_LS_QUICK if quick else SCALING_LS:
        shape = shape_name(batch, dim, N, L)
        params = {"batch": batch, "dim": dim, "N": N, "L": L}
        cases.append(
            Case(
                name=f"scaling fwd {shape}",
                group="scaling",
                description="forward time per token (should stay flat in L)",
                setup=lambda b=batch, d=dim, n=N, l=L: make_scan_inputs(b, d, n, l),
                bmojo=fwd(bmojo_scan),
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
                setup=lambda b=batch, d=dim, n=N, l=L: grad_inputs(b, d, n, l),
                bmojo=fwd_bwd(bmojo_scan),
                repeat=3,
                grad=True,
                updates=batch * dim * N * L,
                tokens=batch * L,
                finish=_finish_per_token,
                params=params,
            )
        )
    return cases


# ---------------------------------------------------------------------------------------
# peak memory of forward+backward, in a fresh process
# ---------------------------------------------------------------------------------------


def _memory_child(
    batch: int, dim: int, N: int, Ls: list[int], threads: int | None, simd: str | None = None
) -> None:
    """Child process body: for each L, build inputs, then measure the peak RSS of one
    forward+backward above the RSS before it. Reports one JSON line to the parent."""
    if threads is not None:
        set_num_threads(threads)
    if simd is not None and simd != simd_level():
        set_simd_level(simd)
    out: dict[str, Any] = {"exact": True, "by_L": {}}
    # warm up code paths and allocator at the smallest size
    warm = grad_inputs(batch, dim, N, min(Ls))
    fwd_bwd(bmojo_scan)(warm)
    del warm
    for L in sorted(Ls):
        inputs = grad_inputs(batch, dim, N, L)
        extra_kib, exact, grads = peak_extra_kib(partial(fwd_bwd(bmojo_scan), inputs))
        input_bytes = sum(inputs[k].numel() * inputs[k].element_size() for k in SCAN_TENSORS)
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        out_bytes = inputs["u"].numel() * inputs["u"].element_size()
        out["exact"] = out["exact"] and exact
        out["by_L"][str(L)] = {
            "peak_extra_bytes": extra_kib * 1024,
            "input_bytes": input_bytes,
            "grad_bytes": grad_bytes,
            "out_bytes": out_bytes,
        }
        del inputs, grads
        gc.collect()
    report_to_parent(out)


def measure_backward_memory(quick: bool = False) -> dict[str, Any] | None:
    """Peak extra resident memory of forward+backward at each scaling length, measured in a
    fresh Python process (torch's allocations are invisible to tracemalloc). Returns
    ``{"exact", "by_L"}``, or ``{"error": message}`` if the child fails."""
    batch, dim, N = SCALING_BDN_QUICK if quick else SCALING_BDN
    Ls = list(SCALING_LS_QUICK if quick else SCALING_LS)
    try:
        threads = int(get_num_threads())
    except Exception:  # noqa: BLE001
        threads = None
    try:
        simd = str(simd_level())
    except Exception:  # noqa: BLE001
        simd = None
    args = {"batch": batch, "dim": dim, "N": N, "Ls": Ls, "threads": threads, "simd": simd}
    return run_child(__name__, "_memory_child", args)


def attach_memory(results: list[Result], mem: dict[str, Any] | None) -> None:
    """Adds the child's figures to the forward+backward scaling results."""
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
                    f"; peak +{approx}{format_mib(m['peak_extra_bytes'])} "
                    f"(out+grads {format_mib(out_grads)})"
                )
