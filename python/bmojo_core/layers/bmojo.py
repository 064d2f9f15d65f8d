"""The B'MOJO layer (design §6.3): fading memory (a selective SSM), innovation-selected
eidetic tokens and a sliding window, read out by attention.

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

**Streaming** (:meth:`BMojoLayer.state_pieces` declares the pieces; design §6.4): conv and
SSM states, the innovation state (last k outputs, count, χ² average), the eidetic store
(positions/scores heap), a ring buffer of the last ``w`` keys/values, a ring of the last
``m_f`` SSM outputs, and the memory block of the current chunk, refreshed when a row
reaches a chunk boundary exactly as in the parallel forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import _validate as V
from .._validate import int_arg
from ..inference.state import Piece, allocate
from ..ops.eidetic import (
    CHI2_FLOOR,
    CHI2_RATE,
    POLICIES,
    eidetic_select,
    gather_positions,
    innovation_scores,
    innovation_step,
    push_scores,
)
from .attention import SlidingWindowAttention
from .ssm import SelectiveSSM

__all__ = ["BMojoLayer"]


def not_nan(scores: Tensor) -> Tensor:
    """``scores`` clamped to their dtype's finite range, NaN to its lowest value (see
    :meth:`BMojoLayer.scores`)."""
    return torch.nan_to_num(scores, nan=torch.finfo(scores.dtype).min)


def _check_input(name: str, x: object, d_model: int, dtype: torch.dtype) -> Tensor:
    V.tensor(name, x)
    V.shape(name, x, (None, None, d_model), "(batch, L, d_model)")
    if x.dtype != dtype:  # type: ignore[union-attr]
        raise V.BmojoTypeError(
            f"{name}: expected dtype {V.dtype_name(dtype)} like the layer's parameters, "
            f"got {V.dtype_name(x.dtype)}"  # type: ignore[union-attr]
        )
    return x  # type: ignore[return-value]


class BMojoLayer(nn.Module):
    """B'MOJO mixer (design §6.3): ``(batch, L, d_model) → (batch, L, d_model)``.

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
        self.d_model = int_arg("d_model", d_model, 1)
        self.window = int_arg("window", window, 0)
        self.n_fading = int_arg("n_fading", n_fading, 0)
        self.n_eidetic = int_arg("n_eidetic", n_eidetic, 0)
        self.innovation_taps = int_arg("innovation_taps", innovation_taps, 1)
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
        """Innovation scores of SSM outputs ``y (batch, L, d_model)`` (not differentiable).
        Non-finite scores (from non-finite outputs) are clamped to the dtype's finite range,
        NaN to its lowest value: such a token is never preferred for retention, the store
        stays valid, and a numerical blow-up propagates through the outputs as in torch
        instead of failing a streaming step halfway."""
        return not_nan(
            innovation_scores(y.detach(), taps=self.innovation_taps, metric=self.innovation_metric)
        )

    def memory(
        self, u: Tensor, y: Tensor | None, eidetic: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """Memory tokens ``(batch, n_chunks, m_e + m_f, d_model)`` and mask of each chunk:
        ``[M, F]``, M the input tokens held by the store built from the positions before
        the chunk (topped up with empty slots), F the SSM outputs ``y_{s-m_f..s-1}``.
        ``eidetic``: M and its mask given instead (context parallelism builds them from
        the stores of the earlier shards)."""
        b, length, d = u.shape
        w, mf, me = self.window, self.n_fading, self.n_eidetic
        nc = -(-length // w)
        toks, masks = [], []
        if me and eidetic is not None:
            toks.append(eidetic[0])
            masks.append(eidetic[1])
        elif me:
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

    def state_pieces(self) -> list[Piece]:
        """The streaming state of one row (design §6.4), in the order it is saved."""
        dt = self.dtype
        cdt = torch.float64 if dt == torch.float64 else torch.float32
        d, w, mf, me = self.d_model, self.window, self.n_fading, self.n_eidetic
        pieces = [] if self.ssm is None else self.ssm.state_pieces()
        if me:
            pieces += [
                Piece("innov_history", (self.innovation_taps, d), cdt),
                Piece("innov_count", (), torch.int64),
                Piece("innov_ema", (2,), cdt),
                Piece("store_positions", (me,), torch.int64, empty=-1),
                Piece("store_scores", (me,), torch.float64),
                Piece("store_count", (), torch.int64),
                Piece("mem_positions", (me,), torch.int64, empty=-1),
            ]
        if w:
            pieces += [
                Piece("ring_k", (w, d), dt),
                Piece("ring_v", (w, d), dt),
                Piece("mem_k", (me + mf, d), dt),
                Piece("mem_v", (me + mf, d), dt),
                Piece("mem_mask", (me + mf,), torch.bool),
            ]
        if mf:
            pieces.append(Piece("fading_y", (mf, d), dt))
        return pieces

    def init_state(self, batch: int) -> dict[str, Tensor]:
        """A fresh streaming state of ``batch`` rows (:meth:`state_pieces`)."""
        return allocate(self.state_pieces(), batch, next(self.parameters()).device)

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
        row; updates ``st`` (:meth:`state_pieces`) in place; returns ``(batch, T, d_model)``."""
        y = self.ssm.step(u, st) if self.ssm is not None else None
        if self.attn is None:
            return y
        b, t, _ = u.shape
        w, mf, me = self.window, self.n_fading, self.n_eidetic
        if me:
            hist = st["innov_history"]
            scores = innovation_step(
                y.to(hist.dtype).contiguous(), self._taps(hist.dtype), hist, st["innov_count"],
                st["innov_ema"], self.innovation_metric == "chi2",
            )  # fmt: skip
            scores = not_nan(scores).to(torch.float64)
        outs = []
        a = 0
        plist = pos.tolist()
        while a < t:
            # A segment stops at the next chunk boundary of any row.
            s = min([t - a] + [w - (q + a) % w for q in plist])
            p = pos + a if a else pos
            refresh = [(q + a) % w == 0 for q in plist]
            if (me or mf) and any(refresh):
                self._refresh(st, p, torch.tensor(refresh))
            seg = u if s == t else u[:, a : a + s]
            ring = (st["ring_k"], st["ring_v"], st["mem_k"], st["mem_v"], st["mem_mask"])
            outs.append(self.attn.step(seg, *ring, p))
            if me:
                mine = scores if s == t else scores[:, a : a + s].contiguous()
                push_scores(
                    st["store_positions"], st["store_scores"], st["store_count"], mine,
                    self.eidetic_policy, self.eidetic_threshold,
                )  # fmt: skip
            if mf:
                n = min(s, mf)  # only the last m_f outputs survive in the ring
                idx = torch.remainder(p[:, None] + torch.arange(s - n, s), mf)
                st["fading_y"].scatter_(
                    1, idx[..., None].expand(b, n, self.d_model), y[:, a + s - n : a + s]
                )
            a += s
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.attn.out_proj(o)

    def _taps(self, dtype: torch.dtype) -> Tensor:
        """The innovation predictor's taps ``1/k`` (cached per dtype: a decode step needs
        them every token)."""
        t = self._taps_cache.get(dtype)
        if t is None:
            k = self.innovation_taps
            t = self._taps_cache[dtype] = torch.full((k,), 1.0 / k, dtype=dtype)
        return t

    def native_params(self) -> dict[str, Any]:
        """The layer's settings and parameters for the fused native decode step
        (:mod:`bmojo_core.ops.decode`)."""
        spec: dict[str, Any] = {
            "window": self.window,
            "n_fading": self.n_fading,
            "n_eidetic": self.n_eidetic,
            "taps": self.innovation_taps,
            "chi2": self.innovation_metric == "chi2",
            "rate": CHI2_RATE,
            "floor": CHI2_FLOOR,
            "policy": self.eidetic_policy,
            "threshold": self.eidetic_threshold,
        }
        if self.ssm is not None:
            spec["ssm"] = self.ssm.native_params()
        if self.attn is not None:
            spec["attn"] = self.attn.native_params()
        return spec
