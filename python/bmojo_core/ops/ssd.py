"""The multi-head SSD scan of Mamba-2 (design §2.4), a drop-in for mamba_ssm's
``mamba_chunk_scan_combined``.

**Computation (interim).** An SSD head of width p is p channels of Mamba-1's selective
scan that share one scalar decay: ``A`` repeated over the head's channels and state
columns, ``dt`` over its channels, ``B``/``C`` grouped. This module maps the SSD onto the
selective-scan kernel (:func:`~bmojo_core.ops.scan.selective_scan_fn`: Rust, SIMD levels
chosen at run time, threads bitwise invariant, autograd, packed sequences), so every
property of that op carries over; a dedicated SSD kernel, which computes each decay once
per (token, head) instead of once per state element, is the next step and will not change
this function's contract. ``chunk_size`` is accepted for compatibility and ignored:
results do not depend on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate as V
from .conv import causal_conv1d_fn
from .scan import selective_scan_fn

__all__ = ["gated_rms_norm", "mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined"]


def _softplus(x: Tensor) -> Tensor:
    return torch.where(x > 20.0, x, F.softplus(x))  # mamba_ssm's threshold


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Mamba-2's SSD scan (design §2.4), mamba_ssm's signature and return conventions.

    ``x (b, l, h, p)``, ``dt (b, l, h)``, ``A (h,)``, ``B, C (b, l, g, n)`` with g | h,
    ``D (h,)`` or ``(h, p)``, ``z (b, l, h, p)`` (gate ``y · silu(z)``), ``dt_bias (h,)``,
    ``initial_states (b, h, p, n)``, ``seq_idx (b, l)`` int (packed sequences: the state
    restarts from zero where it changes), ``cu_seqlens (s + 1,)`` int (batch 1: sequence
    boundaries, used as ``seq_idx`` when that is not given), ``dt_limit`` clamps Δ after
    the softplus. Returns ``out (b, l, h, p)`` (x's dtype), then ``final_states
    (b, h, p, n)`` if ``return_final_states``, then ``varlen_states (s, h, p, n)`` (the
    state after each sequence of ``cu_seqlens``) if ``return_varlen_states``. States are in
    the compute dtype (float64 for float64 inputs, else float32). Differentiable in every
    floating input, through the returned states too.
    """
    V.device_tensor("x", x)
    V.shape("x", x, (None, None, None, None), "(batch, L, heads, head_dim)")
    b, length, h, p = x.shape
    V.device_tensor("dt", dt)
    V.shape("dt", dt, (b, length, h), "(batch, L, heads)")
    V.device_tensor("A", A)
    V.shape("A", A, (h,), "(heads,): one decay rate per head")
    V.device_tensor("B", B)
    V.shape("B", B, (b, length, None, None), "(batch, L, groups, N)")
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g or n == 0:
        raise V.BmojoValueError(
            f"B: expected groups dividing heads={h} and N >= 1, got shape {tuple(B.shape)}"
        )
    V.device_tensor("C", C)
    V.shape("C", C, (b, length, g, n), "(batch, L, groups, N) like B")
    V.int_arg("chunk_size", chunk_size, 1)
    if D is not None:
        V.device_tensor("D", D)
        if tuple(D.shape) not in ((h,), (h, p)):
            raise V.BmojoValueError(f"D: expected shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    for name, t, shp, desc in (
        ("z", z, (b, length, h, p), "(batch, L, heads, head_dim) like x"),
        ("dt_bias", dt_bias, (h,), "(heads,)"),
        ("initial_states", initial_states, (b, h, p, n), "(batch, heads, head_dim, N)"),
    ):
        if t is not None:
            V.device_tensor(name, t)
            V.shape(name, t, shp, desc)
    if seq_idx is not None:
        V.device_tensor("seq_idx", seq_idx, dtypes=V.INTS)
        V.shape("seq_idx", seq_idx, (b, length), "(batch, L)")
    lo, hi = _limit(dt_limit)
    seqs = None
    if cu_seqlens is not None:
        seqs = _boundaries(cu_seqlens, b, length)
        if seq_idx is None:
            seq_idx = torch.repeat_interleave(
                torch.arange(len(seqs) - 1, device=x.device), torch.tensor(seqs).diff()
            )[None]
    elif return_varlen_states:
        raise V.BmojoValueError("return_varlen_states: needs cu_seqlens")
    if return_varlen_states:
        return _varlen(x, dt, A, B, C, D, z, dt_bias, initial_states, seqs, dt_softplus,
                       (lo, hi), return_final_states)  # fmt: skip
    out, last = _scan(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                      (lo, hi))  # fmt: skip
    return (out, last) if return_final_states else out


