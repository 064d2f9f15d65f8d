"""Context-parallel Mamba-2 SSD scan: the sequence split along L in contiguous shards over
the ranks of a process group. As :mod:`.scan`, with one decay per head:
``P = exp(A_h · ΣΔ)`` broadcast over the head's ``(head_dim, N)`` state; the exchange
(:mod:`._affine`) moves ``2 · batch · heads · head_dim · N`` floats per rank."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _validate as V
from ..ops import mamba_chunk_scan_combined as _ssd
from ..ops.reference._common import compute_dtype, softplus_thresholded
from ._affine import sharded_scan, starts_inside

__all__ = ["mamba_chunk_scan_combined"]


def _decay(dt: Tensor, A: Tensor, dt_bias: Tensor | None, softplus: bool, limit: Any,
           seq_idx: Tensor | None, state: Tensor) -> Tensor:  # fmt: skip
    """``P`` with the state's shape ``(b, h, p, n)``: the shard's decay product per head,
    0 for a row in which a new packed sequence starts."""
    cdt = state.dtype
    d = dt.to(cdt)
    if dt_bias is not None:
        d = d + dt_bias.to(cdt)
    if softplus:
        d = softplus_thresholded(d)
    lo, hi = limit
    if (lo, hi) != (0.0, math.inf):
        d = d.clamp(min=lo, max=hi)
    p = torch.exp(d.sum(1) * A.to(cdt))  # (b, h)
    inside = starts_inside(seq_idx)
    if inside is not None:
        p = p * (~inside).to(cdt)[:, None]
    return p[:, :, None, None].expand_as(state).contiguous()


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
):
    """:func:`bmojo_core.mamba_chunk_scan_combined` over a sequence split along L in
    contiguous shards, one per rank of ``group`` (None: the default group), in rank order.

    ``x``, ``dt``, ``B``, ``C``, ``z`` and ``seq_idx`` are this rank's shard (lengths may
    differ, 0 included); ``A``, ``D`` and ``dt_bias`` are the same on every rank;
    ``initial_states`` is read on the first rank; a packed sequence (``seq_idx``) may
    cross a shard boundary (``cu_seqlens`` and ``return_varlen_states``, which number the
    sequences of one batch row, are not supported: pass ``seq_idx``). Returns this shard's
    ``out`` and, with ``return_final_states``, the state after the whole sequence, the same
    on every rank. Equal to the single-process op up to rounding.

    Gradients: a sharded input's is the full gradient for its shard; a shared parameter's
    is this rank's part, to be summed over the group. Every rank must run the backward
    (as with DDP). A bad argument on any rank raises the same error, naming that rank, on
    every rank.
    """
    args = (x, dt, A, B, C, chunk_size)

    def cdt():
        if cu_seqlens is not None or return_varlen_states:
            raise V.BmojoValueError(
                "cu_seqlens: not supported over shards (it numbers the sequences of one "
                "batch row); pass seq_idx instead"
            )
        return compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)

    def whole():
        return _ssd(*args, D, z, dt_bias, initial_states, seq_idx, None, dt_softplus,
                    dt_limit, True)  # fmt: skip

    def from_zero():
        return _ssd(*args, None, None, dt_bias, None, seq_idx, None, dt_softplus, dt_limit,
                    True)[1]  # fmt: skip

    def decay(s):
        return _decay(dt, A, dt_bias, bool(dt_softplus), tuple(dt_limit), seq_idx, s)

    def from_state(h_in):
        return _ssd(*args, D, z, dt_bias, h_in, seq_idx, None, dt_softplus, dt_limit, False)

    return sharded_scan(group, seq_idx, "x", cdt, whole, from_zero, decay, from_state,
                        return_final_states)  # fmt: skip
