"""GPU benchmarks of the CUDA selective scan (forward, forward + backward) at
(B=8, D=1536, N=16, L=2048) and of the decode step (B=1, D=1536, N=16); skipped
without a CUDA device. Run with::

    python -m pytest benches/test_bench_cuda_scan.py --benchmark-only

Each scan case records the achieved bandwidth (``extra_info["GB/s"]``: the bytes the
kernels must move at least, over the median time) next to the pure-torch reference
(``bmojo_core.ops.reference.selective_scan``) on the same GPU; the decode case records the
latency of one call (``extra_info["us_per_call"]``, averaged over a burst of calls).
``BMOJO_BENCH_QUICK=1`` shrinks the shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

QUICK = os.environ.get("BMOJO_BENCH_QUICK", "") not in ("", "0")
SHAPE = (2, 256, 16, 512) if QUICK else (8, 1536, 16, 2048)  # batch, dim, N, L
DECODE = (1, 1536, 16)  # batch, dim, N
BURST = 200  # decode calls per timed round


def _inputs(dtype: torch.dtype, grad: bool):
    batch, dim, n, length = SHAPE
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dt)

    kw = dict(
        u=rn(batch, dim, length),
        delta=0.5 * torch.rand(batch, dim, length, generator=gen, device="cuda").to(dtype),
        A=-0.5 - torch.rand(dim, n, generator=gen, device="cuda"),
        B=rn(batch, n, length),
        C=rn(batch, n, length),
        D=rn(dim, dt=torch.float32),
        z=rn(batch, dim, length),
        delta_bias=0.1 * torch.rand(dim, generator=gen, device="cuda"),
        delta_softplus=True,
    )
    if grad:
        for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
            kw[k].requires_grad_(True)
    return kw


def _bytes(kw, backward: bool) -> int:
    """Minimum traffic: every activation read once and every output written once."""
    act = sum(kw[k].numel() * kw[k].element_size() for k in ("u", "delta", "z", "B", "C"))
    out = kw["u"].numel() * kw["u"].element_size()
    if not backward:
        return act + out
    # plus the backward: reads the activations and dout, writes du/ddelta/dz/dB/dC
    return 3 * act + 2 * out


def _time(fn, rounds: int = 10) -> float:
    """Median seconds per call, CUDA events around each call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _run(impl: str, kw: dict, backward: bool):
    import bmojo_core as bm
    from bmojo_core.ops import reference as ref

    f = bm.selective_scan_fn if impl == "bmojo" else ref.selective_scan
    if not backward:

        def call():
            with torch.no_grad():
                f(**kw)

        return call
    gy = torch.randn_like(kw["u"])
    leaves = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    def call():
        torch.autograd.grad(f(**kw), leaves, gy)

    return call


@pytest.mark.parametrize("impl", ["bmojo", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_selective_scan_cuda(benchmark, impl, dtype, backward):
    kw = _inputs(dtype, backward)
    call = _run(impl, kw, backward)
    rounds = 10 if impl == "bmojo" else 2
    seconds = _time(call, rounds)
    benchmark.group = f"cuda selective scan {'fwd+bwd' if backward else 'fwd'} {dtype} {SHAPE}"
    benchmark.extra_info.update(
        impl=impl, shape=SHAPE, seconds=seconds, device=torch.cuda.get_device_name(),
        **{"GB/s": _bytes(kw, backward) / seconds / 1e9},
    )  # fmt: skip
    benchmark.pedantic(lambda: (call(), torch.cuda.synchronize()), rounds=rounds, iterations=1)


def test_decode_step_latency(benchmark):
    import bmojo_core as bm

    batch, dim, n = DECODE
    gen = torch.Generator(device="cuda").manual_seed(1)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    state = rn(batch, dim, n)
    args = (state, rn(batch, dim), rn(batch, dim).sigmoid(), -rn(dim, n).abs(), rn(batch, n),
            rn(batch, n), rn(dim), rn(batch, dim), rn(dim), True)  # fmt: skip

    def burst():
        for _ in range(BURST):
            bm.selective_state_update(*args)
        torch.cuda.synchronize()

    burst()  # compiles the kernel
    benchmark.group = f"cuda decode step B={batch} D={dim} N={n}"
    benchmark.pedantic(burst, rounds=5, iterations=1)
    benchmark.extra_info["us_per_call"] = benchmark.stats.stats.median / BURST * 1e6
