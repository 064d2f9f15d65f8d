"""Companion (canonical-form) scan, design §4, as torch custom ops with autograd.

Per channel, order n::

    s_t = sum_{i=1..n} alpha_{t,i} s_{t-i} + beta_t u_t
    y_t = sum_{i=0..n-1} c_{t,i} s_{t-i} + D u_t        (default y_t = s_t)

The forward op also returns the sequence ``s`` (B, D, L), saved for the backward op, which
runs the adjoint recurrence in reverse without recomputing the forward. Both ops have a
CUDA kernel (``cuda/companion.cu``, one thread per (batch, channel), sequential in time).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate as V
from ..runtime import cuda as _cuda
from ..runtime import launch as CU
from ._library import custom_op
from ._native import array, core, view, view_opt

# CUDA kernels (cuda/companion.cu): one thread per (batch, channel) lane, sequential in time
# (the recurrence is all-pole), time-invariant gradients reduced over the batch in order.
_K_FWD = _cuda.declare("companion.cu", "companion_scan_fwd")
_K_BWD = _cuda.declare("companion.cu", "companion_scan_bwd")
_K_REDUCE = _cuda.declare("companion.cu", "companion_reduce")
_LANES = 32  # = COMP_LN of the kernels: one warp of lanes per block (tiles of 32 x 32 steps)

MAX_ORDER: int = core.companion.MAX_ORDER


def _y_is_s(c, D) -> bool:
    """Without c and D the output is s itself: the forward then skips writing s."""
    return c is None and D is None


@custom_op("bmojo::companion_scan_fwd", mutates_args=(), device_types="cpu")
def companion_scan_fwd(
    u: Tensor,
    alpha: Tensor,
    beta: Tensor | None,
    c: Tensor | None,
    D: Tensor | None,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised companion scan: every input in one dtype (float32/float64), contiguous;
    ``alpha``/``c`` (B, D, L, n) or (D, n), ``beta`` (B, D, L) or (D,). Returns
    (y, final_state, s); s is empty when it equals y (neither c nor D given)."""
    batch, dim, length = u.shape
    n = alpha.shape[-1]
    y = u.new_empty(batch, dim, length)
    s = u.new_empty(0) if _y_is_s(c, D) else u.new_empty(batch, dim, length)
    last = u.new_empty(batch, dim, n)
    core.companion.scan_fwd(
        view(u), view(alpha), view_opt(beta), view_opt(c), view_opt(D), view_opt(initial_state),
        array(y), None if _y_is_s(c, D) else array(s), array(last),
    )  # fmt: skip
    return y, last, s


def _var(t: Tensor | None, per_step_dim: int) -> int:
    return int(t is not None and t.dim() == per_step_dim)


def _cuda_order(alpha) -> int:
    n = alpha.shape[-1]
    if not 1 <= n <= MAX_ORDER:  # the kernels' ring holds MAX_ORDER values
        raise V.BmojoValueError(f"alpha: the order n must be in 1..{MAX_ORDER}, got {n}")
    return n


@companion_scan_fwd.register_kernel("cuda")
def _(u, alpha, beta, c, D, initial_state):
    batch, dim, length = u.shape
    n = _cuda_order(alpha)
    y = u.new_empty(batch, dim, length)
    s = u.new_empty(0) if _y_is_s(c, D) else u.new_empty(batch, dim, length)
    last = u.new_empty(batch, dim, n)
    lanes = batch * dim
    if lanes:
        _K_FWD.launch(
            CU.suffix(u), grid=CU.grid_exact(lanes, _LANES), block=(_LANES, 1, 1),
            args=(u, alpha, _var(alpha, 4), CU.ptr(beta), _var(beta, 3), CU.ptr(c), _var(c, 4),
                  CU.ptr(D), CU.ptr(initial_state), y, 0 if _y_is_s(c, D) else s, last,
                  batch, dim, length, n),
            fmt="ppipipippppp" "iiii", device=u.device,
        )  # fmt: skip
    return y, last, s


@companion_scan_fwd.register_fake
def _(u, alpha, beta, c, D, initial_state):
    batch, dim, length = u.shape
    n = alpha.shape[-1]
    return (
        u.new_empty(batch, dim, length),
        u.new_empty(batch, dim, n),
        u.new_empty(0) if _y_is_s(c, D) else u.new_empty(batch, dim, length),
    )


