"""The multi-head SSD scan of Mamba-2 (design §2.4), a drop-in for mamba_ssm's
``mamba_chunk_scan_combined``, and Mamba-2's fused block built on it.

The scan is a torch custom op (``bmojo::ssd_fwd`` / ``bmojo::ssd_bwd``) over the Rust
kernel ``rust/kernels/src/ssd.rs``: the direct recurrence with each head's (P, N) state
in L1 and one decay per (token, head); backward from checkpoints every
``CHECKPOINT_CHUNK`` steps; SIMD level chosen at run time; bitwise independent of the
thread count. A CUDA kernel (``cuda/ssd.cu``, compiled by NVRTC) is registered beside it:
one warp per state row, the row's columns in registers, checkpoints every 64 steps, no
atomics. float16/bfloat16 inputs are computed in float32 and returned in their dtype.
``chunk_size`` is accepted for compatibility and ignored: results do not depend on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate as V
from ..runtime import cuda as _cuda
from ..runtime import launch as CU
from ._library import custom_op
from ._native import array, core, eager_no_grad, view, view_opt
from .conv import causal_conv1d_fn
from .scan import _want

__all__ = [
    "CHECKPOINT_CHUNK",
    "gated_rms_norm",
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "ssd_bwd",
    "ssd_fwd",
    "ssd_state_update",
    "ssd_state_update_op",
]

CHECKPOINT_CHUNK: int = core.ssd.CHECKPOINT_CHUNK


def _check_d(D: Tensor | None, h: int, p: int) -> None:
    """``D`` is per head ``(h,)`` or per channel ``(h, p)``."""
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise V.BmojoValueError(f"D: expected shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")


def _softplus(x: Tensor) -> Tensor:
    return torch.where(x > 20.0, x, F.softplus(x))  # mamba_ssm's threshold


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Mamba-2's SSD scan (design §2.4), mamba_ssm's signature and return conventions.

    ``x (b, l, h, p)``, ``dt (b, l, h)``, ``A (h,)``, ``B, C (b, l, g, n)`` with g | h,
    ``D (h,)`` or ``(h, p)``, ``z (b, l, h, p)`` (gate ``y · silu(z)``), ``dt_bias (h,)``,
    ``initial_states (b, h, p, n)``, ``seq_idx (b, l)`` int (packed sequences: the state
    restarts from zero where it changes), ``cu_seqlens (s + 1,)`` int (batch 1: sequence
    boundaries, used as ``seq_idx`` when that is not given), ``dt_limit`` clamps Δ after
    the softplus. Returns ``out (b, l, h, p)`` (x's dtype), then ``final_states
    (b, h, p, n)`` if ``return_final_states``, then ``varlen_states (s, h, p, n)`` (the
    state after each sequence of ``cu_seqlens``) if ``return_varlen_states``. States are in
    the compute dtype (float64 for float64 inputs, else float32). Differentiable in every
    floating input, through the returned states too.
    """
    lo, hi = check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                        dt_limit)  # fmt: skip
    b, length = x.shape[:2]
    seqs = None
    if cu_seqlens is not None:
        seqs = _boundaries(cu_seqlens, b, length)
        if seq_idx is None:
            seq_idx = torch.repeat_interleave(
                torch.arange(len(seqs) - 1, device=x.device),
                torch.tensor(seqs, device=x.device).diff(),
            )[None]
    elif return_varlen_states:
        raise V.BmojoValueError("return_varlen_states: needs cu_seqlens")
    if return_varlen_states:
        return _varlen(x, dt, A, B, C, D, z, dt_bias, initial_states, seqs, dt_softplus,
                       (lo, hi), return_final_states)  # fmt: skip
    out, last = _scan(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                      (lo, hi))  # fmt: skip
    return (out, last) if return_final_states else out


def check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
               dt_limit) -> tuple[float, float]:  # fmt: skip
    """The argument checks of :func:`mamba_chunk_scan_combined` (also run by its
    context-parallel version before the ranks exchange anything); returns ``dt_limit``."""
    V.device_tensor("x", x)
    V.shape("x", x, (None, None, None, None), "(batch, L, heads, head_dim)")
    b, length, h, p = x.shape
    V.device_tensor("dt", dt)
    V.shape("dt", dt, (b, length, h), "(batch, L, heads)")
    V.device_tensor("A", A)
    V.shape("A", A, (h,), "(heads,): one decay rate per head")
    V.device_tensor("B", B)
    V.shape("B", B, (b, length, None, None), "(batch, L, groups, N)")
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g or n == 0:
        raise V.BmojoValueError(
            f"B: expected groups dividing heads={h} and N >= 1, got shape {tuple(B.shape)}"
        )
    V.device_tensor("C", C)
    V.shape("C", C, (b, length, g, n), "(batch, L, groups, N) like B")
    V.int_arg("chunk_size", chunk_size, 1)
    if D is not None:
        V.device_tensor("D", D)
        _check_d(D, h, p)
    for name, t, shp, desc in (
        ("z", z, (b, length, h, p), "(batch, L, heads, head_dim) like x"),
        ("dt_bias", dt_bias, (h,), "(heads,)"),
        ("initial_states", initial_states, (b, h, p, n), "(batch, heads, head_dim, N)"),
    ):
        if t is not None:
            V.device_tensor(name, t)
            V.shape(name, t, shp, desc)
    if seq_idx is not None:
        V.device_tensor("seq_idx", seq_idx, dtypes=V.INTS)
        V.shape("seq_idx", seq_idx, (b, length), "(batch, L)")
    return _limit(dt_limit)


