"""The B'MOJO language model: token embedding, pre-norm residual blocks (B'MOJO layer +
MLP), final norm, head tied to the embedding; trained in parallel, streamed token by token
(:class:`~bmojo_core.inference.stream.Stream`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate as V
from .._validate import int_arg
from ..inference.state import Piece
from ..inference.stream import StreamingLM
from ..ops.decode import layer_norm, linear
from .bmojo import BMojoLayer

__all__ = ["BMojoConfig", "BMojoLM"]


@dataclass(frozen=True)
class BMojoConfig:
    """The architecture of a :class:`BMojoLM`. The fields after ``n_layers`` (but
    ``mlp_ratio``) configure every block's :class:`~bmojo_core.layers.BMojoLayer` and keep
    its meaning and defaults; ``mlp_ratio`` sizes the blocks' MLPs."""

    vocab_size: int
    d_model: int
    n_layers: int
    window: int
    n_fading: int
    n_eidetic: int
    d_state: int = 16
    n_heads: int | None = None
    mlp_ratio: int = 4
    d_conv: int = 4
    expand: int = 2
    innovation_taps: int = 4
    innovation_metric: str = "mse"
    eidetic_policy: str = "topk"
    eidetic_threshold: float = 0.0

    def __post_init__(self) -> None:
        # The layer checks its own settings; these four are the model's.
        for name, lo in (("vocab_size", 1), ("d_model", 1), ("n_layers", 0), ("mlp_ratio", 1)):
            object.__setattr__(self, name, int_arg(name, getattr(self, name), lo))
        if isinstance(self.eidetic_threshold, bool) or not isinstance(
            self.eidetic_threshold, (int, float)
        ):
            raise V.BmojoTypeError(
                f"eidetic_threshold: expected a float, got {self.eidetic_threshold!r}"
            )
        object.__setattr__(self, "eidetic_threshold", float(self.eidetic_threshold))

    def layer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of every block's ``BMojoLayer`` (beside ``d_model``)."""
        model = ("vocab_size", "d_model", "n_layers", "mlp_ratio")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in model}


