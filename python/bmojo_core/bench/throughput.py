"""Throughput cases (group ``throughput``): state updates per second and GFLOP/s of the
selective-scan forward, on one thread and on all the kernels' threads, against the
machine's assumed peak (:func:`bmojo_core.runtime.info.machine_peak`) at
:data:`~.scan.FLOP_PER_UPDATE` flop per state update.
"""

from __future__ import annotations

import os
from typing import Any

from ..runtime import get_num_threads
from ..runtime.info import machine_peak, physical_cores
from .harness import Case, Result
from .scan import (
    FLOP_PER_UPDATE,
    SCAN_SHAPES,
    SCAN_SHAPES_QUICK,
    bmojo_scan,
    fwd,
    make_scan_inputs,
    shape_name,
)

__all__ = ["throughput_cases"]


def _finish_throughput(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    if not res.bmojo_s:
        return
    ups = case.updates / res.bmojo_s
    gflops = ups * FLOP_PER_UPDATE / 1e9
    threads = case.params.get("threads_used") or 1
    peak = machine_peak(min(threads, physical_cores()))
    res.metrics.update(
        updates_per_s=ups, gflops=gflops, peak_gflops=peak["peak_gflops"], threads=threads
    )
    res.extra = f"{ups / 1e9:.2f} Gupd/s, {gflops:.1f} GFLOP/s"
    if peak["peak_gflops"]:
        frac = gflops / peak["peak_gflops"]
        res.metrics["fraction_of_peak"] = frac
        res.extra += f" = {100 * frac:.1f}% of {peak['peak_gflops']:.0f}"


def throughput_cases(quick: bool) -> list[Case]:
    cases = []
    shapes = SCAN_SHAPES_QUICK[:1] if quick else SCAN_SHAPES
    try:
        all_threads = int(get_num_threads())
    except Exception:  # noqa: BLE001
        all_threads = os.cpu_count() or 1
    thread_counts = sorted({1, all_threads})
    for batch, dim, N, L in shapes:
        for threads in thread_counts:
            shape = shape_name(batch, dim, N, L)
            cases.append(
                Case(
                    name=f"throughput fwd {shape} threads={threads}",
                    group="throughput",
                    description="forward state updates/s and GFLOP/s vs the machine's peak",
                    setup=lambda b=batch, d=dim, n=N, l=L: make_scan_inputs(b, d, n, l),
                    bmojo=fwd(bmojo_scan),
                    repeat=7,
                    threads=threads,
                    updates=batch * dim * N * L,
                    tokens=batch * L,
                    finish=_finish_throughput,
                    params={
                        "batch": batch,
                        "dim": dim,
                        "N": N,
                        "L": L,
                        "threads_used": threads,
                    },
                )
            )
    return cases
