"""Reference multi-head SSD scan (Mamba-2's state update, design §2.4), written from the
recurrence one token at a time (not from the chunked algorithm), with every option of
mamba_ssm's ``mamba_chunk_scan_combined``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import cast, compute_dtype, softplus_thresholded

__all__ = ["ssd_scan"]


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """The SSD scan, design §2.4 (mamba_ssm's ``mamba_chunk_scan_combined`` semantics and
    return conventions; ``chunk_size`` is accepted and ignored).

    ``x (b, l, h, p)``, ``dt (b, l, h)``, ``A (h,)``, ``B, C (b, l, g, n)``, ``D (h,)`` or
    ``(h, p)``, ``z (b, l, h, p)``, ``dt_bias (h,)``, ``initial_states (b, h, p, n)``,
    ``seq_idx (b, l)`` int (a change starts a new sequence from a zero state; the initial
    state applies to the first one), ``cu_seqlens (s + 1,)`` int (batch 1: the sequence
    boundaries; used as ``seq_idx`` when that is not given). Returns ``out (b, l, h, p)``
    in x's dtype, then ``final_states (b, h, p, n)`` if ``return_final_states``, then
    the state after each sequence of ``cu_seqlens`` ``(s, h, p, n)`` if
    ``return_varlen_states``; states in the compute dtype.
    """
    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    xs, dts, a = cast(x, cdt), cast(dt, cdt), cast(A, cdt)
    if dt_bias is not None:
        dts = dts + cast(dt_bias, cdt)
    if dt_softplus:
        dts = softplus_thresholded(dts)
    lo, hi = dt_limit
    if (lo, hi) != (0.0, math.inf):
        dts = dts.clamp(min=lo, max=hi)
    rep = h // g
    bh = cast(B, cdt).repeat_interleave(rep, dim=2)  # (b, l, h, n)
    ch = cast(C, cdt).repeat_interleave(rep, dim=2)
    if seq_idx is None and cu_seqlens is not None:
        seq_idx = _seq_idx_of(cu_seqlens, length)
    state = (
        torch.zeros(b, h, p, n, dtype=cdt, device=x.device)
        if initial_states is None
        else cast(initial_states, cdt)
    )
    ends = set() if cu_seqlens is None else {int(e) - 1 for e in cu_seqlens[1:]}
    ys, varlen = [], []
    for t in range(length):
        if seq_idx is not None and t > 0:
            new = (seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None, None]
            state = torch.where(new, torch.zeros_like(state), state)
        decay = torch.exp(dts[:, t] * a)[:, :, None, None]  # (b, h, 1, 1)
        inp = (dts[:, t, :, None] * xs[:, t])[..., None] * bh[:, t, :, None, :]
        state = decay * state + inp
        y = (state * ch[:, t, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            d = cast(D, cdt)
            y = y + (d[:, None] if d.dim() == 1 else d) * xs[:, t]
        if z is not None:
            y = y * F.silu(cast(z[:, t], cdt))
        ys.append(y)
        if t in ends:
            varlen.append(state[0])
    out = (torch.stack(ys, 1) if ys else xs.new_zeros(b, 0, h, p)).to(x.dtype)
    if return_varlen_states and cu_seqlens is not None:
        # A sequence of length 0 keeps the state before it (zero, or the initial state).
        varlen = _varlen_states(cu_seqlens, varlen, state, initial_states, cdt, (h, p, n))
    rest: list = []
    if return_final_states:
        rest.append(state)
    if return_varlen_states:
        rest.append(varlen)
    return out if not rest else (out, *rest)


def _seq_idx_of(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """``seq_idx (1, length)``: position t belongs to sequence i when
    ``cu_seqlens[i] <= t < cu_seqlens[i + 1]``."""
    t = torch.arange(length, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:].to(torch.int64), t, right=True))[None]


def _varlen_states(cu_seqlens, ends, state, initial_states, cdt, shape):
    """The state after each sequence of ``cu_seqlens`` (zero-length ones included)."""
    out = []
    it = iter(ends)
    for i in range(len(cu_seqlens) - 1):
        lo, hi = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        if hi > lo:
            out.append(next(it))
        elif i == 0 and initial_states is not None:
            out.append(cast(initial_states[0], cdt))
        else:
            out.append(state.new_zeros(shape))
    return torch.stack(out) if out else state.new_zeros(0, *shape)