def _limit(dt_limit) -> tuple[float, float]:
    try:
        lo, hi = dt_limit
    except (TypeError, ValueError):
        raise V.BmojoTypeError(f"dt_limit: expected (low, high), got {dt_limit!r}") from None
    lo, hi = V.number_arg("dt_limit[0]", lo), V.number_arg("dt_limit[1]", hi)
    if not (0.0 <= lo <= hi) or math.isnan(hi):
        raise V.BmojoValueError(f"dt_limit: expected 0 <= low <= high, got ({lo}, {hi})")
    return lo, hi


def _boundaries(cu: Tensor, b: int, length: int) -> list[int]:
    V.device_tensor("cu_seqlens", cu, dtypes=V.INTS)
    if cu.dim() != 1 or cu.numel() < 2:
        raise V.BmojoValueError(f"cu_seqlens: expected (n_seqs + 1,), got {tuple(cu.shape)}")
    if b != 1:
        raise V.BmojoValueError(f"cu_seqlens: needs batch 1 (packed sequences), got batch {b}")
    s = cu.tolist()
    if s[0] != 0 or s[-1] != length or any(a > c for a, c in zip(s, s[1:], strict=False)):
        raise V.BmojoValueError(
            f"cu_seqlens: expected non-decreasing offsets from 0 to L={length}, got {s}"
        )
    return s


# ----------------------------------------------------------------------------- the op


def _n_chunks(length: int) -> int:
    return (length + CHECKPOINT_CHUNK - 1) // CHECKPOINT_CHUNK


def _limit_arg(limit: bool, lo: float, hi: float):
    return (lo, hi) if limit else None


@custom_op("bmojo::ssd_fwd", mutates_args=(), device_types="cpu")
def ssd_fwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    initial_states: Tensor | None,
    seq_idx: Tensor | None,
    dt_softplus: bool,
    limit: bool,
    dt_min: float,
    dt_max: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised SSD scan: every float input in one dtype (float32/float64), ``A``,
    ``D``, ``dt_bias``, ``initial_states`` contiguous (``x``, ``dt``, ``B``, ``C``, ``z``
    may be column slices: their rows are read in place), ``seq_idx`` int64; Δ clamped to
    ``[dt_min, dt_max]`` after the softplus if ``limit``. Returns ``out (b, h, l, p)``
    (head-major), ``last_state (b, h, p, n)`` and the checkpoints
    ``(b, h, ceil(l / CHECKPOINT_CHUNK), p, n)`` that feed the backward."""
    return _fwd_cpu(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                    _limit_arg(limit, dt_min, dt_max), True)  # fmt: skip


def _rows(t: Tensor | None, width: int):
    """``t (b, l, ...)`` as the kernel reads it: a flat NumPy span of its (b, l) rows and
    their stride, in place when each row's ``width`` trailing elements are contiguous
    and the rows evenly spaced (column slices of one projection, as Mamba-2 blocks pass
    them), else a contiguous copy."""
    if t is None:
        return None, width
    b, length = t.shape[:2]
    rows = b * length
    inner = t.shape[2:]
    step = 1
    ok = rows > 0
    for size, stride in zip(reversed(inner), reversed(t.stride()[2:]), strict=True):
        ok = ok and (size == 1 or stride == step)
        step *= size
    if ok:
        rs = t.stride(1) if length > 1 else (t.stride(0) if b > 1 else width)
        ok = rs >= width and (b == 1 or t.stride(0) == length * rs)
    if not ok:
        return view(t), width
    flat = t.detach().as_strided(((rows - 1) * rs + width,), (1,))
    return array(flat), rs


def _dims_rows(x, dt, B, C, z):
    """The kernels' dims ``(b, l, h, p, g, n)``, the row views of the per-token inputs and
    their strides."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    (xv, xs), (dv, ds), (bv, bs), (cv, cs), (zv, zs) = (
        _rows(x, h * p), _rows(dt, h), _rows(B, g * n), _rows(C, g * n), _rows(z, h * p)
    )  # fmt: skip
    return (b, length, h, p, g, n), (xv, dv, bv, cv, zv), (xs, ds, bs, cs, zs)


