"""pytest-benchmark versions of every ``bmojo bench`` case (bmojo_core.bench): the scan,
scaling, decode, lm_decode, throughput, companion, conv and bilinear groups, and the peer
cases when their library is installed.

Not collected by the normal test run (``pytest tests``). Run with::

    python -m pytest benches --benchmark-only

Environment: ``BMOJO_BENCH_QUICK=1`` for the small shapes of ``bmojo bench --quick``;
``BMOJO_BENCH_REFERENCE=1`` to also time ``bmojo_core.reference`` (seconds per call; one
round). Each case is its own benchmark group, so bmojo and the reference sit side by side.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from bmojo_core import bench

QUICK = os.environ.get("BMOJO_BENCH_QUICK", "") not in ("", "0")
WITH_REFERENCE = os.environ.get("BMOJO_BENCH_REFERENCE", "") not in ("", "0")

CASES = [c for c in bench.build_cases(quick=QUICK) if c.group != "peer"]
PEERS = [c for c in bench.build_cases(quick=QUICK) if c.group == "peer"]


def _grad_ctx(case: bench.Case):
    return contextlib.nullcontext() if case.grad else torch.no_grad()


def _extra_info(benchmark, case: bench.Case) -> None:
    benchmark.group = case.name
    benchmark.extra_info.update(case.params)
    benchmark.extra_info["updates_per_call"] = case.updates
    benchmark.extra_info["tokens_per_call"] = case.tokens


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bmojo(benchmark, case: bench.Case) -> None:
    _extra_info(benchmark, case)
    with bench.kernel_threads(case.threads):
        inputs = case.setup()
        with _grad_ctx(case):
            benchmark.pedantic(
                case.bmojo,
                args=(inputs,),
                rounds=max(3, case.repeat),
                iterations=case.inner,
                warmup_rounds=case.warmup,
            )


REF_CASES = [c for c in CASES if c.reference is not None]


@pytest.mark.skipif(not WITH_REFERENCE, reason="set BMOJO_BENCH_REFERENCE=1 (slow)")
@pytest.mark.parametrize("case", REF_CASES, ids=[c.name for c in REF_CASES])
def test_reference(benchmark, case: bench.Case) -> None:
    _extra_info(benchmark, case)
    inputs = case.setup()
    with _grad_ctx(case):
        benchmark.pedantic(
            case.reference,
            args=(inputs,),
            rounds=case.ref_repeat,
            iterations=case.ref_inner,
            warmup_rounds=case.ref_warmup,
        )


@pytest.mark.parametrize("case", PEERS, ids=[c.name for c in PEERS])
def test_peer(benchmark, case: bench.Case) -> None:
    if not bench.peer_available():
        pytest.skip(f"{case.reference_label}: not installed")
    _extra_info(benchmark, case)
    inputs = case.setup()
    with torch.no_grad():
        benchmark.pedantic(case.reference, args=(inputs,), rounds=3, warmup_rounds=1)
