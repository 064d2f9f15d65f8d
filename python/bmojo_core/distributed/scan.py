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
from ._affine import chain, check_consistent, seq_meta, starts_inside
from ._comm import agree, resolve, tie

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
    group, rank, world = resolve(group)
    meta: dict[str, Any] = {"seq_idx": seq_idx is not None, **seq_meta(seq_idx, 1)}
    err: BaseException | None = None
    local = None
    try:
        cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
        if rank == 0:  # its start state is known: one scan gives its output and its end
            local = _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                          initial_state=initial_state, seq_idx=seq_idx)  # fmt: skip
            s = local[1]
            p = torch.zeros_like(s)
        else:
            _, s = _scan(u, delta, A, B, C, None, None, delta_bias, delta_softplus, True,
                         seq_idx=seq_idx)  # fmt: skip
            p = _decay(delta, A, delta_bias, bool(delta_softplus), seq_idx, cdt)
        meta.update(shape=tuple(s.shape), dtype=str(cdt), grad=bool(s.requires_grad))
    except Exception as exc:  # every rank must hear of it before any waits on a collective
        err = exc
    metas = agree(group, err, meta)
    check_consistent(metas, "u")
    h_in, h_end, both, grad = chain(p, s, metas, group, rank, world)
    if rank == 0:
        out = local[0]
    else:
        out = _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False,
                    initial_state=h_in, seq_idx=seq_idx)  # fmt: skip
    if grad and not return_last_state and rank == 0:
        out = tie(out, both)  # so that this rank's backward reaches the exchange too
    return (out, h_end) if return_last_state else out
