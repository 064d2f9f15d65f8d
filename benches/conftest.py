"""pytest-benchmark configuration for bmojo_core's benchmarks.

These files are not part of the normal test run (``pytest tests``). Run them with::

    python -m pytest benches --benchmark-only                 # full shapes
    BMOJO_BENCH_QUICK=1 python -m pytest benches --benchmark-only   # small shapes
    BMOJO_BENCH_REFERENCE=1 python -m pytest benches --benchmark-only  # also time the
                                                              # (slow) reference, once

``bmojo bench`` (bmojo_core.cli) runs the same cases with a summary table.
"""

from __future__ import annotations

import os

import pytest


def pytest_report_header(config: pytest.Config) -> list[str]:
    from bmojo_core.bench import FLOP_PER_UPDATE
    from bmojo_core.runtime.info import describe_peak, machine_info, machine_peak

    info = machine_info()
    quick = os.environ.get("BMOJO_BENCH_QUICK", "") not in ("", "0")
    return [
        f"bmojo_core {info['bmojo_core']}: SIMD {info['simd_level']}, "
        f"{info['bmojo_threads']} threads; torch {info['torch']} "
        f"({info['torch_threads']} threads); shapes: {'quick' if quick else 'full'}",
        f"{describe_peak(machine_peak())}; the scan forward is counted as {FLOP_PER_UPDATE} "
        "flop per state update",
    ]
