"""The pipelined schedule of the diagonal scans over shards: the channels (Mamba-1) or heads
(Mamba-2) are cut into blocks, independent of each other; rank ``r`` scans block ``k`` as
soon as it has the state of that block before its shard (sent by rank ``r - 1`` when it
finished its own block ``k``) and sends its end state on to rank ``r + 1``. Every rank
scans its shard once, from its true start state (the single-process op, on one block at a
time), and nothing is corrected afterwards; rank ``r`` starts ``r`` blocks late, so with
``K`` blocks the schedule costs ``(world - 1) / K`` of a scan over the exchange-free ideal
(a wavefront: the skew does not grow from layer to layer). The backward runs the same
wavefront the other way: rank ``r`` waits for the gradient of each block's end state from
rank ``r + 1`` and sends the gradient of its start state to rank ``r - 1``.

Messages are point-to-point, one state block each way per block (a whole state per rank
and direction): ``batch · channels · N`` floats forward, as many backward."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._comm import _eager

# Blocks per rank boundary (the bubble is (world - 1) / blocks of a scan) ...
BLOCKS_PER_BOUNDARY = 32
# ... but each block at least this many state-element steps (batch · channels · N · L;
# ~3 ms of one core's scan), so that a block's fixed costs (an op call, a message) stay
# small beside its compute.
MIN_BLOCK_WORK = 1 << 20
# The pipeline is chosen when its bubble is at most 1 / 8 of a scan (the other schedule
# adds a correction pass of a similar or larger fraction on every rank but the first).
MAX_BUBBLE = 1 / 8


def block_count(world: int, most: int, work: float) -> int:
    """Blocks for a pipeline over ``world`` ranks: at most ``most`` (channels or heads) and
    at most ``work / MIN_BLOCK_WORK`` (``work``: a rank's state-element steps, mean over the
    ranks); at least 1."""
    k = min(most, BLOCKS_PER_BOUNDARY * max(world - 1, 1), int(work // MIN_BLOCK_WORK))
    return max(k, 1)


def worth_it(world: int, blocks: int) -> bool:
    """Whether the pipeline's bubble, ``(world - 1) / blocks`` of a scan, is small enough."""
    return (world - 1) <= MAX_BUBBLE * blocks


