"""Pure-PyTorch reference implementations (the oracles) of bmojo_core's diagonal scans.

These functions *define* the documented semantics of the fast kernels (SPEC §2). They are
written for clarity, not speed: they loop over time in Python, one step at a time, using
ordinary differentiable torch operations, so that

* they run in float64 (and are the ground truth of the parity and gradient tests);
* ``torch.autograd`` differentiates them (reference gradients);
* they depend on nothing but ``torch`` and ``math`` (never on ``bmojo_core._core``).

Conventions (SPEC §1): the state after consuming ``u_t`` is ``h_t``; the output ``y_t``
reads ``h_t``; ``h_0`` (the initial state, default zero) is the state before the first
input. Computation happens in the promoted floating dtype of the inputs, at least float32
(float64 as soon as any input is float64); outputs are returned in the dtype of the main
input, states in the compute dtype.

Functions:

* :func:`softplus_thresholded` -- ``softplus(x)``, but exactly ``x`` where ``x > 20``.
* :func:`diag_scan` -- ``h_t = a_t * h_{t-1} + b_t`` over the last axis (forward or reverse).
* :func:`selective_scan` -- Mamba-1 selective scan (``mamba_ssm.selective_scan_fn``
  semantics) with the ``initial_state`` and packed-sequence ``seq_idx`` extensions.
* :func:`selective_state_update` -- one (or several) streaming steps, in place
  (``mamba_ssm.selective_state_update`` semantics), with a state pool, padding rows and
  intermediate-state snapshots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "softplus_thresholded",
    "diag_scan",
    "selective_scan",
    "selective_state_update",
    "companion_scan",
    "causal_conv1d",
    "causal_conv1d_update",
    "bilinear_scan",
]

_SOFTPLUS_THRESHOLD = 20.0


def softplus_thresholded(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) = log(1 + exp(x))``, replaced by the identity where ``x > 20``.

    This is the convention of the CUDA peers (mamba_ssm); the gradient is exact on both
    branches (``sigmoid(x)`` below the threshold, ``1`` above it).
    """
    return torch.where(x > _SOFTPLUS_THRESHOLD, x, F.softplus(x))


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given floating tensor is float64, else float32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


# ---------------------------------------------------------------------------------------
# 2.1 first-order diagonal scan
# ---------------------------------------------------------------------------------------


def diag_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    reverse: bool = False,
    return_last_state: bool = False,
):
    """First-order diagonal (elementwise) linear recurrence over the last axis.

    ``a`` and ``b`` have the same shape ``(..., L)``; ``initial_state`` has shape ``(...)``
    (default zeros).

    * forward: ``h_t = a_t * h_{t-1} + b_t`` for ``t = 1..L`` with ``h_0 = initial_state``;
      the last state is ``h_L`` (``h[..., -1]``);
    * ``reverse=True``: ``h_t = a_t * h_{t+1} + b_t`` for ``t = L..1`` with
      ``h_{L+1} = initial_state``; the last state is ``h_1`` (``h[..., 0]``).

    Returns ``h`` (shape ``(..., L)``, dtype of ``b``) or ``(h, last_state)`` when
    ``return_last_state`` (last state in the compute dtype). For ``L = 0`` ``h`` is empty
    and the last state is the initial state (or zeros).
    """
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dim() < 1:
        raise ValueError("a and b must have at least one dimension (the time axis)")
    lanes = a.shape[:-1]
    L = a.shape[-1]
    cdt = _compute_dtype(a, b, initial_state)
    a_c = a.to(cdt)
    b_c = b.to(cdt)
    if initial_state is None:
        h = torch.zeros(lanes, dtype=cdt, device=a.device)
    else:
        if initial_state.shape != lanes:
            raise ValueError(
                f"initial_state must have shape {tuple(lanes)}, got {tuple(initial_state.shape)}"
            )
        h = initial_state.to(cdt)

    steps = range(L - 1, -1, -1) if reverse else range(L)
    hs: list[torch.Tensor | None] = [None] * L
    for t in steps:
        h = a_c[..., t] * h + b_c[..., t]
        hs[t] = h
    if L > 0:
        out = torch.stack(hs, dim=-1)  # type: ignore[arg-type]
    else:
        out = torch.zeros(a.shape, dtype=cdt, device=a.device)
    out = out.to(b.dtype)
    if return_last_state:
        if initial_state is not None and L == 0:
            h = h.clone()
        return out, h
    return out


