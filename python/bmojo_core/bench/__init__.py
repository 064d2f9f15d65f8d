"""Benchmark suite of bmojo_core, as plain functions: what ``bmojo bench``
(:mod:`bmojo_core.cli`) runs, and what the pytest-benchmark files in ``benches/`` reuse;
nothing here depends on pytest. This module only re-exports:

* :mod:`.harness`: cases and results, timing, running, memory measurement, formatting;
* :mod:`.suite`: the registry of groups, :func:`build_cases`, :func:`run_suite`;
* one module per group of cases, with its input builders: :mod:`.scan` (``scan``,
  ``scaling``), :mod:`.step` (``decode``), :mod:`.lm` (``lm_decode``),
  :mod:`.throughput`, :mod:`.companion`, :mod:`.conv`, :mod:`.bilinear`, :mod:`.peer`.

Machine facts (CPU, clock, peak) come from :mod:`bmojo_core.runtime.info`.
``--quick`` uses smaller shapes in every group.
"""

from ..runtime.info import describe_peak, machine_info, machine_peak
from .bilinear import make_bilinear_inputs
from .companion import make_companion_inputs
from .conv import make_conv_inputs, make_conv_update_inputs
from .harness import (
    Case,
    Result,
    SavedBytes,
    format_report,
    format_seconds,
    format_table,
    kernel_threads,
    run_case,
    run_cases,
    saved_tensor_bytes,
    time_call,
    to_json,
)
from .lm import make_lm_decode_inputs
from .peer import peer_available
from .scan import FLOP_PER_UPDATE, SCAN_TENSORS, make_scan_inputs, measure_backward_memory
from .step import make_step_inputs
from .suite import GROUPS, REGISTRY, build_cases, run_suite

__all__ = [
    "FLOP_PER_UPDATE",
    "GROUPS",
    "REGISTRY",
    "SCAN_TENSORS",
    "Case",
    "Result",
    "SavedBytes",
    "build_cases",
    "describe_peak",
    "format_report",
    "format_seconds",
    "format_table",
    "kernel_threads",
    "machine_info",
    "machine_peak",
    "make_bilinear_inputs",
    "make_companion_inputs",
    "make_conv_inputs",
    "make_conv_update_inputs",
    "make_lm_decode_inputs",
    "make_scan_inputs",
    "make_step_inputs",
    "measure_backward_memory",
    "peer_available",
    "run_case",
    "run_cases",
    "run_suite",
    "saved_tensor_bytes",
    "time_call",
    "to_json",
]
