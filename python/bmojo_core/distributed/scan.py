"""Context-parallel Mamba-1 selective scan: the sequence split in contiguous shards over
the ranks of a process group. Each rank scans its shard from a zero state for its
``(P, s)`` (``P = exp(A · ΣΔ)``), the ranks exchange them (:mod:`._affine`: one all-gather
of ``2 · batch · dim · N`` floats per rank; one all-reduce of ``world`` times that in the
backward), and each rank scans its shard again from the state before it. The first rank
scans once (its start state, ``initial_state``, is known).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops import selective_scan_fn as _scan
from ..ops.reference._common import compute_dtype, softplus_thresholded
from ._affine import sharded_scan, starts_inside

__all__ = ["selective_scan_fn"]


def _decay(delta: Tensor, A: Tensor, delta_bias: Tensor | None, softplus: bool,
           seq_idx: Tensor | None, cdt: torch.dtype) -> Tensor:  # fmt: skip
    """``P (batch, dim, N)``: the product of the shard's per-step decays, 0 for a row in
    which a new packed sequence starts (the state before the shard no longer reaches its
    end)."""
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if softplus:
        dt = softplus_thresholded(dt)
    p = torch.exp(dt.sum(-1)[..., None] * A.to(cdt))
    inside = starts_inside(seq_idx)
    if inside is not None:
        p = p * (~inside).to(cdt)[:, None, None]
    return p


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    group: Any = None,
):
    """:func:`bmojo_core.selective_scan_fn` over a sequence split along L in contiguous
    shards, one per rank of ``group`` (None: the default group), in rank order.

    Every sequence-shaped argument (``u``, ``delta``, ``z``, a time-varying ``B``/``C``,
    ``seq_idx``) is this rank's shard (lengths may differ between ranks, 0 included);
    ``A``, ``D``, ``delta_bias`` and a constant ``B``/``C`` are the same on every rank.
    ``initial_state`` is the state before the whole sequence, read on the first rank (the
    others' is ignored); a packed sequence (``seq_idx``) may cross a shard boundary.
    Returns this shard's ``out``, and with ``return_last_state`` the state after the whole
    sequence, the same on every rank. Equal to the single-process op up to rounding
    (the composed start states add a few operations).

    Gradients: a sharded input's gradient is the full gradient for its shard; the
    gradient of a parameter shared by the ranks is this rank's part, to be summed over the
    group (all-reduce) like any data-parallel gradient. The backward exchanges gradients
    with the other ranks, so every rank must run it (as with DDP). A bad argument on any
    rank raises the same error, naming that rank, on every rank.
    """

    def whole():
        return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                     initial_state=initial_state, seq_idx=seq_idx)  # fmt: skip

    def from_zero():
        return _scan(u, delta, A, B, C, None, None, delta_bias, delta_softplus, True,
                     seq_idx=seq_idx)[1]  # fmt: skip

    def decay(s):
        return _decay(delta, A, delta_bias, bool(delta_softplus), seq_idx, s.dtype)

    def from_state(h_in):
        return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False,
                     initial_state=h_in, seq_idx=seq_idx)  # fmt: skip

    def cdt():
        return compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)

    return sharded_scan(group, seq_idx, "u", cdt, whole, from_zero, decay, from_state,
                        return_last_state)  # fmt: skip
