"""Reference causal depthwise convolution and its decode update (design §3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import compute_dtype

__all__ = ["causal_conv1d", "causal_conv1d_update"]


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
    cdt = compute_dtype(x, weight, bias, initial_states)
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
    cdt = compute_dtype(x, weight, bias, conv_state)
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
