"""The benchmark harness: what a case is, how it is timed and run, how memory is measured
and how results are reported. Nothing here knows a particular op; the groups of cases are
in the sibling modules and :mod:`.suite` walks them.

* :class:`Case`, :class:`Result`; :func:`time_call` (medians of ``time.perf_counter``
  samples); :func:`run_case` and :func:`run_cases` (progress display, errors caught per
  case); :func:`kernel_threads` (the kernels' thread count for the duration of a case);
* memory: :class:`SavedBytes` / :func:`saved_tensor_bytes` (bytes saved for backward) and
  the peak resident memory of a call in a fresh child process (:func:`peak_extra_kib`,
  :func:`run_child`, :func:`report_to_parent`);
* parity and per-call figures shared by the groups (:func:`rel_err`,
  :func:`finish_parity`, :func:`finish_per_call`);
* formatting: :func:`format_seconds`, :func:`format_mib`, :func:`format_table`,
  :func:`format_report`, :func:`to_json`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..runtime import get_num_threads, set_num_threads
from ..runtime.info import describe_peak

__all__ = [
    "Case",
    "Result",
    "SavedBytes",
    "finish_parity",
    "finish_per_call",
    "format_mib",
    "format_report",
    "format_seconds",
    "format_table",
    "kernel_threads",
    "peak_extra_kib",
    "rel_err",
    "report_to_parent",
    "run_case",
    "run_cases",
    "run_child",
    "saved_tensor_bytes",
    "time_call",
    "to_json",
]


# ---------------------------------------------------------------------------------------
# data classes
# ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmark: build inputs with ``setup()``, then time ``bmojo(inputs)`` against
    ``reference(inputs)`` (optional).

    ``inner`` calls make one timed sample (for calls of a few µs); the reported time is the
    median over ``repeat`` samples, divided by ``inner``. ``grad=False`` runs the calls under
    ``torch.no_grad()``. ``threads`` (if set) is passed to ``bmojo_core.set_num_threads``
    for the duration of the case. ``finish(case, inputs, result, bmojo_out, ref_out)`` may
    add metrics to the result.
    """

    name: str
    group: str
    description: str
    setup: Callable[[], dict[str, Any]]
    bmojo: Callable[[dict[str, Any]], Any]
    reference: Callable[[dict[str, Any]], Any] | None = None
    reference_label: str = "bmojo_core.reference"
    repeat: int = 7
    warmup: int = 1
    inner: int = 1
    ref_repeat: int = 1
    ref_warmup: int = 0
    ref_inner: int = 1
    grad: bool = False
    threads: int | None = None
    count_saved: bool = False  # count the bytes the reference saves for backward
    updates: int = 0  # state updates per call (B·D·N·L)
    tokens: int = 0  # sequence positions per call (B·L)
    finish: Callable[..., None] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """Outcome of one case; times are seconds per call (median)."""

    name: str
    group: str
    description: str
    bmojo_s: float | None = None
    reference_s: float | None = None
    reference_label: str = ""
    speedup: float | None = None
    extra: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------


