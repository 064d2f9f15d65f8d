"""Context-parallel Mamba-1 selective scan: the sequence split in contiguous shards over
the ranks of a process group, in one of two schedules.

- *pipeline* (:mod:`._pipeline`): the channels are cut into blocks; a rank scans each block
  once from its true start state, received from the rank before it, and passes its end
  state on. Nothing is recomputed; the outputs equal the single-process op's bitwise; the
  cost is a bubble of ``(world - 1) / blocks`` of a scan.
- *exchange*: each rank scans its shard from a zero state (its output and its end state
  ``s``), the ranks exchange ``(P, s)`` (``P = exp(A · ΣΔ)``; :mod:`._affine`: one
  all-gather of ``2 · batch · dim · N`` floats per rank; one all-reduce of ``world`` times
  that in the backward), and each rank adds what the state before its shard contributes,
  ``C_t · (exp(A · Σ_{s≤t} Δ_s) ⊙ h_in)`` (gated), by a scan of a zero input from that
  state — over the steps where it still matters only: with ``A ≤ 0`` and ``Δ ≥ 0`` every
  term is at most ``e^{-K} |C_t| |h_in|`` once ``min |A_d| · Σ Δ ≥ K = 45`` in every
  channel (``e^{-45} < 2^{-64}``, below fp64 rounding), so the scan stops there. The first
  rank scans once (its start state, ``initial_state``, is known). Its cost does not grow
  with the ranks, so it serves where a pipeline would have too few blocks per rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import selective_scan_fn as _scan
from ..ops.scan import check_args
from ._affine import sharded_scan, starts_inside
from ._comm import _eager, resolve
from ._pipeline import Plan, block_ranges

__all__ = ["selective_scan_fn"]


# The correction stops where every remaining term is below e^-HORIZON of its scale.
HORIZON = 45.0
# Steps per block of the passes over Δ (blocks small enough for the allocator to reuse:
# fresh pages are costly, and a whole shard of Δ is as large as the input).
_BLOCK = 2048


def _blocks(delta: Tensor, delta_bias: Tensor | None, softplus: bool):
    """The steps block by block, ``(lo, Δ[..., lo:lo + block])`` in float64 (more exact
    sums; and torch's float64 softplus is vectorised where its float32 one is not;
    mamba_ssm's threshold: the identity above 20), in two buffers reused from block to
    block (no fresh memory per block). A yielded block is valid until the next is asked
    for. Without ``softplus``, the pre-activations."""
    length = delta.shape[-1]
    if length == 0:
        return
    shape = (*delta.shape[:2], min(_BLOCK, length))
    x = torch.empty(shape, dtype=torch.float64, device=delta.device)
    y = torch.empty_like(x) if softplus else x
    bias = None if delta_bias is None else delta_bias.to(torch.float64)[:, None]
    for lo in range(0, length, _BLOCK):
        n = min(_BLOCK, length - lo)
        xb, yb = x[..., :n], y[..., :n]
        xb.copy_(delta[..., lo : lo + n])
        if bias is not None:
            xb.add_(bias)
        if softplus:
            torch.ops.aten.softplus.out(xb, 1, 20, out=yb)
        yield lo, yb


class _StepSum(torch.autograd.Function):
    """``Σ_t Δ_t (batch, dim)`` over the shard, block by block (no (batch, dim, L)
    temporaries but the gradient of ``delta``)."""

    @staticmethod
    def forward(ctx, delta, delta_bias, softplus, cdt):  # type: ignore[override]
        total = delta.new_zeros(delta.shape[:2], dtype=torch.float64)
        for _, dt in _blocks(delta, delta_bias, softplus):
            total += dt.sum(-1)
        ctx.save_for_backward(delta, delta_bias)
        ctx.softplus = softplus
        return total.to(cdt)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        delta, delta_bias = ctx.saved_tensors
        g = g.to(torch.float64)[..., None]
        dd = torch.empty_like(delta)
        db = None if delta_bias is None else g.new_zeros(delta.shape[1])
        for lo, x in _blocks(delta, delta_bias, False):
            if ctx.softplus:  # softplus' = sigmoid below the threshold, 1 above
                piece = torch.where(x > 20, 1.0, torch.sigmoid(x)) * g
            else:
                piece = g.expand(*g.shape[:2], x.shape[-1])
            dd[..., lo : lo + x.shape[-1]] = piece
            if db is not None:
                db += piece.sum((0, 2))
        return dd, None if db is None else db.to(delta_bias.dtype), None, None


@_eager
def _step_total(delta: Tensor, delta_bias: Tensor | None, softplus: bool,
                cdt: torch.dtype) -> Tensor:  # fmt: skip
    """:class:`_StepSum`, run eagerly under torch.compile (its block loop and ``out=``
    softplus are not for Dynamo to trace)."""
    return _StepSum.apply(delta, delta_bias, softplus, cdt)


@_eager
def _add_head(y: Tensor, head: Tensor) -> Tensor:
    """:class:`_AddHead`, run eagerly under torch.compile (an in-place update of an op's
    output)."""
    return _AddHead.apply(y, head)


def _decay(total: Tensor, A: Tensor, seq_idx: Tensor | None) -> Tensor:
    """``P (batch, dim, N)`` from the shard's summed steps: the product of its per-step
    decays, 0 for a row in which a new packed sequence starts (the state before the shard
    no longer reaches its end)."""
    p = torch.exp(total[..., None] * A.to(total.dtype))
    inside = starts_inside(seq_idx)
    if inside is not None:
        p = p * (~inside).to(total.dtype)[:, None, None]
    return p


@_eager
@torch.no_grad()
def _reach(delta: Tensor, delta_bias: Tensor | None, softplus: bool, A: Tensor,
           seq_idx: Tensor | None, total: Tensor | None = None) -> int:  # fmt: skip
    """How many leading steps of the shard the state before it still reaches: up to the
    first step from which, in every row and channel, ``min_n |A[d, n]| · Σ_{s≤t} Δ_s ≥
    HORIZON`` (each decay ``exp(A[d, n] · ΣΔ)`` is then below ``e^-HORIZON``, and stays so),
    and not past a packed sequence starting inside the shard. The whole shard unless
    ``A ≤ 0`` and Δ is a softplus (only then do the decays only shrink). Block by block,
    stopping once every channel has passed; not at all if ``total`` (the shard's summed
    steps) shows a channel that never passes."""
    length = delta.shape[-1]
    if length == 0:
        return 0
    reach = length
    if softplus and bool((A <= 0).all()):
        rate = (-A.to(torch.float64)).amin(-1)[:, None]  # (dim, 1): slowest decay
        if total is not None and bool((total.to(torch.float64) * rate[:, 0] < HORIZON).any()):
            return _seq_cap(length, seq_idx)
        run = delta.new_zeros(delta.shape[:2], dtype=torch.float64)
        first = torch.full(delta.shape[:2], length, dtype=torch.int64, device=delta.device)
        for lo, dt in _blocks(delta, delta_bias, True):
            c = dt.cumsum(-1).add_(run[..., None])
            past = c * rate >= HORIZON
            hit = past.any(-1) & (first == length)
            first = torch.where(hit, past.to(torch.int8).argmax(-1) + lo, first)
            if not bool((first == length).any()):
                break
            run = c[..., -1]
        reach = int(first.max())
    return _seq_cap(reach, seq_idx)


def _seq_cap(reach: int, seq_idx: Tensor | None) -> int:
    """``reach``, but not past the first packed sequence starting inside the shard."""
    if seq_idx is not None and seq_idx.shape[1] > 1:
        moved = (seq_idx[:, 1:] != seq_idx[:, :-1]).any(0)  # a start at index i + 1
        if bool(moved.any()):
            reach = min(reach, int(moved.to(torch.int8).argmax()) + 1)
    return reach


class _AddHead(torch.autograd.Function):
    """``y[..., :n] += head`` in place (``y``: this module's own scan output, which nothing
    else holds): no full-size copy forward, and the backward passes ``y``'s gradient
    through as it is (slicing and concatenating would allocate two full-size zeros)."""

    @staticmethod
    def forward(ctx, y, head):  # type: ignore[override]
        ctx.n = head.shape[-1]
        y[..., : ctx.n] += head
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, g[..., : ctx.n]


def _head(t: Tensor, n: int) -> Tensor:
    """A time-varying B/C (or any (.., L) tensor) cut to its first ``n`` steps; a
    constant (dim, N) one as it is."""
    return t[..., :n] if t.dim() >= 3 else t


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
    schedule: str = "auto",
):
    """:func:`bmojo_core.selective_scan_fn` over a sequence split along L in contiguous
    shards, one per rank of ``group`` (None: the default group), in rank order.

    Every sequence-shaped argument (``u``, ``delta``, ``z``, a time-varying ``B``/``C``,
    ``seq_idx``) is this rank's shard (lengths may differ between ranks, 0 included);
    ``A``, ``D``, ``delta_bias`` and a constant ``B``/``C`` are the same on every rank.
    ``initial_state`` is the state before the whole sequence, read on the first rank (the
    others' is ignored); a packed sequence (``seq_idx``) may cross a shard boundary.
    Returns this shard's ``out``, and with ``return_last_state`` the state after the whole
    sequence, the same on every rank.

    ``schedule``: "pipeline" (each rank scans its shard once, channel block by channel
    block, from the true start state passed on by the rank before it: the output equals
    the single-process op's bitwise; a bubble of ``(world - 1) / blocks`` of a scan),
    "exchange" (each rank scans from zero, the ranks exchange their shards' state maps and
    correct their first steps: equal up to rounding; no bubble, but a correction pass) or
    "auto" (the pipeline when its bubble is at most 1/8 with blocks of at least ~2^20
    state-element steps, else the exchange); the same on every rank.

    Gradients: a sharded input's gradient is the full gradient for its shard; the
    gradient of a parameter shared by the ranks is this rank's part, to be summed over the
    group (all-reduce) like any data-parallel gradient. The backward exchanges gradients
    with the other ranks, so every rank must run it (as with DDP). A bad argument on any
    rank raises the same error, naming that rank, on every rank.
    """

    def whole():
        return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                     initial_state=initial_state, seq_idx=seq_idx)  # fmt: skip

    def from_zero():  # the gated output from a zero start (with D), and the end state
        return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                     seq_idx=seq_idx)  # fmt: skip

    sums: list[Tensor] = []

    def decay(s):
        total = _step_total(delta, delta_bias, bool(delta_softplus), s.dtype)
        sums.append(total.detach())
        return _decay(total, A, seq_idx)

    def from_state(h_in, y0):  # ranks after the first (the first runs whole())
        n = _reach(delta, delta_bias, bool(delta_softplus), A, seq_idx,
                   sums[0] if sums else None)  # fmt: skip
        if n == 0:
            return y0
        zero = u.new_zeros(u.shape[0], u.shape[1], n)
        carry = _scan(zero, delta[..., :n], A, _head(B, n), _head(C, n), None, None, delta_bias,
                      delta_softplus, False, initial_state=h_in,
                      seq_idx=None if seq_idx is None else seq_idx[:, :n])  # fmt: skip
        if z is not None:  # the gate distributes over the sum
            carry = carry * F.silu(z[..., :n].to(carry.dtype))
        return _add_head(y0, carry.to(y0.dtype))

    rank = resolve(group)[1]
    tensors = [u, delta, A, B, C, D, z, delta_bias, initial_state if rank == 0 else None,
               seq_idx]  # fmt: skip

    def check():
        _, _, dtype = check_args(*tensors)
        batch, dim, length = u.shape
        return {"dtype": dtype, "shape": (batch, dim, A.shape[1]), "length": length,
                "most": dim}  # fmt: skip

    def plan(blocks, keep, info):
        def by_channel(t):  # B/C: constant (dim, N), variable (batch, N, L) or grouped
            return {2: ("c", 0), 3: None}.get(t.dim(), ("g", 1))

        def run(inputs, h):
            uu, dd, aa, bb, cc, dv, zz, bias, _, sq = inputs
            return _scan(uu, dd, aa, bb, cc, dv, zz, bias, delta_softplus, True,
                         initial_state=h, seq_idx=sq)  # fmt: skip

        groups = [t.shape[1] for t in (B, C) if t.dim() == 4]
        axes = [("c", 1), ("c", 1), ("c", 0), by_channel(B), by_channel(C), ("c", 0),
                ("c", 1), ("c", 0), ("c", 1), None]  # fmt: skip
        return Plan(tensors, axes, 8, run, 1, info["shape"], info["dtype"],
                    block_ranges(u.shape[1], groups, blocks), keep)  # fmt: skip

    return sharded_scan(group, seq_idx, "u", check, whole, from_zero, decay, from_state,
                        return_last_state, tensors=tensors, plan=plan,
                        schedule=schedule)  # fmt: skip
