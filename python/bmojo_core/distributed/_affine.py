"""The exchange of diagonal scans (Mamba-1, Mamba-2): a shard maps the state before it to
the state after it affinely, ``h_out = P ⊙ h_in + s``, with ``P`` the product of its
decays (0 in a row where a packed sequence starts inside it) and ``s`` its last state from
a zero start. The ranks all-gather their ``(P, s)`` (``2 ·`` state size floats per rank),
and every rank composes the prefix: the state before its shard and the state after the
whole sequence (the same on every rank, computed alike). The backward of the gather sums
each rank's gradient of every ``(P, s)`` over the ranks (one all-reduce) and hands it to
the shard that produced it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import BmojoTypeError, BmojoValueError
from . import _pipeline as P
from ._comm import agree, gather, resolve, tie


def seq_meta(seq_idx: Any, axis: int) -> dict[str, Any]:
    """The packed-sequence ids at the two ends of this shard (``axis``: the length axis of
    ``seq_idx``'s (batch, L)), for :func:`chain`'s boundary check."""
    if isinstance(seq_idx, Tensor) and seq_idx.dim() == 2 and seq_idx.shape[axis] > 0:
        return {"first": seq_idx[:, 0].tolist(), "last": seq_idx[:, -1].tolist()}
    return {}


def starts_inside(seq_idx: Tensor | None) -> Tensor | None:
    """Rows of this shard in which a new packed sequence starts after its first position."""
    if seq_idx is None or seq_idx.shape[1] < 2:
        return None
    return (seq_idx[:, 1:] != seq_idx[:, :-1]).any(-1)


def check_consistent(metas: list[dict[str, Any]], first_arg: str) -> None:
    ref = metas[0]
    for r, m in enumerate(metas[1:], 1):
        if m.get("shape") != ref.get("shape"):
            raise BmojoValueError(
                f"{first_arg}: expected the same state shape on every rank, got "
                f"{ref.get('shape')} on rank 0 and {m.get('shape')} on rank {r}"
            )
        if m["dtype"] != ref["dtype"]:
            raise BmojoTypeError(
                f"{first_arg}: expected the same compute dtype on every rank, got "
                f"{ref['dtype']} on rank 0 and {m['dtype']} on rank {r}"
            )
        if m["schedule"] != ref["schedule"]:
            raise BmojoValueError(
                f"schedule: expected the same on every rank, got {ref['schedule']!r} on rank 0 "
                f"and {m['schedule']!r} on rank {r}"
            )
        if m["seq_idx"] != ref["seq_idx"]:
            raise BmojoValueError("seq_idx: expected on every rank or on none")


def chain(p: Tensor, s: Tensor, metas: list[dict[str, Any]], group: Any, rank: int,
          world: int, grad: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(state before this rank's shard, state after the whole sequence, the exchanged
    tensor)``; ``p`` and ``s`` have the state's shape, batch first; ``grad``: whether the
    exchange is differentiated."""
    both = gather(torch.stack([p, s]), group, rank, world, grad=grad)  # (world, 2, *state)
    starts = _boundary_starts(metas, s.device)
    h = torch.zeros_like(s)
    h_in = h
    shape = (-1,) + (1,) * (s.dim() - 1)
    for r in range(world):
        if r == rank:
            h_in = h
        nxt = both[r, 0] * h + both[r, 1]
        if r + 1 < world and starts[r + 1] is not None:
            nxt = nxt * (~starts[r + 1]).to(nxt.dtype).view(shape)
        h = nxt
    return h_in, h, both


def _boundary_starts(metas: list[dict[str, Any]], device: torch.device) -> list[Tensor | None]:
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


SCHEDULES = ("auto", "pipeline", "exchange")


def _schedule(schedule: Any, metas: list[dict[str, Any]], world: int) -> int:
    """Blocks of the pipeline (0: the exchange schedule) for the agreed ``metas``: "auto"
    pipelines when its bubble is small (:func:`._pipeline.worth_it`); "pipeline" always,
    in as many blocks as the channels allow."""
    if schedule == "exchange" or world == 1 and schedule == "auto":
        return 0
    most = metas[0]["most"]
    if schedule == "pipeline":
        return max(1, min(most, P.BLOCKS_PER_BOUNDARY * max(world - 1, 1)))
    k = P.block_count(world, most, sum(m["work"] for m in metas) / world)
    return k if P.worth_it(world, k) else 0


def sharded_scan(
    group: Any,
    seq_idx: Tensor | None,
    first_arg: str,
    check: Callable[[], dict[str, Any]],
    whole: Callable[[], tuple[Tensor, Tensor]] | None,
    from_zero: Callable[[], tuple[Any, Tensor]],
    decay: Callable[[Tensor], Tensor],
    from_state: Callable[[Tensor | None, Any], Tensor],
    return_state: bool,
    initial: Tensor | None = None,
    *,
    tensors: list[Tensor | None],
    plan: Callable[[int, Tensor | None, dict[str, Any]], P.Plan],
    schedule: Any = "auto",
):
    """A diagonal scan over shards. ``check()`` checks the arguments (all of them: what
    follows runs after the ranks agreed that every rank's are good) and returns this
    rank's ``dtype`` (compute dtype), ``shape`` (the state's), ``length`` (the shard's)
    and ``most`` (the most blocks of the pipeline); ``tensors``: the op's tensor
    arguments (whether any is differentiated). Then either the pipeline
    (:mod:`._pipeline`; ``plan(blocks, keep, info)`` describes the op, ``info`` what
    ``check`` returned) or the exchange schedule: every rank but the first runs
    ``from_zero()`` (``(partial, s)``: what a zero start gives of its output, if anything,
    and its end state) and ``decay(s)`` (its P), then, once the states are exchanged,
    ``from_state(h_in, partial)`` (its output from the state before its shard). The
    first rank runs ``whole()`` (its output and end state from the known start), or, if
    ``whole`` is None (``from_zero`` is then much cheaper than a scan: the ranks exchange
    before any scans, so that all scan at once), as the others with ``initial`` (the state
    before the sequence, or None) as its start. Returns ``out`` or ``(out, state after the
    whole sequence)``."""
    group, rank, world = resolve(group)
    meta: dict[str, Any] = {"seq_idx": seq_idx is not None, **seq_meta(seq_idx, 1),
                            "schedule": schedule}  # fmt: skip
    err: BaseException | None = None
    try:
        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            raise BmojoValueError(
                f"schedule: expected one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}"
            )
        info = check()
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        meta.update(dtype=str(info["dtype"]), shape=tuple(info["shape"]), grad=grad,
                    work=math.prod(info["shape"]) * info["length"], most=info["most"])  # fmt: skip
    except Exception as exc:  # every rank must hear of it before any waits on a collective
        err = exc
    metas = agree(group, err, meta)
    check_consistent(metas, first_arg)
    grad = any(m["grad"] for m in metas)
    blocks = _schedule(schedule, metas, world)
    if blocks:
        starts = _boundary_starts(metas, torch.device("cpu"))[rank]
        keep = None if rank == 0 or starts is None else ~starts
        out, end = P.pipelined(plan(blocks, keep, info), group, rank, world, grad)
        if not return_state:
            return out
        both = gather(end, group, rank, world, grad=grad)
        if grad:
            out = tie(out, both)
        return out, both[world - 1]
    local = partial = None
    if rank == 0 and whole is not None:  # one scan gives its output and its end
        local = whole()
        s = local[1]
        p = torch.zeros_like(s)
    else:
        partial, s = from_zero()
        p = decay(s)
        if rank == 0:  # the start is known: the end state is the map applied to it
            if initial is not None:
                s = p * initial.to(s.dtype) + s
            p = torch.zeros_like(s)
    h_in, h_end, both = chain(p, s, metas, group, rank, world, grad)
    if local is not None:
        out = local[0]
    else:
        out = from_state(initial if rank == 0 else h_in, partial)
    if grad:  # so that this rank's backward reaches the exchange whatever its output
        out = tie(out, both)  # depends on (and whether or not its loss uses h_end)
    return (out, h_end) if return_state else out