def _limit(dt_limit) -> tuple[float, float]:
    try:
        lo, hi = dt_limit
    except (TypeError, ValueError):
        raise V.BmojoTypeError(f"dt_limit: expected (low, high), got {dt_limit!r}") from None
    lo, hi = V.number_arg("dt_limit[0]", lo), V.number_arg("dt_limit[1]", hi)
    if not (0.0 <= lo <= hi) or math.isnan(hi):
        raise V.BmojoValueError(f"dt_limit: expected 0 <= low <= high, got ({lo}, {hi})")
    return lo, hi


def _boundaries(cu: Tensor, b: int, length: int) -> list[int]:
    V.device_tensor("cu_seqlens", cu, dtypes=V.INTS)
    if cu.dim() != 1 or cu.numel() < 2:
        raise V.BmojoValueError(f"cu_seqlens: expected (n_seqs + 1,), got {tuple(cu.shape)}")
    if b != 1:
        raise V.BmojoValueError(f"cu_seqlens: needs batch 1 (packed sequences), got batch {b}")
    s = cu.tolist()
    if s[0] != 0 or s[-1] != length or any(a > c for a, c in zip(s, s[1:], strict=False)):
        raise V.BmojoValueError(
            f"cu_seqlens: expected non-decreasing offsets from 0 to L={length}, got {s}"
        )
    return s


def _scan(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx, softplus, limit):
    """The SSD as a selective scan over h·p channels (see the module doc)."""
    b, length, h, p = x.shape
    n = B.shape[3]
    dim = h * p
    u = x.permute(0, 2, 3, 1).reshape(b, dim, length)
    lo, hi = limit
    bias = None
    if (lo, hi) != (0.0, math.inf):
        # The clamp comes after the softplus: applied here, the kernel gets Δ itself.
        d = dt if dt_bias is None else dt + dt_bias.to(dt.dtype)
        d = (_softplus(d) if softplus else d).clamp(min=lo, max=hi)
        softplus = False
    else:
        d = dt
        bias = None if dt_bias is None else dt_bias.repeat_interleave(p)
    delta = d.permute(0, 2, 1).repeat_interleave(p, dim=1)
    a = A.repeat_interleave(p)[:, None].expand(dim, n)
    dd = None if D is None else (D.repeat_interleave(p) if D.dim() == 1 else D.reshape(dim))
    zz = None if z is None else z.permute(0, 2, 3, 1).reshape(b, dim, length)
    init = None if h0 is None else h0.reshape(b, dim, n)
    out, last = selective_scan_fn(
        u, delta.to(u.dtype), a, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), dd, zz, bias,
        bool(softplus), True, initial_state=init, seq_idx=seq_idx,
    )  # fmt: skip
    return out.reshape(b, h, p, length).permute(0, 3, 1, 2), last.reshape(b, h, p, n)


def _varlen(x, dt, A, B, C, D, z, dt_bias, h0, seqs, softplus, limit, final):
    """One scan per sequence of ``cu_seqlens`` (batch 1): the outputs and each
    sequence's final state (a zero-length one keeps the state before it)."""
    outs, states = [], []
    _, _, h, p = x.shape
    n = B.shape[3]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    last = h0[0].to(cdt) if h0 is not None else x.new_zeros(h, p, n, dtype=cdt)
    for i, (a, c) in enumerate(zip(seqs, seqs[1:], strict=False)):
        init = h0 if i == 0 else None
        if c == a:
            before = init[0] if init is not None else x.new_zeros(h, p, n, dtype=cdt)
            states.append(before.to(cdt))
            continue
        sl = slice(a, c)
        zs = None if z is None else z[:, sl]
        o, s = _scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D, zs, dt_bias, init, None,
                     softplus, limit)  # fmt: skip
        outs.append(o)
        states.append(s[0])
        last = s[0]
    out = torch.cat(outs, 1) if outs else x.new_zeros(x.shape)
    varlen = torch.stack(states)
    # The packed scan's final state: after the last sequence that has positions.
    return (out, last[None], varlen) if final else (out, varlen)


