"""The fused native decode step of a whole B'MOJO language model (design §6.4): one call
per token runs the embedding, every block (LayerNorm, SSM step, memory-block refresh, ring
write, attention over [memory, window], innovation score and store push, MLP with exact
GELU), the final norm and the tied head, for every slot of a stream.

:class:`FusedLM` holds a copy of the model's parameters in the layout the kernel reads,
built from the dictionaries the modules export (``native_params``; :func:`linear` and
:func:`layer_norm` write their entries). :class:`NativeState` owns a stream's state buffers
natively, allocated from the stream's declaration (pieces with a name, shape, dtype and
empty value) and exposed as tensors over the same memory, so a step passes only the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import dtype_name
from ._native import core, view

__all__ = ["FusedLM", "NativeState", "layer_norm", "linear"]


def linear(prefix: str, lin: nn.Linear) -> dict[str, Any]:
    """The entries of a linear map: ``{prefix}_w`` (out, in) and ``{prefix}_b``."""
    return {f"{prefix}_w": lin.weight, f"{prefix}_b": lin.bias}


def layer_norm(prefix: str, ln: nn.LayerNorm) -> dict[str, Any]:
    """The entries of a LayerNorm: ``{prefix}_w``, ``{prefix}_b``, ``{prefix}_eps``."""
    return {f"{prefix}_w": ln.weight, f"{prefix}_b": ln.bias, f"{prefix}_eps": float(ln.eps)}


def _arrays(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with every tensor as a contiguous NumPy array (nested dicts too)."""
    out: dict[str, Any] = {}
    for k, v in spec.items():
        if isinstance(v, dict):
            out[k] = _arrays(v)
        elif isinstance(v, Tensor):
            out[k] = view(v)
        else:
            out[k] = v
    return out


class FusedLM:
    """A model's parameters copied into native memory for the fused decode step.

    ``top`` holds ``embedding (vocab, d_model)`` and the final norm (:func:`layer_norm`
    ``norm_f``); ``layers`` one dict per block (the block's ``native_params``). ``dtype``
    float32 or float64, the parameters' dtype."""

    def __init__(self, top: dict[str, Any], layers: Sequence[dict[str, Any]], dtype: torch.dtype):
        vocab, d_model = top["embedding"].shape
        with torch.no_grad():
            self._native = core.decode.DecodePlan(
                vocab, d_model, _arrays(top), [_arrays(x) for x in layers], dtype == torch.float64
            )
        self.dtype = dtype

    def step(self, tokens: Tensor, state: NativeState) -> None:
        """One token per slot ``tokens (batch,)`` int64 through every layer, updating
        ``state`` in place. Everything is checked before anything is written."""
        self._native.step(tokens.contiguous().numpy(), state._native)


class NativeState:
    """A stream's state owned natively: ``stream`` (the stream's own pieces) and
    ``layers`` (each block's) are declarations with ``name``, ``shape`` (per row),
    ``dtype`` (float32, float64, int64 or bool: a float16/bfloat16 model streams in Python)
    and ``empty``; the tensors
    :attr:`stream_tensors` and :attr:`layer_tensors` (name → tensor ``(batch, *shape)``)
    view the native buffers and start at the pieces' empty values."""

    def __init__(self, stream: Sequence[Any], layers: Sequence[Sequence[Any]], batch: int):
        def spec(pieces):
            return [(p.name, dtype_name(p.dtype), (batch, *p.shape)) for p in pieces]

        self._native = core.decode.DecodeState(spec(stream), [spec(ps) for ps in layers])

        def tensors(i, pieces):
            out = {p.name: torch.from_numpy(self._native.array(i, p.name)) for p in pieces}
            for p in pieces:
                out[p.name].fill_(p.empty)
            return out

        self.stream_tensors: dict[str, Tensor] = tensors(None, stream)
        self.layer_tensors: list[dict[str, Tensor]] = [
            tensors(i, ps) for i, ps in enumerate(layers)
        ]
