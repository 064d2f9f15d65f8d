"""bmojo_core: fast, differentiable state-space scans for modern sequence models.

The CPU kernels live in the Rust extension ``bmojo_core._core``; this package wraps them
as torch custom ops (namespace ``bmojo``) with autograd. Importing it never touches CUDA.

Environment variables read at import:

* ``BMOJO_NUM_THREADS``: threads of the kernels' pool (default: ``torch.get_num_threads()``,
  so the two pools never oversubscribe the cores);
* ``BMOJO_SIMD``: force a lower instruction-set level (one of ``simd_levels()``).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

import torch

from . import _core, layers, realization, reference, stream
from .bilinear import bilinear_scan
from .companion import companion_scan
from .conv import causal_conv1d_fn, causal_conv1d_update
from .eidetic import EideticStore, eidetic_select, gather_positions, innovation_scores
from .errors import (
    BmojoCompileError,
    BmojoCudaError,
    BmojoError,
    BmojoTypeError,
    BmojoValueError,
)
from .layers import BMojoLayer, BMojoLM, SelectiveSSM, SlidingWindowAttention
from .scan import diag_scan, selective_scan_fn
from .step import selective_state_update
from .stream import Stream

try:
    __version__ = version("bmojo_core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "BMojoLM",
    "BMojoLayer",
    "BmojoCompileError",
    "BmojoCudaError",
    "BmojoError",
    "BmojoTypeError",
    "BmojoValueError",
    "EideticStore",
    "SelectiveSSM",
    "SlidingWindowAttention",
    "Stream",
    "__version__",
    "bilinear_scan",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "companion_scan",
    "diag_scan",
    "eidetic_select",
    "gather_positions",
    "get_num_threads",
    "innovation_scores",
    "layers",
    "realization",
    "reference",
    "selective_scan_fn",
    "selective_state_update",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "simd_levels",
    "stream",
]


def simd_level() -> str:
    """The instruction-set level the kernels use: avx512, avx2, sse2/neon or scalar."""
    return _core.runtime.simd_level()


def simd_levels() -> list[str]:
    """The levels this CPU supports, best first."""
    return list(_core.runtime.simd_levels())


def set_simd_level(name: str) -> None:
    """Forces a level, e.g. ``"scalar"`` (it must be in ``simd_levels()``)."""
    if not isinstance(name, str):
        raise BmojoTypeError(f"name: expected a str, got {type(name).__name__}")
    _core.runtime.set_simd_level(name)


def get_num_threads() -> int:
    """Threads the kernels may use."""
    return _core.runtime.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the kernels' thread count (>= 1). Results do not depend on it."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise BmojoTypeError(f"n: expected an int >= 1, got {n!r}")
    if n < 1:
        raise BmojoValueError(f"n: expected an int >= 1, got {n}")
    _core.runtime.set_num_threads(n)


def _configure_from_env() -> None:
    threads = os.environ.get("BMOJO_NUM_THREADS")
    if threads:
        try:
            n = int(threads)
        except ValueError:
            n = 0
        if n < 1:
            raise BmojoValueError(f"BMOJO_NUM_THREADS: expected an integer >= 1, got {threads!r}")
        set_num_threads(n)
    else:
        set_num_threads(max(1, torch.get_num_threads()))
    level = os.environ.get("BMOJO_SIMD")
    if level:
        try:
            set_simd_level(level)
        except BmojoValueError as e:
            raise BmojoValueError(f"BMOJO_SIMD: {e}") from None


_configure_from_env()
