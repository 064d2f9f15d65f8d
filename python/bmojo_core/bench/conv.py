"""Causal-convolution cases (group ``conv``, design §3.2) and their inputs:
:func:`~bmojo_core.ops.causal_conv1d_fn` (bias, SiLU) forward and forward+backward against
``torch.nn.functional.conv1d`` (depthwise, left-padded) at (B=8, D=1536, L=2048, K=4), in
GB/s; :func:`~bmojo_core.ops.causal_conv1d_update` µs per call at D=1536 against the
reference update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..ops import causal_conv1d_fn, causal_conv1d_update, reference
from .harness import Case, Result, finish_parity, finish_per_call

__all__ = ["conv_cases", "make_conv_inputs", "make_conv_update_inputs"]

# (batch, dim, L, K): Mamba-1's convolution (width 4) at its inner width.
CONV_SHAPE = (8, 1536, 2048, 4)
CONV_SHAPE_QUICK = (2, 256, 512, 4)
CONV_UPDATE_DIM = 1536


def make_conv_inputs(
    batch: int, dim: int, length: int, width: int, *, requires_grad: bool = False
) -> dict[str, Any]:
    """``causal_conv1d_fn`` inputs x (batch, dim, L), weight (dim, width), bias (dim), plus
    the output gradient with ``requires_grad``."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(batch, dim, length, generator=g),
        "weight": torch.randn(dim, width, generator=g) / width,
        "bias": torch.randn(dim, generator=g),
    }
    for v in inputs.values():
        v.requires_grad_(requires_grad)
    if requires_grad:
        inputs["grad_out"] = torch.randn(batch, dim, length, generator=g)
    return inputs


def make_conv_update_inputs(batch: int, dim: int, width: int) -> dict[str, Any]:
    """``causal_conv1d_update`` inputs (one token, SiLU)."""
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(batch, dim, generator=g),
        "conv_state": torch.randn(batch, dim, width - 1, generator=g),
        "weight": torch.randn(dim, width, generator=g) / width,
        "bias": torch.randn(dim, generator=g),
        "activation": "silu",
    }


_CONV_ARGS = ("x", "weight", "bias")


def _torch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv with torch: left padding K-1, groups=D, then SiLU."""
    width = weight.shape[1]
    y = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x, (width - 1, 0)), weight[:, None], bias, groups=x.shape[1]
    )
    return torch.nn.functional.silu(y)


def _bmojo_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return causal_conv1d_fn(x, weight, bias, activation="silu")


def _conv_call(fn: Callable[..., Any], grad: bool) -> Callable[[dict[str, Any]], Any]:
    def call(inputs: dict[str, Any]) -> Any:
        out = fn(*(inputs[k] for k in _CONV_ARGS))
        if not grad:
            return out
        return torch.autograd.grad(out, [inputs[k] for k in _CONV_ARGS], inputs["grad_out"])

    return call


def _finish_bandwidth(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    finish_parity(case, inputs, res, out, ref_out)
    nbytes = case.params.get("bytes", 0)
    if res.bmojo_s and nbytes:
        gbs = nbytes / res.bmojo_s / 1e9
        res.metrics["gb_per_s"] = gbs
        res.extra = f"{gbs:.1f} GB/s" + (f"; {res.extra}" if res.extra else "")
        if res.reference_s:
            res.metrics["reference_gb_per_s"] = nbytes / res.reference_s / 1e9


def conv_cases(quick: bool) -> list[Case]:
    batch, dim, L, K = CONV_SHAPE_QUICK if quick else CONV_SHAPE
    shape = f"B={batch} D={dim} L={L} K={K}"
    act = batch * dim * L * 4  # one float32 activation tensor, bytes
    common = {"group": "conv", "reference_label": "torch F.conv1d", "tokens": batch * L}
    cases = [
        Case(
            name=f"conv fwd {shape}",
            description="causal_conv1d_fn (bias, SiLU) vs F.conv1d depthwise with left padding "
            "(+ SiLU); GB/s counts x read + out written",
            setup=lambda: make_conv_inputs(batch, dim, L, K),
            bmojo=_conv_call(_bmojo_conv, False),
            reference=_conv_call(_torch_conv, False),
            ref_repeat=7,
            ref_warmup=1,
            finish=_finish_bandwidth,
            params={"batch": batch, "dim": dim, "L": L, "K": K, "bytes": 2 * act},
            **common,
        ),
        Case(
            name=f"conv fwd+bwd {shape}",
            description="causal_conv1d_fn forward+backward (dx, dweight, dbias) vs autograd "
            "through F.conv1d; GB/s counts x, dy read (twice: fwd, bwd) + out, dx written",
            setup=lambda: make_conv_inputs(batch, dim, L, K, requires_grad=True),
            bmojo=_conv_call(_bmojo_conv, True),
            reference=_conv_call(_torch_conv, True),
            grad=True,
            ref_repeat=5,
            ref_warmup=1,
            finish=_finish_bandwidth,
            params={"batch": batch, "dim": dim, "L": L, "K": K, "bytes": 5 * act},
            **common,
        ),
    ]
    for b in (1, 64):
        cases.append(
            Case(
                name=f"conv update B={b} D={CONV_UPDATE_DIM} K={K}",
                group="conv",
                description="causal_conv1d_update, one token, no grad, µs per Python call",
                setup=lambda b=b: make_conv_update_inputs(b, CONV_UPDATE_DIM, K),
                bmojo=lambda inp: causal_conv1d_update(**inp),
                reference=lambda inp: reference.causal_conv1d_update(**inp),
                repeat=5,
                warmup=50,
                inner=100 if quick else 400,
                ref_repeat=3,
                ref_warmup=2,
                ref_inner=20,
                tokens=b,
                finish=finish_per_call,
                params={"batch": b, "dim": CONV_UPDATE_DIM, "K": K},
            )
        )
    return cases
