"""Sliding-window attention with a per-chunk block of memory tokens (design §3.3, §6.3)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import int_arg
from ..errors import BmojoValueError
from ..ops.decode import linear

__all__ = ["SlidingWindowAttention"]


class SlidingWindowAttention(nn.Module):
    """Multi-head attention of position t to the input tokens ``[t-window+1, t]`` and to a
    per-chunk block of memory tokens (chunks of ``window`` positions). No positional
    encoding. Keys/values of memory tokens use the same projections as input tokens."""

    def __init__(
        self, d_model: int, window: int, n_heads: int | None = None, bias: bool = False,
        device=None, dtype=None,
    ):  # fmt: skip
        super().__init__()
        self.d_model = int_arg("d_model", d_model, 1)
        self.window = int_arg("window", window, 1)
        if n_heads is None:
            n_heads = max(1, d_model // 64)
        self.n_heads = int_arg("n_heads", n_heads, 1)
        if d_model % n_heads:
            raise BmojoValueError(f"n_heads: {n_heads} does not divide d_model={d_model}")
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
        # Ring slot j holds the key of the position `age` steps before the last one; query i
        # (position pos + i) sees it iff that position exists (age < pos) and lies in its
        # window (age < w - 1 - i).
        age = torch.remainder(pos[:, None] - 1 - torch.arange(w), w)  # (b, w)
        lim = torch.minimum(pos[:, None], w - 1 - torch.arange(s))  # (b, S)
        ring_ok = age[:, None, :] < lim[:, :, None]
        new_ok = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
        mask = torch.cat([mem_mask[:, None, :].expand(b, s, mem_mask.shape[1]), ring_ok, new_ok], 2)
        keys = torch.cat([mem_k, ring_k, k], dim=1)
        vals = torch.cat([mem_v, ring_v, v], dim=1)
        o = F.scaled_dot_product_attention(
            self._heads(q), self._heads(keys), self._heads(vals), attn_mask=mask[:, None]
        )
        idx = torch.remainder(pos[:, None] + torch.arange(s), w)[..., None].expand(b, s, d)
        ring_k.scatter_(1, idx, k)
        ring_v.scatter_(1, idx, v)
        return o.transpose(1, 2).reshape(b, s, d)

    def native_params(self) -> dict[str, Any]:
        """Heads and projections for the fused native decode step (:mod:`bmojo_core.ops.decode`)."""
        return {
            "n_heads": self.n_heads,
            **linear("qkv", self.qkv),
            **linear("out_proj", self.out_proj),
        }
