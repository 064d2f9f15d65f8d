"""Companion-scan cases (group ``companion``, design §4) and their inputs:
:func:`~bmojo_core.ops.companion_scan` forward and forward+backward (time-invariant alpha,
beta, c, D) at (B=8, D=64, L=4096, n=4) and (B=1, D=1024, L=4096, n=8), against the
reference loop and against ``scipy.signal.lfilter`` looped over channels; the forward with
an input-dependent alpha against the reference loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..ops import companion_scan, reference
from .harness import Case, finish_parity

__all__ = ["companion_cases", "make_companion_inputs"]

# (batch, dim, L, n): many channels of a 4th-order filter, and a wide 8th-order one.
COMPANION_SHAPES = ((8, 64, 4096, 4), (1, 1024, 4096, 8))
COMPANION_SHAPES_QUICK = ((2, 64, 512, 4), (1, 128, 512, 8))


def _stable_alpha(dim: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Companion coefficients of a stable, well-conditioned filter per channel: poles
    r·exp(±iθ) with radius r in (0.6, 0.95) and angles spread over (0, π) with jitter (one
    real pole when n is odd), alpha = -(coefficients of prod (z - p_i))[1:]. Clustered poles
    would make the companion form ill-conditioned and the fp32 comparison meaningless."""
    k = torch.arange(n // 2, dtype=torch.float64)
    jitter = torch.rand(dim, n // 2, generator=gen, dtype=torch.float64) - 0.5
    theta = (k + 0.5 + 0.6 * jitter) * math.pi / max(1, n // 2 + n % 2)
    r = 0.6 + 0.35 * torch.rand(dim, n // 2, generator=gen, dtype=torch.float64)
    poles = torch.polar(r, theta)
    poles = torch.cat([poles, poles.conj()], dim=1)
    if n % 2:
        real = 0.6 + 0.35 * torch.rand(dim, 1, generator=gen, dtype=torch.float64)
        poles = torch.cat([poles, real.to(poles.dtype)], dim=1)
    coef = torch.zeros(dim, n + 1, dtype=poles.dtype)
    coef[:, 0] = 1.0
    for i in range(n):  # multiply by (z - p_i)
        coef[:, 1:] = coef[:, 1:] - poles[:, i : i + 1] * coef[:, :-1]
    return -coef[:, 1:].real


def make_companion_inputs(
    batch: int,
    dim: int,
    length: int,
    n: int,
    *,
    requires_grad: bool = False,
    varying: bool = False,
) -> dict[str, Any]:
    """Companion scan inputs, float32: fixed alpha (dim, n) from stable poles, or with
    ``varying`` an input-dependent alpha (batch, dim, L, n) that modulates those
    coefficients by ±10% per step."""
    g = torch.Generator().manual_seed(0)
    alpha = _stable_alpha(dim, n, g).float()
    if varying:
        mod = 1 + 0.1 * (2 * torch.rand(batch, dim, length, n, generator=g) - 1)
        alpha = alpha[None, :, None, :] * mod
    inputs = {
        "u": torch.randn(batch, dim, length, generator=g),
        "alpha": alpha.contiguous(),
        "beta": torch.rand(dim, generator=g) + 0.5,
        "c": torch.randn(dim, n, generator=g) / n,
        "D": torch.randn(dim, generator=g),
    }
    for v in inputs.values():
        v.requires_grad_(requires_grad)
    if requires_grad:
        inputs["grad_out"] = torch.randn(batch, dim, length, generator=g)
    return inputs


_COMPANION_ARGS = ("u", "alpha", "beta", "c", "D")


def _companion_call(fn: Callable[..., Any], grad: bool) -> Callable[[dict[str, Any]], Any]:
    def call(inputs: dict[str, Any]) -> Any:
        out = fn(**{k: inputs[k] for k in _COMPANION_ARGS})
        if not grad:
            return out
        return torch.autograd.grad(out, [inputs[k] for k in _COMPANION_ARGS], inputs["grad_out"])

    return call


def _lfilter_companion(inputs: dict[str, Any]) -> Any:
    """The same filter with scipy.signal.lfilter, one call per (batch, channel) row:
    numerator beta*c (ascending powers of z^-1), denominator [1, -alpha], plus D*u."""
    from scipy.signal import lfilter

    u = inputs["u"].detach().numpy()
    alpha = inputs["alpha"].detach().double().numpy()
    num = (inputs["beta"][:, None] * inputs["c"]).detach().double().numpy()
    dskip = inputs["D"].detach().numpy()
    out = u.copy()
    for b in range(u.shape[0]):
        for d in range(u.shape[1]):
            den = [1.0, *(-alpha[d])]
            out[b, d] = lfilter(num[d], den, u[b, d]) + dskip[d] * u[b, d]
    return torch.from_numpy(out)


def companion_cases(quick: bool) -> list[Case]:
    cases = []
    for batch, dim, L, n in COMPANION_SHAPES_QUICK if quick else COMPANION_SHAPES:
        shape = f"B={batch} D={dim} L={L} n={n}"
        params = {"batch": batch, "dim": dim, "L": L, "n": n}
        setup = lambda b=batch, d=dim, l=L, k=n: make_companion_inputs(b, d, l, k)  # noqa: E731
        setup_g = lambda b=batch, d=dim, l=L, k=n: make_companion_inputs(  # noqa: E731
            b, d, l, k, requires_grad=True
        )
        common = {"group": "companion", "params": params, "tokens": batch * L}
        cases += [
            Case(
                name=f"companion fwd {shape}",
                description="companion_scan forward (time-invariant alpha, beta, c, D) vs the "
                "reference loop",
                setup=setup,
                bmojo=_companion_call(companion_scan, False),
                reference=_companion_call(reference.companion_scan, False),
                finish=finish_parity,
                **common,
            ),
            Case(
                name=f"companion fwd {shape} vs lfilter",
                description="companion_scan forward vs scipy.signal.lfilter looped over channels",
                setup=setup,
                bmojo=_companion_call(companion_scan, False),
                reference=_lfilter_companion,
                reference_label="scipy.signal.lfilter",
                ref_repeat=3,
                ref_warmup=1,
                finish=finish_parity,
                **common,
            ),
            Case(
                name=f"companion fwd {shape} time-varying alpha",
                description="companion_scan forward with alpha (batch, dim, L, n) vs the "
                "reference loop",
                setup=lambda b=batch, d=dim, l=L, k=n: make_companion_inputs(
                    b, d, l, k, varying=True
                ),
                bmojo=_companion_call(companion_scan, False),
                reference=_companion_call(reference.companion_scan, False),
                finish=finish_parity,
                **common,
            ),
            Case(
                name=f"companion fwd+bwd {shape}",
                description="companion_scan forward+backward (all input grads) vs autograd "
                "through the reference loop",
                setup=setup_g,
                bmojo=_companion_call(companion_scan, True),
                reference=_companion_call(reference.companion_scan, True),
                grad=True,
                repeat=5,
                finish=finish_parity,
                **common,
            ),
        ]
    return cases
