"""The call pattern of a real client: torch matmul → op → torch matmul, as a transformers
Mamba mixer calls its kernels (d_inner 1536, N 16, K 4, d_model 768), at the default
thread settings. For each op and size it prints the time the op adds to the pattern with
bmojo_core and with the pure-torch path transformers falls back to (its own formulas), and
their ratio: a ratio below 1 is a call pattern bmojo_core makes slower.

    python benches/interleaved.py [--repeat 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import bmojo_core as bm
import torch
import torch.nn.functional as F

D, N, K, DM = 1536, 16, 4, 768


def torch_scan(u, delta, A, B, C, D_, z, bias):
    """transformers' MambaMixer fallback (recurrent loop)."""
    dt = F.softplus(delta + bias[:, None])
    dA = torch.exp(A[None, :, None, :] * dt[..., None])
    dBu = dt[..., None] * B.transpose(1, 2)[:, None] * u[..., None]
    h = torch.zeros(u.shape[0], D, N)
    ys = []
    for t in range(u.shape[-1]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append((h @ C[:, :, t, None])[..., 0])
    y = torch.stack(ys, -1) + u * D_[:, None]
    return y * F.silu(z)


def torch_step(state, x, dt, A, B, C, D_, z, bias):
    dt = F.softplus(dt + bias)
    dA = torch.exp(dt[..., None] * A)
    state.copy_(state * dA + dt[..., None] * B[:, None] * x[..., None])
    return ((state @ C[..., None])[..., 0] + x * D_) * F.silu(z)


def torch_conv(x, w, b):
    return F.silu(F.conv1d(x, w[:, None], b, padding=K - 1, groups=D)[..., : x.shape[-1]])


def torch_conv_update(x, state, w, b):
    full = torch.cat([state, x], -1)
    state.copy_(full[..., -state.shape[-1] :])
    return F.silu((full * w).sum(-1, keepdim=True) + b[:, None])


def cases(batch: int, length: int):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    u, delta, z = r(batch, D, length), r(batch, D, length) * 0.5, r(batch, D, length)
    A, Bv, Cv = -torch.rand(D, N, generator=g), r(batch, N, length), r(batch, N, length)
    Dv, bias, w, b = r(D), r(D) * 0.1, r(D, K), r(D)
    st, cs = r(batch, D, N), r(batch, D, K - 1)
    x1, dt1, z1, B1, C1 = r(batch, D), r(batch, D), r(batch, D), r(batch, N), r(batch, N)
    if length == 1:
        yield ("selective_state_update", lambda: bm.selective_state_update(
            st, x1, dt1, A, B1, C1, Dv, z1, bias, True),
            lambda: torch_step(st, x1, dt1, A, B1, C1, Dv, z1, bias))  # fmt: skip
        yield ("causal_conv1d_update", lambda: bm.causal_conv1d_update(
            u, cs, w, b, "silu"), lambda: torch_conv_update(u, cs, w, b))  # fmt: skip
    yield ("selective_scan_fn", lambda: bm.selective_scan_fn(
        u, delta, A, Bv, Cv, Dv, z, bias, True),
        lambda: torch_scan(u, delta, A, Bv, Cv, Dv, z, bias))  # fmt: skip
    yield ("causal_conv1d_fn", lambda: bm.causal_conv1d_fn(u, w, b, activation="silu"),
           lambda: torch_conv(u, w, b))  # fmt: skip


def _pattern_once(op, h, w1, w2) -> float:
    """Seconds of one matmul → op → matmul (h is not carried from one call to the next:
    repeated products would shrink it into denormals, which slow the matmuls down)."""
    t0 = time.perf_counter()
    xz = h @ w1
    op()
    xz[:, :D] @ w2
    return time.perf_counter() - t0


def added_time(ours, ref, rows: int, repeat: int) -> tuple[float, float]:
    """Median time each op adds to the matmul pair, bmojo_core's and torch's. The base
    pattern (matmuls alone) and the two ops run in alternation inside every repeat, so slow
    phases of the machine hit all three alike and cancel in the per-repeat differences."""
    w1, w2 = torch.randn(DM, 2 * D) / 30, torch.randn(D, DM) / 30
    h = torch.randn(rows, DM)
    for f in (lambda: None, ours, ref):
        _pattern_once(f, h, w1, w2)  # warm-up
    d_ours, d_ref = [], []
    for _ in range(repeat):
        base = min(_pattern_once(lambda: None, h, w1, w2) for _ in range(2))
        d_ours.append(_pattern_once(ours, h, w1, w2) - base)
        d_ref.append(_pattern_once(ref, h, w1, w2) - base)
    return statistics.median(d_ours), statistics.median(d_ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=60)
    args = ap.parse_args()
    print(f"threads: torch {torch.get_num_threads()}, bmojo_core {bm.get_num_threads()}")
    print(f"{'op':24s} {'batch':>5s} {'L':>5s} {'bmojo_core':>11s} {'torch':>11s} {'ratio':>7s}")
    with torch.no_grad():
        for batch, length in ((1, 1), (8, 1), (1, 8), (1, 64), (1, 1024), (8, 256)):
            rows = batch  # decode-sized matmuls: the hand-over between pools is measured
            for name, ours, ref in cases(batch, length):
                slow = name == "selective_scan_fn" and length >= 256  # the torch loop
                rep = max(3, args.repeat // 20) if slow else args.repeat
                o, t = added_time(ours, ref, rows, rep)
                print(f"{name:24s} {batch:5d} {length:5d} {o * 1e6:9.0f}us {t * 1e6:9.0f}us "
                      f"{t / max(o, 1e-9):7.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