# ---------------------------------------------------------------------------------------
# 2.2 selective scan (Mamba-1)
# ---------------------------------------------------------------------------------------


def _expand_bc(X: torch.Tensor, name: str, batch: int, dim: int, L: int) -> torch.Tensor:
    """Bring B or C to shape (batch or 1, dim, N, L or 1) (broadcastable)."""
    if X.dim() == 2:  # (dim, N) constant
        if X.shape[0] != dim:
            raise ValueError(f"{name}: constant form must be (dim={dim}, N)")
        return X[None, :, :, None]
    if X.dim() == 3:  # (batch, N, L) variable
        if X.shape[0] != batch or X.shape[2] != L:
            raise ValueError(f"{name}: variable form must be (batch={batch}, N, L={L})")
        return X[:, None, :, :]
    if X.dim() == 4:  # (batch, G, N, L) grouped
        G = X.shape[1]
        if X.shape[0] != batch or X.shape[3] != L or G == 0 or dim % G != 0:
            raise ValueError(f"{name}: grouped form must be (batch={batch}, G | {dim}, N, L={L})")
        return X.repeat_interleave(dim // G, dim=1)
    raise ValueError(f"{name}: expected 2, 3 or 4 dimensions, got {X.dim()}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """Mamba-1 selective scan, ``mamba_ssm.selective_scan_ref`` semantics (SPEC §2.2).

    Shapes: ``u, delta, z`` ``(batch, dim, L)``; ``A`` ``(dim, N)``; ``B``/``C`` each
    ``(dim, N)`` (constant), ``(batch, N, L)`` (variable) or ``(batch, G, N, L)`` (grouped,
    channel ``d`` uses group ``d // (dim // G)``); ``D``, ``delta_bias`` ``(dim,)``;
    ``initial_state`` ``(batch, dim, N)``; ``seq_idx`` ``(batch, L)`` integer.

    ::

        Δ_t      = delta_t + delta_bias          (then softplus_thresholded if delta_softplus)
        h_t[d,n] = exp(Δ_t[d] A[d,n]) h_{t-1}[d,n] + Δ_t[d] B_t[n] u_t[d]
        y_t[d]   = Σ_n C_t[n] h_t[d,n] + D[d] u_t[d]
        out_t[d] = y_t[d] * silu(z_t[d])         (if z is given)

    ``h_0 = initial_state`` (default zeros). Where ``seq_idx[b, t] != seq_idx[b, t-1]``
    (``t >= 1``) a new packed sequence starts: ``h_{t-1}`` is replaced by zero before the
    update at ``t``.

    Returns ``out`` (dtype of ``u``) or ``(out, last_state)`` with ``last_state = h_L``
    ``(batch, dim, N)`` in the compute dtype (the initial state, or zeros, when ``L = 0``).
    """
    if u.dim() != 3:
        raise ValueError("u must be (batch, dim, L)")
    batch, dim, L = u.shape
    N = A.shape[-1]
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u_c = u.to(cdt)
    dt = delta.to(cdt)
    A_c = A.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = softplus_thresholded(dt)
    Bx = _expand_bc(B.to(cdt), "B", batch, dim, L)  # (b|1, dim, N, L|1)
    Cx = _expand_bc(C.to(cdt), "C", batch, dim, L)

    if initial_state is None:
        h = torch.zeros((batch, dim, N), dtype=cdt, device=u.device)
    else:
        h = initial_state.to(cdt)
    reset = None
    if seq_idx is not None:
        reset = torch.zeros((batch, L), dtype=torch.bool, device=u.device)
        if L > 1:
            reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]

    ys = []
    for t in range(L):
        Bt = Bx[..., t if Bx.shape[-1] > 1 else 0]  # (b|1, dim, N)
        Ct = Cx[..., t if Cx.shape[-1] > 1 else 0]
        dt_t = dt[:, :, t, None]  # (batch, dim, 1)
        if reset is not None:
            keep = (~reset[:, t]).to(cdt)[:, None, None]
            h = h * keep
        h = torch.exp(dt_t * A_c) * h + dt_t * Bt * u_c[:, :, t, None]
        ys.append((h * Ct).sum(-1))  # (batch, dim)
    if L > 0:
        y = torch.stack(ys, dim=-1)
    else:
        y = torch.zeros((batch, dim, 0), dtype=cdt, device=u.device)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(u.dtype)
    if return_last_state:
        if L == 0 and initial_state is not None:
            h = h.clone()
        return out, h
    return out


# ---------------------------------------------------------------------------------------
# 2.3 streaming step (selective_state_update)
# ---------------------------------------------------------------------------------------


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    *,
    intermediate_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Streaming step(s) of the selective SSM, in place (mamba_ssm semantics, SPEC §2.3).

    Layouts (``Bt`` = batch rows, ``S`` = state slots, ``T`` = tokens):

    ============  ==========================  ==============================
    argument      channel layout              heads layout
    ============  ==========================  ==============================
    state         (S, dim, N)                 (S, H, P, N)
    x, dt, z      (Bt, dim) / (Bt, T, dim)    (Bt, H, P) / (Bt, T, H, P)
    A             (dim, N)                    (H, P, N)
    B, C          (Bt, N) or (Bt, G, N), with an extra T axis after Bt if multi-token
    D, dt_bias    (dim,)                      (H, P)
    ============  ==========================  ==============================

    Groups: ``G`` divides ``dim`` (channel layout) or ``H`` (heads layout); channel/head
    ``k`` uses group ``k // (dim_or_H // G)``. The multi-token form is detected by
    ``x.dim() == state.dim()``.

    Row ``i`` reads and writes ``state[state_batch_indices[i]]`` (default: slot ``i``, and
    then ``S`` must equal the batch). A negative index marks a padding row: its output is
    zero and nothing is written. For each token::

        Δ = softplus_thresholded(dt + dt_bias) if dt_softplus else dt + dt_bias
        h = exp(Δ A) h + Δ B x ;  y = Σ_n C h + D x ;  out = y * silu(z)

    ``state`` receives the state after the last token (cast to its dtype). If
    ``intermediate_states`` (``(Bt, T, *state.shape[1:])``, multi-token only) is given,
    ``intermediate_states[i, t]`` receives the state after token ``t`` of row ``i``.
    Returns ``out`` shaped like ``x``, in ``x``'s dtype.
    """
    heads = state.dim() == 4
    if state.dim() not in (3, 4):
        raise ValueError("state must be (S, dim, N) or (S, H, P, N)")
    multi = x.dim() == state.dim()
    S = state.shape[0]
    N = state.shape[-1]
    if heads:
        H, P = state.shape[1], state.shape[2]
    else:
        # channel layout == heads layout with one channel per head
        H, P = state.shape[1], 1
    batch = x.shape[0]
    cdt = _compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)

    # canonical shapes: x, dt, z (batch, T, H, P); B, C (batch, T, G, N)
    def tok(t_: torch.Tensor) -> torch.Tensor:
        t_ = t_.to(cdt)
        if not multi:
            t_ = t_.unsqueeze(1)
        return t_.reshape(batch, t_.shape[1], H, P)

    def grp(t_: torch.Tensor) -> torch.Tensor:
        t_ = t_.to(cdt)
        if not multi:
            t_ = t_.unsqueeze(1)
        if t_.dim() == 3:  # (batch, T, N) -> one group
            t_ = t_.unsqueeze(2)
        return t_

    xs, dts = tok(x), tok(dt)
    zs = tok(z) if z is not None else None
    Bs, Cs = grp(B), grp(C)
    T = xs.shape[1]
    G = Bs.shape[2]
    if G == 0 or H % G != 0 or Cs.shape[2] != G:
        raise ValueError("B and C must have the same number of groups, dividing dim (or H)")
    heads_per_group = H // G
    A_c = A.to(cdt).reshape(H, P, N)
    D_c = D.to(cdt).reshape(H, P) if D is not None else None
    bias_c = dt_bias.to(cdt).reshape(H, P) if dt_bias is not None else None

    if state_batch_indices is None:
        if S != batch:
            raise ValueError("without state_batch_indices, state.shape[0] must equal batch")
        slots = list(range(batch))
    else:
        slots = [int(s) for s in state_batch_indices.tolist()]
        used = [s for s in slots if s >= 0]
        if any(s >= S for s in used):
            raise ValueError("state_batch_indices out of range")
        if len(set(used)) != len(used):
            raise ValueError("state_batch_indices has duplicate non-negative entries")

    out = torch.zeros((batch, T, H, P), dtype=cdt, device=x.device)
    with torch.no_grad():
        for i in range(batch):
            slot = slots[i]
            if slot < 0:
                continue  # padding row: output zero, nothing written
            h = state[slot].to(cdt).reshape(H, P, N)
            for t in range(T):
                delta = dts[i, t]
                if bias_c is not None:
                    delta = delta + bias_c
                if dt_softplus:
                    delta = softplus_thresholded(delta)
                # group of each head: (H, N)
                Bt = Bs[i, t].repeat_interleave(heads_per_group, dim=0)
                Ct = Cs[i, t].repeat_interleave(heads_per_group, dim=0)
                h = (
                    torch.exp(delta[..., None] * A_c) * h
                    + delta[..., None] * Bt[:, None, :] * xs[i, t][..., None]
                )
                y = (h * Ct[:, None, :]).sum(-1)
                if D_c is not None:
                    y = y + D_c * xs[i, t]
                if zs is not None:
                    y = y * F.silu(zs[i, t])
                out[i, t] = y
                if intermediate_states is not None:
                    intermediate_states[i, t].copy_(h.reshape(state.shape[1:]))
            state[slot].copy_(h.reshape(state.shape[1:]))
    return out.reshape(x.shape).to(x.dtype)


# ============================================================ companion (SPEC §4)
# (companion references go here)


def companion_scan(
    u: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Companion (canonical-form) scan, SPEC §4, one step at a time::

        s_t = sum_{i=1..n} alpha[..., t, i-1] s_{t-i} + beta_t u_t
        y_t = sum_{i=0..n-1} c[..., t, i] s_{t-i} + D u_t      (y_t = s_t + D u_t without c)

    ``u`` (B, D, L); ``alpha``/``c`` (B, D, L, n) or (D, n); ``beta`` (B, D, L) or (D,);
    ``D`` (D,); ``initial_state`` (B, D, n) = (s_0, s_{-1}, ..., s_{1-n}). Returns ``y``
    (dtype of ``u``) and, if asked, the final state (s_L, ..., s_{L-n+1}) in the compute
    dtype.
    """
    cdt = _compute_dtype(u, alpha, beta, c, D, initial_state)
    batch, dim, length = u.shape
    n = alpha.shape[-1]
    uc = u.to(cdt)

    def at(x, t):
        """Coefficients of step t, broadcast to (B, D[, n])."""
        if x is None:
            return None
        x = x.to(cdt)
        if x.dim() in (3, 4):  # per step
            return x[:, :, t]
        return x.expand(batch, *x.shape)

    # hist[k] = s_{t-k} before step t (k = 1..n); kept as a list, newest first.
    if initial_state is None:
        hist = [uc.new_zeros(batch, dim) for _ in range(n)]
    else:
        h0 = initial_state.to(cdt)
        hist = [h0[:, :, j] for j in range(n)]
    ys = []
    for t in range(length):
        a = at(alpha, t)
        b = at(beta, t)
        drive = uc[:, :, t] if b is None else b * uc[:, :, t]
        s = drive + sum(a[:, :, i] * hist[i] for i in range(n))
        hist = [s] + hist[:-1]
        if c is None:
            y = s
        else:
            ct = at(c, t)
            y = sum(ct[:, :, i] * hist[i] for i in range(n))
        if D is not None:
            y = y + D.to(cdt) * uc[:, :, t]
        ys.append(y)
    y = torch.stack(ys, dim=-1) if ys else uc.new_zeros(batch, dim, 0)
    y = y.to(u.dtype)
    if return_final_state:
        return y, torch.stack(hist, dim=-1)
    return y


# ============================================================ causal conv (SPEC §3)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution as a sum of shifted copies of x (no conv1d):
    ``y_t = bias + Σ_i weight[:, K-1-i] · x_{t-i}``, with ``x_{t-i}`` taken from
    ``initial_states`` (or zero) before the start and cut where ``seq_idx`` changes between
    t-i and t. Returns ``(out, final_states)`` in x's dtype; final_states are the last K-1
    inputs of ``cat(initial_states or zeros, x)``."""
    dtype_in = x.dtype
    cdt = _compute_dtype(x, weight, bias, initial_states)
    x, weight = x.to(cdt), weight.to(cdt)
    b, d, length = x.shape
    k = weight.shape[1]
    pad = initial_states.to(cdt) if initial_states is not None else x.new_zeros(b, d, k - 1)
    ext = torch.cat([pad, x], dim=-1)  # ext[..., j + K - 1] = x_j
    y = (
        x.new_zeros(b, d, length)
        if bias is None
        else bias.to(cdt)[None, :, None].expand(b, d, length)
    )
    if seq_idx is not None:
        # start[t] = first position of t's sequence
        change = torch.ones(b, length, dtype=torch.bool)
        change[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        pos = torch.arange(length).expand(b, length)
        start = torch.cummax(torch.where(change, pos, torch.zeros_like(pos)), dim=1).values
    for i in range(k):
        shifted = ext[..., k - 1 - i : k - 1 - i + length]
        term = weight[None, :, k - 1 - i, None] * shifted
        if seq_idx is not None:
            ok = (torch.arange(length)[None, :] - i) >= start
            term = term * ok[:, None, :].to(cdt)
        y = y + term
    if activation in ("silu", "swish"):
        y = F.silu(y)
    final = ext[..., ext.shape[-1] - (k - 1) :]
    return y.to(dtype_in), final.to(dtype_in)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """causal-conv1d's ``causal_conv1d_update_ref`` semantics, row by row, plus a slot
    pool (``conv_state_indices``; negative = padding row: zero output, no write). Updates
    ``conv_state`` in place."""
    dtype_in = x.dtype
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    b, d, ntok = x.shape
    k = weight.shape[1]
    s = conv_state.shape[-1]
    cdt = _compute_dtype(x, weight, bias, conv_state)
    w = weight.to(cdt)
    out = torch.zeros(b, d, ntok, dtype=cdt)
    for i in range(b):
        slot = i if conv_state_indices is None else int(conv_state_indices[i])
        if slot < 0:
            continue
        st = conv_state[slot].to(cdt)
        xi = x[i].to(cdt)
        if cache_seqlens is None:
            full = torch.cat([st, xi], dim=-1)
            conv_state[slot].copy_(full[:, full.shape[-1] - s :])
        else:
            c = int(cache_seqlens[i])
            idx = [(c - (k - 1) + j) % s for j in range(k - 1)]
            full = torch.cat([st[:, idx], xi], dim=-1)
            new = st.clone()
            for t in range(ntok if s else 0):
                new[:, (c + t) % s] = xi[:, t]
            conv_state[slot].copy_(new)
        y = F.conv1d(full[None], w[:, None, :], None if bias is None else bias.to(cdt), groups=d)
        out[i] = y[0, :, -ntok:] if ntok else y[0, :, :0]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    if squeeze:
        out = out.squeeze(-1)
    return out.to(dtype_in)


# ============================================================ bilinear (SPEC §5)


def bilinear_scan(
    u: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    N: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Bilinear / time-varying dense scan, one step at a time (SPEC §5).

    ``x_t = A_t x_{t-1} + B u_t``, ``y_t = C x_t + D u_t`` with ``A_t = A + Σ_j v_{t,j}
    N_j`` (``A (n, n)``, ``N (m, n, n)``, ``v (batch, L, m)`` defaulting to ``u``) or
    ``A_t = A[:, t]`` for ``A (batch, L, n, n)``. ``u (batch, L, p)``, ``B (n, p)``,
    ``C (q, n)``, ``D (q, p)``, ``initial_state (batch, n)``. Returns ``y`` (the states
    when ``C`` is None) in ``u``'s dtype, and the final state in the compute dtype when
    ``return_final_state``.
    """
    cdt = _compute_dtype(u, A, B, C, D, N, v, initial_state)
    batch, L, _ = u.shape
    uc, Ac, Bc = u.to(cdt), A.to(cdt), B.to(cdt)
    n = Bc.shape[0]
    if N is not None and v is None:
        v = u
    x = (
        torch.zeros(batch, n, dtype=cdt, device=u.device)
        if initial_state is None
        else initial_state.to(cdt)
    )
    xs = []
    for t in range(L):
        if Ac.dim() == 4:
            At = Ac[:, t]
        else:
            At = Ac.expand(batch, n, n)
            if N is not None:
                At = At + torch.einsum("bm,mij->bij", v[:, t].to(cdt), N.to(cdt))
        x = torch.einsum("bij,bj->bi", At, x) + uc[:, t] @ Bc.T
        xs.append(x)
    states = torch.stack(xs, 1) if L > 0 else torch.zeros(batch, 0, n, dtype=cdt)
    if C is None:
        y = states
    else:
        y = states @ C.to(cdt).T
        if D is not None:
            y = y + uc @ D.to(cdt).T
    y = y.to(u.dtype)
    if return_final_state:
        return y, (x.clone() if L == 0 else x)
    return y


# ============================================================ eidetic (SPEC §6)


def innovation_scores_ref(
    y: torch.Tensor,
    taps: int | None = None,
    weights: torch.Tensor | None = None,
    metric: str = "mse",
    history: torch.Tensor | None = None,
    chi2_rate: float = 1.0 / 16.0,
    chi2_floor: float = 1e-6,
) -> torch.Tensor:
    """Innovation scores (SPEC §6.1) one position at a time in float64, returned in
    float64 ``(batch, L)``. ``history (batch, h, d)``: outputs before ``y`` (oldest first);
    a position with ``a < k`` predecessors uses the first ``a`` taps rescaled by
    ``S_k / S_a``; ``"chi2"`` divides by the bias-corrected EMA of past innovations
    (``v = ε_t`` when there is none), floored at ``chi2_floor``."""
    k = (len(weights) if weights is not None else 4) if taps is None else taps
    c = (
        torch.full((k,), 1.0 / k, dtype=torch.float64)
        if weights is None
        else weights.detach().to(torch.float64)
    )
    y64 = y.detach().to(torch.float64)
    batch, L, d = y64.shape
    prev = (
        history.detach().to(torch.float64)
        if history is not None
        else torch.zeros(batch, 0, d, dtype=torch.float64)
    )
    ext = torch.cat([prev, y64], dim=1)
    h = prev.shape[1]
    total = float(c.sum())
    out = torch.zeros(batch, L, dtype=torch.float64)
    m = torch.zeros(batch, dtype=torch.float64)
    z = 0.0
    for t in range(L):
        i = h + t
        a = min(i, k)
        part = float(c[:a].sum())
        f = 1.0 if (a == k or part == 0.0) else total / part
        pred = torch.zeros(batch, d, dtype=torch.float64)
        for j in range(1, a + 1):
            pred = pred + c[j - 1] * f * ext[:, i - j]
        eps = ((ext[:, i] - pred) ** 2).mean(-1) if d else torch.zeros(batch, dtype=torch.float64)
        if metric == "chi2":
            v = m / z if z > 0 else eps
            out[:, t] = eps / torch.clamp(v, min=chi2_floor)
        else:
            out[:, t] = eps
        m = (1 - chi2_rate) * m + chi2_rate * eps
        z = (1 - chi2_rate) * z + chi2_rate
    return out


def eidetic_held_ref(
    scores: torch.Tensor, upto: int, capacity: int, policy: str = "topk", threshold: float = 0.0
) -> torch.Tensor:
    """Positions held after consuming ``scores[:, :upto]`` (SPEC §6.2), by brute force:
    ``"topk"`` ranks all past positions by (score desc, position asc) and keeps the first
    ``capacity``; ``"threshold"`` does so among scores > threshold; ``"fifo"`` keeps the
    last ``capacity`` positions with score > threshold. Returns ``(batch, capacity)``
    int64, sorted ascending, padded with -1."""
    rows = []
    for row in scores.detach().to(torch.float64).tolist():
        cand = [t for t in range(upto) if policy == "topk" or row[t] > threshold]
        if policy == "fifo":
            keep = cand[max(0, len(cand) - capacity) :]
        else:
            keep = sorted(cand, key=lambda t: (-row[t], t))[:capacity]
        keep = sorted(keep)
        rows.append(keep + [-1] * (capacity - len(keep)))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), capacity)


def eidetic_select_ref(
    scores: torch.Tensor, capacity: int, chunk: int, policy: str = "topk", threshold: float = 0.0
) -> torch.Tensor:
    """For each chunk start ``s = 0, chunk, 2 chunk, ... < L``: ``eidetic_held_ref`` of the
    positions ``< s``; ``(batch, n_chunks, capacity)`` int64."""
    batch, L = scores.shape
    starts = range(0, L, chunk)
    held = [eidetic_held_ref(scores, s, capacity, policy, threshold) for s in starts]
    if not held:
        return torch.zeros(batch, 0, capacity, dtype=torch.int64)
    return torch.stack(held, dim=1)


# ============================================================ B'MOJO layer (SPEC §6.3)


def selective_ssm_ref(ssm, u: torch.Tensor) -> torch.Tensor:
    """The Mamba-1 mixer ``bmojo_core.layers.SelectiveSSM`` from its parameters, with
    :func:`causal_conv1d` and :func:`selective_scan` (``u (batch, L, d_model)``)."""
    xz = F.linear(u, ssm.in_proj.weight, ssm.in_proj.bias).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x, _ = causal_conv1d(x, ssm.conv_weight, ssm.conv_bias, activation="silu")
    dbc = F.linear(x.transpose(1, 2), ssm.x_proj.weight)
    dt, b, c = dbc.split((ssm.dt_rank, ssm.d_state, ssm.d_state), dim=-1)
    delta = F.linear(dt, ssm.dt_proj.weight).transpose(1, 2)
    y = selective_scan(
        x, delta, -torch.exp(ssm.A_log), b.transpose(1, 2), c.transpose(1, 2), ssm.D, z,
        delta_bias=ssm.dt_proj.bias, delta_softplus=True,
    )  # fmt: skip
    return F.linear(y.transpose(1, 2), ssm.out_proj.weight, ssm.out_proj.bias)


def bmojo_layer_ref(layer, u: torch.Tensor) -> torch.Tensor:
    """``bmojo_core.layers.BMojoLayer`` from its parameters by dense masked attention over
    the whole sequence (an ``L × 3L`` mask; for tests and as the benchmark baseline).

    Keys of query t: every input token j (allowed iff ``t-w < j ≤ t``), every SSM output
    j (allowed iff ``s-m_f ≤ j < s``, ``s = w·(t // w)`` the chunk start) and every input
    token j again as an eidetic token (allowed iff j is held by the store built from the
    positions ``< s``: :func:`eidetic_held_ref` over :func:`innovation_scores_ref`).
    Keys/values share one projection; softmax over the allowed keys; output projection.
    With ``window = 0`` the output is the SSM output."""
    y = selective_ssm_ref(layer.ssm, u) if layer.ssm is not None else None
    w, mf, me = layer.window, layer.n_fading, layer.n_eidetic
    if w == 0:
        return y
    attn = layer.attn
    batch, L, d = u.shape
    t = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    s = (t // w) * w
    keys = [u]
    masks = [((j <= t) & (j > t - w)).expand(batch, L, L)]
    if mf:
        keys.append(y)
        masks.append(((j >= s - mf) & (j < s)).expand(batch, L, L))
    if me:
        sc = innovation_scores_ref(y, taps=layer.innovation_taps, metric=layer.innovation_metric)
        em = torch.zeros(batch, L, L, dtype=torch.bool)
        for c0 in range(0, L, w):
            h = eidetic_held_ref(sc, c0, me, layer.eidetic_policy, layer.eidetic_threshold)
            row = torch.zeros(batch, L + 1, dtype=torch.bool)
            row.scatter_(1, torch.where(h >= 0, h, L), True)  # -1 → the spare column L
            em[:, c0 : c0 + w] = row[:, None, :L]
        keys.append(u)
        masks.append(em)
    tokens = torch.cat(keys, dim=1)
    mask = torch.cat(masks, dim=2)
    wq, wk, wv = attn.qkv.weight.chunk(3, dim=0)
    bq, bk, bv = (None,) * 3 if attn.qkv.bias is None else attn.qkv.bias.chunk(3)
    H = attn.n_heads
    q = F.linear(u, wq, bq).view(batch, L, H, -1).transpose(1, 2)
    k = F.linear(tokens, wk, bk).view(batch, tokens.shape[1], H, -1).transpose(1, 2)
    v = F.linear(tokens, wv, bv).view(batch, tokens.shape[1], H, -1).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    o = torch.softmax(logits, dim=-1) @ v
    o = o.transpose(1, 2).reshape(batch, L, d)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
