"""The measurement behind the SSD kernel's algorithm (docs/design.md §2.4): the direct
recurrence (bmojo_core) against the chunked, matrix-product SSD written for speed in torch
(batched MKL GEMMs, one chunk's Q × Q matrices at a time) at several chunk sizes, and
transformers' chunked ``mamba2_chunk_scan``, forward, at b=1 l=2048 h=24 p=64 n=128 g=1,
fp32, default threads.

    python benches/ssd_algorithms.py
"""

from __future__ import annotations

import time

import bmojo_core as bm
import torch
import torch.nn.functional as F


def chunked(x, dt, A, B, C, Q):
    """Chunked SSD forward (no D, z, bias): returns (out (b, l, h, p), final state)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    nc = l // Q
    dA = (dt * A).reshape(b, nc, Q, h)  # log decays
    s = dA.cumsum(2)  # (b,nc,Q,h)
    xd = (x * dt[..., None]).reshape(b, nc, Q, h, p)
    Bc = B[:, :, 0].reshape(b, nc, Q, n)
    Cc = C[:, :, 0].reshape(b, nc, Q, n)
    G = Cc @ Bc.transpose(-1, -2)  # (b,nc,Q,Q) shared by heads
    sh = s.permute(0, 1, 3, 2)  # (b,nc,h,Q)
    Lm = sh[..., :, None] - sh[..., None, :]
    mask = torch.ones(Q, Q, dtype=torch.bool).tril()
    Lm = torch.exp(Lm.masked_fill(~mask, -torch.inf))  # (b,nc,h,Q,Q)
    M = G[:, :, None] * Lm
    y = M @ xd.permute(0, 1, 3, 2, 4)  # (b,nc,h,Q,p)
    w = torch.exp(sh[..., -1:] - sh)  # (b,nc,h,Q)
    S = (xd.permute(0, 1, 3, 4, 2) * w[:, :, :, None]) @ Bc[:, :, None]  # (b,nc,h,p,n)
    H = torch.zeros(b, h, p, n)
    decay = torch.exp(sh[..., -1])  # (b,nc,h)
    Hs = []
    for c in range(nc):
        Hs.append(H)
        H = decay[:, c, :, None, None] * H + S[:, c]
    Hp = torch.stack(Hs, 1)  # (b,nc,h,p,n) state before chunk
    yin = (Cc[:, :, None] * torch.exp(sh)[..., None]) @ Hp.transpose(-1, -2)  # (b,nc,h,Q,p)
    return (y + yin).permute(0, 1, 3, 2, 4).reshape(b, l, h, p), H


def best_ms(f, rep=5):
    f()
    best = 1e9
    for _ in range(rep):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    torch.manual_seed(0)
    b, l, h, p, n = 1, 2048, 24, 64, 128
    x = torch.randn(b, l, h, p)
    dt = F.softplus(torch.randn(b, l, h) * 0.5)
    A = -torch.rand(h) - 0.2
    B, C = torch.randn(b, l, 1, n), torch.randn(b, l, 1, n)
    print(f"SSD forward b={b} l={l} h={h} p={p} n={n} g=1, fp32, torch threads "
          f"{torch.get_num_threads()}, bmojo_core threads {bm.get_num_threads()}")  # fmt: skip
    with torch.no_grad():
        ref = bm.mamba_chunk_scan_combined(x, dt, A, B, C, 256)
        ms = best_ms(lambda: bm.mamba_chunk_scan_combined(x, dt, A, B, C, 256))
        print(f"direct recurrence (bmojo_core)        {ms:8.1f} ms")
        for Q in (32, 64, 128, 256):
            y, _ = chunked(x, dt, A, B, C, Q)
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            ms = best_ms(lambda Q=Q: chunked(x, dt, A, B, C, Q))
            print(f"chunked, torch GEMMs, Q={Q:<4d}          {ms:8.1f} ms  (rel err {err:.1e})")
        try:
            from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
        except ImportError:
            return
        fn = getattr(mamba2_chunk_scan, "__wrapped__", mamba2_chunk_scan)
        ms = best_ms(lambda: fn(x, dt, A, B, C, 256), rep=3)
        print(f"transformers mamba2_chunk_scan (Q=256) {ms:8.1f} ms")


if __name__ == "__main__":
    main()
