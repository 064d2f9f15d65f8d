"""Context-parallel Mamba-2 SSD scan: the sequence split along L in contiguous shards over
the ranks of a process group, in one of two schedules (see :mod:`.scan`).

- *pipeline* (:mod:`._pipeline`): the heads are cut into blocks, scanned once each from
  their true start state, passed from rank to rank.
- *exchange*: as :mod:`.scan`'s, with one decay per head: ``P = exp(A_h · ΣΔ)`` broadcast
  over the head's ``(head_dim, N)`` state; the exchange (:mod:`._affine`) moves ``2 · batch
  · heads · head_dim · N`` floats per rank. A shard's end state from a zero start is a
  matrix product (one decay per head), so every rank computes it first, the ranks
  exchange, and then all scan their shards at once, each from the state before it: one
  scan per rank, all in parallel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _validate as V
from ..ops import mamba_chunk_scan_combined as _ssd
from ..ops.reference._common import compute_dtype, softplus_thresholded
from ..ops.ssd import check_args
from ._affine import sharded_scan, starts_inside
from ._comm import resolve
from ._pipeline import Plan, block_ranges

__all__ = ["mamba_chunk_scan_combined"]


def _dt(dt: Tensor, dt_bias: Tensor | None, softplus: bool, limit: Any,
        cdt: torch.dtype) -> Tensor:  # fmt: skip
    """The step sizes the scan uses: ``(b, l, h)`` after bias, softplus and clamp."""
    d = dt.to(cdt)
    if dt_bias is not None:
        d = d + dt_bias.to(cdt)
    if softplus:
        d = softplus_thresholded(d)
    lo, hi = limit
    if (lo, hi) != (0.0, math.inf):
        d = d.clamp(min=lo, max=hi)
    return d


def _decay(d: Tensor, A: Tensor, seq_idx: Tensor | None, state: Tensor) -> Tensor:
    """``P`` with the state's shape ``(b, h, p, n)``: the shard's decay product per head,
    0 for a row in which a new packed sequence starts."""
    p = torch.exp(d.sum(1) * A.to(d.dtype))  # (b, h)
    inside = starts_inside(seq_idx)
    if inside is not None:
        p = p * (~inside).to(d.dtype)[:, None]
    return p[:, :, None, None].expand_as(state).contiguous()


def _end_state(x: Tensor, d: Tensor, A: Tensor, B: Tensor, seq_idx: Tensor | None) -> Tensor:
    """The shard's end state from a zero start, ``Σ_t exp(A_h · Σ_{s>t} Δ_s) Δ_t x_t B_tᵀ``
    (b, h, p, n), without its outputs: one head decay per step makes this a matrix product
    (a fraction of a scan's cost; in Mamba-1, with a decay per state element, it is not).
    The exponent is summed from the shard's end, where the weights that matter are. A
    position followed by a new packed sequence inside the shard contributes nothing."""
    b, length, h, _ = x.shape
    g = B.shape[2]
    a = d * A.to(d.dtype)  # (b, l, h)
    after = torch.zeros_like(a)  # Σ_{s>t} a_s
    if length > 1:
        after[:, :-1] = a[:, 1:].flip(1).cumsum(1).flip(1)
    w = torch.exp(after) * d
    if seq_idx is not None and length > 1:
        change = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
        later = torch.zeros_like(seq_idx, dtype=torch.int64)
        later[:, :-1] = change.flip(1).cumsum(1).flip(1)
        w = w * (later == 0).to(w.dtype)[..., None]
    # the weights go on B's side ((b, l, h, n): N values per head, not head_dim)
    bw = B.to(d.dtype).repeat_interleave(h // g, dim=2) * w[..., None]
    return torch.einsum("blhp,blhn->bhpn", x.to(d.dtype), bw)


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
    *,
    group: Any = None,
    schedule: str = "auto",
):
    """:func:`bmojo_core.mamba_chunk_scan_combined` over a sequence split along L in
    contiguous shards, one per rank of ``group`` (None: the default group), in rank order.

    ``x``, ``dt``, ``B``, ``C``, ``z`` and ``seq_idx`` are this rank's shard (lengths may
    differ, 0 included); ``A``, ``D`` and ``dt_bias`` are the same on every rank;
    ``initial_states`` is read on the first rank; a packed sequence (``seq_idx``) may
    cross a shard boundary (``cu_seqlens`` and ``return_varlen_states``, which number the
    sequences of one batch row, are not supported: pass ``seq_idx``). Returns this shard's
    ``out`` and, with ``return_final_states``, the state after the whole sequence, the same
    on every rank. Equal to the single-process op up to rounding (a shard's chunks start
    at its own first position). ``schedule``: as in :func:`.scan.selective_scan_fn`
    ("auto", "pipeline" over blocks of heads, or "exchange").

    Gradients: a sharded input's is the full gradient for its shard; a shared parameter's
    is this rank's part, to be summed over the group. Every rank must run the backward
    (as with DDP). A bad argument on any rank raises the same error, naming that rank, on
    every rank.
    """
    args = (x, dt, A, B, C, chunk_size)
    rank = resolve(group)[1]

    tensors = [x, dt, A, B, C, D, z, dt_bias, initial_states if rank == 0 else None, seq_idx]

    def check():
        if cu_seqlens is not None or return_varlen_states:
            raise V.BmojoValueError(
                "cu_seqlens: not supported over shards (it numbers the sequences of one "
                "batch row); pass seq_idx instead"
            )
        check_args(*args, D, z, dt_bias, initial_states if rank == 0 else None, seq_idx,
                   dt_limit)  # fmt: skip
        b, length, h, p = x.shape
        return {"dtype": compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states),
                "shape": (b, h, p, B.shape[3]), "length": length, "most": h}  # fmt: skip

    def plan(blocks, keep, info):
        def run(inputs, h):
            xx, dd, aa, bb, cc, dv, zz, bias, _, sq = inputs
            return _ssd(xx, dd, aa, bb, cc, chunk_size, dv, zz, bias, h, sq, None,
                        dt_softplus, dt_limit, True)  # fmt: skip

        axes = [("c", 2), ("c", 2), ("c", 0), ("g", 2), ("g", 2), ("c", 0), ("c", 2),
                ("c", 0), ("c", 1), None]  # fmt: skip
        return Plan(tensors, axes, 8, run, 2, info["shape"], info["dtype"],
                    block_ranges(x.shape[2], [B.shape[2]], blocks), keep)  # fmt: skip

    def steps(cdt):
        return _dt(dt, dt_bias, bool(dt_softplus), tuple(dt_limit), cdt)

    def from_zero():
        cdt_ = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
        return None, _end_state(x, steps(cdt_), A, B, seq_idx)

    def decay(s):
        return _decay(steps(s.dtype), A, seq_idx, s)

    def from_state(h_in, _):
        return _ssd(*args, D, z, dt_bias, h_in, seq_idx, None, dt_softplus, dt_limit)

    return sharded_scan(group, seq_idx, "x", check, None, from_zero, decay, from_state,
                        return_final_states, initial_states, tensors=tensors, plan=plan,
                        schedule=schedule)  # fmt: skip
