"""Layer oracles: :class:`~bmojo_core.layers.SelectiveSSM` and
:class:`~bmojo_core.layers.BMojoLayer` recomputed from their parameters with the op
references and dense masked attention (an ``L x 3L`` mask over the whole sequence)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops.reference import (
    causal_conv1d,
    eidetic_held_ref,
    innovation_scores_ref,
    selective_scan,
)

__all__ = ["bmojo_layer_ref", "selective_ssm_ref"]


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
        sc = torch.nan_to_num(sc, nan=torch.finfo(sc.dtype).min)  # as BMojoLayer.scores
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
