"""The registry of the benchmark groups, in the order ``bmojo bench`` runs them;
:func:`build_cases` walks it and :func:`run_suite` runs what it built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..runtime.info import machine_info, machine_peak
from .bilinear import bilinear_cases
from .companion import companion_cases
from .conv import conv_cases
from .harness import Case, run_cases
from .lm import lm_decode_cases
from .peer import peer_cases
from .scan import (
    FLOP_PER_UPDATE,
    attach_memory,
    measure_backward_memory,
    scaling_cases,
    scan_cases,
)
from .scan import warm_up_reference as warm_up_scan_reference
from .ssd import ssd_cases
from .step import decode_cases
from .step import warm_up_reference as warm_up_step_reference
from .throughput import throughput_cases
from .transformers import transformers_cases

__all__ = ["GROUPS", "REGISTRY", "build_cases", "run_suite"]

#: (group name, function building the group's cases from ``quick``), in running order.
REGISTRY: tuple[tuple[str, Callable[[bool], list[Case]]], ...] = (
    ("scan", scan_cases),
    ("scaling", scaling_cases),
    ("decode", decode_cases),
    ("lm_decode", lm_decode_cases),
    ("throughput", throughput_cases),
    ("companion", companion_cases),
    ("conv", conv_cases),
    ("bilinear", bilinear_cases),
    ("ssd", ssd_cases),
    ("transformers", transformers_cases),
    ("peer", peer_cases),
)

GROUPS = tuple(name for name, _ in REGISTRY)


def build_cases(quick: bool = False, only: str | Sequence[str] | None = None) -> list[Case]:
    """All benchmark cases, in order. ``only`` keeps the cases whose name contains one of
    the given substrings or whose group is one of them (case-insensitive)."""
    cases = [case for _, build in REGISTRY for case in build(quick)]
    if only:
        keys = [only] if isinstance(only, str) else list(only)
        keys = [k.lower() for k in keys]
        cases = [c for c in cases if any(k in c.name.lower() or k == c.group for k in keys)]
    return cases


def _warm_up_references() -> None:
    """One tiny call of each reference path, so that torch's one-time initialisation is not
    charged to the reference timings (which run once, without warm-up)."""
    for warm_up in (warm_up_scan_reference, warm_up_step_reference):
        try:
            warm_up()
        except Exception:  # noqa: BLE001 - the cases themselves will report errors
            pass


def run_suite(
    quick: bool = False,
    only: str | Sequence[str] | None = None,
    *,
    progress: bool = True,
    memory: bool = True,
    with_reference: bool = True,
) -> dict[str, Any]:
    """Run the suite. Returns ``{"machine", "peak", "quick", "results", "memory"}`` with
    ``results`` a list of :class:`~.harness.Result` (also JSON-serialisable through
    :func:`~.harness.to_json`); ``memory`` is the peak resident memory of the scan's
    forward+backward (:func:`.scan.measure_backward_memory`) when a scaling case ran."""
    cases = build_cases(quick, only)
    if with_reference and any(c.reference is not None for c in cases):
        _warm_up_references()
    results = run_cases(cases, progress=progress, with_reference=with_reference)
    mem = None
    if memory and any(r.group == "scaling" and r.error is None for r in results):
        mem = measure_backward_memory(quick)
        attach_memory(results, mem)
    return {
        "machine": machine_info(),
        "peak": {**machine_peak(), "flop_per_update": FLOP_PER_UPDATE},
        "quick": quick,
        "results": results,
        "memory": mem,
    }
