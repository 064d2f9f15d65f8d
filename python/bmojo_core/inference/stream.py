"""Streaming inference (design §6.4).

``stream = model.stream(batch_size=B)`` holds ``B`` independent slots (sequences).
``stream.feed(tokens)`` consumes any number of tokens per slot (``(B,)`` or ``(B, T)``)
and returns their logits; feeding a sequence token by token or in chunks of any size
gives the parallel forward's logits (up to rounding). ``generate(n, temperature, top_k,
seed)`` samples ``n`` tokens per slot continuing from the last fed token. ``reset(slots)``
empties some slots and leaves the others untouched. The state has a fixed size (memory
constant in the stream length): the pieces the model's layers declare
(:mod:`.state`). ``save() -> bytes`` / ``Stream.load(model, data)`` use the format of
:mod:`.format`.

A model is streamable when it derives from :class:`StreamingLM` and provides what that
class lists (:class:`bmojo_core.layers.BMojoLM` does).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import _validate as V
from ..ops.decode import NativeState
from ..ops.eidetic import check_store
from . import decode as _decode
from . import format as _format
from .format import FORMAT_VERSION, MAGIC
from .state import MAX_POSITION, Piece, allocate, layer_name, stream_pieces

__all__ = ["FORMAT_VERSION", "MAGIC", "Stream", "StreamingLM"]


class StreamingLM:
    """Base of the language models a :class:`Stream` runs; ``stream(batch_size)`` opens
    one. A subclass (an ``nn.Module``) provides:

    * ``vocab_size``, ``dtype``, ``config`` (a dataclass, written into saved streams);
    * ``check_tokens(name, tokens) -> Tensor``: int64 tokens, range-checked;
    * ``layer_state_pieces() -> list[list[Piece]]``: each block's streaming state;
    * ``step_tokens(tokens (B, T), layers, pos (B,)) -> logits (B, T, vocab)``: the Python
      streaming step, updating each block's state dict in ``layers`` in place;
    * ``native_params() -> (top, layers)``: the parameters for the fused native step
      (:class:`bmojo_core.ops.decode.FusedLM`);
    * for each block's eidetic store, ``eidetic_stores() -> list[(policy, threshold) |
      None]`` (the invariants a loaded state must satisfy).
    """

    def stream(self, batch_size: int = 1) -> Stream:
        """A streaming decoder of ``batch_size`` independent slots (:class:`Stream`)."""
        return Stream(self, batch_size)


class Stream:
    """Streaming decoder over ``batch_size`` independent slots of a
    :class:`~bmojo_core.layers.BMojoLM` (see the module doc). Every piece of state is a
    tensor in ``self.state`` (name → tensor)."""

    def __init__(self, model, batch_size: int = 1):
        if not isinstance(model, StreamingLM):
            raise V.BmojoTypeError(f"model: expected a BMojoLM, got {type(model).__name__}")
        self.model = model
        self.batch_size = V.int_arg("batch_size", batch_size, 1)
        self.fused_decode: bool | None = None
        """One-token feeds use the fused native step (:mod:`.decode`): None follows
        ``BMOJO_FUSED_DECODE`` (default on), True forces it, False forces the Python step
        path."""
        self._plan: _decode.DecodePlan | None = None
        own = stream_pieces(model.vocab_size, model.dtype)
        layer_pieces = model.layer_state_pieces()
        self.pieces: list[Piece] = _pieces(own, layer_pieces)
        """The state's declaration, in the order it is saved."""
        self._native: NativeState | None = None
        with V.allocating("batch_size"):
            if _decode.native(model):
                # Native buffers: the fused step then receives nothing but the tokens.
                self._native = NativeState(own, layer_pieces, self.batch_size)
                mine, self._layers = self._native.stream_tensors, self._native.layer_tensors
            else:
                mine = allocate(own, self.batch_size)
                self._layers = [allocate(ps, self.batch_size) for ps in layer_pieces]
        self._state = {
            **mine,
            **{layer_name(i, k): t for i, st in enumerate(self._layers) for k, t in st.items()},
        }

    @property
    def state(self) -> dict[str, Tensor]:
        """The state tensors by name (``position``, ``logits``, ``has_logits``,
        ``layers.{i}.{piece}``). Assigning a dict of the same names, dtypes and shapes
        copies it in."""
        return self._state

    @state.setter
    def state(self, st: dict[str, Tensor]) -> None:
        if not isinstance(st, dict) or list(st) != list(self._state):
            raise V.BmojoValueError("state: expected a dict with the stream's pieces, in order")
        for name, t in st.items():
            ref = self._state[name]
            if not isinstance(t, Tensor) or t.dtype != ref.dtype or t.shape != ref.shape:
                raise V.BmojoValueError(
                    f"state[{name!r}]: expected a {V.dtype_name(ref.dtype)} tensor of shape "
                    f"{tuple(ref.shape)}"
                )
        _check_state(st, self.model, lambda why: V.BmojoValueError(f"state: {why}"))
        with torch.no_grad():
            for name, t in st.items():
                self._state[name].copy_(t)

    def __repr__(self) -> str:
        return f"Stream(batch_size={self.batch_size}, positions={self.positions.tolist()})"

    @property
    def positions(self) -> Tensor:
        """Tokens consumed per slot ``(batch_size,)`` int64."""
        return self._state["position"].clone()

    def nbytes(self) -> int:
        """Bytes held by the state tensors (constant over the stream's life)."""
        return sum(t.numel() * t.element_size() for t in self._state.values())

    # ------------------------------------------------------------------ feeding

    def _fused(self):
        """The fused step's model copy, or None when the Python path runs."""
        if self._native is None or not _decode.enabled(self.fused_decode):
            return None
        self._plan = _decode.plan_for(self.model, self._plan)
        return self._plan.fused

    def _fused_step(self, fused, tok: Tensor) -> Tensor:
        fused.step(tok, self._native)
        return self._state["logits"].clone()

    def feed(self, tokens) -> Tensor:
        """Consumes ``tokens`` ``(batch_size,)`` (one per slot) or ``(batch_size, T)``
        (T ≥ 0 per slot; int tensor or nested lists) and returns their logits
        ``(batch_size, vocab)`` or ``(batch_size, T, vocab)``. Everything is checked before
        the state changes: a failed call leaves the stream as it was."""
        if (
            isinstance(tokens, Tensor)
            and tokens.dtype == torch.int64
            and tokens.shape == (self.batch_size,)
            and tokens.device.type == "cpu"
        ):
            # Decode fast path: the native step checks the token ids before writing.
            fused = self._fused()
            if fused is not None:
                return self._fused_step(fused, tokens)
        if not isinstance(tokens, Tensor):
            tokens = V.int_tensor("tokens", tokens, "token ids")
        if tokens.dim() not in (1, 2) or tokens.shape[0] != self.batch_size:
            raise V.BmojoValueError(
                f"tokens: expected shape ({self.batch_size},) or ({self.batch_size}, T) "
                f"(one row per slot), got {tuple(tokens.shape)}"
            )
        tok = self.model.check_tokens("tokens", tokens)
        single = tok.dim() == 1
        if single:
            tok = tok[:, None]
        logits = self._run(tok)
        return logits[:, 0] if single else logits

    def _check_room(self, t: int) -> None:
        """Raises unless every slot can take ``t`` more tokens without its position
        passing :data:`~.state.MAX_POSITION` (checked before anything is written)."""
        pos = self._state["position"]
        if t and int(pos.max()) > MAX_POSITION - t:
            slot = int(pos.argmax())
            raise V.BmojoValueError(
                f"tokens: slot {slot} is at position {int(pos[slot])}; {t} more tokens would "
                f"pass the largest position {MAX_POSITION} (reset the slot)"
            )

    @torch.no_grad()
    def _run(self, tok: Tensor) -> Tensor:
        t = tok.shape[1]
        st = self._state
        if t == 0:
            return st["logits"].new_zeros(self.batch_size, 0, self.model.vocab_size)
        self._check_room(t)
        if t == 1:
            fused = self._fused()
            if fused is not None:
                return self._fused_step(fused, tok[:, 0])[:, None]
        logits = self.model.step_tokens(tok, self._layers, st["position"].clone())
        st["position"] += t
        st["logits"].copy_(logits[:, -1])
        st["has_logits"].fill_(True)
        return logits

    def generate(
        self,
        n: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Samples ``n`` tokens per slot ``(batch_size, n)`` int64, each fed back in. Starts
        from the logits of the last fed token (every slot must have one). ``temperature``
        0 is greedy (argmax); ``top_k`` keeps the k most likely tokens; ``seed`` makes the
        draw reproducible."""
        n = V.int_arg("n", n, 0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise V.BmojoTypeError(f"temperature: expected a float >= 0, got {temperature!r}")
        if not (temperature >= 0.0 and temperature < float("inf")):
            raise V.BmojoValueError(f"temperature: expected a finite float >= 0, got {temperature}")
        if top_k is not None:
            top_k = V.int_arg("top_k", top_k, 1)
        if seed is not None:
            seed = V.int_arg("seed", seed, -(2**63), 2**64 - 1)
        if not bool(self._state["has_logits"].all()):
            empty = (~self._state["has_logits"]).nonzero().flatten().tolist()
            raise V.BmojoValueError(
                f"generate: slots {empty} have no token yet; feed a prompt (at least one "
                "token) first"
            )
        self._check_room(n)
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        out = torch.empty(self.batch_size, n, dtype=torch.int64)
        for i in range(n):
            logits = self._state["logits"].to(torch.float64)
            if temperature == 0.0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            out[:, i] = nxt
            self._run(nxt[:, None])
        return out

    def reset(self, slots=None) -> None:
        """Empties the chosen slots (all by default): an int, a sequence of ints or a bool
        mask ``(batch_size,)``. The other slots are untouched."""
        idx = V.indices("slots", slots, self.batch_size, "slot")
        for p in self.pieces:
            self._state[p.name][idx] = p.empty

    # ------------------------------------------------------------------ save / load

    def save(self) -> bytes:
        """The stream's state as bytes (:mod:`.format`; no pickle)."""
        return _format.encode({**_header(self.model), "batch_size": self.batch_size}, self._state)

    @classmethod
    def load(cls, model, data: bytes) -> Stream:
        """Restores a stream saved by :meth:`save` for ``model`` (same configuration and
        dtype; e.g. in another process). Safe on untrusted bytes: everything is checked
        (sizes against the data's own length before anything is allocated, then the
        checksum and the state's invariants) and any defect raises ``BmojoValueError``."""
        if not isinstance(model, StreamingLM):
            raise V.BmojoTypeError(f"model: expected a BMojoLM, got {type(model).__name__}")
        saved = _format.read(data)
        b = saved.header.get("batch_size")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise _format.bad(f"invalid batch_size {b!r:.40}")
        pieces = _pieces(stream_pieces(model.vocab_size, model.dtype), model.layer_state_pieces())
        state = _format.decode(saved, _header(model), pieces, b)
        _check_state(state, model, _format.bad)
        stream = cls(model, b)  # as many bytes as the data held: checked above
        with torch.no_grad():
            for name, t in state.items():
                stream._state[name].copy_(t)
        return stream


def _header(model) -> dict:
    """What a saved stream's header must hold for ``model``."""
    return {
        "format": "bmojo_core.stream",
        "dtype": V.dtype_name(model.dtype),
        "model": dataclasses.asdict(model.config),
    }


def _pieces(own: list[Piece], layers: list[list[Piece]]) -> list[Piece]:
    """A stream's declaration, in the order it is saved: its own pieces, then each block's
    under ``layers.{i}.``."""
    return own + [
        dataclasses.replace(p, name=layer_name(i, p.name))
        for i, ps in enumerate(layers)
        for p in ps
    ]


def _check_state(state: dict[str, Tensor], model, bad) -> None:
    """Invariants a restored state must satisfy (else a later feed could misbehave);
    ``bad(why)`` makes the error."""
    pos = state["position"]
    if bool(((pos < 0) | (pos > MAX_POSITION)).any()):
        raise bad(f"position outside [0, {MAX_POSITION}]")
    if bool((state["has_logits"] != (pos > 0)).any()):
        raise bad("has_logits does not match the positions")
    for name, t in state.items():
        if t.is_floating_point() and name != "logits" and not bool(torch.isfinite(t).all()):
            raise bad(f"tensor {name!r} holds non-finite values")
    for i, store in enumerate(model.eidetic_stores()):
        if store is None:
            continue
        policy, threshold = store
        sp, cnt = state[layer_name(i, "store_positions")], state[layer_name(i, "store_count")]
        if not torch.equal(cnt, pos) or not torch.equal(state[layer_name(i, "innov_count")], pos):
            raise bad(f"layer {i}: store/innovation counts do not match the positions")
        try:
            check_store(sp, state[layer_name(i, "store_scores")], cnt, policy, threshold)
        except V.BmojoValueError as e:
            raise bad(f"layer {i}: invalid eidetic store ({e})") from None
        mp = state[layer_name(i, "mem_positions")]
        if bool(((mp < -1) | (mp >= pos[:, None])).any()):
            raise bad(f"layer {i}: invalid memory positions")