def gated_rms_norm(
    x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int,
    norm_before_gate: bool,
) -> Tensor:  # fmt: skip
    """Mamba-2's gated RMSNorm over groups of ``group_size`` of the last axis, in float32
    (float64 for float64 inputs): ``RMSNorm(x) · silu(z)`` if ``norm_before_gate``, else
    ``RMSNorm(x · silu(z))``; returns x's dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(cdt)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(cdt))
    *lead, d = h.shape
    g = h.reshape(*lead, d // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    h = g.reshape(*lead, d) * weight.to(cdt)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.to(cdt))
    return h.to(x.dtype)


def mamba_split_conv1d_scan_combined(
    zxbcdt: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    dt_bias: Tensor | None,
    A: Tensor,
    D: Tensor,
    chunk_size: int,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: Tensor | None = None,
    outproj_bias: Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
):
    """Mamba-2's fused block, mamba_ssm's signature: split ``zxbcdt (b, l, 2·dim + 2·g·n +
    h)`` into ``z``, ``xBC``, ``dt``; causal depthwise conv of ``xBC`` (``conv1d_weight
    (dim + 2·g·n, K)``, activation); split into ``x``, ``B``, ``C``; the SSD scan (Δ =
    softplus(dt + dt_bias), ``dt_limit``); then the gated RMSNorm with ``rmsnorm_weight
    (dim,)`` over groups of ``dim / ngroups`` (``norm_before_gate`` either way; without
    it the gate is ``y · silu(z)``), then ``outproj_weight (out, dim)``/``outproj_bias``.
    ``D (h,)`` needs ``headdim``; ``D (h, p)`` gives it. Returns ``out`` (and the final
    states ``(b, h, p, n)`` if ``return_final_states``). Differentiable in every input."""
    V.device_tensor("zxbcdt", zxbcdt)
    V.shape("zxbcdt", zxbcdt, (None, None, None), "(batch, L, 2*dim + 2*ngroups*N + heads)")
    V.device_tensor("D", D)
    if D.dim() == 2:
        h, p = D.shape
    elif D.dim() == 1:
        h = D.shape[0]
        if headdim is None:
            raise V.BmojoValueError("headdim: required when D has shape (heads,)")
        p = V.int_arg("headdim", headdim, 1)
    else:
        raise V.BmojoValueError(f"D: expected (heads,) or (heads, head_dim), got {tuple(D.shape)}")
    g = V.int_arg("ngroups", ngroups, 1)
    if h % g:
        raise V.BmojoValueError(f"ngroups: {g} must divide the number of heads {h}")
    b, length, total = zxbcdt.shape
    dim = h * p
    rest = total - 2 * dim - h
    if rest <= 0 or rest % (2 * g):
        raise V.BmojoValueError(
            f"zxbcdt: last axis {total} is not 2*dim + 2*ngroups*N + heads for dim={dim}, "
            f"heads={h}, ngroups={g}"
        )
    n = rest // (2 * g)
    z, xbc, dt = torch.split(zxbcdt, [dim, dim + 2 * g * n, h], dim=-1)
    xbc = causal_conv1d_fn(
        xbc.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx, activation=activation
    ).transpose(1, 2)
    x, B, C = torch.split(xbc, [dim, g * n, g * n], dim=-1)
    gate = z.reshape(b, length, h, p)
    out, last = mamba_chunk_scan_combined(
        x.reshape(b, length, h, p), dt.to(x.dtype), A, B.reshape(b, length, g, n),
        C.reshape(b, length, g, n), chunk_size, D=D, z=None if rmsnorm_weight is not None
        else gate, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
        dt_softplus=True, dt_limit=dt_limit, return_final_states=True,
    )  # fmt: skip
    out = out.reshape(b, length, dim)
    if rmsnorm_weight is not None:
        V.device_tensor("rmsnorm_weight", rmsnorm_weight)
        V.shape("rmsnorm_weight", rmsnorm_weight, (dim,), "(dim,)")
        eps = V.number_arg("rmsnorm_eps", rmsnorm_eps)
        out = gated_rms_norm(out, z, rmsnorm_weight, eps, dim // g, bool(norm_before_gate))
    if outproj_weight is not None:
        V.device_tensor("outproj_weight", outproj_weight)
        V.shape("outproj_weight", outproj_weight, (None, dim), "(out_dim, dim)")
        out = F.linear(out.to(outproj_weight.dtype), outproj_weight, outproj_bias)
    return (out, last) if return_final_states else out
