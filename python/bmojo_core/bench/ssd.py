"""Mamba-2 SSD cases (group ``ssd``, design §2.4) and their inputs:
:func:`~bmojo_core.ops.mamba_chunk_scan_combined` forward and forward+backward at a
Mamba2-130m-like shape (b=1, l=2048, h=24, p=64, n=128, g=1; and b=8, l=512) against
transformers' pure-torch ``mamba2_chunk_scan`` (the chunked SSD its Mamba-2 models run on
CPU) and autograd through it, or against bmojo_core's float32 recurrence oracle where
transformers is not installed. GFLOP/s count the recurrence's 5 flops per (token, head,
channel, state) element (decay multiply, input FMA, output FMA), against the machine's
FMA peak.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops import mamba_chunk_scan_combined, reference
from ..runtime.info import machine_peak
from .harness import Case, Result, finish_parity

__all__ = ["FLOP_PER_SSD_ELEMENT", "make_ssd_inputs", "ssd_cases", "transformers_chunk_scan"]

FLOP_PER_SSD_ELEMENT = 5
# (batch, L, heads, head_dim, N, groups)
SSD_SHAPES = ((1, 2048, 24, 64, 128, 1), (8, 512, 24, 64, 128, 1))
SSD_SHAPES_QUICK = ((1, 256, 4, 64, 128, 1),)
CHUNK = 256
_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def make_ssd_inputs(
    b: int, length: int, h: int, p: int, n: int, g: int, *, requires_grad: bool = False
) -> dict[str, Any]:
    """Mamba-2 SSD inputs (x, dt, A, B, C, D, dt_bias) in float32, plus the output gradient
    with ``requires_grad``."""
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(b, length, h, p, generator=gen),
        "dt": torch.randn(b, length, h, generator=gen) * 0.5,
        "A": -torch.rand(h, generator=gen) - 0.2,
        "B": torch.randn(b, length, g, n, generator=gen),
        "C": torch.randn(b, length, g, n, generator=gen),
        "D": torch.randn(h, generator=gen),
        "dt_bias": torch.randn(h, generator=gen) * 0.1,
    }
    for v in inputs.values():
        v.requires_grad_(requires_grad)
    if requires_grad:
        inputs["grad_out"] = torch.randn(b, length, h, p, generator=gen)
    return inputs


def transformers_chunk_scan():
    """transformers' pure-torch ``mamba2_chunk_scan`` (unwrapped from its kernel hub
    decorator), or None where transformers is not installed."""
    try:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    except Exception:  # noqa: BLE001 - ImportError, or an install that fails to import
        return None
    return getattr(mamba2_chunk_scan, "__wrapped__", mamba2_chunk_scan)


def _ours(inp: dict[str, Any]) -> torch.Tensor:
    return mamba_chunk_scan_combined(*(inp[k] for k in _ARGS[:5]), CHUNK, D=inp["D"],
                                     dt_bias=inp["dt_bias"], dt_softplus=True)  # fmt: skip


def _peer(fn):
    def call(inp: dict[str, Any]) -> torch.Tensor:
        if fn is None:
            return reference.ssd_scan(*(inp[k] for k in _ARGS[:5]), D=inp["D"],
                                      dt_bias=inp["dt_bias"], dt_softplus=True)  # fmt: skip
        return fn(*(inp[k] for k in _ARGS[:5]), CHUNK, D=inp["D"], dt_bias=inp["dt_bias"],
                  dt_softplus=True)  # fmt: skip

    return call


def _with_grad(fn):
    def call(inp: dict[str, Any]) -> Any:
        out = fn(inp)
        return torch.autograd.grad(out, [inp[k] for k in _ARGS], inp["grad_out"])

    return call


def _finish_flops(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    finish_parity(case, inputs, res, out, ref_out)
    flops = case.params["flop"]
    if res.bmojo_s and flops:
        gflops = flops / res.bmojo_s / 1e9
        res.metrics["gflop_per_s"] = gflops
        peak = machine_peak().get("peak_gflops")
        text = f"{gflops:.0f} GFLOP/s"
        if peak:
            res.metrics["fraction_of_fma_peak"] = gflops / peak
            text += f" ({100 * gflops / peak:.0f}% of FMA peak)"
        res.extra = text + (f"; {res.extra}" if res.extra else "")


def ssd_cases(quick: bool) -> list[Case]:
    peer = transformers_chunk_scan()
    label = ("transformers mamba2_chunk_scan (torch)" if peer is not None
             else "bmojo_core.reference.ssd_scan")  # fmt: skip
    cases = []
    for b, length, h, p, n, g in SSD_SHAPES_QUICK if quick else SSD_SHAPES:
        shape = f"b={b} l={length} h={h} p={p} n={n} g={g}"
        elements = b * length * h * p * n
        params = {"batch": b, "L": length, "heads": h, "head_dim": p, "N": n, "groups": g,
                  "transformers": peer is not None}  # fmt: skip
        common = {"group": "ssd", "reference_label": label, "tokens": b * length,
                  "finish": _finish_flops}  # fmt: skip
        cases.append(
            Case(
                name=f"ssd fwd {shape}",
                description="mamba_chunk_scan_combined (D, dt_bias, softplus) forward vs "
                f"{label} (chunk {CHUNK}); GFLOP/s of the recurrence",
                setup=lambda b=b, length=length, h=h, p=p, n=n, g=g: make_ssd_inputs(
                    b, length, h, p, n, g
                ),
                bmojo=_ours,
                reference=_peer(peer),
                repeat=5,
                ref_repeat=3,
                ref_warmup=1,
                params={**params, "flop": FLOP_PER_SSD_ELEMENT * elements},
                **common,
            )
        )
        cases.append(
            Case(
                name=f"ssd fwd+bwd {shape}",
                description="mamba_chunk_scan_combined forward+backward (every input) vs "
                f"autograd through {label}; GFLOP/s count the kernels' flops: forward 5, "
                "backward 16 (recomputed states 5, adjoint 11) per element",
                setup=lambda b=b, length=length, h=h, p=p, n=n, g=g: make_ssd_inputs(
                    b, length, h, p, n, g, requires_grad=True
                ),
                bmojo=_with_grad(_ours),
                reference=_with_grad(_peer(peer)),
                grad=True,
                repeat=3,
                ref_repeat=2,
                ref_warmup=1,
                params={**params, "flop": (FLOP_PER_SSD_ELEMENT + 16) * elements},
                **common,
            )
        )
    return cases