@custom_op("bmojo::companion_scan_bwd", mutates_args=(), device_types="cpu")
def companion_scan_bwd(
    u: Tensor,
    alpha: Tensor,
    beta: Tensor | None,
    c: Tensor | None,
    D: Tensor | None,
    initial_state: Tensor | None,
    s: Tensor,
    dy: Tensor,
    dlast_state: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, dalpha, dbeta, dc, dD, dinitial_state), each in its input's layout;
    those of absent optional inputs are empty tensors. ``s`` is the forward's s (its y
    when neither c nor D is given). Deterministic."""
    batch, dim, _ = u.shape
    n = alpha.shape[-1]
    du, dalpha = torch.empty_like(u), torch.empty_like(alpha)
    dbeta = torch.empty_like(beta) if beta is not None else u.new_empty(0)
    dc = torch.empty_like(c) if c is not None else u.new_empty(0)
    dD = torch.empty_like(D) if D is not None else u.new_empty(0)
    dh0 = u.new_empty(batch, dim, n)
    core.companion.scan_bwd(
        view(u), view(alpha), view_opt(beta), view_opt(c), view_opt(D), view_opt(initial_state),
        view(s), view(dy), view_opt(dlast_state), array(du), array(dalpha),
        None if beta is None else array(dbeta), None if c is None else array(dc),
        None if D is None else array(dD), array(dh0),
    )  # fmt: skip
    return du, dalpha, dbeta, dc, dD, dh0


@companion_scan_bwd.register_kernel("cuda")
def _(u, alpha, beta, c, D, initial_state, s, dy, dlast_state):
    batch, dim, length = u.shape
    n = _cuda_order(alpha)
    du, dalpha = torch.empty_like(u), torch.empty_like(alpha)
    dbeta = torch.empty_like(beta) if beta is not None else u.new_empty(0)
    dc = torch.empty_like(c) if c is not None else u.new_empty(0)
    dD = torch.empty_like(D) if D is not None else u.new_empty(0)
    dh0 = u.new_empty(batch, dim, n)
    lanes = batch * dim
    if not lanes:
        # Time-invariant gradients of an empty batch are zero.
        for t in (dalpha, dbeta, dc, dD):
            if t.dim() <= 2:
                t.zero_()
        return du, dalpha, dbeta, dc, dD, dh0
    av, bv, cv = _var(alpha, 4), _var(beta, 3), _var(c, 4)
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    # Per-lane partials of the time-invariant gradients (only those needed are written).
    pa = u.new_empty(0 if av else lanes * n, dtype=acc)
    pb = u.new_empty(lanes if beta is not None and not bv else 0, dtype=acc)
    pc = u.new_empty(lanes * n if c is not None and not cv else 0, dtype=acc)
    pd = u.new_empty(lanes if D is not None else 0, dtype=acc)
    sfx, dev = CU.suffix(u), u.device
    _K_BWD.launch(
        sfx, grid=CU.grid_exact(lanes, _LANES), block=(_LANES, 1, 1),
        args=(u, alpha, av, CU.ptr(beta), bv, CU.ptr(c), cv, CU.ptr(D), CU.ptr(initial_state),
              s, dy, CU.ptr(dlast_state), du, dalpha, CU.ptr(None if beta is None else dbeta),
              CU.ptr(None if c is None else dc),
              dh0, pa, pb, pc, pd, batch, dim, length, n),
        fmt="ppipipippppp" "ppppp" "pppp" "iiii", device=dev,
    )  # fmt: skip
    for part, out in ((pa, dalpha), (pb, dbeta), (pc, dc), (pd, dD)):
        if part.numel():
            per = out.numel()
            _K_REDUCE.launch(
                sfx,
                grid=CU.grid1(per),
                block=(CU.BLOCK, 1, 1),
                args=(part, out, batch, per),
                fmt="ppil",
                device=dev,
            )
    return du, dalpha, dbeta, dc, dD, dh0


@companion_scan_bwd.register_fake
def _(u, alpha, beta, c, D, initial_state, s, dy, dlast_state):
    batch, dim, _ = u.shape
    return (
        torch.empty_like(u),
        torch.empty_like(alpha),
        u.new_empty(0) if beta is None else torch.empty_like(beta),
        u.new_empty(0) if c is None else torch.empty_like(c),
        u.new_empty(0) if D is None else torch.empty_like(D),
        u.new_empty(batch, dim, alpha.shape[-1]),
    )


def _setup(ctx, inputs, output):
    u, alpha, beta, c, D, initial_state = inputs
    ctx.present = (beta is not None, c is not None, D is not None, initial_state is not None)
    s = output[0] if _y_is_s(c, D) else output[2]
    ctx.save_for_backward(u, alpha, beta, c, D, initial_state, s)


def _backward(ctx, dy, dlast, _ds):
    u, alpha, beta, c, D, initial_state, s = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    du, dalpha, dbeta, dc, dD, dh0 = torch.ops.bmojo.companion_scan_bwd(
        u, alpha, beta, c, D, initial_state, s, dy.contiguous(),
        None if dlast is None else dlast.contiguous(),
    )  # fmt: skip
    has_beta, has_c, has_d, has_h0 = ctx.present
    return (
        du,
        dalpha,
        dbeta if has_beta else None,
        dc if has_c else None,
        dD if has_d else None,
        dh0 if has_h0 else None,
    )


companion_scan_fwd.register_autograd(_backward, setup_context=_setup)


def _check_coef(name, t, batch, dim, length, n):
    """alpha / c: (B, D, L, n) per step or (D, n) per channel."""
    V.device_tensor(name, t)
    if t.dim() == 4:
        V.shape(name, t, (batch, dim, length, n), "(batch, dim, L, n) for per-step coefficients")
    elif t.dim() == 2:
        V.shape(name, t, (dim, n), "(dim, n) for time-invariant coefficients")
    else:
        raise V.BmojoValueError(
            f"{name}: expected shape (batch, dim, L, n) or (dim, n), got {tuple(t.shape)}"
        )


def companion_scan(
    u: Tensor,
    alpha: Tensor,
    beta: Tensor | None = None,
    c: Tensor | None = None,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
):
    """Companion (canonical-form) scan of order n, design §4, per channel::

        s_t = sum_{i=1..n} alpha_{t,i} s_{t-i} + beta_t u_t
        y_t = sum_{i=0..n-1} c_{t,i} s_{t-i} + D u_t        (y_t = s_t + D u_t without c)

    Shapes: ``u`` ``(batch, dim, L)``; ``alpha`` ``(batch, dim, L, n)`` (per step) or
    ``(dim, n)`` (time-invariant), ``alpha[..., i-1]`` multiplies ``s_{t-i}``; ``beta``
    ``(batch, dim, L)`` or ``(dim,)`` (default 1); ``c`` ``(batch, dim, L, n)`` or
    ``(dim, n)``, ``c[..., i]`` multiplies ``s_{t-i}``; ``D`` ``(dim,)``;
    ``initial_state`` ``(batch, dim, n)`` = ``(s_0, s_{-1}, …, s_{1-n})`` (default zero).
    1 <= n <= 64.

    Returns ``y`` (dtype of ``u``), or ``(y, final_state)`` with ``final_state =
    (s_L, s_{L-1}, …, s_{L-n+1})`` ``(batch, dim, n)`` in the compute dtype (float64 for
    float64 inputs, else float32). Differentiable in every tensor input, also through the
    final state alone.
    """
    V.device_tensor("u", u)
    if u.dim() != 3:
        raise V.BmojoValueError(f"u: expected shape (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    V.device_tensor("alpha", alpha)
    if alpha.dim() not in (2, 4):
        raise V.BmojoValueError(
            f"alpha: expected shape (batch, dim, L, n) or (dim, n), got {tuple(alpha.shape)}"
        )
    n = alpha.shape[-1]
    if not 1 <= n <= MAX_ORDER:
        raise V.BmojoValueError(
            f"alpha: the order n (last dimension) must be in 1..{MAX_ORDER}, got {n}"
        )
    _check_coef("alpha", alpha, batch, dim, length, n)
    if beta is not None:
        V.device_tensor("beta", beta)
        if beta.dim() == 3:
            V.shape("beta", beta, (batch, dim, length), "(batch, dim, L) for per-step gains")
        else:
            V.shape("beta", beta, (dim,), "(dim,) for time-invariant gains, or (batch, dim, L)")
    if c is not None:
        _check_coef("c", c, batch, dim, length, n)
    if D is not None:
        V.device_tensor("D", D)
        V.shape("D", D, (dim,), "(dim,)")
    if initial_state is not None:
        V.device_tensor("initial_state", initial_state)
        V.shape("initial_state", initial_state, (batch, dim, n), "(batch, dim, n)")
    named = {"u": u, "alpha": alpha, "beta": beta, "c": c, "D": D,
             "initial_state": initial_state}  # fmt: skip
    V.same_device(named, "u")
    cdt = V.compute_dtype(named, "u")
    cv = V.as_compute
    y, last, _ = torch.ops.bmojo.companion_scan_fwd(
        cv(u, cdt), cv(alpha, cdt), cv(beta, cdt), cv(c, cdt), cv(D, cdt),
        cv(initial_state, cdt),
    )  # fmt: skip
    y = y.to(u.dtype)
    return (y, last) if return_final_state else y
