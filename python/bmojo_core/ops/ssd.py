"""The multi-head SSD scan of Mamba-2 (design §2.4), a drop-in for mamba_ssm's
``mamba_chunk_scan_combined``.

**Computation (interim).** An SSD head of width p is p channels of Mamba-1's selective
scan that share one scalar decay: ``A`` repeated over the head's channels and state
columns, ``dt`` over its channels, ``B``/``C`` grouped. This module maps the SSD onto the
selective-scan kernel (:func:`~bmojo_core.ops.scan.selective_scan_fn`: Rust, SIMD levels
chosen at run time, threads bitwise invariant, autograd, packed sequences), so every
property of that op carries over; a dedicated SSD kernel, which computes each decay once
per (token, head) instead of once per state element, is the next step and will not change
this function's contract. ``chunk_size`` is accepted for compatibility and ignored:
results do not depend on it.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate as V
from .scan import selective_scan_fn

__all__ = ["mamba_chunk_scan_combined"]


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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise V.BmojoTypeError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    V.int_arg("chunk_size", chunk_size, 1)
    if D is not None:
        V.device_tensor("D", D)
        if tuple(D.shape) not in ((h,), (h, p)):
            raise V.BmojoValueError(f"D: expected shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")
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
    lo, hi = _limit(dt_limit)
    seqs = None
    if cu_seqlens is not None:
        seqs = _boundaries(cu_seqlens, b, length)
        if seq_idx is None:
            seq_idx = torch.repeat_interleave(
                torch.arange(len(seqs) - 1, device=x.device), torch.tensor(seqs).diff()
            )[None]
    elif return_varlen_states:
        raise V.BmojoValueError("return_varlen_states: needs cu_seqlens")
    if return_varlen_states:
        return _varlen(x, dt, A, B, C, D, z, dt_bias, initial_states, seqs, dt_softplus,
                       (lo, hi), return_final_states)  # fmt: skip
    out, last = _scan(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                      (lo, hi))  # fmt: skip
    return (out, last) if return_final_states else out


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


def _scan(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, softplus, limit):
    """The SSD as a selective scan over h·p channels (see the module doc)."""
    b, length, h, p = x.shape
    n = B.shape[3]
    dim = h * p
    u = x.permute(0, 2, 3, 1).reshape(b, dim, length)
    lo, hi = limit
    bias = None
    if (lo, hi) != (0.0, math.inf):
        # The clamp comes after the softplus: applied here, the kernel gets Δ itself.
        d = dt if dt_bias is None else dt + dt_bias.to(dt.dtype)
        d = (_softplus(d) if softplus else d).clamp(min=lo, max=hi)
        softplus = False
    else:
        d = dt
        bias = None if dt_bias is None else dt_bias.repeat_interleave(p)
    delta = d.permute(0, 2, 1).repeat_interleave(p, dim=1)
    a = A.repeat_interleave(p)[:, None].expand(dim, n)
    dd = None if D is None else (D.repeat_interleave(p) if D.dim() == 1 else D.reshape(dim))
    zz = None if z is None else z.permute(0, 2, 3, 1).reshape(b, dim, length)
    init = None if h0 is None else h0.reshape(b, dim, n)
    out, last = selective_scan_fn(
        u, delta.to(u.dtype), a, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), dd, zz, bias,
        bool(softplus), True, initial_state=init, seq_idx=seq_idx,
    )  # fmt: skip
    return out.reshape(b, h, p, length).permute(0, 3, 1, 2), last.reshape(b, h, p, n)


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