def _fwd_cpu(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, softplus, limit, ckpt: bool,
             token_major: bool = False):  # fmt: skip
    b, length, h, p = x.shape
    n = B.shape[3]
    out = x.new_empty(b, length, h, p) if token_major else x.new_empty(b, h, length, p)
    last = x.new_empty(b, h, p, n)
    cks = x.new_empty(b, h, _n_chunks(length), p, n) if ckpt else x.new_empty(0)
    dims, (xv, dv, bv, cv, zv), rows = _dims_rows(x, dt, B, C, z)
    core.ssd.ssd_fwd(
        xv, dv, view(A), bv, cv, view_opt(D), zv, view_opt(dt_bias), view_opt(h0),
        view_opt(seq_idx), softplus, limit, dims, rows, array(out), array(last), array(cks),
        token_major,
    )  # fmt: skip
    return out, last, cks


@ssd_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus, limit, dt_min,
      dt_max):  # fmt: skip
    b, length, h, p = x.shape
    n = B.shape[3]
    return (
        x.new_empty(b, h, length, p),
        x.new_empty(b, h, p, n),
        x.new_empty(b, h, _n_chunks(length), p, n),
    )


@custom_op("bmojo::ssd_bwd", mutates_args=(), device_types="cpu")
def ssd_bwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    seq_idx: Tensor | None,
    dt_softplus: bool,
    limit: bool,
    dt_min: float,
    dt_max: float,
    checkpoints: Tensor,
    dout: Tensor,
    dlast_state: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states)`` from
    ``dout (b, h, l, p)``; ``dx``/``dz`` are head-major ``(b, h, l, p)`` and ``ddt``
    ``(b, h, l)``; those of absent optional inputs are empty. Deterministic."""
    b, length, h, p = x.shape
    n = B.shape[3]
    dx = x.new_empty(b, h, length, p)
    ddt = x.new_empty(b, h, length)
    dA, dB, dC = torch.empty_like(A), B.new_empty(B.shape), C.new_empty(C.shape)
    dh0 = x.new_empty(b, h, p, n)
    dD = torch.empty_like(D) if D is not None else x.new_empty(0)
    dz = x.new_empty(b, h, length, p) if z is not None else x.new_empty(0)
    dbias = torch.empty_like(dt_bias) if dt_bias is not None else x.new_empty(0)
    dims, (xv, dv, bv, cv, zv), rows = _dims_rows(x, dt, B, C, z)
    core.ssd.ssd_bwd(
        xv, dv, view(A), bv, cv, view_opt(D), zv, view_opt(dt_bias), view_opt(seq_idx),
        dt_softplus, _limit_arg(limit, dt_min, dt_max), dims, rows, view(checkpoints),
        view(dout), view_opt(dlast_state), array(dx), array(ddt), array(dA), array(dB),
        array(dC), None if D is None else array(dD), None if z is None else array(dz),
        None if dt_bias is None else array(dbias),
        array(dh0),
    )  # fmt: skip
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0


@ssd_bwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, seq_idx, dt_softplus, limit, dt_min, dt_max,
      checkpoints, dout, dlast_state):  # fmt: skip
    b, length, h, p = x.shape
    n = B.shape[3]
    return (
        x.new_empty(b, h, length, p),
        x.new_empty(b, h, length),
        torch.empty_like(A),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        x.new_empty(0) if D is None else torch.empty_like(D),
        x.new_empty(0) if z is None else x.new_empty(b, h, length, p),
        x.new_empty(0) if dt_bias is None else torch.empty_like(dt_bias),
        x.new_empty(b, h, p, n),
    )


def _setup(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, softplus, limit, lo, hi = inputs
    ctx.flags = (softplus, limit, lo, hi)
    ctx.present = (D is not None, z is not None, dt_bias is not None, h0 is not None)
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, output[2])


def _backward(ctx, dout, dlast, _dckpt):
    x, dt, A, B, C, D, z, dt_bias, seq_idx, ckpt = ctx.saved_tensors
    b, length, h, p = x.shape
    if dout is None:
        dout = x.new_zeros(b, h, length, p)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = torch.ops.bmojo.ssd_bwd(
        x, dt, A, B, C, D, z, dt_bias, seq_idx, *ctx.flags, ckpt, dout.contiguous(),
        None if dlast is None else dlast.contiguous(),
    )  # fmt: skip
    has_d, has_z, has_bias, has_h0 = ctx.present
    return (
        dx.transpose(1, 2), ddt.transpose(1, 2), dA, dB, dC,
        dD if has_d else None,
        dz.transpose(1, 2) if has_z else None,
        dbias if has_bias else None,
        dh0 if has_h0 else None,
        None, None, None, None, None,
    )  # fmt: skip


ssd_fwd.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- CUDA
#
# cuda/ssd.cu, compiled by NVRTC on first use: grid (ceil(P / nw), heads, batch), one warp
# per state row (nw rows per block), the lanes over N (at most 256) with the state in
# registers. Float inputs in one dtype (float32/float64; the public path converts
# float16/bfloat16 to float32 as on the CPU). The backward writes per-block partials that
# are summed here in a fixed order: deterministic, no atomics.

# One forward and one backward entry point per bound 32·NJ on N (NJ columns per lane).
_CUDA_NMAX = (32, 64, 128, 256)
_K_FWD = {m: _cuda.declare("ssd.cu", f"ssd_fwd_n{m}", dtypes=("f32", "f64")) for m in _CUDA_NMAX}
_K_BWD = {m: _cuda.declare("ssd.cu", f"ssd_bwd_n{m}", dtypes=("f32", "f64")) for m in _CUDA_NMAX}
_K_BWD_DT = _cuda.declare("ssd.cu", "ssd_bwd_dt", dtypes=("f32", "f64"))
_CUDA_MAXW = 8  # most warps (state rows) per block (BM_SSD_MAXW)
_CUDA_NSUB = 8  # backward states kept per chunk in shared memory (BM_SSD_NSUB)
# Dynamic shared memory of the backward, (_CUDA_NSUB + 2) * nw * N elements: within the
# 48 KiB a launch gets without opting in, less the kernel's static buffers (under 8 KiB).
_CUDA_SMEM_BWD = 40 * 1024
# Most elements of the backward's dB/dC partials (2 * batch * heads * tiles * N per step):
# longer sequences go through several launches, each over a window of whole chunks.
_CUDA_PART_ELEMS = 1 << 24


def _cuda_check(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, limit, extra=()):
    """Dtype and shape contract of the CUDA kernels (the public path always meets it):
    every float tensor in x's dtype, float32 or float64; ``seq_idx`` int64."""
    if x.dtype not in (torch.float32, torch.float64):
        raise V.BmojoTypeError(
            f"x: the CUDA kernel expects float32 or float64, got {V.dtype_name(x.dtype)}"
        )
    named = (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
             ("dt_bias", dt_bias), ("initial_states", h0), *extra)  # fmt: skip
    for name, t in named:
        _want(name, t, x.dtype)
    _want("seq_idx", seq_idx, torch.int64)
    V.shape("x", x, (None, None, None, None), "(batch, L, heads, head_dim)")
    b, length, h, p = x.shape
    V.shape("B", B, (b, length, None, None), "(batch, L, groups, N)")
    g, n = B.shape[2], B.shape[3]
    if h == 0 or p == 0 or n == 0 or g == 0 or h % g:
        raise V.BmojoValueError(
            f"x: expected heads, head_dim and N >= 1 with groups dividing heads, got x "
            f"{tuple(x.shape)} and B {tuple(B.shape)}"
        )
    if n > _CUDA_NMAX[-1]:
        raise V.BmojoValueError(f"B: N = {n} is larger than the CUDA kernel's {_CUDA_NMAX[-1]}")
    if b > CU.MAX_GRID_Y or h > CU.MAX_GRID_Y or length >= 2**31:
        raise V.BmojoValueError(
            f"x: at most {CU.MAX_GRID_Y} batch rows and heads and 2**31 - 1 steps on CUDA, "
            f"got {tuple(x.shape)}"
        )
    V.shape("dt", dt, (b, length, h), "(batch, L, heads)")
    V.shape("A", A, (h,), "(heads,)")
    V.shape("C", C, (b, length, g, n), "(batch, L, groups, N) like B")
    _check_d(D, h, p)
    for name, t, shp in (
        ("z", z, (b, length, h, p)),
        ("dt_bias", dt_bias, (h,)),
        ("initial_states", h0, (b, h, p, n)),
        ("seq_idx", seq_idx, (b, length)),
    ):
        if t is not None:
            V.shape(name, t, shp, str(shp))
    if limit is not None and not limit[0] <= limit[1]:
        raise V.BmojoValueError(f"dt_limit: expected low <= high, got {tuple(limit)}")


