"""The fused native decode step of a whole B'MOJO language model (design §6.4): one call
per token runs the embedding, every block (LayerNorm, SSM step, memory-block refresh, ring
write, attention over [memory, window], innovation score and store push, MLP with exact
GELU), the final norm and the tied head, for every slot of a stream.

:class:`FusedLM` holds a copy of the model's parameters in the layout the kernel reads,
built from the dictionaries the modules export (``native_params``; :func:`linear` and
:func:`layer_norm` write their entries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._native import core, inout, view

__all__ = ["FusedLM", "linear", "layer_norm"]


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

    def __init__(
        self, top: dict[str, Any], layers: Sequence[dict[str, Any]], dtype: torch.dtype
    ):  # fmt: skip
        vocab, d_model = top["embedding"].shape
        with torch.no_grad():
            self._native = core.decode.DecodePlan(vocab, d_model,
                _arrays(top), [_arrays(x) for x in layers],
                dtype == torch.float64,
            )  # fmt: skip
        self.dtype = dtype

    def step(
        self, tokens: Tensor, stream: dict[str, Tensor], layers: Sequence[dict[str, Tensor]]
    ) -> None:
        """One token per slot ``tokens (batch,)`` int64 through every layer, updating the
        stream's state in place: ``stream`` its own pieces, ``layers`` each block's, by name.
        Everything is checked before anything is written."""
        arrays = [inout(stream[k]) for k in ("position", "logits", "has_logits")]
        for st in layers:
            for name in core.decode.DecodePlan.state_names():
                t = st.get(name)
                arrays.append(inout(t) if t is not None else self._absent(name))
        self._native.step(tokens.contiguous().numpy(), arrays)

    def _absent(self, name: str):
        """A piece the layer does not have (no SSM, window or eidetic memory): an empty
        array of the piece's dtype, a distinct one each (the kernel borrows each)."""
        if name in ("innov_count", "store_positions", "store_count", "mem_positions"):
            return np.empty(0, np.int64)
        if name == "store_scores":
            return np.empty(0, np.float64)
        if name == "mem_mask":
            return np.empty(0, np.bool_)
        return np.empty(0, np.float64 if self.dtype == torch.float64 else np.float32)
