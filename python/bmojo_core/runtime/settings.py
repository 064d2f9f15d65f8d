"""Run-time settings of the kernels: their thread pool and their instruction-set level.

Read from the environment when :mod:`bmojo_core.runtime` is first imported:

* ``BMOJO_NUM_THREADS``: threads of the kernels' pool (default: ``torch.get_num_threads()``,
  so that bmojo_core's pool and torch's never oversubscribe the cores: the kernels run
  while torch's intra-op pool is idle);
* ``BMOJO_SIMD``: force a lower instruction-set level (one of :func:`simd_levels`).

Results do not depend on the thread count (bitwise, for one SIMD level).
"""

from __future__ import annotations

import os

import torch

from .. import _core
from .._validate import int_arg
from ..errors import BmojoTypeError, BmojoValueError

__all__ = ["get_num_threads", "set_num_threads", "set_simd_level", "simd_level", "simd_levels"]


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


MAX_THREADS: int = _core.runtime.MAX_THREADS
"""The most threads :func:`set_num_threads` accepts (1024)."""


def set_num_threads(n: int) -> None:
    """Sets the kernels' thread count (an int in ``[1, MAX_THREADS]``). Results do not
    depend on it."""
    _core.runtime.set_num_threads(int_arg("n", n, 1, MAX_THREADS))


def configure_from_env() -> None:
    """Applies ``BMOJO_NUM_THREADS`` and ``BMOJO_SIMD`` (see the module doc)."""
    threads = os.environ.get("BMOJO_NUM_THREADS")
    if threads:
        try:
            n = int(threads)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_THREADS:
            raise BmojoValueError(
                f"BMOJO_NUM_THREADS: expected an integer in [1, {MAX_THREADS}], got {threads!r}"
            )
        set_num_threads(n)
    else:
        set_num_threads(min(max(1, torch.get_num_threads()), MAX_THREADS))
    level = os.environ.get("BMOJO_SIMD")
    if level:
        try:
            set_simd_level(level)
        except BmojoValueError as e:
            raise BmojoValueError(f"BMOJO_SIMD: {e}") from None