def time_call(
    fn: Callable[[], Any],
    *,
    repeat: int = 7,
    warmup: int = 1,
    inner: int = 1,
    grad: bool = False,
) -> tuple[float, list[float], Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` samples of ``inner`` calls
    each (``time.perf_counter``). Returns (median seconds per call, all samples, last
    output). Runs under ``torch.no_grad()`` unless ``grad``."""
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    out = None
    samples: list[float] = []
    with ctx:
        for _ in range(warmup):
            out = fn()
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples), samples, out


# ---------------------------------------------------------------------------------------
# memory: bytes saved for backward
# ---------------------------------------------------------------------------------------


class SavedBytes:
    """Context manager that sums the bytes of the distinct storages saved for backward
    inside it (``torch.autograd.graph.saved_tensors_hooks``), not counting the storages of
    ``exclude`` (the inputs, which exist anyway). Read ``nbytes`` afterwards."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
            ptr, nbytes = id(t), t.numel() * t.element_size()
        if ptr not in self._excluded:
            self._seen[ptr] = max(self._seen.get(ptr, 0), nbytes)
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(
    fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> tuple[int, Any]:
    """Run ``fn()`` with grad enabled; return (bytes saved for backward beyond the storages
    of ``exclude``, output of fn). See :class:`SavedBytes`."""
    with torch.enable_grad(), SavedBytes(exclude) as counter:
        out = fn()
    return counter.nbytes, out


# ---------------------------------------------------------------------------------------
# memory: peak resident memory, in a fresh child process
# ---------------------------------------------------------------------------------------

_CHILD_TAG = "BMOJO_MEMORY "


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def peak_extra_kib(fn: Callable[[], Any]) -> tuple[int, bool, Any]:
    """Peak resident memory of ``fn()`` above the resident memory before it, in KiB.
    Returns ``(extra_kib, exact, output)``; ``exact`` is False where the peak could not be
    reset (no ``/proc/self/clear_refs``): the peak is then the process's peak so far."""
    gc.collect()
    base = _proc_status_kib("VmRSS")
    exact = _reset_peak_rss() and base is not None
    before_peak = _peak_rss_kib()
    out = fn()
    peak = _peak_rss_kib()
    if base is None:
        base = before_peak
    return max(0, peak - base), exact, out


def report_to_parent(result: dict[str, Any]) -> None:
    """Child side of :func:`run_child`: prints ``result`` as the one tagged JSON line."""
    print(_CHILD_TAG + json.dumps(result), flush=True)


def run_child(module: str, function: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Runs ``module.function(**kwargs)`` in a fresh Python process (torch's allocations are
    invisible to tracemalloc, and a fresh process has a clean peak) and returns the dict it
    passed to :func:`report_to_parent`, or ``{"error": message}`` if the child fails."""
    code = (
        f"import sys, json; from {module} import {function}; "
        f"a = json.loads(sys.argv[1]); {function}(**a)"
    )
    try:
        # A fixed glibc mmap threshold: every large tensor gets its own mapping, returned to
        # the system when freed, so the resident memory follows the live tensors (glibc's
        # dynamic threshold would otherwise keep freed blocks in the heap and hide reuse).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(kwargs)],
            capture_output=True,
            text=True,
            timeout=1800,
            env=env,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    for line in proc.stdout.splitlines():
        if line.startswith(_CHILD_TAG):
            return json.loads(line[len(_CHILD_TAG) :])
    return {"error": (proc.stderr or proc.stdout).strip()[-2000:] or f"exit {proc.returncode}"}


# ---------------------------------------------------------------------------------------
# figures shared by the groups
# ---------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b| in float64 (the absolute error where b is zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    scale = b64.abs().max().item() if b64.numel() else 0.0
    err = (a64 - b64).abs().max().item() if b64.numel() else 0.0
    return err / scale if scale > 0 else err


def finish_parity(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    """Largest relative error over the outputs (a tensor or a tuple of tensors)."""
    if ref_out is None or out is None:
        return
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref_out if isinstance(ref_out, (tuple, list)) else (ref_out,)
    err = max(rel_err(a, b) for a, b in zip(outs, refs, strict=True))
    res.metrics["max_rel_err_vs_reference"] = err
    res.extra = f"max rel err {err:.1e}"


def finish_per_call(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    """µs per call (one-token steps) and, if the case counts them, state updates per s."""
    parts = []
    if res.bmojo_s:
        res.metrics["us_per_call"] = res.bmojo_s * 1e6
        parts.append(f"{res.bmojo_s * 1e6:.1f} µs/call")
    if res.reference_s:
        res.metrics["reference_us_per_call"] = res.reference_s * 1e6
    if res.bmojo_s and case.updates:
        ups = case.updates / res.bmojo_s
        res.metrics["updates_per_s"] = ups
        parts.append(f"{ups / 1e9:.2f} Gupd/s")
    res.extra = "; ".join(parts)


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_threads(n: int | None) -> Iterator[None]:
    """The kernels' thread count set to ``n`` inside (unchanged if ``n`` is None)."""
    if n is None:
        yield
        return
    before = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(before)


def run_case(case: Case, *, with_reference: bool = True) -> Result:
    """Run one case; exceptions are caught and reported in ``Result.error``."""
    res = Result(
        name=case.name,
        group=case.group,
        description=case.description,
        reference_label=case.reference_label if case.reference else "",
        params=dict(case.params),
    )
    if not case.params.get("available", True):
        res.skipped = f"{case.params.get('requires', case.reference_label)}: not installed"
        return res
    try:
        with kernel_threads(case.threads):
            inputs = case.setup()
            res.bmojo_s, samples, out = time_call(
                lambda: case.bmojo(inputs),
                repeat=case.repeat,
                warmup=case.warmup,
                inner=case.inner,
                grad=case.grad,
            )
            res.metrics["bmojo_samples_s"] = samples
            ref_out = None
            if with_reference and case.reference is not None:
                ref_inputs = case.setup()  # fresh inputs: the step updates state in place
                # bytes the reference saves for backward, counted during its (single) timed
                # call: the hooks cost far less than the reference itself
                counting = case.grad and case.count_saved
                ref_tensors = [v for v in ref_inputs.values() if isinstance(v, torch.Tensor)]
                counter = SavedBytes(ref_tensors if counting else ())
                with counter if counting else contextlib.nullcontext():
                    res.reference_s, ref_samples, ref_out = time_call(
                        lambda: case.reference(ref_inputs),
                        repeat=case.ref_repeat,
                        warmup=case.ref_warmup,
                        inner=case.ref_inner,
                        grad=case.grad,
                    )
                if counting:
                    calls = case.ref_warmup + case.ref_repeat * case.ref_inner
                    res.metrics["reference_saved_for_backward_bytes"] = counter.nbytes // calls
                res.metrics["reference_samples_s"] = ref_samples
                res.speedup = res.reference_s / res.bmojo_s if res.bmojo_s else None
            if case.finish is not None:
                case.finish(case, inputs, res, out, ref_out)
    except Exception as exc:  # noqa: BLE001 - report and go on with the next case
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        gc.collect()
    return res


def _progress(items: list[Case], enabled: bool):
    """tqdm over the cases if available, else plain prints to stderr."""
    if not enabled:
        yield from ((c, lambda _s: None) for c in items)
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(items, desc="bmojo bench", unit="case", file=sys.stderr, dynamic_ncols=True)
        for c in bar:
            bar.set_postfix_str(c.name, refresh=True)
            yield c, bar.write
        bar.close()
    else:
        n = len(items)
        for i, c in enumerate(items, 1):
            print(f"[{i}/{n}] {c.name} ...", file=sys.stderr, flush=True)
            yield c, lambda s: print(s, file=sys.stderr, flush=True)


def run_cases(
    cases: Sequence[Case], *, progress: bool = True, with_reference: bool = True
) -> list[Result]:
    """Runs the cases in order (:func:`run_case`), with a progress display on stderr that
    also names the cases that fail."""
    results: list[Result] = []
    for case, write in _progress(list(cases), progress):
        r = run_case(case, with_reference=with_reference)
        if r.error:
            write(f"  {case.name}: ERROR {r.error}")
        results.append(r)
    return results


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def format_mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table: case, bmojo, reference, speed-up, extra."""
    header = ("case", "bmojo", "reference", "speed-up", "extra")
    rows = []
    for r in results:
        if r.skipped:
            rows.append((r.name, "—", "—", "—", f"skipped: {r.skipped}"))
            continue
        if r.error:
            rows.append((r.name, "—", "—", "—", f"ERROR {r.error}"[:120]))
            continue
        speed = f"{r.speedup:.1f}×" if r.speedup else "—"
        rows.append(
            (r.name, format_seconds(r.bmojo_s), format_seconds(r.reference_s), speed, r.extra)
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    widths[-1] = min(widths[-1], 100)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i in (0, 4) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def format_report(report: dict[str, Any]) -> str:
    """The report of :func:`bmojo_core.bench.run_suite`: machine, table, notes."""
    m = report["machine"]
    peak = report["peak"]
    peak_note = describe_peak(peak)
    if peak.get("flop_per_update"):
        peak_note += (
            f"; the forward is counted as {peak['flop_per_update']} flop per state update "
            "(Δ·A 1 + exp 1 + FMA h 2 + FMA y 2)"
        )
    lines = [
        f"bmojo_core {m['bmojo_core']} | SIMD {m['simd_level']} | bmojo threads "
        f"{m['bmojo_threads']} | torch {m['torch']} ({m['torch_threads']} threads) | "
        f"Python {m['python']}",
        f"CPU: {m['cpu']} ({m['physical_cores']} cores) | {m['platform']}",
        "",
        format_table(report["results"]),
        "",
        "Notes:",
        "  times are medians of repeated calls (time.perf_counter); the reference "
        "(bmojo_core.reference, a Python loop over time, autograd for backward) is timed once.",
        "  speed-up = reference time / bmojo time; 'max rel err' = max|bmojo − ref| / max|ref|.",
        "  'saved' = bytes saved for backward beyond the inputs (bmojo vs reference);",
        "  'peak +' = peak resident memory of one forward+backward above the resident memory "
        "before it, in a fresh process;",
        "  it includes the output and the input gradients ('out+grads', O(B·D·L)).",
        "  " + peak_note,
    ]
    mem = report.get("memory")
    if mem and "error" in mem:
        lines.append(f"  memory measurement failed: {mem['error'][-300:]}")
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    out = dict(report)
    out["results"] = [asdict(r) for r in report["results"]]
    return json.dumps(out, indent=2, default=str)
