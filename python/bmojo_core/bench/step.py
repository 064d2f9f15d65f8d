"""Decode-step cases (group ``decode``, design §2.3) and their inputs:
:func:`~bmojo_core.ops.selective_state_update` (no grad), µs per call from Python at B=1
and B=64 (D=1536, N=16), against the reference step
(:func:`bmojo_core.ops.reference.selective_state_update`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops import reference, selective_state_update
from .harness import Case, finish_per_call
from .scan import inverse_softplus, shape_name

__all__ = ["decode_cases", "make_step_inputs", "warm_up_reference"]

# (batch, dim, N): one sequence and a batch of 64 at Mamba-1's inner width.
DECODE_SHAPES = ((1, 1536, 16), (64, 1536, 16))
DECODE_SHAPES_QUICK = ((1, 256, 16), (8, 256, 16))


def make_step_inputs(
    batch: int, dim: int, N: int, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Any]:
    """Inputs of ``selective_state_update`` (one decode token, every option on)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    return {
        "state": randn(batch, dim, N),
        "x": randn(batch, dim),
        "dt": 0.1 * randn(batch, dim),
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1).to(dtype),
        "B": randn(batch, N),
        "C": randn(batch, N),
        "D": torch.ones(dim, dtype=dtype),
        "z": randn(batch, dim),
        "dt_bias": inverse_softplus(torch.full((dim,), 0.01)).to(dtype),
        "dt_softplus": True,
    }


def _bmojo_step(**kw: Any) -> Any:
    return selective_state_update(**kw)


def _ref_step(**kw: Any) -> Any:
    return reference.selective_state_update(**kw)


def warm_up_reference() -> None:
    """One tiny call of the reference step (torch's one-time initialisation)."""
    with torch.no_grad():
        _ref_step(**make_step_inputs(1, 4, 2))


def decode_cases(quick: bool) -> list[Case]:
    cases = []
    for batch, dim, N in DECODE_SHAPES_QUICK if quick else DECODE_SHAPES:
        shape = shape_name(batch, dim, N)
        cases.append(
            Case(
                name=f"decode step {shape}",
                group="decode",
                description="selective_state_update, one token, no grad, µs per Python call",
                setup=lambda b=batch, d=dim, n=N: make_step_inputs(b, d, n),
                bmojo=lambda inp: _bmojo_step(**inp),
                reference=lambda inp: _ref_step(**inp),
                repeat=5,
                warmup=50,
                inner=100 if quick else 400,  # 5 × 400 = 2000 timed calls
                ref_repeat=3,
                ref_warmup=2,
                ref_inner=20 if quick else 50,
                updates=batch * dim * N,
                tokens=batch,
                finish=finish_per_call,
                params={"batch": batch, "dim": dim, "N": N},
            )
        )
    return cases
