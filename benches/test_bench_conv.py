"""Causal depthwise convolution (SPEC §3): bmojo_core against ``F.conv1d`` (depthwise,
left-padded), forward and forward+backward, plus the single-token decode update.

Not collected by the normal test run. Run with::

    python -m pytest benches/test_bench_conv.py --benchmark-only

``BMOJO_BENCH_QUICK=1`` uses small shapes. Each case is its own benchmark group; the
forward cases record the achieved bandwidth (bytes of x read + out written, per second)
as ``GB/s`` in ``extra_info``; the update records ``us_per_call``.
"""

from __future__ import annotations

import os

import bmojo_core as bm
import pytest
import torch
import torch.nn.functional as F
from bmojo_core import _core

QUICK = os.environ.get("BMOJO_BENCH_QUICK", "") not in ("", "0")
B, D, L, K = (2, 256, 512, 4) if QUICK else (8, 1536, 2048, 4)


def _inputs(grad: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, L, generator=gen)
    w = torch.randn(D, K, generator=gen) / K**0.5
    b = torch.randn(D, generator=gen)
    if grad:
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    return x, w, b


def _bmojo(x, w, b):
    return bm.causal_conv1d_fn(x, w, b, activation="silu")


def _torch(x, w, b):
    return F.silu(F.conv1d(F.pad(x, (K - 1, 0)), w[:, None, :], b, groups=D))


IMPLS = {"bmojo": _bmojo, "torch_conv1d": _torch}


def _record_bandwidth(benchmark, nbytes: int) -> None:
    best = benchmark.stats.stats.min
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["GB/s"] = round(nbytes / best / 1e9, 2)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, impl):
    benchmark.group = f"conv fwd B{B} D{D} L{L} K{K} silu"
    benchmark.extra_info.update(B=B, D=D, L=L, K=K)
    x, w, b = _inputs(grad=False)
    f = IMPLS[impl]
    with torch.no_grad():
        out = benchmark.pedantic(f, args=(x, w, b), rounds=10, warmup_rounds=2)
    torch.testing.assert_close(out, _torch(x, w, b), rtol=1e-4, atol=1e-4)
    _record_bandwidth(benchmark, 2 * x.numel() * x.element_size())


@pytest.mark.parametrize("impl", ["bmojo_kernel", "torch_add_roofline"])
def test_forward_preallocated(benchmark, impl):
    """The forward kernel alone, writing into a preallocated output (no page faults of a
    fresh 100 MB tensor), beside a streaming ``torch.add(out=)`` over the same bytes as
    the bandwidth roofline."""
    benchmark.group = f"conv fwd kernel (preallocated) B{B} D{D} L{L} K{K} silu"
    x, w, b = _inputs(grad=False)
    out, fin = torch.empty_like(x), torch.empty(B, D, K - 1)
    if impl == "bmojo_kernel":
        args = (x.numpy(), w.numpy(), b.numpy(), None, None, True, out.numpy(), fin.numpy())
        benchmark.pedantic(_core.causal_conv1d_fwd, args=args, rounds=10, warmup_rounds=2)
        torch.testing.assert_close(out, _torch(x, w, b), rtol=1e-4, atol=1e-4)
    else:
        benchmark.pedantic(torch.add, args=(x, 1.0), kwargs={"out": out}, rounds=10)
    _record_bandwidth(benchmark, 2 * x.numel() * x.element_size())


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl):
    benchmark.group = f"conv fwd+bwd B{B} D{D} L{L} K{K} silu"
    benchmark.extra_info.update(B=B, D=D, L=L, K=K)
    x, w, b = _inputs(grad=True)
    g = torch.randn(B, D, L, generator=torch.Generator().manual_seed(1))
    f = IMPLS[impl]

    def step():
        x.grad = w.grad = b.grad = None
        f(x, w, b).backward(g)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    # bytes: x, dout read; out (recomputed), dx written
    _record_bandwidth(benchmark, 3 * x.numel() * x.element_size())


def test_update_single_token(benchmark):
    d = 1536
    benchmark.group = f"conv update B1 D{d} K{K}"
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, d, generator=gen)
    state = torch.randn(1, d, K - 1, generator=gen)
    w = torch.randn(d, K, generator=gen)
    b = torch.randn(d, generator=gen)
    inner = 2000
    benchmark.pedantic(
        bm.causal_conv1d_update,
        args=(x, state, w, b, "silu"),
        rounds=5,
        iterations=inner,
        warmup_rounds=1,
    )
    benchmark.extra_info["us_per_call"] = round(benchmark.stats.stats.min * 1e6, 2)
