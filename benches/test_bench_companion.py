"""companion_scan benchmarks (SPEC §4): bmojo vs the pure-torch loop reference and vs
``scipy.signal.lfilter`` looped over channels (time-invariant case).

Not collected by the normal test run. Run with::

    python -m pytest benches/test_bench_companion.py --benchmark-only
    BMOJO_BENCH_REFERENCE=1 python -m pytest benches/test_bench_companion.py --benchmark-only

``BMOJO_BENCH_QUICK=1`` shrinks L to 512. Each shape/mode is its own benchmark group.
"""

from __future__ import annotations

import os

import bmojo_core as bm
import numpy as np
import pytest
import scipy.signal
import torch
from bmojo_core import reference

QUICK = os.environ.get("BMOJO_BENCH_QUICK", "") not in ("", "0")
WITH_REFERENCE = os.environ.get("BMOJO_BENCH_REFERENCE", "") not in ("", "0")
L = 512 if QUICK else 4096
SHAPES = [(8, 64, L, 4), (1, 1024, L, 8)]
IDS = [f"B{b}-D{d}-L{ln}-n{n}" for b, d, ln, n in SHAPES]


def _inputs(shape, alpha_var: bool, grad: bool):
    B, D, L_, n = shape
    gen = torch.Generator().manual_seed(0)
    amp = 0.9 / n
    u = torch.randn(B, D, L_, generator=gen)
    a_shape = (B, D, L_, n) if alpha_var else (D, n)
    alpha = (torch.rand(*a_shape, generator=gen) * 2 - 1) * amp
    beta = torch.rand(D, generator=gen) + 0.5
    xs = dict(u=u, alpha=alpha, beta=beta)
    if grad:
        xs = {k: v.requires_grad_(True) for k, v in xs.items()}
    return xs


def _fwd(fn, xs):
    with torch.no_grad():
        return fn(**xs)


def _fwd_bwd(fn, xs):
    for v in xs.values():
        v.grad = None
    y, last = fn(**xs, return_final_state=True)
    (y.sum() + last.sum()).backward()


def _lfilter(xs):
    u, a, b = xs["u"].numpy(), xs["alpha"].numpy(), xs["beta"].numpy()
    out = np.empty_like(u)
    for d in range(u.shape[1]):
        out[:, d] = scipy.signal.lfilter([b[d]], np.concatenate([[1.0], -a[d]]), u[:, d], axis=-1)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("layout", ["var", "const"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_bmojo(benchmark, shape, layout, mode):
    benchmark.group = f"companion {mode} {layout} {IDS[SHAPES.index(shape)]}"
    xs = _inputs(shape, layout == "var", mode == "fwd_bwd")
    run = _fwd if mode == "fwd" else _fwd_bwd
    benchmark.pedantic(run, args=(bm.companion_scan, xs), rounds=10, warmup_rounds=2)


@pytest.mark.skipif(not WITH_REFERENCE, reason="set BMOJO_BENCH_REFERENCE=1 (slow)")
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_reference(benchmark, shape, mode):
    benchmark.group = f"companion {mode} var {IDS[SHAPES.index(shape)]}"
    xs = _inputs(shape, True, mode == "fwd_bwd")
    run = _fwd if mode == "fwd" else _fwd_bwd
    benchmark.pedantic(run, args=(reference.companion_scan, xs), rounds=1, warmup_rounds=0)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_lfilter(benchmark, shape):
    benchmark.group = f"companion fwd const {IDS[SHAPES.index(shape)]}"
    xs = _inputs(shape, False, False)
    want = _lfilter(xs)
    got = _fwd(bm.companion_scan, xs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    benchmark.pedantic(_lfilter, args=(xs,), rounds=5, warmup_rounds=1)
