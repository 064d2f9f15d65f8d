"""The declaration of a stream's state: every piece is a tensor with a batch axis in front,
declared once, as a :class:`Piece`, by the module that owns it, and allocated, reset, saved,
loaded and handed to the native decode step from that declaration, by name.

A stream's state (design §6.4) is the stream's own pieces (:func:`stream_pieces`) plus, for
each block ``i`` of the model, the pieces the layer declares, named ``layers.{i}.{name}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MAX_POSITION", "Piece", "allocate", "layer_name", "stream_pieces"]

MAX_POSITION = 2**63 - 2
"""The largest position a stream slot may reach (its counters are int64; the native step
keeps one value of headroom)."""


@dataclass(frozen=True)
class Piece:
    """One tensor of a streaming state: shape ``(batch, *shape)``, dtype ``dtype``; a fresh
    or reset row holds ``empty`` everywhere."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    empty: int = 0


def stream_pieces(vocab_size: int, dtype: torch.dtype) -> list[Piece]:
    """The stream's own pieces: tokens consumed per slot, the logits of the last fed token
    and whether a slot has any."""
    return [
        Piece("position", (), torch.int64),
        Piece("logits", (vocab_size,), dtype),
        Piece("has_logits", (), torch.bool),
    ]


def layer_name(i: int, name: str) -> str:
    """The state name of piece ``name`` of block ``i``."""
    return f"layers.{i}.{name}"


def allocate(
    pieces: Sequence[Piece], batch: int, device: torch.device | None = None
) -> dict[str, Tensor]:
    """Fresh tensors ``(batch, *shape)`` filled with each piece's empty value."""
    return {
        p.name: torch.full((batch, *p.shape), p.empty, dtype=p.dtype, device=device) for p in pieces
    }
