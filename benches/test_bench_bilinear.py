"""pytest-benchmark cases of bilinear_scan (SPEC §5): the forward of the modulated form
(batch 1, m = 2, p = 2) by the sequential path, the chunked parallel path and the
pure-torch reference loop, for n in {4, 16, 64} and L in {256, 4096}.

Not collected by the normal test run (``pytest tests``). Run with::

    python -m pytest benches/test_bench_bilinear.py --benchmark-only

``BMOJO_BENCH_QUICK=1`` shrinks L to {256, 1024}. Each (n, L) is its own benchmark group,
so the three methods sit side by side.
"""

from __future__ import annotations

import os

import pytest
import torch
from bmojo_core import bilinear_scan
from bmojo_core import reference as ref

QUICK = os.environ.get("BMOJO_BENCH_QUICK", "") not in ("", "0")
NS = (4, 16, 64)
LS = (256, 1024) if QUICK else (256, 4096)
METHODS = ("sequential", "parallel", "reference")


def _inputs(n: int, L: int, batch: int = 1, p: int = 2, m: int = 2) -> dict:
    gen = torch.Generator().manual_seed(n * 100003 + L)

    def rn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    s = 0.6 / n**0.5
    return dict(
        u=rn(batch, L, p),
        A=rn(n, n, scale=s),
        B=rn(n, p, scale=0.5),
        N=rn(m, n, n, scale=0.3 * s),
        v=rn(batch, L, m),
        C=rn(1, n),
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("L", LS)
@pytest.mark.parametrize("n", NS)
def test_bilinear_forward(benchmark, n, L, method):
    kw = _inputs(n, L)
    benchmark.group = f"bilinear fwd n={n} L={L}"
    benchmark.extra_info.update(n=n, L=L, batch=1, m=2, method=method)
    if method == "reference":
        fn, rounds = (lambda: ref.bilinear_scan_ref(**kw)), 2
    else:
        fn, rounds = (lambda: bilinear_scan(**kw, method=method)), 10
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
