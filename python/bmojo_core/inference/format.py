"""The byte format of a saved stream: versioned, checksummed, no pickle (loading untrusted
bytes cannot run code)::

    magic  b"BMOJOST\\0" (8 bytes) | version u32 LE | header length u64 LE
    header UTF-8 JSON: format, version, model config, dtype, batch_size, tensors
           [{name, dtype, shape, offset, nbytes}]
    raw little-endian tensor bytes (offsets relative to the start of this section)
    SHA-256 of everything above (32 bytes)

:func:`decode` checks the magic, version and checksum, the header against the expected one
and every tensor's name, dtype, shape, offset and size against the expected pieces, in
order; any mismatch raises :class:`~bmojo_core.errors.BmojoValueError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._validate import dtype_name
from ..errors import BmojoTypeError, BmojoValueError
from .state import Piece

__all__ = ["FORMAT_VERSION", "MAGIC", "bad", "decode", "encode", "read_header"]

MAGIC = b"BMOJOST\0"
FORMAT_VERSION = 1
_PRE = struct.Struct("<8sIQ")
_DIGEST = 32


def encode(header: Mapping[str, Any], state: Mapping[str, Tensor]) -> bytes:
    """``header`` (JSON-serialisable) and the tensors of ``state``, in order, as bytes."""
    entries, chunks, off = [], [], 0
    for name, t in state.items():
        t = t.detach().contiguous()
        if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
            raw = t.numpy().byteswap().tobytes()
        else:
            raw = t.view(torch.uint8).numpy().tobytes()
        entries.append(
            {"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
             "offset": off, "nbytes": len(raw)}
        )  # fmt: skip
        chunks.append(raw)
        off += len(raw)
    text = json.dumps({**header, "tensors": entries}, sort_keys=True).encode()
    body = _PRE.pack(MAGIC, FORMAT_VERSION, len(text)) + text + b"".join(chunks)
    return body + hashlib.sha256(body).digest()


def bad(why: str) -> BmojoValueError:
    """The error for saved bytes that are not a valid stream (names the argument ``data``)."""
    return BmojoValueError(f"data: {why}")


def read_header(data: object) -> tuple[dict[str, Any], bytes]:
    """The checked header and the raw tensor section of saved bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BmojoTypeError(f"data: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PRE.size + _DIGEST or data[:8] != MAGIC:
        raise bad("not a bmojo_core stream (bad magic or too short)")
    _, version, hlen = _PRE.unpack_from(data)
    if version != FORMAT_VERSION:
        raise bad(f"stream format version {version} is not supported (expected {FORMAT_VERSION})")
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
    return header, body[_PRE.size + hlen :]


def decode(
    header: Mapping[str, Any], payload: bytes, expected: Mapping[str, Any],
    pieces: Sequence[Piece], batch: int,
) -> dict[str, Tensor]:  # fmt: skip
    """The tensors of a saved stream whose header (from :func:`read_header`) must match
    ``expected`` on its keys, and whose tensors must be exactly ``pieces`` with ``batch``
    rows, in order. Returns new tensors (nothing is written anywhere)."""
    for key, want in expected.items():
        if header.get(key) != want:
            raise bad(f"{key} {header.get(key)!r} does not match this model's {want!r}")
    entries = header.get("tensors")
    if not isinstance(entries, list) or len(entries) != len(pieces):
        raise bad("tensor list does not match the model's stream state")
    state: dict[str, Tensor] = {}
    end = 0
    for e, p in zip(entries, pieces, strict=True):
        shape = [batch, *p.shape]
        if not isinstance(e, dict) or e.get("name") != p.name:
            raise bad(f"expected tensor {p.name!r}, got {e!r:.80}")
        if e.get("dtype") != dtype_name(p.dtype) or e.get("shape") != shape:
            raise bad(
                f"tensor {p.name!r}: expected {dtype_name(p.dtype)} {shape}, "
                f"got {e.get('dtype')} {e.get('shape')}"
            )
        nb = p.dtype.itemsize
        for s in shape:
            nb *= s
        if e.get("offset") != end or e.get("nbytes") != nb:
            raise bad(f"tensor {p.name!r}: bad offset/size")
        raw = bytearray(payload[end : end + nb])
        end += nb
        t = torch.frombuffer(raw, dtype=torch.uint8) if nb else torch.empty(0, dtype=torch.uint8)
        t = t.view(p.dtype).reshape(shape)
        if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
            t = torch.from_numpy(t.numpy().byteswap())
        state[p.name] = t
    if end != len(payload):
        raise bad("trailing bytes after the tensors")
    return state
