"""Bilinear-scan cases (group ``bilinear``, design §5) and their inputs:
:func:`~bmojo_core.ops.bilinear_scan` forward, sequential and parallel paths, against the
reference loop, n in {4, 16, 64}, L in {256, 4096}, batch 1, m = 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..ops import bilinear_scan, reference
from .harness import Case, finish_parity

__all__ = ["bilinear_cases", "make_bilinear_inputs"]

BILINEAR_NS = (4, 16, 64)
BILINEAR_LS = (256, 4096)
BILINEAR_NS_QUICK = (4, 16)
BILINEAR_LS_QUICK = (256, 1024)


def make_bilinear_inputs(batch: int, length: int, n: int, m: int = 2) -> dict[str, Any]:
    """Modulated bilinear scan inputs with p = m inputs (v = u), kept contractive:
    ||A0|| = 0.5 and sum_j ||N_j|| <= 0.2 for |u| of order 1."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g)
    A = 0.5 * A / torch.linalg.matrix_norm(A, ord=2)
    N = torch.randn(m, n, n, generator=g)
    N = 0.1 / m * N / torch.linalg.matrix_norm(N, ord=2)[:, None, None]
    return {
        "u": torch.randn(batch, length, m, generator=g).clamp(-2, 2),
        "A": A,
        "B": torch.randn(n, m, generator=g),
        "C": torch.randn(1, n, generator=g),
        "N": N,
    }


def _bilinear_call(method: str | None) -> Callable[[dict[str, Any]], Any]:
    """``bilinear_scan`` with ``method``, or the reference loop for None."""

    def call(inputs: dict[str, Any]) -> Any:
        if method is None:
            return reference.bilinear_scan(**inputs)
        return bilinear_scan(**inputs, method=method)

    return call


def bilinear_cases(quick: bool) -> list[Case]:
    cases = []
    for n in BILINEAR_NS_QUICK if quick else BILINEAR_NS:
        for L in BILINEAR_LS_QUICK if quick else BILINEAR_LS:
            shape = f"B=1 L={L} n={n} m=2"
            for method in ("sequential", "parallel"):
                cases.append(
                    Case(
                        name=f"bilinear fwd {method} {shape}",
                        group="bilinear",
                        description=f"bilinear_scan forward, method={method!r}, vs the "
                        "reference loop",
                        setup=lambda l=L, k=n: make_bilinear_inputs(1, l, k),
                        bmojo=_bilinear_call(method),
                        reference=_bilinear_call(None),
                        tokens=L,
                        finish=finish_parity,
                        params={"batch": 1, "L": L, "n": n, "m": 2, "method": method},
                    )
                )
    return cases
