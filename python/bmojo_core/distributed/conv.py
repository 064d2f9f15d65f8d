"""Context-parallel causal depthwise convolution: the sequence split along L in contiguous
shards over the ranks of a process group.

Output t reads inputs t-K+1 .. t, so a shard needs the K-1 inputs before it (its halo),
which may come from several earlier shards when shards are shorter than K-1, and from
``initial_states`` before the sequence. Every rank publishes the last ``min(L_r, K-1)``
inputs of its shard (one all-gather of ``batch · dim · (K-1)`` values per rank, plus the
first rank's ``initial_states``), builds its halo from the ranks before it, and convolves
``[halo, shard]``, dropping the halo's own outputs. The halo's gradient travels back to
the ranks it came from through the same exchange (one all-reduce in the backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _validate as V
from ..ops import causal_conv1d_fn as _conv
from ..ops.conv import check_args, silu_flag
from ._comm import agree, resolve
from ._halo import before, exchange

__all__ = ["causal_conv1d_fn"]


def _check(x, weight, bias, seq_idx, initial_states, activation, rank: int):
    """The single-process op's argument checks on this rank's shard (``initial_states``
    only where it is read: on the first rank)."""
    out = check_args(x, weight, bias, seq_idx, initial_states if rank == 0 else None)
    silu_flag(activation)
    V.same_device({"x": x, "weight": weight, "bias": bias, "seq_idx": seq_idx,
                   "initial_states": initial_states if rank == 0 else None}, "x")  # fmt: skip
    return out


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
    *,
    group: Any = None,
):
    """:func:`bmojo_core.causal_conv1d_fn` over a sequence split along L in contiguous
    shards, one per rank of ``group`` (None: the default group), in rank order.

    ``x`` and ``seq_idx`` are this rank's shard (any length, 0 and shorter than the width
    included); ``weight`` and ``bias`` are the same on every rank; ``initial_states`` (the
    K-1 inputs before the sequence) is read on the first rank. A packed sequence may cross
    shard boundaries. Returns this shard's ``out``, and with ``return_final_states`` the
    last K-1 inputs of the whole sequence, the same on every rank. Equal to the
    single-process op up to rounding (the kernel may group a position's products
    differently near the start of a shard than in the middle of the sequence).

    Gradients: ``x``'s is the full gradient for this shard (the halo's travels back to its
    ranks), ``initial_states``' reaches the first rank; ``weight``'s and ``bias``' are this
    rank's part, to be summed over the group like any data-parallel gradient. Every rank
    must run the backward (as with DDP). A bad argument on any rank raises the same error,
    naming that rank, on every rank.
    """
    group, rank, world = resolve(group)
    err: BaseException | None = None
    meta: dict[str, Any] = {}
    try:
        b, d, length, k = _check(x, weight, bias, seq_idx, initial_states, activation, rank)
        meta = {"shape": (b, d), "k": k, "length": length, "dtype": str(x.dtype),
                "seq_idx": seq_idx is not None,
                "grad": torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad
                    for t in (x, weight, bias, initial_states if rank == 0 else None))}  # fmt: skip
        n = min(length, k - 1)
        if seq_idx is not None:
            meta["tail_ids"] = seq_idx[:, length - n :].tolist()
            meta["first_ids"] = seq_idx[:, :1].tolist() if length else None
    except Exception as exc:  # every rank must hear of it before any waits on a collective
        err = exc
    metas = agree(group, err, meta)
    for r, m in enumerate(metas):
        for key in ("shape", "k", "dtype", "seq_idx"):
            if m[key] != metas[0][key]:
                what = {"shape": "(batch, dim) of x", "k": "width K of weight",
                        "dtype": "dtype of x", "seq_idx": "presence of seq_idx"}[key]  # fmt: skip
                raise V.BmojoValueError(
                    f"x: expected the same {what} on every rank, got {metas[0][key]} on rank 0 "
                    f"and {m[key]} on rank {r}"
                )
    h = k - 1
    if h == 0:  # no halo: each shard on its own
        out = _conv(x, weight, bias, seq_idx, None, False, None, activation)
        if not return_final_states:
            return out
        return out, x.new_zeros(b, d, 0)
    grad = any(m["grad"] for m in metas)
    lengths = [m["length"] for m in metas]
    parts = exchange(x, h, initial_states, group, rank, world, grad)
    halo, where = before(parts, lengths, rank, h, fill=True)
    ext = torch.cat([halo, x], dim=-1)
    sq = None
    if seq_idx is not None:
        ids = _halo_ids(where, metas, b)
        sq = torch.cat([torch.tensor(ids, dtype=seq_idx.dtype, device=seq_idx.device),
                        seq_idx], dim=-1)  # fmt: skip
    out = _conv(ext, weight, bias, sq, None, False, None, activation)[..., h:]
    if not return_final_states:
        return out
    return out, before(parts, lengths, world, h, fill=True)[0]


def _halo_ids(where: list[tuple[int, int]], metas: list[dict[str, Any]],
              batch: int) -> list[list[int]]:  # fmt: skip
    """Row-wise packed-sequence ids of the halo positions: those of the shards they come
    from; before the sequence (zeros, as the single-process op reads there with seq_idx)
    an id unlike the sequence's first, so that no tap crosses into them."""
    first = next((m["first_ids"] for m in metas if m.get("first_ids")), [[0]] * batch)
    rows: list[list[int]] = [[] for _ in range(batch)]
    for j, take in where:
        for i in range(batch):
            if j < 0:
                rows[i] += [first[i][0] - 1] * take
            else:
                tail = metas[j]["tail_ids"][i]
                rows[i] += tail[len(tail) - take :]
    return rows
