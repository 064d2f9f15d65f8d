"""Streaming inference for :class:`bmojo_core.layers.BMojoLM` (SPEC §6.4).

``stream = model.stream(batch_size=B)`` holds ``B`` independent slots (sequences).
``stream.feed(tokens)`` consumes any number of tokens per slot (``(B,)`` or ``(B, T)``)
and returns their logits; feeding a sequence token by token or in chunks of any size
gives the parallel forward's logits (up to rounding). ``generate(n, temperature, top_k,
seed)`` samples ``n`` tokens per slot continuing from the last fed token. ``reset(slots)``
empties some slots and leaves the others untouched. The state has a fixed size (memory
constant in the stream length).

``save() -> bytes`` / ``Stream.load(model, data)``: a versioned binary format, no pickle::

    magic  b"BMOJOST\\0" (8 bytes) | version u32 LE | header length u64 LE
    header UTF-8 JSON: format, version, model config, dtype, batch_size, tensors
           [{name, dtype, shape, offset, nbytes}]
    raw little-endian tensor bytes (offsets relative to the start of this section)
    SHA-256 of everything above (32 bytes)

``load`` checks the magic, version, checksum, the model configuration and dtype, every
tensor's name/dtype/shape against a fresh stream of the same batch size and the
invariants of the eidetic stores, and raises :class:`bmojo_core.BmojoValueError` with a
clear message on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import torch
from torch import Tensor

from . import _core
from . import _validate as V
from . import decode as _decode

__all__ = ["FORMAT_VERSION", "MAGIC", "Stream"]

MAGIC = b"BMOJOST\0"
FORMAT_VERSION = 1
_PRE = struct.Struct("<8sIQ")
_DIGEST = 32
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "bool": torch.bool,
}


class Stream:
    """Streaming decoder over ``batch_size`` independent slots of a
    :class:`~bmojo_core.layers.BMojoLM` (see the module doc). Every piece of state is a
    plain tensor in ``self.state`` (name → tensor)."""

    def __init__(self, model, batch_size: int = 1):
        from .layers import BMojoLM

        if not isinstance(model, BMojoLM):
            raise V.BmojoTypeError(f"model: expected a BMojoLM, got {type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise V.BmojoTypeError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if batch_size < 1:
            raise V.BmojoValueError(f"batch_size: expected an int >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.fused_decode: bool | None = None
        """One-token feeds use the fused native step (:mod:`bmojo_core.decode`): None
        follows ``BMOJO_FUSED_DECODE`` (default on), True forces it, False forces the
        Python step path."""
        self.state = self._fresh(model, batch_size)

    @property
    def state(self) -> dict[str, Tensor]:
        """The state tensors by name (``position``, ``logits``, ``has_logits``,
        ``layers.{i}.{piece}``)."""
        return self._state

    @state.setter
    def state(self, st: dict[str, Tensor]) -> None:
        self._state = st
        # Per-layer views of the same tensors, built once (the decode loop reads them).
        n = len(self.model.blocks)
        self._layers = [{} for _ in range(n)]
        for k, v in st.items():
            if k.startswith("layers."):
                i, piece = k[len("layers.") :].split(".", 1)
                self._layers[int(i)][piece] = v

    @staticmethod
    def _fresh(model, b: int) -> dict[str, Tensor]:
        st: dict[str, Tensor] = {
            "position": torch.zeros(b, dtype=torch.int64),
            "logits": torch.zeros(b, model.vocab_size, dtype=model.dtype),
            "has_logits": torch.zeros(b, dtype=torch.bool),
        }
        for i, blk in enumerate(model.blocks):
            for k, v in blk.mixer.init_state(b).items():
                st[f"layers.{i}.{k}"] = v
        return st

    def __repr__(self) -> str:
        return f"Stream(batch_size={self.batch_size}, positions={self.positions.tolist()})"

    @property
    def positions(self) -> Tensor:
        """Tokens consumed per slot ``(batch_size,)`` int64."""
        return self.state["position"].clone()

    def nbytes(self) -> int:
        """Bytes held by the state tensors (constant over the stream's life)."""
        return sum(t.numel() * t.element_size() for t in self.state.values())

    # ------------------------------------------------------------------ feeding

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
            and _decode.enabled(self)
        ):
            # Decode fast path: the native step checks the token ids before writing.
            plan = _decode.plan_for(self)
            if plan is not None:
                return _decode.step(self, plan, tokens)
        if not isinstance(tokens, Tensor):
            try:
                tokens = torch.as_tensor(tokens, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError):
                raise V.BmojoTypeError(
                    f"tokens: expected an int tensor or nested lists of ints, got "
                    f"{type(tokens).__name__}"
                ) from None
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

    @torch.no_grad()
    def _run(self, tok: Tensor) -> Tensor:
        model = self.model
        t = tok.shape[1]
        if t == 0:
            return self.state["logits"].new_zeros(self.batch_size, 0, model.vocab_size)
        if t == 1 and _decode.enabled(self):
            plan = _decode.plan_for(self)
            if plan is not None:
                return _decode.step(self, plan, tok[:, 0])[:, None]
        pos = self.state["position"].clone()
        h = model.embedding(tok)
        for i, blk in enumerate(model.blocks):
            h = blk.step(h, self._layers[i], pos)
        logits = model.head(h)
        self.state["position"] += t
        self.state["logits"].copy_(logits[:, -1])
        self.state["has_logits"].fill_(True)
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
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise V.BmojoValueError(f"n: expected an int >= 0, got {n!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise V.BmojoTypeError(f"temperature: expected a float >= 0, got {temperature!r}")
        if not (temperature >= 0.0 and temperature < float("inf")):
            raise V.BmojoValueError(f"temperature: expected a finite float >= 0, got {temperature}")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise V.BmojoValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
        if not bool(self.state["has_logits"].all()):
            empty = (~self.state["has_logits"]).nonzero().flatten().tolist()
            raise V.BmojoValueError(
                f"generate: slots {empty} have no token yet; feed a prompt (at least one "
                "token) first"
            )
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        out = torch.empty(self.batch_size, n, dtype=torch.int64)
        for i in range(n):
            logits = self.state["logits"].to(torch.float64)
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
        b = self.batch_size
        if slots is None:
            idx = torch.arange(b)
        elif isinstance(slots, Tensor) and slots.dtype == torch.bool:
            V.shape("slots", slots, (b,), "(batch_size,) bool mask")
            idx = slots.nonzero().flatten()
        else:
            if isinstance(slots, int) and not isinstance(slots, bool):
                slots = [slots]
            try:
                idx = torch.as_tensor(slots, dtype=torch.int64).flatten()
            except (TypeError, ValueError, RuntimeError):
                raise V.BmojoTypeError(
                    f"slots: expected slot indices or a bool mask, got {slots!r}"
                ) from None
            if idx.numel() and (int(idx.min()) < -b or int(idx.max()) >= b):
                raise V.BmojoValueError(
                    f"slots: indices must be in [-{b}, {b}), got {idx.tolist()}"
                )
        from .layers import BMojoLayer

        for name, t in self.state.items():
            t[idx] = BMojoLayer.EMPTY.get(name.rsplit(".", 1)[-1], 0)

    # ------------------------------------------------------------------ save / load

    def _header(self) -> dict:
        return {
            "format": "bmojo_core.stream",
            "version": FORMAT_VERSION,
            "model": self.model.config,
            "dtype": V.dtype_name(self.model.dtype),
            "batch_size": self.batch_size,
        }

    def save(self) -> bytes:
        """The stream's state as bytes (format in the module doc; no pickle)."""
        entries, chunks, off = [], [], 0
        for name, t in self.state.items():
            raw = t.detach().contiguous().view(torch.uint8).numpy().tobytes()
            if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
                raw = t.contiguous().numpy().byteswap().tobytes()
            entries.append(
                {"name": name, "dtype": V.dtype_name(t.dtype), "shape": list(t.shape),
                 "offset": off, "nbytes": len(raw)}
            )  # fmt: skip
            chunks.append(raw)
            off += len(raw)
        header = json.dumps({**self._header(), "tensors": entries}, sort_keys=True).encode()
        body = _PRE.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(chunks)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def load(cls, model, data: bytes) -> Stream:
        """Restores a stream saved by :meth:`save` for ``model`` (same configuration and
        dtype; e.g. in another process). Raises ``BmojoValueError`` for corrupted, truncated
        or foreign data, or a state that does not fit the model."""

        def bad(why: str):
            return V.BmojoValueError(f"data: {why}")

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise V.BmojoTypeError(f"data: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < _PRE.size + _DIGEST or data[:8] != MAGIC:
            raise bad("not a bmojo_core stream (bad magic or too short)")
        magic, version, hlen = _PRE.unpack_from(data)
        if version != FORMAT_VERSION:
            raise bad(
                f"stream format version {version} is not supported (expected {FORMAT_VERSION})"
            )
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if hashlib.sha256(body).digest() != digest:
            raise bad("checksum mismatch (corrupted or truncated stream)")
        if _PRE.size + hlen > len(body):
            raise bad("header length exceeds the data")
        try:
            header = json.loads(body[_PRE.size : _PRE.size + hlen].decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        payload = body[_PRE.size + hlen :]
        b = header.get("batch_size")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise bad(f"invalid batch_size {b!r}")
        stream = cls(model, b)  # validates model
        want = stream._header()
        for key in ("format", "version", "dtype", "model"):
            if header.get(key) != want[key]:
                raise bad(f"{key} {header.get(key)!r} does not match this model's {want[key]!r}")
        entries = header.get("tensors")
        if not isinstance(entries, list) or len(entries) != len(stream.state):
            raise bad("tensor list does not match the model's stream state")
        state: dict[str, Tensor] = {}
        end = 0
        for e, (name, ref) in zip(entries, stream.state.items(), strict=True):
            if not isinstance(e, dict) or e.get("name") != name:
                raise bad(f"expected tensor {name!r}, got {e!r:.80}")
            if e.get("dtype") != V.dtype_name(ref.dtype) or e.get("shape") != list(ref.shape):
                raise bad(
                    f"tensor {name!r}: expected {V.dtype_name(ref.dtype)} {list(ref.shape)}, "
                    f"got {e.get('dtype')} {e.get('shape')}"
                )
            nb = ref.numel() * ref.element_size()
            if e.get("offset") != end or e.get("nbytes") != nb:
                raise bad(f"tensor {name!r}: bad offset/size")
            raw = bytearray(payload[end : end + nb])
            end += nb
            t = (
                torch.frombuffer(raw, dtype=torch.uint8)
                if nb
                else torch.empty(0, dtype=torch.uint8)
            )
            t = t.view(_DTYPES[e["dtype"]]).reshape(ref.shape).clone()
            if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
                t = torch.from_numpy(t.numpy().byteswap())
            state[name] = t
        if end != len(payload):
            raise bad("trailing bytes after the tensors")
        _check_state(state, model, bad)
        stream.state = state
        return stream


def _check_state(state: dict[str, Tensor], model, bad) -> None:
    """Invariants a restored state must satisfy (else a later feed could misbehave)."""
    pos = state["position"]
    if bool((pos < 0).any()):
        raise bad("negative position")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            if name != "logits":
                raise bad(f"tensor {name!r} holds non-finite values")
    for i, blk in enumerate(model.blocks):
        layer = blk.mixer
        pre = f"layers.{i}."
        if layer.n_eidetic:
            sp = state[pre + "store_positions"]
            cnt = state[pre + "store_count"]
            if not torch.equal(cnt, pos) or not torch.equal(state[pre + "innov_count"], pos):
                raise bad(f"layer {i}: store/innovation counts do not match the positions")
            try:
                _core.eidetic.check(
                    sp.numpy(),
                    state[pre + "store_scores"].numpy(),
                    cnt.numpy(),
                    layer.eidetic_policy,
                    layer.eidetic_threshold,
                )
            except ValueError as e:
                raise bad(f"layer {i}: invalid eidetic store ({e})") from None
            mp = state[pre + "mem_positions"]
            if bool(((mp < -1) | (mp >= pos[:, None])).any()):
                raise bad(f"layer {i}: invalid memory positions")