def _cuda_dims(x, B, D, softplus, limit):
    """The kernels' dimension and flag arguments (fmt ``iiiiiiiidd``)."""
    _, length, h, p = x.shape
    lo, hi = limit if limit is not None else (0.0, math.inf)
    return (length, h, p, B.shape[2], B.shape[3], int(D is not None and D.dim() == 2),
            int(bool(softplus)), int(limit is not None), float(lo), float(hi))  # fmt: skip


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _nmax(n: int) -> int:
    """The entry points' bound on N for N state columns."""
    return next(m for m in _CUDA_NMAX if n <= m)


def _fwd_cuda(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, softplus, limit, ckpt: bool):
    """The forward kernel (same contract as :func:`_fwd_cpu`; inputs made contiguous)."""
    x, dt, A, B, C, D, z, dt_bias, h0, seq_idx = map(
        _c, (x, dt, A, B, C, D, z, dt_bias, h0, seq_idx)
    )
    _cuda_check(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, limit)
    b, length, h, p = x.shape
    n = B.shape[3]
    out = x.new_empty(b, h, length, p)
    last = x.new_empty(b, h, p, n)
    cks = x.new_empty(b, h, _n_chunks(length), p, n) if ckpt else x.new_empty(0)
    if b:
        nw = min(_CUDA_MAXW, p)
        _K_FWD[_nmax(n)].launch(
            CU.suffix(x), grid=(-(-p // nw), h, b), block=(32 * nw, 1, 1),
            args=(x, dt, A, B, C, CU.ptr(D), CU.ptr(z), CU.ptr(dt_bias), CU.ptr(h0),
                  CU.ptr(seq_idx), out, last, cks if cks.numel() else 0,
                  *_cuda_dims(x, B, D, softplus, limit)),
            fmt="p" * 13 + "i" * 8 + "dd", device=x.device,
        )  # fmt: skip
    return out, last, cks


@ssd_fwd.register_kernel("cuda")
def _ssd_fwd_cuda(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus, limit,
                  dt_min, dt_max):  # fmt: skip
    return _fwd_cuda(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                     _limit_arg(limit, dt_min, dt_max), True)  # fmt: skip


def _bwd_rows_per_block(p: int, n: int, esize: int) -> int:
    """Warps (state rows) per backward block: as many as the shared memory holds, <= 8."""
    fit = _CUDA_SMEM_BWD // ((_CUDA_NSUB + 2) * n * esize)
    return max(1, min(_CUDA_MAXW, p, fit))


def _bwd_window(length: int, per_step: int) -> int:
    """Steps per backward launch (whole chunks) so that the partials stay bounded."""
    w = max(1, _CUDA_PART_ELEMS // max(1, per_step) // CHECKPOINT_CHUNK) * CHECKPOINT_CHUNK
    return min(w, _n_chunks(length) * CHECKPOINT_CHUNK)


@ssd_bwd.register_kernel("cuda")
def _ssd_bwd_cuda(x, dt, A, B, C, D, z, dt_bias, seq_idx, dt_softplus, limit, dt_min, dt_max,
                  checkpoints, dout, dlast_state):  # fmt: skip
    x, dt, A, B, C, D, z, dt_bias, seq_idx, checkpoints, dout, dlast = map(
        _c, (x, dt, A, B, C, D, z, dt_bias, seq_idx, checkpoints, dout, dlast_state)
    )
    lim = _limit_arg(limit, dt_min, dt_max)
    extra = (("checkpoints", checkpoints), ("dout", dout), ("dlast_state", dlast))
    _cuda_check(x, dt, A, B, C, D, z, dt_bias, None, seq_idx, lim, extra)
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    V.shape("checkpoints", checkpoints, (b, h, _n_chunks(length), p, n), "(b, h, chunks, p, n)")
    V.shape("dout", dout, (b, h, length, p), "(batch, heads, L, head_dim)")
    if dlast is not None:
        V.shape("dlast_state", dlast, (b, h, p, n), "(batch, heads, head_dim, N)")
    dims = _cuda_dims(x, B, D, dt_softplus, lim)
    dx = x.new_empty(b, h, length, p)
    dz = x.new_empty(b, h, length, p) if z is not None else x.new_empty(0)
    dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
    ddt, pdA = x.new_empty(b, h, length), x.new_empty(b, h, length)
    # The adjoint carried from the end (dlast) to the start (dinitial_states), in place.
    dh0 = dlast.clone() if dlast is not None else x.new_zeros(b, h, p, n)
    pD = x.new_zeros(b, h, p)
    if b and length:
        nw = _bwd_rows_per_block(p, n, x.element_size())
        ntile = -(-p // nw)
        win = _bwd_window(length, 2 * b * h * ntile * n)
        pB, pC = x.new_empty(b, h, ntile, win, n), x.new_empty(b, h, ntile, win, n)
        pxg, pgs = x.new_empty(b, h, ntile, length), x.new_empty(b, h, ntile, length)
        smem = (_CUDA_NSUB + 2) * nw * n * x.element_size()
        for t_lo in reversed(range(0, length, win)):
            t_hi = min(length, t_lo + win)
            _K_BWD[_nmax(n)].launch(
                CU.suffix(x), grid=(ntile, h, b), block=(32 * nw, 1, 1),
                args=(x, dt, A, B, C, CU.ptr(D), CU.ptr(z), CU.ptr(dt_bias), CU.ptr(seq_idx),
                      checkpoints, dout, dh0, dx, dz if z is not None else 0, pB, pC, pxg, pgs,
                      pD, *dims, t_lo, t_hi, win),
                fmt="p" * 19 + "i" * 8 + "dd" + "iii", shared_mem=smem, device=x.device,
            )  # fmt: skip
            # dB, dC of the window: the blocks of each group's heads summed in order.
            tw = t_hi - t_lo
            for part, dst in ((pB, dB), (pC, dC)):
                s = part.view(b, g, h // g * ntile, win, n)[:, :, :, :tw].sum(2)
                dst[:, t_lo:t_hi].copy_(s.transpose(1, 2))
        _K_BWD_DT.launch(
            CU.suffix(x), grid=CU.grid1(b * h * length), block=(CU.BLOCK, 1, 1),
            args=(dt, A, CU.ptr(dt_bias), pxg, pgs, ddt, pdA, *dims, b, ntile),
            fmt="p" * 7 + "i" * 8 + "dd" + "ii", device=x.device,
        )  # fmt: skip
    dA = pdA.sum((0, 2))
    dbias = ddt.sum((0, 2)) if dt_bias is not None else x.new_empty(0)
    dD = x.new_empty(0)
    if D is not None:
        dD = pD.sum(0) if D.dim() == 2 else pD.sum(0).sum(-1)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0


def _scan(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, softplus, limit):
    """The SSD through the op (or straight to the kernel when nothing is differentiated):
    ``out (b, l, h, p)`` in x's dtype and the final state in the compute dtype."""
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
             "initial_states": h0}  # fmt: skip
    V.same_device({**named, "seq_idx": seq_idx}, "x")
    cdt = V.compute_dtype(named, "x")
    c = V.as_compute
    lo, hi = limit
    has_limit = (lo, hi) != (0.0, math.inf)
    sq = None if seq_idx is None else seq_idx.to(torch.int64).contiguous()

    def rows(t):  # per-token inputs keep their strides (the kernel reads rows in place)
        return None if t is None else t.to(cdt)

    args = (rows(x), rows(dt), c(A, cdt), rows(B), rows(C), c(D, cdt), rows(z),
            c(dt_bias, cdt), c(h0, cdt), sq, bool(softplus))  # fmt: skip
    if eager_no_grad(named) and not x.is_cuda:
        # The kernel directly (no dispatcher), writing mamba_ssm's (b, l, h, p) layout.
        out, last, _ = _fwd_cpu(*args, (lo, hi) if has_limit else None, False, True)
        return out.to(x.dtype), last
    if eager_no_grad(named):
        out, last, _ = _fwd_cuda(*args, (lo, hi) if has_limit else None, False)
    else:
        out, last, _ = torch.ops.bmojo.ssd_fwd(*args, has_limit, float(lo), float(hi))
    # One copy into mamba_ssm's contiguous (b, l, h, p) layout, casting on the way.
    b, length, h, p = x.shape
    return x.new_empty(b, length, h, p).copy_(out.transpose(1, 2)), last


def _varlen(x, dt, A, B, C, D, z, dt_bias, h0, seqs, softplus, limit, final):
    """One scan per sequence of ``cu_seqlens`` (batch 1): the outputs and each
    sequence's final state (a zero-length one keeps the state before it)."""
    outs, states = [], []
    _, _, h, p = x.shape
    n = B.shape[3]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    last = h0[0].to(cdt) if h0 is not None else x.new_zeros(h, p, n, dtype=cdt)
    for i, (a, c) in enumerate(zip(seqs, seqs[1:], strict=False)):
        init = h0 if i == 0 else None
        if c == a:
            before = init[0] if init is not None else x.new_zeros(h, p, n, dtype=cdt)
            states.append(before.to(cdt))
            continue
        sl = slice(a, c)
        zs = None if z is None else z[:, sl]
        o, s = _scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D, zs, dt_bias, init, None,
                     softplus, limit)  # fmt: skip
        outs.append(o)
        states.append(s[0])
        last = s[0]
    out = torch.cat(outs, 1) if outs else x.new_zeros(x.shape)
    varlen = torch.stack(states)
    # The packed scan's final state: after the last sequence that has positions.
    return (out, last[None], varlen) if final else (out, varlen)


def gated_rms_norm(
    x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int,
    norm_before_gate: bool,
) -> Tensor:  # fmt: skip
    """Mamba-2's gated RMSNorm over groups of ``group_size`` of the last axis, in float32
    (float64 for float64 inputs): ``RMSNorm(x) · silu(z)`` if ``norm_before_gate``, else
    ``RMSNorm(x · silu(z))``; returns x's dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(cdt)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(cdt))
    *lead, d = h.shape
    g = h.reshape(*lead, d // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    h = g.reshape(*lead, d) * weight.to(cdt)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.to(cdt))
    return h.to(x.dtype)


def mamba_split_conv1d_scan_combined(
    zxbcdt: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    dt_bias: Tensor | None,
    A: Tensor,
    D: Tensor,
    chunk_size: int,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: Tensor | None = None,
    outproj_bias: Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
):
    """Mamba-2's fused block, mamba_ssm's signature: split ``zxbcdt (b, l, 2·dim + 2·g·n +
    h)`` into ``z``, ``xBC``, ``dt``; causal depthwise conv of ``xBC`` (``conv1d_weight
    (dim + 2·g·n, K)``, activation); split into ``x``, ``B``, ``C``; the SSD scan (Δ =
    softplus(dt + dt_bias), ``dt_limit``); then the gated RMSNorm with ``rmsnorm_weight
    (dim,)`` over groups of ``dim / ngroups`` (``norm_before_gate`` either way; without
    it the gate is ``y · silu(z)``), then ``outproj_weight (out, dim)``/``outproj_bias``.
    ``D (h,)`` needs ``headdim``; ``D (h, p)`` gives it. Returns ``out`` (and the final
    states ``(b, h, p, n)`` if ``return_final_states``). Differentiable in every input."""
    V.device_tensor("zxbcdt", zxbcdt)
    V.shape("zxbcdt", zxbcdt, (None, None, None), "(batch, L, 2*dim + 2*ngroups*N + heads)")
    V.device_tensor("D", D)
    if D.dim() == 2:
        h, p = D.shape
    elif D.dim() == 1:
        h = D.shape[0]
        if headdim is None:
            raise V.BmojoValueError("headdim: required when D has shape (heads,)")
        p = V.int_arg("headdim", headdim, 1)
    else:
        raise V.BmojoValueError(f"D: expected (heads,) or (heads, head_dim), got {tuple(D.shape)}")
    g = V.int_arg("ngroups", ngroups, 1)
    if h % g:
        raise V.BmojoValueError(f"ngroups: {g} must divide the number of heads {h}")
    b, length, total = zxbcdt.shape
    dim = h * p
    rest = total - 2 * dim - h
    if rest <= 0 or rest % (2 * g):
        raise V.BmojoValueError(
            f"zxbcdt: last axis {total} is not 2*dim + 2*ngroups*N + heads for dim={dim}, "
            f"heads={h}, ngroups={g}"
        )
    n = rest // (2 * g)
    z, xbc, dt = torch.split(zxbcdt, [dim, dim + 2 * g * n, h], dim=-1)
    xbc = causal_conv1d_fn(
        xbc.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx, activation=activation
    ).transpose(1, 2)
    x, B, C = torch.split(xbc, [dim, g * n, g * n], dim=-1)
    gate = z.reshape(b, length, h, p)
    out, last = mamba_chunk_scan_combined(
        x.reshape(b, length, h, p), dt.to(x.dtype), A, B.reshape(b, length, g, n),
        C.reshape(b, length, g, n), chunk_size, D=D, z=None if rmsnorm_weight is not None
        else gate, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
        dt_softplus=True, dt_limit=dt_limit, return_final_states=True,
    )  # fmt: skip
    out = out.reshape(b, length, dim)
    if rmsnorm_weight is not None:
        V.device_tensor("rmsnorm_weight", rmsnorm_weight)
        V.shape("rmsnorm_weight", rmsnorm_weight, (dim,), "(dim,)")
        eps = V.number_arg("rmsnorm_eps", rmsnorm_eps)
        out = gated_rms_norm(out, z, rmsnorm_weight, eps, dim // g, bool(norm_before_gate))
    if outproj_weight is not None:
        V.device_tensor("outproj_weight", outproj_weight)
        V.shape("outproj_weight", outproj_weight, (None, dim), "(out_dim, dim)")
        out = F.linear(out.to(outproj_weight.dtype), outproj_weight, outproj_bias)
    return (out, last) if return_final_states else out


# ----------------------------------------------------------------------------- decoding


def ssd_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One Mamba-2 decoding step with one decay per head, updating ``state (batch, heads,
    P, N)`` in place: ``x``, ``z`` ``(batch, heads, P)``; ``dt (batch, heads)``; ``A``,
    ``dt_bias`` ``(heads,)``; ``B``, ``C`` ``(batch, groups, N)``; ``D (heads,)`` or
    ``(heads, P)``. Returns ``out (batch, heads, P)``. Plain contiguous CPU tensors in the
    state's dtype (float32/float64) go straight to the kernel; anything else is validated
    and converted first. A failed call leaves ``state`` as it was.

    :func:`~bmojo_core.ops.selective_state_update` takes this path by itself when it
    receives Mamba-2's layout the way transformers passes it (``A`` expanded to
    ``(heads, P, N)``, ``dt``/``D``/``dt_bias`` expanded over P, with zero strides)."""
    out = _state_update_fast(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if out is not None:
        return out
    V.device_tensor("x", x)
    V.shape("x", x, (None, None, None), "(batch, heads, head_dim)")
    b, h, p = x.shape
    V.device_tensor("B", B)
    V.shape("B", B, (b, None, None), "(batch, groups, N)")
    n = B.shape[2]
    V.device_tensor("state", state)
    V.shape("state", state, (b, h, p, n), "(batch, heads, head_dim, N) like x and B")
    if state.is_cuda:
        raise V.BmojoValueError("state: ssd_state_update runs on CPU tensors")
    for name, t, shp, desc in (
        ("dt", dt, (b, h), "(batch, heads)"),
        ("A", A, (h,), "(heads,)"),
        ("B", B, (b, None, n), "(batch, groups, N)"),
        ("C", C, (b, None, n), "(batch, groups, N)"),
        ("z", z, (b, h, p), "(batch, heads, head_dim) like x"),
        ("dt_bias", dt_bias, (h,), "(heads,)"),
    ):
        if t is not None:
            V.device_tensor(name, t)
            V.shape(name, t, shp, desc)
    if D is not None:
        V.device_tensor("D", D)
        _check_d(D, h, p)
    named = {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z,
             "dt_bias": dt_bias}  # fmt: skip
    V.same_device(named, "state")
    V.writable("state", state, {k: v for k, v in named.items() if k != "state"})
    cdt = V.compute_dtype(named, "state")
    if state.dtype != cdt:
        raise V.BmojoTypeError(
            "state: expected float32 or float64 (updated in place), got "
            f"{V.dtype_name(state.dtype)}"
        )
    if not state.is_contiguous():
        raise V.BmojoValueError("state: expected a contiguous tensor (it is updated in place)")
    c = V.as_compute
    out = torch.ops.bmojo.ssd_state_update(
        state, *(c(t, cdt) for t in (x, dt, A, B, C, D, z, dt_bias)), bool(dt_softplus)
    )
    return out.to(x.dtype)


@custom_op("bmojo::ssd_state_update", mutates_args=("state",), device_types="cpu")
def ssd_state_update_op(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
) -> Tensor:
    """Normalised decoding step (the op behind :func:`ssd_state_update` when it validates,
    and under tracing): contiguous tensors in the state's dtype, float32/float64; updates
    ``state (b, h, p, n)`` in place, returns ``out (b, h, p)``."""
    out = core.ssd.ssd_state_update(
        array(state), view(x), view(dt), view(A), view(B), view(C), view_opt(D),
        view_opt(z), view_opt(dt_bias), bool(dt_softplus),
    )  # fmt: skip
    return torch.from_numpy(out)


@ssd_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


def _state_update_fast(state, x, dt, A, B, C, D, z, dt_bias, softplus):
    """The kernel on plain contiguous CPU tensors of the state's dtype (the decode hot
    path: no validation in Python, the kernel checks every shape exactly); None when the
    inputs need the validating path."""
    if torch.compiler.is_compiling() or not eager_no_grad(
        {
            "state": state,
            "x": x,
            "dt": dt,
            "A": A,
            "B": B,
            "C": C,
            "D": D,
            "z": z,
            "dt_bias": dt_bias,
        }  # fmt: skip
    ):
        return None
    try:  # Tensor.numpy, not _native.array: faster, as in ops.step's decode path
        out = core.ssd.ssd_state_update(
            state.numpy(), x.numpy(), dt.numpy(), A.numpy(), B.numpy(), C.numpy(),
            None if D is None else D.numpy(), None if z is None else z.numpy(),
            None if dt_bias is None else dt_bias.numpy(), bool(softplus),
        )  # fmt: skip
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return None
    return torch.from_numpy(out)


def tied_head_update(state, x, dt, A, B, C, D, z, dt_bias, softplus) -> Tensor | None:
    """Mamba-2's decode layout as transformers passes it to ``selective_state_update``:
    ``state (b, h, p, n)``, ``x`` ``(b, h, p)``, ``A (h, p, n)`` with zero strides over
    (p, n), ``dt (b, h, p)`` and ``D``/``dt_bias`` ``(h, p)`` with zero strides over p: the
    per-head step on views of one element per head (no copy). None when the layout is
    anything else (then the general step runs)."""
    if not (isinstance(state, Tensor) and isinstance(A, Tensor) and isinstance(dt, Tensor)):
        return None
    if state.dim() != 4 or A.dim() != 3 or A.stride(1) != 0 or A.stride(2) != 0:
        return None
    if dt.dim() != 3 or dt.stride(2) != 0 or not isinstance(B, Tensor) or B.dim() != 3:
        return None

    def per_head(t):
        if t is None:
            return None
        if t.dim() != 2 or t.stride(1) != 0:
            return t
        return t[:, 0]

    if dt_bias is not None and (dt_bias.dim() != 2 or dt_bias.stride(1) != 0):
        return None
    # The per-token inputs are small, often views into the projection: contiguous copies
    # cost less than the kernel call (the state and A, the large ones, are never copied).
    c = [None if t is None else t.contiguous() for t in (x, dt[:, :, 0], B, C, z)]
    return _state_update_fast(state, c[0], c[1], A[:, 0, 0], c[2], c[3], per_head(D), c[4],
                              per_head(dt_bias), softplus)  # fmt: skip