def block_ranges(channels: int, groups: Sequence[int], blocks: int) -> list[tuple[int, int]]:
    """About ``blocks`` channel ranges ``[c0, c1)`` covering ``channels``, each of which
    holds whole groups or a part of one group of every grouped input (``groups``: their
    group counts; ``channels / g`` consecutive channels per group), so that a block's part
    of a grouped input is a plain slice of its groups."""
    g = math.lcm(1, *groups)
    if len(set(groups)) > 1:  # whole groups of one input may split another's: stay inside
        blocks = max(blocks, g)
    q = channels // g
    if blocks <= g:
        cuts = [g * i // blocks * q for i in range(blocks + 1)]
        return list(zip(cuts, cuts[1:], strict=False))
    m = min(q, -(-blocks // g))
    out = []
    for j in range(g):
        cuts = [j * q + q * i // m for i in range(m + 1)]
        out += list(zip(cuts, cuts[1:], strict=False))
    return out


@dataclass
class Plan:
    """What an op gives the pipeline.

    ``tensors``: its tensor inputs (None for an absent one); ``axes[i]``: how input ``i`` is
    cut per block: ``("c", axis)`` by channels, ``("g", axis)`` by groups, or None (the same
    whole tensor for every block, its gradient summed over the blocks). ``initial``: the
    index in ``tensors`` of the state before the sequence (read on the first rank), or
    None. ``run(inputs, h)``: the op on one block's inputs from start state ``h`` (None: a
    zero state), returning ``(out, end state)``; the state is cut along axis 1, the output
    along ``out_axis``. ``state_shape``/``dtype``: the whole state's. ``keep``: on a rank
    after the first, None or a (batch,) bool tensor, False in a row where a new packed
    sequence starts at the shard's first position (the state before it is dropped there).
    """

    tensors: Sequence[Tensor | None]
    axes: Sequence[tuple[str, int] | None]
    initial: int | None
    run: Callable[[list[Tensor | None], Tensor | None], tuple[Tensor, Tensor]]
    out_axis: int
    state_shape: tuple[int, ...]
    dtype: torch.dtype
    ranges: list[tuple[int, int]]
    keep: Tensor | None = None


def _cut(t: Tensor | None, how: tuple[str, int] | None, rng: tuple[int, int],
         channels: int):  # fmt: skip
    """The key of block ``rng``'s part of an input (equal keys: the same part) and that
    part; a grouped input's groups are ``channels / groups`` consecutive channels each."""
    if t is None or how is None:
        return None, t
    kind, axis = how
    lo, hi = rng[0], rng[1]
    if kind == "g":
        q = channels // t.shape[axis]
        lo, hi = lo // q, -(-hi // q)
    if lo == 0 and hi == t.shape[axis]:
        return None, t
    return (lo, hi), t.narrow(axis, lo, hi - lo)


class _Comm:
    """The point-to-point messages of one pipeline (tags: the block index; the forward and
    the backward move in opposite directions, so their messages never meet)."""

    def __init__(self, group: Any, rank: int, world: int):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.prev = dist.get_global_rank(group, rank - 1) if rank > 0 else None
        self.next = dist.get_global_rank(group, rank + 1) if rank + 1 < world else None

    def recv(self, bufs: list[Tensor], src: int | None) -> list[Any]:
        return [self.dist.irecv(b, src=src, group=self.group, tag=k) for k, b in enumerate(bufs)]

    def send(self, t: Tensor, dst: int | None, k: int) -> Any:
        return self.dist.isend(t, dst=dst, group=self.group, tag=k)


class _Wave(torch.autograd.Function):
    """One rank's part of the pipelined scan. The forward builds each block's graph (the
    single-process op's, from that block's own leaves), the backward runs them block by
    block between the messages and assembles the inputs' gradients."""

    @staticmethod
    def forward(ctx, plan: Plan, comm: _Comm, grad: bool, _anchor: Tensor,
                *tensors: Tensor | None):  # type: ignore[override]  # fmt: skip
        need = ctx.needs_input_grad[4:]
        leaves: dict[tuple[int, Any], Tensor] = {}

        def part(i: int, rng):
            key, t = _cut(tensors[i], plan.axes[i], rng, plan.state_shape[1])
            if t is None:
                return None
            if (i, key) not in leaves:
                leaves[i, key] = t.detach().requires_grad_(need[i])
            return leaves[i, key]

        bufs = [plan_state(plan, r) for r in plan.ranges] if comm.prev is not None else []
        pending = comm.recv(bufs, comm.prev) if bufs else []
        sends, blocks = [], []
        for k, rng in enumerate(plan.ranges):
            h = None
            if bufs:
                pending[k].wait()
                h = bufs[k]
                if plan.keep is not None:
                    h.mul_(_rows(plan.keep, h))
                h.requires_grad_(grad)
            elif plan.initial is not None:
                h = part(plan.initial, rng)
            inputs = [None if i == plan.initial else part(i, rng) for i in range(len(tensors))]
            with torch.enable_grad():
                out, end = plan.run(inputs, h)
            if comm.next is not None:
                sends.append(comm.send(end.detach().contiguous(), comm.next, k))
            blocks.append((rng, h, out, end))
        for w in sends:
            w.wait()
        ctx.plan, ctx.comm, ctx.blocks, ctx.leaves, ctx.n = plan, comm, blocks, leaves, len(tensors)
        out = torch.cat([b[2].detach() for b in blocks], plan.out_axis)
        end = torch.cat([b[3].detach() for b in blocks], 1)
        return out, end

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out: Tensor | None, g_end: Tensor | None):  # type: ignore[override]
        plan, comm = ctx.plan, ctx.comm
        bufs = [plan_state(plan, b[0]) for b in ctx.blocks] if comm.next is not None else []
        pending = comm.recv(bufs, comm.next) if bufs else []
        sends = []
        for k, (rng, h, out, end) in enumerate(ctx.blocks):
            c0, c1 = rng[0], rng[1]
            d_end = None if g_end is None else g_end[:, c0:c1]
            if bufs:
                pending[k].wait()
                d_end = bufs[k] if d_end is None else bufs[k] + d_end
            pairs = []
            if out.requires_grad and g_out is not None:
                pairs.append((out, g_out.narrow(plan.out_axis, c0, c1 - c0)))
            if end.requires_grad and d_end is not None:
                pairs.append((end, d_end))
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
            if comm.prev is not None:
                dh = torch.zeros_like(h) if h.grad is None else h.grad
                if plan.keep is not None:
                    dh = dh * _rows(plan.keep, dh)
                sends.append(comm.send(dh.contiguous(), comm.prev, k))
        for w in sends:
            w.wait()
        grads = [_assemble(plan, ctx.leaves, i) for i in range(ctx.n)]
        del ctx.blocks, ctx.leaves
        return (None, None, None, None, *grads)


def _rows(keep: Tensor, like: Tensor) -> Tensor:
    """A (batch,) mask shaped to multiply ``like`` row by row."""
    return keep.to(like.device, like.dtype).view((-1,) + (1,) * (like.dim() - 1))


def plan_state(plan: Plan, rng: tuple[int, int]) -> Tensor:
    """An empty state block (a message buffer) for channels ``rng``."""
    shape = list(plan.state_shape)
    shape[1] = rng[1] - rng[0]
    device = next(t for t in plan.tensors if t is not None).device
    return torch.empty(shape, dtype=plan.dtype, device=device)


def _assemble(plan: Plan, leaves: dict[tuple[int, Any], Tensor], i: int) -> Tensor | None:
    """Input ``i``'s gradient from its blocks' leaves (parts in order, a missing one zero)."""
    parts = sorted((key, t) for (j, key), t in leaves.items() if j == i and t.requires_grad)
    if not parts:
        return None
    if parts[0][0] is None:  # the whole tensor, shared by the blocks
        t = parts[0][1]
        return torch.zeros_like(t) if t.grad is None else t.grad
    axis = plan.axes[i][1]  # type: ignore[index]
    return torch.cat([torch.zeros_like(t) if t.grad is None else t.grad for _, t in parts], axis)


@_eager
def pipelined(plan: Plan, group: Any, rank: int, world: int, grad: bool) -> tuple[Tensor, Tensor]:
    """``(this shard's output, the state after it)`` by the pipeline; ``grad`` (the same on
    every rank) makes the output differentiable on every rank, so that every rank runs the
    backward wavefront."""
    anchor = torch.zeros(0, requires_grad=grad)
    return _Wave.apply(plan, _Comm(group, rank, world), grad, anchor, *plan.tensors)
