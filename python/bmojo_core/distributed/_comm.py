"""What every context-parallel op shares: the process group, one agreement step that
turns a failure on any rank into the same exception on every rank (instead of a rank
waiting forever in a collective the failed one never reaches), and the differentiable
exchange of the shards' boundary states."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import BmojoError, BmojoTypeError, BmojoValueError


def resolve(group: Any) -> tuple[Any, int, int]:
    """``(group, rank, world size)`` of ``group`` (None: the default group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise BmojoValueError(
            "group: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or use the single-process op)"
        )
    if group is None:
        group = dist.group.WORLD
    try:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    except (RuntimeError, ValueError) as exc:
        raise BmojoValueError(f"group: not a process group of this process ({exc})") from None
    if rank < 0:
        raise BmojoValueError("group: this process is not a member of the group")
    return group, rank, world


def _as_error(kind: str, message: str) -> BmojoError:
    if kind == "type":
        return BmojoTypeError(message)
    if kind == "value":
        return BmojoValueError(message)
    return BmojoError(message)


def _kind(exc: BaseException) -> str:
    if isinstance(exc, TypeError):
        return "type"
    if isinstance(exc, ValueError):
        return "value"
    return "other"


# The exchanges run eagerly under torch.compile (a graph break each): Dynamo cannot trace
# object collectives or point-to-point messages, and the model around them still compiles.
_eager = torch.compiler.disable


@_eager
def agree(group: Any, error: BaseException | None, meta: Any) -> list[Any]:
    """Every rank's ``meta``, in rank order, after one exchange; if any rank passes an
    ``error``, every rank raises the first failing rank's error (same class family and
    message, naming that rank) instead."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    mine = (None if error is None else (_kind(error), str(error)), meta)
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine, group=group)
    for r, (err, _) in enumerate(out):
        if err is not None:
            exc = _as_error(err[0], f"{err[1]} (on rank {r} of {world})")
            if error is not None:
                raise exc from error
            raise exc
    return [m for _, m in out]


class _Gathered(torch.autograd.Function):
    """Every rank's tensor stacked in rank order (gathered already, by
    :func:`gather_start`); the backward sums each rank's gradient of the stack over the
    ranks and returns this rank's slice, so an entry's gradient reaches the rank that
    produced it."""

    @staticmethod
    def forward(ctx, t: Tensor, stacked: Tensor, group: Any, rank: int) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.rank = group, rank
        return stacked.view_as(stacked)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank], None, None, None


@_eager
def gather_start(t: Tensor, group: Any, world: int, *, grad: bool) -> tuple[Any, ...]:
    """Starts gathering every rank's ``t`` (an asynchronous all-gather, so that compute can
    run while it travels); :func:`gather_finish` waits for it. ``grad`` must be the same on
    every rank (the backward is a collective every rank has to reach)."""
    import torch.distributed as dist

    if grad and not t.requires_grad:
        t = t.detach().requires_grad_()
    if not grad:
        t = t.detach()
    send = t.detach().contiguous()
    parts = [torch.empty_like(send) for _ in range(world)]
    work = dist.all_gather(parts, send, group=group, async_op=True)
    return t, send, parts, work


@_eager
def gather_finish(started: tuple[Any, ...], group: Any, rank: int) -> Tensor:
    """The stack ``(world, *t.shape)`` of a :func:`gather_start`, differentiable if it was
    started with ``grad``."""
    t, _, parts, work = started
    work.wait()
    return _Gathered.apply(t, torch.stack(parts), group, rank)


def gather(t: Tensor, group: Any, rank: int, world: int, *, grad: bool) -> Tensor:
    """Every rank's ``t`` stacked in rank order, differentiable when ``grad`` (which must be
    the same on every rank: the backward is a collective every rank has to reach)."""
    return gather_finish(gather_start(t, group, world, grad=grad), group, rank)


class _Tie(torch.autograd.Function):
    """``x`` unchanged, with ``other`` in its graph (a zero gradient flows to it), so the
    backward of this rank reaches the exchange behind ``other`` like every other rank's."""

    @staticmethod
    def forward(ctx, x: Tensor, other: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape, ctx.dtype = other.shape, other.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g, torch.zeros(ctx.shape, dtype=ctx.dtype, device=g.device)


def tie(x: Tensor, other: Tensor) -> Tensor:
    return _Tie.apply(x, other)
