"""Reference diagonal scan (design §2.1) and Mamba-1 selective scan (design §2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import compute_dtype, softplus_thresholded

__all__ = ["diag_scan", "selective_scan"]


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
    cdt = compute_dtype(a, b, initial_state)
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
    """Mamba-1 selective scan, ``mamba_ssm.selective_scan_ref`` semantics (design §2.2).

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
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
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
