"""Halo exchange: the last ``h`` positions of every shard, so that a rank can read the
``h`` positions before its own (from as many earlier shards as it takes, when shards are
shorter than ``h``). One all-gather of ``2 · batch · channels · h`` values per rank (the
tail and, from the first rank, what lies before the sequence); its backward returns each
halo position's gradient to the rank that holds it (one all-reduce)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._comm import gather_finish, gather_start


def exchange_start(x: Tensor, h: int, before_start: Tensor | None, group: Any, rank: int,
                   world: int, grad: bool) -> tuple[Any, ...]:  # fmt: skip
    """Starts :func:`exchange` (the all-gather travels while the caller computes); finish
    it with ``gather_finish(started, group, rank)``."""
    b, c, length = x.shape
    n = min(length, h)
    tail = torch.cat([x.new_zeros(b, c, h - n), x[..., length - n :]], dim=-1)
    pre = before_start if (rank == 0 and before_start is not None) else None
    pre = x.new_zeros(b, c, h) if pre is None else pre.to(x.dtype)
    return gather_start(torch.stack([tail, pre]), group, world, grad=grad)


def exchange(x: Tensor, h: int, before_start: Tensor | None, group: Any, rank: int,
             world: int, grad: bool) -> Tensor:  # fmt: skip
    """Every rank's last ``min(L, h)`` positions of ``x (batch, channels, L)``, right-aligned
    in ``h`` slots, and the first rank's ``before_start (batch, channels, h)`` (zeros if
    None): ``(world, 2, batch, channels, h)``."""
    started = exchange_start(x, h, before_start, group, rank, world, grad)
    return gather_finish(started, group, rank)


def before(parts: Tensor, lengths: list[int], r: int, h: int,
           fill: bool) -> tuple[Tensor, list[tuple[int, int]]]:  # fmt: skip
    """The positions before rank ``r``'s shard, oldest first: the last ``h`` of them, taken
    from the shards before it and, with ``fill``, topped up from what lies before the
    sequence (else fewer near the start). Also ``(rank, count)`` per piece, oldest first
    (rank -1: before the sequence)."""
    pieces, where, need = [], [], h
    for j in range(r - 1, -1, -1):
        take = min(need, lengths[j], h)
        if take:
            pieces.append(parts[j, 0, :, :, h - take :])
            where.append((j, take))
            need -= take
        if not need:
            break
    if need and fill:
        pieces.append(parts[0, 1, :, :, h - need :])
        where.append((-1, need))
    pieces.reverse()
    where.reverse()
    if not pieces:
        return parts[0, 0, :, :, :0], where
    return (torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]), where