class Block(nn.Module):
    """Pre-norm residual block: ``h += BMojoLayer(LN(h)); h += MLP(LN(h))`` (GELU MLP)."""

    def __init__(self, config: BMojoConfig, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        d, ff = config.d_model, config.mlp_ratio * config.d_model
        self.norm1 = nn.LayerNorm(d, **fk)
        self.mixer = BMojoLayer(d, **config.layer_kwargs(), **fk)
        self.norm2 = nn.LayerNorm(d, **fk)
        self.mlp = nn.Sequential(nn.Linear(d, ff, **fk), nn.GELU(), nn.Linear(ff, d, **fk))

    def forward(self, h: Tensor, mixer: Any = None) -> Tensor:
        """``mixer(layer, x)`` in place of ``layer(x)`` if given (see
        :meth:`BMojoLM.forward_with`)."""
        x = self.norm1(h)
        h = h + (self.mixer(x) if mixer is None else mixer(self.mixer, x))
        return h + self.mlp(self.norm2(h))

    def step(self, h: Tensor, st: dict[str, Tensor], pos: Tensor) -> Tensor:
        """Streaming: :meth:`forward` of ``h (batch, T, d_model)`` at positions ``pos``."""
        h = h + self.mixer.step(self.norm1(h), st, pos)
        return h + self.mlp(self.norm2(h))

    def native_params(self) -> dict[str, Any]:
        """The block for the fused native decode step (:mod:`bmojo_core.ops.decode`)."""
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return {
            **self.mixer.native_params(),
            "d_ff": fc1.out_features,
            **layer_norm("norm1", self.norm1),
            **layer_norm("norm2", self.norm2),
            **linear("fc1", fc1),
            **linear("fc2", fc2),
        }


class BMojoLM(StreamingLM, nn.Module):
    """Language model: token embedding, ``n_layers`` pre-norm residual :class:`Block`\\ s,
    final LayerNorm, head tied to the embedding.
    ``forward(tokens (batch, L)) → logits (batch, L, vocab_size)``; ``stream(batch_size)``
    opens a :class:`~bmojo_core.inference.stream.Stream`.

    Built from a :class:`BMojoConfig` or from its fields: ``BMojoLM(config)`` or
    ``BMojoLM(vocab_size, d_model, n_layers, window, n_fading, n_eidetic, **options)``;
    ``device`` and ``dtype`` place the parameters.
    """

    def __init__(self, *args: Any, device=None, dtype=None, **kwargs: Any):
        super().__init__()
        if len(args) == 1 and not kwargs and isinstance(args[0], BMojoConfig):
            config = args[0]
        else:
            config = BMojoConfig(*args, **kwargs)
        self.config = config
        fk = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(config.vocab_size, config.d_model, **fk)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(config, **fk) for _ in range(config.n_layers)])
        self.norm_f = nn.LayerNorm(config.d_model, **fk)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def check_tokens(self, name: str, tokens: object) -> Tensor:
        """``tokens`` as int64 after checking the type and the vocabulary range."""
        V.tensor(name, tokens, dtypes=(torch.int32, torch.int64, torch.int16, torch.uint8))
        if tokens.numel() and (  # type: ignore[union-attr]
            int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size  # type: ignore[union-attr]
        ):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)][0]  # type: ignore[index,operator]
            raise V.BmojoValueError(
                f"{name}: token id {int(bad)} is outside the vocabulary [0, {self.vocab_size})"
            )
        return tokens.long()  # type: ignore[union-attr]

    def head(self, h: Tensor) -> Tensor:
        return F.linear(self.norm_f(h), self.embedding.weight)

    def forward(self, tokens: Tensor, label_mask: Tensor | None = None) -> Tensor:
        """Logits ``(batch, L, vocab)``; with ``label_mask (batch, L)`` bool only those of
        the masked positions, ``(n, vocab)`` in row-major order (training on a few labelled
        positions then skips the head and its softmax everywhere else)."""
        return self.forward_with(tokens, None, label_mask)

    def forward_with(self, tokens: Tensor, mixer: Any, label_mask: Tensor | None = None) -> Tensor:
        """:meth:`forward` with each block's mixer run as ``mixer(layer, x)`` (None: as
        ``layer(x)``): :mod:`bmojo_core.distributed` runs the layers over shards."""
        tokens = self.check_tokens("tokens", tokens)
        V.shape("tokens", tokens, (None, None), "(batch, L)")
        if label_mask is not None:
            V.tensor("label_mask", label_mask, dtypes=(torch.bool,))
            V.shape("label_mask", label_mask, tuple(tokens.shape), "(batch, L) like tokens")
        h = self.embedding(tokens)
        for blk in self.blocks:
            h = blk(h, mixer)
        return self.head(h if label_mask is None else h[label_mask])

    # ------------------------------------------------------------------ streaming

    def layer_state_pieces(self) -> list[list[Piece]]:
        return [blk.mixer.state_pieces() for blk in self.blocks]

    @torch.no_grad()
    def step_tokens(self, tokens: Tensor, layers: list[dict[str, Tensor]], pos: Tensor) -> Tensor:
        h = self.embedding(tokens)
        for blk, st in zip(self.blocks, layers, strict=True):
            h = blk.step(h, st, pos)
        return self.head(h)

    def native_params(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        top = {"embedding": self.embedding.weight, **layer_norm("norm_f", self.norm_f)}
        return top, [blk.native_params() for blk in self.blocks]

    def eidetic_stores(self) -> list[tuple[str, float] | None]:
        return [
            (b.mixer.eidetic_policy, b.mixer.eidetic_threshold) if b.mixer.n_eidetic else None
            for b in self.blocks
        ]
