"""Mamba-1's fused block, a drop-in for mamba_ssm's ``mamba_inner_fn`` (design §2.2): the
causal conv, the x/Δ projections, the selective scan and the out-projection, composed from
this package's ops (so with their autograd, threads and SIMD levels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate as V
from .conv import causal_conv1d_fn
from .scan import selective_scan_fn

__all__ = ["mamba_inner_fn"]


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """mamba_ssm's RMS norm over the last axis, in float32 or wider (x's dtype back)."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    h = x.to(cdt)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(cdt)
    return h.to(x.dtype)


def mamba_inner_fn(
    xz: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    x_proj_weight: Tensor,
    delta_proj_weight: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    A: Tensor,
    B: Tensor | None = None,
    C: Tensor | None = None,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    B_proj_bias: Tensor | None = None,
    C_proj_bias: Tensor | None = None,
    delta_softplus: bool = True,
    checkpoint_lvl: int = 1,
    b_rms_weight: Tensor | None = None,
    c_rms_weight: Tensor | None = None,
    dt_rms_weight: Tensor | None = None,
    b_c_dt_rms_eps: float = 1e-6,
) -> Tensor:
    """Mamba-1's block, mamba_ssm's signature: ``xz (b, 2·d, L)`` split into ``x`` and the
    gate ``z``; ``x`` through the causal conv (``conv1d_weight (d, 1, K)`` or ``(d, K)``,
    SiLU); ``x_proj_weight (r + 2·n, d)`` gives Δ's low-rank input (``r`` =
    ``delta_proj_weight.shape[1]``, projected by ``delta_proj_weight (d, r)``) and, where
    ``B``/``C`` are None, the input-dependent ``B``, ``C`` (``+ B_proj_bias``/``C_proj_bias``;
    RMS-normalised with ``b_rms_weight``/``c_rms_weight``, and Δ with ``dt_rms_weight`` over
    ``d``, as mamba_ssm does); then the selective scan (``A (d, n)``, ``D``, ``delta_bias``,
    ``delta_softplus``, gate ``z``) and ``out_proj_weight (out, d)``/``out_proj_bias``.
    Returns ``(b, L, out)``. ``checkpoint_lvl`` is accepted for compatibility (the scan
    keeps its own checkpoints). Differentiable in every input."""
    V.device_tensor("xz", xz)
    V.shape("xz", xz, (None, None, None), "(batch, 2*dim, L)")
    b, d2, length = xz.shape
    if d2 % 2:
        raise V.BmojoValueError(f"xz: expected an even channel count (x and z), got {d2}")
    d = d2 // 2
    V.device_tensor("conv1d_weight", conv1d_weight)
    if conv1d_weight.dim() == 3 and conv1d_weight.shape[1] == 1:
        conv1d_weight = conv1d_weight[:, 0]
    V.shape("conv1d_weight", conv1d_weight, (d, None), "(dim, 1, K) or (dim, K)")
    V.device_tensor("delta_proj_weight", delta_proj_weight)
    V.shape("delta_proj_weight", delta_proj_weight, (d, None), "(dim, dt_rank)")
    rank = delta_proj_weight.shape[1]
    V.device_tensor("A", A)
    V.shape("A", A, (d, None), "(dim, N)")
    n = A.shape[1]
    V.device_tensor("x_proj_weight", x_proj_weight)
    want_rows = rank + (n if B is None else 0) + (n if C is None else 0)
    V.shape("x_proj_weight", x_proj_weight, (want_rows, d), "(dt_rank + N·[B is None] + "
            "N·[C is None], dim)")  # fmt: skip
    V.device_tensor("out_proj_weight", out_proj_weight)
    V.shape("out_proj_weight", out_proj_weight, (None, d), "(out_dim, dim)")
    V.int_arg("checkpoint_lvl", checkpoint_lvl, 0)
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_fn(x, conv1d_weight, conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2).reshape(b * length, d), x_proj_weight)  # (b·L, ·)
    delta = (x_dbl[:, :rank] @ delta_proj_weight.t()).reshape(b, length, d)
    if dt_rms_weight is not None:
        delta = _rms(delta, dt_rms_weight, b_c_dt_rms_eps)
    delta = delta.transpose(1, 2)
    col = rank

    def var(given, bias, rms, name):
        nonlocal col
        if given is not None:
            return given
        m = x_dbl[:, col : col + n]
        col += n
        if bias is not None:
            m = m + bias.to(m.dtype)
        if rms is not None:
            m = _rms(m, rms, b_c_dt_rms_eps)
        return m.reshape(b, length, n).transpose(1, 2).contiguous()  # (b, N, L)

    Bm = var(B, B_proj_bias, b_rms_weight, "B")
    Cm = var(C, C_proj_bias, c_rms_weight, "C")
    y = selective_scan_fn(x, delta, A, Bm, Cm, D, z, delta_bias, bool(delta_softplus))
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
