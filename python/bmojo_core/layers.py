"""B'MOJO layers (SPEC §6.3) as torch ``nn.Module``s built on bmojo_core's kernels.

* :class:`SelectiveSSM` — the Mamba-1 mixer (in_proj, depthwise causal conv + SiLU,
  x_proj → (Δ, B, C), dt_proj, selective scan with z gate, out_proj) with Mamba's
  initialisation.
* :class:`SlidingWindowAttention` — multi-head attention of each query to the previous
  ``window`` tokens (itself included) and to a per-chunk block of memory tokens.
* :class:`BMojoLayer` — fading memory (SSM), innovation-selected eidetic tokens and a
  sliding window, read out by attention.
* :class:`BMojoLM` — embedding, pre-norm residual blocks (B'MOJO layer + MLP), final norm,
  head tied to the embedding; ``model.stream(batch_size)`` opens a streaming decoder
  (:mod:`bmojo_core.stream`).

**How the SSM output reaches the layer output.** With ``window > 0`` the layer output is
the attention output: the SSM feeds it through the ``n_fading`` fading tokens (keys/values
of its outputs ``y_{s-m_f..s-1}``) and, through the innovation scores, decides which past
tokens become eidetic memory. With ``window = 0`` the layer is a pure SSM and its output is
the SSM output. With ``n_fading = n_eidetic = 0`` the SSM is not built (pure sliding-window
attention). With ``n_fading = 0 < n_eidetic`` the SSM only drives the (non-differentiable)
selection, so its parameters get no gradient.

**Parallel forward.** Chunks of ``w = window`` positions; chunk ``c`` (start ``s = c·w``)
has queries ``s..s+w-1`` and keys ``[memory (m_e + m_f), previous chunk (w), this chunk
(w)]`` with a mask (window ``[t-w+1, t]``, absent memory slots). One batched SDPA call over
``batch × chunks``: cost linear in L, never an L×L matrix. Eidetic payloads are the input
tokens U at the held positions, projected by the same K/V projections as the window
tokens; fading tokens are the SSM outputs, projected likewise. No positional encoding.

**Streaming** (per layer, all plain tensors; see :mod:`bmojo_core.stream`): conv and SSM
states (updated in place by ``causal_conv1d_update`` / ``selective_state_update``), the
innovation state (last k outputs, count, χ² average), the eidetic store (positions/scores
heap) and the keys/values of held tokens, a ring buffer of the last ``w`` keys/values, a
ring of the last ``m_f`` SSM outputs, and the memory block of the current chunk, refreshed
when a row reaches a chunk boundary exactly as in the parallel forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _core
from . import _validate as V
from .conv import causal_conv1d_fn, causal_conv1d_update
from .eidetic import (
    CHI2_FLOOR,
    CHI2_RATE,
    POLICIES,
    eidetic_select,
    gather_positions,
    innovation_scores,
)
from .scan import selective_scan_fn
from .step import selective_state_update

__all__ = ["BMojoLM", "BMojoLayer", "SelectiveSSM", "SlidingWindowAttention"]


def _int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise V.BmojoTypeError(f"{name}: expected an int >= {lo}, got {v!r}")
    if v < lo:
        raise V.BmojoValueError(f"{name}: expected an int >= {lo}, got {v}")
    return v


def _check_input(name: str, x: object, d_model: int, dtype: torch.dtype) -> Tensor:
    V.tensor(name, x)
    V.shape(name, x, (None, None, d_model), "(batch, L, d_model)")
    if x.dtype != dtype:  # type: ignore[union-attr]
        raise V.BmojoTypeError(
            f"{name}: expected dtype {V.dtype_name(dtype)} like the layer's parameters, "
            f"got {V.dtype_name(x.dtype)}"  # type: ignore[union-attr]
        )
    return x  # type: ignore[return-value]


# ----------------------------------------------------------------------------- SSM


class SelectiveSSM(nn.Module):
    """Mamba-1 mixer: ``(batch, L, d_model) → (batch, L, d_model)``.

    ``d_inner = expand · d_model``; ``dt_rank = ceil(d_model / 16)`` by default. Init as
    Mamba: dt_proj weight uniform ±dt_rank^-½, its bias the inverse softplus of Δ drawn
    log-uniformly in ``[dt_min, dt_max]`` (floored at ``dt_init_floor``), ``A_log =
    log(1..N)`` (S4D-real), ``D = 1``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model = _int("d_model", d_model, 1)
        self.d_state = _int("d_state", d_state, 1)
        self.d_conv = _int("d_conv", d_conv, 1)
        self.d_inner = _int("expand", expand, 1) * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else _int("dt_rank", dt_rank, 1)
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias, **fk)
        conv = nn.Conv1d(di, di, d_conv, groups=di, bias=conv_bias, **fk)  # for its init
        self.conv_weight = nn.Parameter(conv.weight.detach()[:, 0, :].clone())
        self.conv_bias = nn.Parameter(conv.bias.detach().clone()) if conv_bias else None
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True, **fk)
        with torch.no_grad():
            std = self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(
                torch.rand(di, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, d_state + 1, dtype=torch.float64).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(a).to(self.dt_proj.weight.dtype))
        self.D = nn.Parameter(torch.ones(di, **fk))
        self.out_proj = nn.Linear(di, d_model, bias=bias, **fk)

    def _proj(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (batch, L, d_inner) after the conv → (Δ raw (batch, L, di), B, C (batch, L, N))."""
        r, n = self.dt_rank, self.d_state
        dbc = self.x_proj(x)
        dt, b, c = dbc.split((r, n, n), dim=-1)
        return F.linear(dt, self.dt_proj.weight), b, c

    def forward(self, u: Tensor) -> Tensor:
        """Parallel forward (bmojo_core's causal conv and selective scan)."""
        xz = self.in_proj(u).transpose(1, 2)  # (batch, 2 di, L)
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d_fn(x, self.conv_weight, self.conv_bias, activation="silu")
        delta, b, c = self._proj(x.transpose(1, 2))
        y = selective_scan_fn(
            x, delta.transpose(1, 2), -torch.exp(self.A_log), b.transpose(1, 2),
            c.transpose(1, 2), self.D, z, delta_bias=self.dt_proj.bias, delta_softplus=True,
        )  # fmt: skip
        return self.out_proj(y.transpose(1, 2))

    def init_state(self, batch: int) -> dict[str, Tensor]:
        w = self.conv_weight
        return {
            "conv": w.new_zeros(batch, self.d_inner, max(self.d_conv - 1, 0)),
            "ssm": w.new_zeros(batch, self.d_inner, self.d_state),
        }

    @torch.no_grad()
    def step(self, u: Tensor, state: dict[str, Tensor]) -> Tensor:
        """Streaming: ``u (batch, T, d_model)``; updates ``state['conv']`` and
        ``state['ssm']`` in place; returns ``(batch, T, d_model)``."""
        if u.shape[1] == 1:
            return self._step1(u[:, 0], state)[:, None]
        xz = self.in_proj(u)
        x, z = xz.chunk(2, dim=-1)
        x = causal_conv1d_update(
            x.transpose(1, 2).contiguous(), state["conv"], self.conv_weight, self.conv_bias,
            activation="silu",
        ).transpose(1, 2)  # fmt: skip
        x = x.contiguous()
        delta, b, c = self._proj(x)
        y = selective_state_update(
            state["ssm"], x, delta.contiguous(), -torch.exp(self.A_log), b.contiguous(),
            c.contiguous(), self.D, z.contiguous(), self.dt_proj.bias, True,
        )  # fmt: skip
        return self.out_proj(y)

    def _step1(self, u: Tensor, state: dict[str, Tensor]) -> Tensor:
        """One token ``u (batch, d_model)``: the decode path (single-token kernel forms)."""
        di = self.d_inner
        xz = self.in_proj(u)
        x = causal_conv1d_update(
            xz[:, :di].contiguous(), state["conv"], self.conv_weight, self.conv_bias,
            activation="silu",
        )  # fmt: skip
        delta, b, c = self._proj(x)
        y = selective_state_update(
            state["ssm"], x, delta, -torch.exp(self.A_log), b.contiguous(), c.contiguous(),
            self.D, xz[:, di:].contiguous(), self.dt_proj.bias, True,
        )  # fmt: skip
        return self.out_proj(y)


# ----------------------------------------------------------------------------- attention


class SlidingWindowAttention(nn.Module):
    """Multi-head attention of position t to the input tokens ``[t-window+1, t]`` and to a
    per-chunk block of memory tokens (chunks of ``window`` positions). No positional
    encoding. Keys/values of memory tokens use the same projections as input tokens."""

    def __init__(
        self, d_model: int, window: int, n_heads: int | None = None, bias: bool = False,
        device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        self.d_model = _int("d_model", d_model, 1)
        self.window = _int("window", window, 1)
        if n_heads is None:
            n_heads = max(1, d_model // 64)
        self.n_heads = _int("n_heads", n_heads, 1)
        if d_model % n_heads:
            raise V.BmojoValueError(f"n_heads: {n_heads} does not divide d_model={d_model}")
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, device=device, dtype=dtype)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``(..., d_model)`` of tokens ``x (..., d_model)``."""
        d = self.d_model
        w = self.qkv.weight[d:]
        b = None if self.qkv.bias is None else self.qkv.bias[d:]
        return F.linear(x, w, b).chunk(2, dim=-1)

    def _heads(self, x: Tensor) -> Tensor:  # (n, T, d) → (n, H, T, hd)
        n, t, _ = x.shape
        return x.view(n, t, self.n_heads, -1).transpose(1, 2)

    def forward(
        self, x: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None
    ) -> Tensor:
        """``x (batch, L, d_model)``; ``memory (batch, n_chunks, m, d_model)`` tokens seen by
        every query of chunk c = t // window, ``memory_mask (batch, n_chunks, m)`` bool
        (False = absent). Returns ``(batch, L, d_model)``."""
        b, length, d = x.shape
        w = self.window
        nc = -(-length // w)
        if length == 0:
            return self.out_proj(x)
        pad = nc * w - length
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = F.pad(q, (0, 0, 0, pad)).reshape(b * nc, w, d)

        def windows(t: Tensor) -> Tensor:  # (b, L, d) → (b, nc, 2w, d): previous + this chunk
            t = F.pad(t, (0, 0, w, pad)).view(b, nc + 1, w, d)
            return torch.cat([t[:, :-1], t[:, 1:]], dim=2)

        kw, vw = windows(k), windows(v)
        i = torch.arange(w)[:, None]
        j = torch.arange(2 * w)[None, :]
        band = (j > i) & (j <= i + w)  # key j is position s - w + j
        mask = band.expand(nc, w, 2 * w).clone()
        mask[0, :, :w] = False  # before position 0
        mask = mask.expand(b, nc, w, 2 * w)
        if memory is not None and memory.shape[2] > 0:
            mk, mv = self.kv(memory)
            kw = torch.cat([mk, kw], dim=2)
            vw = torch.cat([mv, vw], dim=2)
            mm = memory_mask[:, :, None, :].expand(b, nc, w, memory.shape[2])
            mask = torch.cat([mm, mask], dim=3)
        nk = kw.shape[2]
        o = F.scaled_dot_product_attention(
            self._heads(q),
            self._heads(kw.reshape(b * nc, nk, d)),
            self._heads(vw.reshape(b * nc, nk, d)),
            attn_mask=mask.reshape(b * nc, 1, w, nk),
        )
        o = o.transpose(1, 2).reshape(b, nc * w, d)[:, :length]
        return self.out_proj(o)

    def step(
        self, x: Tensor, ring_k: Tensor, ring_v: Tensor, mem_k: Tensor, mem_v: Tensor,
        mem_mask: Tensor, pos: Tensor,
    ) -> Tensor:  # fmt: skip
        """Streaming segment: ``x (batch, S, d)`` at positions ``pos + 0..S-1`` (S ≤ window,
        no chunk boundary after the first token). ``ring_k/v (batch, w, d)`` hold the keys
        of positions ``p`` in slot ``p % w``; the memory block ``mem_k/v (batch, m, d)``
        with ``mem_mask (batch, m)``. Writes the new keys into the ring; returns the
        attention output before ``out_proj`` ``(batch, S, d)``."""
        b, s, d = x.shape
        w = self.window
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        slot = torch.arange(w)
        last = pos[:, None] - 1
        pk = last - torch.remainder(last - slot, w)  # position held by each ring slot
        qi = pos[:, None] + torch.arange(s)  # (b, S)
        ring_ok = (pk[:, None, :] >= 0) & (pk[:, None, :] > qi[:, :, None] - w)
        new_ok = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
        mask = torch.cat([mem_mask[:, None, :].expand(b, s, mem_mask.shape[1]), ring_ok, new_ok], 2)
        keys = torch.cat([mem_k, ring_k, k], dim=1)
        vals = torch.cat([mem_v, ring_v, v], dim=1)
        o = F.scaled_dot_product_attention(
            self._heads(q), self._heads(keys), self._heads(vals), attn_mask=mask[:, None]
        )
        idx = torch.remainder(qi, w)
        rows = torch.arange(b)[:, None]
        ring_k[rows, idx] = k
        ring_v[rows, idx] = v
        return o.transpose(1, 2).reshape(b, s, d)

    def step1(
        self, x: Tensor, ring_k: Tensor, ring_v: Tensor, mem_k: Tensor, mem_v: Tensor,
        mem_mask: Tensor, pos: Tensor, warm: bool,
    ) -> Tensor:  # fmt: skip
        """:meth:`step` for one token ``x (batch, d)``: the new key goes into its ring slot
        first, then the query reads ``[memory, ring]``: after the write the ring holds
        exactly the window (slots not yet written are masked while ``pos < w - 1``;
        ``warm`` says no row is in that phase)."""
        b, d = x.shape
        w = self.window
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        rows = torch.arange(b)
        idx = torch.remainder(pos, w)
        ring_k[rows, idx] = k
        ring_v[rows, idx] = v
        h = self.n_heads
        keys = torch.cat([mem_k, ring_k], dim=1).view(b, -1, h, d // h).transpose(1, 2)
        vals = torch.cat([mem_v, ring_v], dim=1).view(b, -1, h, d // h).transpose(1, 2)
        if warm:
            ring_ok = torch.ones(b, w, dtype=torch.bool)
        else:
            ring_ok = torch.arange(w) <= pos[:, None]
        mask = torch.cat([mem_mask, ring_ok], dim=1)[:, None, None, :]
        o = F.scaled_dot_product_attention(q.view(b, h, 1, d // h), keys, vals, attn_mask=mask)
        return o.reshape(b, d)


# ----------------------------------------------------------------------------- B'MOJO


class BMojoLayer(nn.Module):
    """B'MOJO mixer (SPEC §6.3): ``(batch, L, d_model) → (batch, L, d_model)``.

    ``window`` w (chunk size and attention window; 0 = pure SSM), ``n_fading`` m_f SSM
    output tokens and ``n_eidetic`` m_e stored tokens per chunk (B'MOJO-F when 0; pure
    sliding-window attention when both are 0). ``innovation_taps`` / ``innovation_metric``
    configure the innovation score (§6.1), ``eidetic_policy`` / ``eidetic_threshold`` the
    store (§6.2). See the module doc for how the pieces combine.
    """

    def __init__(
        self,
        d_model: int,
        window: int,
        n_fading: int,
        n_eidetic: int,
        d_state: int = 16,
        n_heads: int | None = None,
        d_conv: int = 4,
        expand: int = 2,
        innovation_taps: int = 4,
        innovation_metric: str = "mse",
        eidetic_policy: str = "topk",
        eidetic_threshold: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.d_model = _int("d_model", d_model, 1)
        self.window = _int("window", window, 0)
        self.n_fading = _int("n_fading", n_fading, 0)
        self.n_eidetic = _int("n_eidetic", n_eidetic, 0)
        self.innovation_taps = _int("innovation_taps", innovation_taps, 1)
        if innovation_metric not in ("mse", "chi2"):
            raise V.BmojoValueError(
                f"innovation_metric: expected 'mse' or 'chi2', got {innovation_metric!r}"
            )
        if eidetic_policy not in POLICIES:
            raise V.BmojoValueError(
                f"eidetic_policy: expected one of {POLICIES}, got {eidetic_policy!r}"
            )
        self.innovation_metric = innovation_metric
        self.eidetic_policy = eidetic_policy
        self.eidetic_threshold = float(eidetic_threshold)
        if self.window == 0 and (n_fading or n_eidetic):
            raise V.BmojoValueError(
                "window: memory tokens (n_fading, n_eidetic) need a window > 0 (they are read "
                "by the attention)"
            )
        fk = {"device": device, "dtype": dtype}
        need_ssm = self.window == 0 or self.n_fading > 0 or self.n_eidetic > 0
        self.ssm = (
            SelectiveSSM(d_model, d_state, d_conv=d_conv, expand=expand, **fk) if need_ssm else None
        )
        self.attn = (
            SlidingWindowAttention(d_model, window, n_heads, **fk) if self.window > 0 else None
        )
        self._taps_cache: dict[torch.dtype, Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, window={self.window}, n_fading={self.n_fading}, "
            f"n_eidetic={self.n_eidetic}"
        )

    def scores(self, y: Tensor) -> Tensor:
        """Innovation scores of SSM outputs ``y (batch, L, d_model)`` (not differentiable)."""
        return innovation_scores(
            y.detach(), taps=self.innovation_taps, metric=self.innovation_metric
        )

    def memory(self, u: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Memory tokens ``(batch, n_chunks, m_e + m_f, d_model)`` and mask of each chunk:
        ``[M, F]``, M the input tokens held by the store built from the positions before
        the chunk (topped up with empty slots), F the SSM outputs ``y_{s-m_f..s-1}``."""
        b, length, d = u.shape
        w, mf, me = self.window, self.n_fading, self.n_eidetic
        nc = -(-length // w)
        toks, masks = [], []
        if me:
            held = eidetic_select(
                self.scores(y), me, w, policy=self.eidetic_policy,
                threshold=self.eidetic_threshold,
            )  # fmt: skip
            tok, mask = gather_positions(u, held)
            toks.append(tok)
            masks.append(mask)
        if mf:
            p = torch.arange(nc)[:, None] * w - mf + torch.arange(mf)  # (nc, m_f)
            ok = p >= 0
            tok = y[:, p.clamp(min=0)] * ok[None, :, :, None].to(y.dtype)
            toks.append(tok)
            masks.append(ok.expand(b, nc, mf))
        if not toks:
            return None
        return torch.cat(toks, dim=2), torch.cat(masks, dim=2)

    def forward(self, u: Tensor) -> Tensor:
        """Parallel (training) forward, linear in L."""
        _check_input("u", u, self.d_model, self.dtype)
        y = self.ssm(u) if self.ssm is not None else None
        if self.attn is None:
            return y
        if u.shape[1] == 0:
            return self.attn(u)
        mem = self.memory(u, y)
        return self.attn(u, *(mem if mem is not None else (None, None)))

    # ------------------------------------------------------------------ streaming

    def init_state(self, batch: int) -> dict[str, Tensor]:
        """Zeroed streaming state of ``batch`` rows (plain tensors; see the module doc)."""
        st: dict[str, Tensor] = {}
        p = next(self.parameters())
        d, w, mf, me = self.d_model, self.window, self.n_fading, self.n_eidetic
        if self.ssm is not None:
            st.update(self.ssm.init_state(batch))
        if me:
            k = self.innovation_taps
            cdt = torch.float64 if p.dtype == torch.float64 else torch.float32
            st["innov_history"] = torch.zeros(batch, k, d, dtype=cdt)
            st["innov_count"] = torch.zeros(batch, dtype=torch.int64)
            st["innov_ema"] = torch.zeros(batch, 2, dtype=cdt)
            st["store_positions"] = torch.full((batch, me), -1, dtype=torch.int64)
            st["store_scores"] = torch.zeros(batch, me, dtype=torch.float64)
            st["store_count"] = torch.zeros(batch, dtype=torch.int64)
            st["mem_positions"] = torch.full((batch, me), -1, dtype=torch.int64)
        if w:
            st["ring_k"] = p.new_zeros(batch, w, d)
            st["ring_v"] = p.new_zeros(batch, w, d)
            st["mem_k"] = p.new_zeros(batch, me + mf, d)
            st["mem_v"] = p.new_zeros(batch, me + mf, d)
            st["mem_mask"] = torch.zeros(batch, me + mf, dtype=torch.bool)
        if mf:
            st["fading_y"] = p.new_zeros(batch, mf, d)
        return st

    EMPTY = {"store_positions": -1, "mem_positions": -1}
    """Fill value of a reset row (others: 0 / False)."""

    def _refresh(self, st: dict[str, Tensor], pos: Tensor, rows: Tensor) -> None:
        """Memory block of the chunk starting at ``pos`` for the rows ``rows`` (bool)."""
        w, mf, me = self.window, self.n_fading, self.n_eidetic
        b = pos.shape[0]
        sel = rows[:, None, None]
        ks, vs, ms = [], [], []
        if me:
            big = torch.iinfo(torch.int64).max
            sp = st["store_positions"]
            held = torch.where(sp >= 0, sp, big).sort(1).values
            held = torch.where(held == big, -1, held)  # (b, m_e) sorted
            valid = held >= 0
            in_ring = valid & (held >= pos[:, None] - w)
            r = torch.remainder(held.clamp(min=0), w)[..., None].expand(b, me, self.d_model)
            old = st["mem_positions"]
            j = (held[:, :, None] == old[:, None, :]).to(torch.int8).argmax(-1)
            j = j[..., None].expand(b, me, self.d_model)
            for name, ring in (("mem_k", st["ring_k"]), ("mem_v", st["ring_v"])):
                prev = st[name][:, :me]
                new = torch.where(in_ring[..., None], ring.gather(1, r), prev.gather(1, j))
                new = torch.where(valid[..., None], new, 0.0)
                (ks if name == "mem_k" else vs).append(new)
            ms.append(valid)
            st["mem_positions"].copy_(torch.where(rows[:, None], held, old))
        if mf:
            fk, fv = self.attn.kv(st["fading_y"])
            last = pos[:, None] - 1
            pf = last - torch.remainder(last - torch.arange(mf), mf)
            ok = pf >= 0
            ks.append(torch.where(ok[..., None], fk, 0.0))
            vs.append(torch.where(ok[..., None], fv, 0.0))
            ms.append(ok)
        if ks:
            st["mem_k"].copy_(torch.where(sel, torch.cat(ks, 1), st["mem_k"]))
            st["mem_v"].copy_(torch.where(sel, torch.cat(vs, 1), st["mem_v"]))
            st["mem_mask"].copy_(torch.where(rows[:, None], torch.cat(ms, 1), st["mem_mask"]))

    @torch.no_grad()
    def step(self, u: Tensor, st: dict[str, Tensor], pos: Tensor) -> Tensor:
        """Streaming: ``u (batch, T, d_model)`` at positions ``pos[b] + 0..T-1`` of each
        row; updates ``st`` in place; returns ``(batch, T, d_model)``."""
        if u.shape[1] == 1:
            return self._step1(u[:, 0], st, pos)[:, None]
        y = self.ssm.step(u, st) if self.ssm is not None else None
        if self.attn is None:
            return y
        b, t, _ = u.shape
        w, mf, me = self.window, self.n_fading, self.n_eidetic
        if me:
            scores, ist = innovation_scores(
                y, taps=self.innovation_taps, metric=self.innovation_metric,
                state={"history": st["innov_history"], "count": st["innov_count"],
                       "ema": st["innov_ema"]},
                return_state=True,
            )  # fmt: skip
            st["innov_history"].copy_(ist["history"])
            st["innov_count"].copy_(ist["count"])
            st["innov_ema"].copy_(ist["ema"])
            scores = scores.to(torch.float64).contiguous()
        outs = []
        a = 0
        plist = pos.tolist()
        rows = torch.arange(b)[:, None]
        while a < t:
            # A segment stops at the next chunk boundary of any row.
            s = min([t - a] + [w - (p + a) % w for p in plist])
            p = pos + a
            refresh = torch.remainder(p, w) == 0
            if bool(refresh.any()) and (me or mf):
                self._refresh(st, p, refresh)
            outs.append(
                self.attn.step(
                    u[:, a : a + s],
                    st["ring_k"],
                    st["ring_v"],
                    st["mem_k"],
                    st["mem_v"],
                    st["mem_mask"],
                    p,
                )
            )
            if me:
                torch.ops.bmojo.eidetic_push(
                    st["store_positions"], st["store_scores"], st["store_count"],
                    scores[:, a : a + s].contiguous(), self.eidetic_policy,
                    self.eidetic_threshold,
                )  # fmt: skip
            if mf:
                n = min(s, mf)  # only the last m_f outputs survive in the ring
                idx = torch.remainder(p[:, None] + torch.arange(s - n, s), mf)
                st["fading_y"][rows, idx] = y[:, a + s - n : a + s]
            a += s
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.attn.out_proj(o)

    def _taps(self, dtype: torch.dtype) -> Tensor:
        t = self._taps_cache.get(dtype)
        if t is None:
            k = self.innovation_taps
            t = self._taps_cache[dtype] = torch.full((k,), 1.0 / k, dtype=dtype)
        return t

    def _step1(self, u: Tensor, st: dict[str, Tensor], pos: Tensor) -> Tensor:
        """Decode path for one token ``u (batch, d_model)``: the same state transitions as
        :meth:`step` with fewer, direct kernel calls (no segment bookkeeping)."""
        y = self.ssm._step1(u, st) if self.ssm is not None else None
        if self.attn is None:
            return y
        w, mf, me = self.window, self.n_fading, self.n_eidetic
        plist = pos.tolist()
        if me or mf:
            refresh = [p % w == 0 for p in plist]
            if any(refresh):
                self._refresh(st, pos, torch.tensor(refresh))
        o = self.attn.step1(
            u, st["ring_k"], st["ring_v"], st["mem_k"], st["mem_v"], st["mem_mask"], pos,
            min(plist) >= w - 1,
        )  # fmt: skip
        if me:
            hist = st["innov_history"]
            cdt = hist.dtype
            yc = y.to(cdt)[:, None].contiguous()
            b = yc.shape[0]
            scores = yc.new_empty(b, 1)
            h2, c2, e2 = (
                torch.empty_like(hist),
                torch.empty_like(st["innov_count"]),
                torch.empty_like(st["innov_ema"]),
            )
            _core.eidetic.innovation_scores(
                yc.numpy(), self._taps(cdt).numpy(), hist.numpy(), st["innov_count"].numpy(),
                st["innov_ema"].numpy(), self.innovation_metric == "chi2", CHI2_RATE,
                CHI2_FLOOR, scores.numpy(), h2.numpy(), c2.numpy(), e2.numpy(),
            )  # fmt: skip
            hist.copy_(h2)
            st["innov_count"].copy_(c2)
            st["innov_ema"].copy_(e2)
            _core.eidetic.push(
                st["store_positions"].numpy(), st["store_scores"].numpy(),
                st["store_count"].numpy(), scores.to(torch.float64).numpy(),
                self.eidetic_policy, self.eidetic_threshold,
            )  # fmt: skip
        if mf:
            st["fading_y"][torch.arange(pos.shape[0]), torch.remainder(pos, mf)] = y
        return self.attn.out_proj(o)


# ----------------------------------------------------------------------------- LM


class _Block(nn.Module):
    def __init__(self, d_model: int, mlp_ratio: int, layer_kw: dict, fk: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, **fk)
        self.mixer = BMojoLayer(d_model, **layer_kw, **fk)
        self.norm2 = nn.LayerNorm(d_model, **fk)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model, **fk),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model, **fk),
        )

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.mixer(self.norm1(h))
        return h + self.mlp(self.norm2(h))

    def step(self, h: Tensor, st: dict[str, Tensor], pos: Tensor) -> Tensor:
        h = h + self.mixer.step(self.norm1(h), st, pos)
        return h + self.mlp(self.norm2(h))


class BMojoLM(nn.Module):
    """Language model: token embedding, ``n_layers`` pre-norm residual blocks
    (``h += BMojoLayer(LN(h)); h += MLP(LN(h))``), final LayerNorm, head tied to the
    embedding. ``forward(tokens (batch, L)) → logits (batch, L, vocab_size)``.
    ``stream(batch_size)`` opens a :class:`bmojo_core.stream.Stream`."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        window: int,
        n_fading: int,
        n_eidetic: int,
        d_state: int = 16,
        n_heads: int | None = None,
        mlp_ratio: int = 4,
        d_conv: int = 4,
        expand: int = 2,
        innovation_taps: int = 4,
        innovation_metric: str = "mse",
        eidetic_policy: str = "topk",
        eidetic_threshold: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.config = {
            "vocab_size": _int("vocab_size", vocab_size, 1),
            "d_model": _int("d_model", d_model, 1),
            "n_layers": _int("n_layers", n_layers, 0),
            "window": window, "n_fading": n_fading, "n_eidetic": n_eidetic,
            "d_state": d_state, "n_heads": n_heads, "mlp_ratio": _int("mlp_ratio", mlp_ratio, 1),
            "d_conv": d_conv, "expand": expand, "innovation_taps": innovation_taps,
            "innovation_metric": innovation_metric, "eidetic_policy": eidetic_policy,
            "eidetic_threshold": float(eidetic_threshold),
        }  # fmt: skip
        fk = {"device": device, "dtype": dtype}
        layer_kw = {k: self.config[k] for k in (
            "window", "n_fading", "n_eidetic", "d_state", "n_heads", "d_conv", "expand",
            "innovation_taps", "innovation_metric", "eidetic_policy", "eidetic_threshold",
        )}  # fmt: skip
        self.embedding = nn.Embedding(vocab_size, d_model, **fk)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(
            [_Block(d_model, mlp_ratio, layer_kw, fk) for _ in range(n_layers)]
        )
        self.norm_f = nn.LayerNorm(d_model, **fk)

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def check_tokens(self, name: str, tokens: object) -> Tensor:
        V.tensor(name, tokens, dtypes=(torch.int32, torch.int64, torch.int16, torch.uint8))
        if tokens.numel() and (  # type: ignore[union-attr]
            int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size  # type: ignore[union-attr]
        ):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)][0]  # type: ignore[index,operator]
            raise V.BmojoValueError(
                f"{name}: token id {int(bad)} is outside the vocabulary [0, {self.vocab_size})"
            )
        return tokens.long()  # type: ignore[union-attr]

    def head(self, h: Tensor) -> Tensor:
        return F.linear(self.norm_f(h), self.embedding.weight)

    def forward(self, tokens: Tensor, label_mask: Tensor | None = None) -> Tensor:
        """Logits ``(batch, L, vocab)``; with ``label_mask (batch, L)`` bool only those of
        the masked positions, ``(n, vocab)`` in row-major order (training on a few labelled
        positions then skips the head and its softmax everywhere else)."""
        tokens = self.check_tokens("tokens", tokens)
        V.shape("tokens", tokens, (None, None), "(batch, L)")
        if label_mask is not None:
            V.tensor("label_mask", label_mask, dtypes=(torch.bool,))
            V.shape("label_mask", label_mask, tuple(tokens.shape), "(batch, L) like tokens")
        h = self.embedding(tokens)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h if label_mask is None else h[label_mask])

    def stream(self, batch_size: int = 1):
        """A streaming decoder of ``batch_size`` independent slots (see
        :class:`bmojo_core.stream.Stream`)."""
        from .stream import Stream

        return Stream(self, batch_size)
