"""Benchmarks of the B'MOJO layer and streaming decoder (not part of ``pytest tests``)::

    python -m pytest benches/test_bench_layers.py --benchmark-only
    BMOJO_BENCH_QUICK=1 ...        # small shapes
    BMOJO_BENCH_REFERENCE=1 ...    # also time the dense pure-torch reference (slow, 1 round)

Cases: ``BMojoLayer`` forward and forward+backward at (B=8, L=2048, d_model=256,
window=128, n_fading=4, n_eidetic=32), float32, against
``bmojo_core.layers.reference.bmojo_layer_ref`` (dense L×3L masked attention + reference
scan); streaming
decode of a 4-layer d_model=256 ``BMojoLM`` at batch 1 and 32 (one token per slot per
call, fused native step and Python step path, 1 and 2 kernel threads;
``extra_info['tokens_per_call']`` gives tokens/s = tokens_per_call / mean); peak
resident memory over a 100k-token stream (``extra_info``). Decode runs with one torch
thread (small matmuls lose to OpenMP start-up and, on a busy machine, to spinning).
"""

from __future__ import annotations

import os

import pytest
import torch
from bmojo_core.layers import BMojoLayer, BMojoLM
from bmojo_core.layers import reference as R

QUICK = os.environ.get("BMOJO_BENCH_QUICK", "") not in ("", "0")
WITH_REFERENCE = os.environ.get("BMOJO_BENCH_REFERENCE", "") not in ("", "0")

LAYER = (
    dict(B=2, L=512, d_model=128, window=64, n_fading=4, n_eidetic=16)
    if QUICK
    else dict(B=8, L=2048, d_model=256, window=128, n_fading=4, n_eidetic=32)
)
LM = dict(vocab_size=256, d_model=256, n_layers=4, window=128, n_fading=4, n_eidetic=32)
LONG = 10_000 if QUICK else 100_000


def _layer():
    torch.manual_seed(0)
    c = LAYER
    layer = BMojoLayer(c["d_model"], c["window"], c["n_fading"], c["n_eidetic"])
    u = torch.randn(c["B"], c["L"], c["d_model"])
    return layer, u


def _info(benchmark, group: str, tokens: int) -> None:
    benchmark.group = group
    benchmark.extra_info.update(LAYER if group.startswith("layer") else LM)
    benchmark.extra_info["tokens_per_call"] = tokens


def _fwd(fn, layer, u):
    with torch.no_grad():
        return fn(layer, u)


def _fwd_bwd(fn, layer, u):
    u = u.detach().requires_grad_()
    fn(layer, u).square().mean().backward()
    layer.zero_grad(set_to_none=True)


def _bmojo(layer, u):
    return layer(u)


@pytest.mark.parametrize("impl", ["bmojo", "reference"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_layer(benchmark, impl, mode):
    if impl == "reference" and not WITH_REFERENCE:
        pytest.skip("set BMOJO_BENCH_REFERENCE=1 (slow)")
    layer, u = _layer()
    _info(benchmark, f"layer-{mode}", u.shape[0] * u.shape[1])
    fn = _bmojo if impl == "bmojo" else R.bmojo_layer_ref
    run = _fwd if mode == "forward" else _fwd_bwd
    rounds, warm = (3, 1) if impl == "bmojo" else (1, 0)
    benchmark.pedantic(run, args=(fn, layer, u), rounds=rounds, warmup_rounds=warm)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", ["fused", "python"])
@pytest.mark.parametrize("batch", [1, 32])
def test_decode(benchmark, batch, path, threads, one_thread):
    """``fused``: the native one-call step (bmojo_core.ops.decode) on ``threads`` kernel threads;
    ``python``: the per-op Python step path (``stream.fused_decode = False``)."""
    import bmojo_core

    torch.manual_seed(0)
    lm = BMojoLM(**LM)
    stream = lm.stream(batch)
    stream.fused_decode = path == "fused"
    stream.feed(torch.randint(0, 256, (batch, 300)))  # past the first chunks
    tok = torch.randint(0, 256, (batch,))
    _info(benchmark, f"decode-{path}", batch)
    benchmark.extra_info.update(batch=batch, path=path, threads=threads)
    before = bmojo_core.get_num_threads()
    bmojo_core.set_num_threads(threads)
    try:
        rounds = 50 if path == "fused" else 10
        benchmark.pedantic(stream.feed, args=(tok,), rounds=rounds, iterations=4, warmup_rounds=5)
    finally:
        bmojo_core.set_num_threads(before)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_long_stream_memory(benchmark, one_thread):
    """Feeds LONG tokens in pieces of 1000; records the resident-memory growth after the
    first 10% (the state is fixed-size) and the state's bytes."""
    torch.manual_seed(0)
    lm = BMojoLM(**LM)
    stream = lm.stream(1)
    tok = torch.randint(0, 256, (1, LONG))
    piece = 1000
    stats = {}

    def run():
        base = None
        peak = 0
        for a in range(0, LONG, piece):
            stream.feed(tok[:, a : a + piece])
            if a + piece == LONG // 10:
                base = _rss()
            if base is not None:
                peak = max(peak, _rss())
        stats["rss_growth_after_10pct_bytes"] = peak - base
        stats["state_bytes"] = stream.nbytes()

    _info(benchmark, "long-stream", LONG)
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(stats)
    assert stats["rss_growth_after_10pct_bytes"] < 64 * 2**20
