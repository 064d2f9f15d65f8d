"""Reference streaming step of the selective SSM (design §2.3), in place, with a state
pool, padding rows and intermediate-state snapshots."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import compute_dtype, softplus_thresholded

__all__ = ["selective_state_update"]


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
    """Streaming step(s) of the selective SSM, in place (mamba_ssm semantics, design §2.3).

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
    cdt = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)

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
