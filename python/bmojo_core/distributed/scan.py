"""Context-parallel Mamba-1 selective scan: the sequence split in contiguous shards over
the ranks of a process group.

A shard maps the state before it to the state after it affinely, ``h_out = P ⊙ h_in + s``
(per batch row, channel and state entry): ``P = exp(A · ΣΔ)`` is the shard's decay product
(0 where a packed sequence starts inside it) and ``s`` its last state from a zero start.
Each rank computes its ``(P, s)``, the ranks exchange them (one all-gather of
``2 · batch · dim · N`` floats per rank), every rank composes the prefix to get the state
before its shard, and scans its shard again from that state. The backward runs through
the same exchange: each rank's gradient with respect to every ``(P, s)`` is summed over the
ranks (one all-reduce) and flows back into the shard that produced it. The first rank
scans once (its start state, ``initial_state``, is known), the others twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops import selective_scan_fn as _scan
from ..ops.reference._common import compute_dtype, softplus_thresholded
from ._comm import agree, gather, resolve, tie

__all__ = ["selective_scan_fn"]


def _row_meta(u: Any, seq_idx: Any) -> dict[str, Any]:
    """What the ranks must agree on, and the packed-sequence ids at the shard's ends."""
    meta: dict[str, Any] = {"seq_idx": seq_idx is not None}
    if isinstance(u, Tensor) and u.dim() == 3:
        meta["shape"] = (u.shape[0], u.shape[1])
        meta["length"] = u.shape[2]
    if isinstance(seq_idx, Tensor) and seq_idx.dim() == 2 and seq_idx.shape[1] > 0:
        meta["first"] = seq_idx[:, 0].tolist()
        meta["last"] = seq_idx[:, -1].tolist()
    return meta


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
    if seq_idx is not None and seq_idx.shape[1] > 1:
        starts = (seq_idx[:, 1:] != seq_idx[:, :-1]).any(-1)
        p = p * (~starts).to(cdt)[:, None, None]
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
    meta = _row_meta(u, seq_idx)
    err: BaseException | None = None
    local = None
    try:
        cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
        meta["dtype"] = str(cdt)
        if rank == 0:  # its start state is known: one scan gives its output and its end
            local = _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                          initial_state=initial_state, seq_idx=seq_idx)  # fmt: skip
            s = local[1]
            p = torch.zeros_like(s)
        else:
            _, s = _scan(u, delta, A, B, C, None, None, delta_bias, delta_softplus, True,
                         seq_idx=seq_idx)  # fmt: skip
            p = _decay(delta, A, delta_bias, bool(delta_softplus), seq_idx, cdt)
        meta["grad"] = bool(s.requires_grad)
    except Exception as exc:  # every rank must hear of it before any waits on a collective
        err = exc
    metas = agree(group, err, meta)
    _check_consistent(metas)

    grad = any(m["grad"] for m in metas)
    both = gather(torch.stack([p, s]), group, rank, world, grad=grad)  # (world, 2, b, d, N)
    h = torch.zeros_like(s)
    starts = _boundary_starts(metas, s.shape[0], s.device)
    h_in = h
    for r in range(world):
        if r == rank:
            h_in = h
        nxt = both[r, 0] * h + both[r, 1]
        if r + 1 < world and starts[r + 1] is not None:
            nxt = nxt * (~starts[r + 1]).to(nxt.dtype)[:, None, None]
        h = nxt
    if rank == 0:
        out = local[0]
    else:
        out = _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False,
                    initial_state=h_in, seq_idx=seq_idx)  # fmt: skip
    if grad and not return_last_state and rank == 0:
        out = tie(out, both)
    return (out, h) if return_last_state else out


def _check_consistent(metas: list[dict[str, Any]]) -> None:
    from ..errors import BmojoTypeError, BmojoValueError

    ref = metas[0]
    for r, m in enumerate(metas[1:], 1):
        if m.get("shape") != ref.get("shape"):
            raise BmojoValueError(
                f"u: expected the same (batch, dim) on every rank, got {ref.get('shape')} on "
                f"rank 0 and {m.get('shape')} on rank {r}"
            )
        if m["dtype"] != ref["dtype"]:
            raise BmojoTypeError(
                f"u: expected the same compute dtype on every rank, got {ref['dtype']} on "
                f"rank 0 and {m['dtype']} on rank {r}"
            )
        if m["seq_idx"] != ref["seq_idx"]:
            raise BmojoValueError("seq_idx: expected on every rank or on none")


def _boundary_starts(metas: list[dict[str, Any]], batch: int,
                     device: torch.device) -> list[Tensor | None]:  # fmt: skip
    """Per rank r: the rows in which a new packed sequence starts at r's first position
    (its first id differs from the last id of the nearest non-empty shard before it)."""
    out: list[Tensor | None] = [None] * len(metas)
    prev = None
    for r, m in enumerate(metas):
        if "first" not in m:  # no seq_idx, or an empty shard: nothing starts here
            continue
        if prev is not None:
            out[r] = torch.tensor(
                [a != b for a, b in zip(m["first"], prev, strict=True)], device=device
            )
        prev = m["last"]
    return out
