"""What an MQAR accuracy means: its 95 % interval over the test queries and the ceiling of
what a model's attention can see.

* :func:`wilson_interval`: the Wilson score interval of a binomial proportion (the test
  queries are the trials). It stays inside [0, 1] and is honest near 0, where most rows of
  a hard MQAR table sit, unlike the normal approximation.
* :func:`recall_ceiling`: the share of test queries a model can answer by looking its
  answer up in what it attends to. A query at position ``t`` whose value token sits
  ``lag`` positions back (:func:`~bmojo_core.mqar.data.value_lags`) is inside a sliding
  window of ``w`` tokens iff ``lag < w``; ``n_eidetic`` retained tokens can hold the values
  of at most ``n_eidetic`` of a row's other queries. The SSM state (and so B'MOJO's fading
  tokens) may carry any token, with no exact bound: the ceiling counts the window and the
  eidetic tokens only, and a pure SSM has none (None).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validate import int_arg
from ..errors import BmojoValueError

__all__ = ["recall_ceiling", "wilson_interval"]


def wilson_interval(
    successes: int, trials: int, z: float = 1.959963984540054
) -> tuple[float, float]:
    """Wilson score interval of ``successes / trials`` (default: 95 %, ``z`` = Φ⁻¹(0.975))."""
    k, n = int_arg("successes", successes, 0), int_arg("trials", trials, 1)
    if k > n:
        raise BmojoValueError(f"successes: expected <= trials ({n}), got {k}")
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
        raise BmojoValueError(f"z: expected a finite number > 0, got {z!r}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the bounds are exactly 0 at k = 0 and exactly 1 at k = n (rounding would miss them)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def recall_ceiling(lags: Tensor, window: int, n_eidetic: int = 0) -> float | None:
    """Share of the queries of ``lags`` ``(rows, queries)`` whose answer lies within a
    window of ``window`` tokens, plus per row at most ``n_eidetic`` of the others (what the
    eidetic tokens can hold). ``window = 0`` (a pure SSM): None, no exact ceiling."""
    w, e = int_arg("window", window, 0), int_arg("n_eidetic", n_eidetic, 0)
    if not isinstance(lags, Tensor) or lags.dim() != 2 or lags.numel() == 0:
        raise BmojoValueError("lags: expected a non-empty (rows, queries) tensor")
    if w == 0:
        return None
    inside = lags < w
    outside = (~inside).sum(1)
    seen = inside.sum(1) + torch.clamp(outside, max=e)
    return float(seen.sum()) / lags.numel()
