"""Eidetic tokens over shards. The store a chunk reads is built from every position before
the chunk, so it is passed from rank to rank (a chain of point-to-point messages: rank r
waits for rank r-1's, scores its shard, pushes its scores, sends on): the innovation
state, the store at the shard's end and the store at the last chunk boundary before it
(what the next rank's first, partial chunk reads). Scores and stores are not
differentiated; the held tokens are. A position held by a later chunk sits, when its
owner's shard ends, in the owner's end store or in its boundary store (a store only loses
positions), so each rank publishes the tokens of those two stores that it owns (one
all-gather of ``2 · m_e · d`` values per row and rank, differentiable), and a chunk's
tokens come from these or from the rank's own shard."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops.eidetic import eidetic_select, innovation_scores
from ._comm import _eager, gather


def _empty(b: int, m: int, count: int, device: torch.device) -> dict[str, Tensor]:
    return {"positions": torch.full((b, m), -1, dtype=torch.int64, device=device),
            "scores": torch.zeros(b, m, dtype=torch.float64, device=device),
            "count": torch.full((b,), count, dtype=torch.int64, device=device)}  # fmt: skip


def _pack(innov: dict[str, Tensor] | None, stores: list[dict[str, Tensor]],
          device: torch.device) -> Tensor:  # fmt: skip
    """One float64 message on ``device`` (the backend's: NCCL sends CUDA tensors only;
    positions and counts are exact below 2^53)."""
    parts = [torch.tensor([0.0 if innov is None else 1.0], dtype=torch.float64, device=device)]
    if innov is not None:
        parts += [innov[k].to(device, torch.float64).flatten() for k in ("history", "count", "ema")]
    for st in stores:
        parts += [
            st[k].to(device, torch.float64).flatten() for k in ("positions", "scores", "count")
        ]
    return torch.cat(parts)


def _unpack(msg: Tensor, b: int, k: int, d: int, m: int, cdt: torch.dtype):
    i = 1
    innov = None

    def take(n: int) -> Tensor:
        nonlocal i
        out = msg[i : i + n]
        i += n
        return out

    if msg[0] == 1.0:
        innov = {"history": take(b * k * d).view(b, k, d).to(cdt),
                 "count": take(b).to(torch.int64),
                 "ema": take(2 * b).view(b, 2).to(cdt)}  # fmt: skip
    else:
        take(b * k * d + 3 * b)
    stores = []
    for _ in range(2):
        stores.append({"positions": take(b * m).view(b, m).to(torch.int64),
                       "scores": take(b * m).view(b, m),
                       "count": take(b).to(torch.int64)})  # fmt: skip
    return innov, stores


def _sorted(positions: Tensor) -> Tensor:
    """A store's positions ascending, empty slots (-1) last (as eidetic_select's held)."""
    big = torch.iinfo(torch.int64).max
    held = torch.where(positions >= 0, positions, big).sort(1).values
    return torch.where(held == big, -1, held)


@_eager
def eidetic_tokens(
    module: Any, u: Tensor, y: Tensor, start: int, ext_start: int, n_ext: int, group: Any,
    rank: int, world: int, grad: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The eidetic block ``(tokens (b, n_chunks, m_e, d), mask)`` of each chunk of the
    extended piece ``[ext_start, start + L)`` (chunk-aligned; chunks before the shard's
    first chunk are left empty: their queries are not this rank's)."""
    import torch.distributed as dist

    b, length, d = u.shape
    w, m, k = module.window, module.n_eidetic, module.innovation_taps
    policy, thr = module.eidetic_policy, module.eidetic_threshold
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    end = start + length
    dev = u.device
    if rank == 0:
        innov, end_in, bound_in = None, _empty(b, m, 0, dev), _empty(b, m, 0, dev)
    else:
        n_msg = 1 + b * k * d + 3 * b + 2 * (2 * b * m + b)
        msg = torch.empty(n_msg, dtype=torch.float64, device=dev)
        dist.recv(msg, src=dist.get_global_rank(group, rank - 1), group=group)
        innov, (end_in, bound_in) = _unpack(msg, b, k, d, m, cdt)
    held_chunks: list[Tensor] = []  # held of the chunks from the shard's first on
    if start % w:
        held_chunks.append(_sorted(bound_in["positions"])[:, None])
    end_out, bound_out, innov_out = end_in, bound_in, innov
    if length:
        scores, innov_out = innovation_scores(
            y.detach(), taps=k, metric=module.innovation_metric, state=innov, return_state=True
        )
        scores = torch.nan_to_num(scores, nan=torch.finfo(scores.dtype).min)
        sc = scores.to(torch.float64)
        b1 = min(-(-start // w) * w, end)  # the first boundary after start (or the end)
        lb = max(end // w * w, b1)  # the last boundary up to the end
        s = end_in
        if b1 > start:
            _, s = eidetic_select(sc[:, : b1 - start], m, w, policy, thr, store=s, start=start,
                                  return_store=True)  # fmt: skip
        if b1 % w == 0:
            bound_out = s  # b1 is a boundary (not just the end)
        if lb > b1:
            h1, s = eidetic_select(sc[:, b1 - start : lb - start], m, w, policy, thr, store=s,
                                   start=b1, return_store=True)  # fmt: skip
            held_chunks.append(h1)
            bound_out = s
        if end > lb:
            h2, s = eidetic_select(sc[:, lb - start :], m, w, policy, thr, store=s, start=lb,
                                   return_store=True)  # fmt: skip
            held_chunks.append(h2)
        end_out = s
    if rank + 1 < world:
        dist.send(_pack(innov_out, [end_out, bound_out], dev),
                  dst=dist.get_global_rank(group, rank + 1), group=group)  # fmt: skip
    # the tokens this rank owns in its outgoing stores, published to every rank
    cand = torch.cat([end_out["positions"], bound_out["positions"]], dim=1)  # (b, 2m)
    mine = (cand >= start) & (cand < end)
    cand = torch.where(mine, cand, -1)
    if length:
        at = torch.where(mine, cand - start, 0)[..., None].expand(b, 2 * m, d)
        rows = torch.gather(u, 1, at) * mine[..., None].to(u.dtype)
    else:  # an empty shard owns nothing
        rows = u.new_zeros(b, 2 * m, d)
    all_rows = gather(rows, group, rank, world, grad=grad)  # (W, b, 2m, d)
    all_pos = gather(cand, group, rank, world, grad=False)  # (W, b, 2m)
    src_pos = all_pos.permute(1, 0, 2).reshape(b, world * 2 * m)
    src = torch.cat([all_rows.permute(1, 0, 2, 3).reshape(b, world * 2 * m, d), u], dim=1)
    # every chunk of the extended piece
    n_chunks = -(-n_ext // w)
    first = start // w - ext_start // w  # index of the shard's first chunk in the piece
    held = torch.full((b, n_chunks, m), -1, dtype=torch.int64, device=dev)
    if held_chunks and n_chunks > first:
        got = torch.cat(held_chunks, dim=1)[:, : n_chunks - first]
        held[:, first : first + got.shape[1]] = got
    valid = held >= 0
    earlier = valid & (held < start)
    match = held[..., None] == src_pos[:, None, None, :]
    if not bool(match.any(-1)[earlier].all()):  # the invariant in the module doc
        raise RuntimeError("bmojo_core.distributed: an eidetic token's owner did not publish it")
    idx = torch.where(earlier, match.to(torch.int8).argmax(-1),
                      world * 2 * m + (held - start).clamp(min=0))  # fmt: skip
    idx = torch.where(valid, idx, 0).reshape(b, -1)
    tok = torch.gather(src, 1, idx[..., None].expand(b, idx.shape[1], d))
    tok = tok.view(b, n_chunks, m, d) * valid[..., None].to(tok.dtype)
    return tok, valid
