"""The byte format of a saved stream: a `safetensors <https://github.com/huggingface/safetensors>`_
file (no pickle: loading untrusted bytes cannot run code; any safetensors reader can list
it). Format version 2::

    header length u64 LE | safetensors JSON header | raw little-endian tensor bytes

The tensors are the stream's state pieces (:mod:`.state`), one per name; the header's
``__metadata__`` has one entry, ``"bmojo_core.stream"``, a JSON object with ``version``
(2), ``header`` (our JSON text: format, model config, dtype, batch_size) and ``sha256``
(hex digest of ``header`` and the tensors' bytes in the stream's piece order).

Version 1 (the earlier build's own container: magic ``b"BMOJOST\\0"``, version u32, header
length u64, JSON header with a tensor list, raw tensors, SHA-256 of everything) is still
read.

**Untrusted data.** :func:`read` parses a header of at most :data:`HEADER_LIMIT` bytes and
:data:`DEPTH_LIMIT` levels of nesting; :func:`decode` checks the header against the
expected one, every tensor's name, dtype and shape against the expected pieces and the
byte count against the data's own length *before* any tensor is allocated (so nothing
larger than the data is ever allocated), then the checksum. Every failure raises
:class:`~bmojo_core.errors.BmojoValueError` (:func:`bad`) or, for a non-bytes argument,
:class:`~bmojo_core.errors.BmojoTypeError`.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._validate import dtype_name
from ..errors import BmojoTypeError, BmojoValueError
from .state import Piece

__all__ = [
    "DEPTH_LIMIT",
    "FORMAT_VERSION",
    "HEADER_LIMIT",
    "MAGIC",
    "Saved",
    "bad",
    "decode",
    "encode",
    "read",
]

FORMAT_VERSION = 2
MAGIC = b"BMOJOST\0"
"""The magic of format version 1 (still read)."""
HEADER_LIMIT = 1 << 20
"""The largest JSON header accepted, in bytes (a real one is a few kB)."""
DEPTH_LIMIT = 8
"""The deepest nesting of arrays and objects accepted in a JSON header (a real one has 4)."""

_FORMAT = "bmojo_core.stream"
_V1_PRE = struct.Struct("<8sIQ")
_DIGEST = 32
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def bad(why: str) -> BmojoValueError:
    """The error for saved bytes that are not a valid stream (names the argument ``data``)."""
    return BmojoValueError(f"data: {why}")


@dataclass
class Saved:
    """Parsed (not yet trusted) saved bytes: our ``header``, the ``tensors`` the file
    declares (name → (dtype name, shape, offset, nbytes) in ``payload``), the raw
    ``payload``, the whole ``data`` and the format ``version``."""

    header: dict[str, Any]
    tensors: dict[str, tuple[object, object, int, int]]
    payload: memoryview
    data: bytes
    version: int
    header_text: bytes = b""
    digest: str = ""


# ----------------------------------------------------------------------------- writing


def _bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
        return t.numpy().byteswap().tobytes()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _checksum(header_text: bytes, chunks: Sequence[bytes | memoryview]) -> str:
    h = hashlib.sha256(header_text)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def encode(header: Mapping[str, Any], state: Mapping[str, Tensor]) -> bytes:
    """``header`` (JSON-serialisable) and the tensors of ``state`` as format-2 bytes; the
    checksum covers the tensors in ``state``'s order."""
    from safetensors.torch import save

    text = json.dumps(dict(header), sort_keys=True)
    # Own copies: safetensors refuses tensors that share memory, and the native state's
    # tensors are views of one buffer.
    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in state.items()}
    digest = _checksum(text.encode(), [_bytes(t) for t in tensors.values()])
    # One metadata entry: safetensors writes its metadata map in no fixed order, and equal
    # states must give equal bytes.
    ours = {"version": FORMAT_VERSION, "header": text, "sha256": digest}
    return save(tensors, metadata={_FORMAT: json.dumps(ours, sort_keys=True)})


# ----------------------------------------------------------------------------- reading

_TOKENS = re.compile(rb'[\\"\[\]{}]')


def _json(raw: bytes | memoryview, what: str) -> Any:
    """``raw`` parsed as JSON after checking its size and nesting depth (a deep header
    would otherwise exhaust the parser's recursion)."""
    if len(raw) > HEADER_LIMIT:
        raise bad(f"{what} is {len(raw)} bytes, more than the limit of {HEADER_LIMIT}")
    raw = bytes(raw)
    depth, in_str, skip = 0, False, -1
    for m in _TOKENS.finditer(raw):
        i, c = m.start(), raw[m.start()]
        if i <= skip:
            continue
        if in_str:
            if c == 0x5C:  # backslash: the next byte is escaped
                skip = i + 1
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > DEPTH_LIMIT:
                raise bad(f"{what} nests deeper than {DEPTH_LIMIT} levels")
        elif c in (0x5D, 0x7D):
            depth -= 1
    try:
        return json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad(f"{what} is not valid JSON") from None


def _as_dict(v: object, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise bad(f"{what} is not a JSON object")
    return v


def read(data: object) -> Saved:
    """Parses saved bytes of either format version up to the tensor list; nothing in them
    is trusted yet (see :func:`decode`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BmojoTypeError(f"data: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if data[:8] == MAGIC:
        return _read_v1(data)
    if len(data) < 8:
        raise bad("not a bmojo_core stream (too short)")
    (hlen,) = struct.unpack_from("<Q", data)
    if hlen > HEADER_LIMIT:
        raise bad(f"header is {hlen} bytes, more than the limit of {HEADER_LIMIT}")
    if 8 + hlen > len(data):
        raise bad("header length exceeds the data")
    top = _as_dict(_json(memoryview(data)[8 : 8 + hlen], "header"), "header")
    meta = top.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(_FORMAT), str):
        raise bad("not a bmojo_core stream (no bmojo_core metadata)")
    meta = _as_dict(_json(meta[_FORMAT].encode(), "metadata"), "metadata")
    version = meta.get("version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version == 2):
        raise bad(
            f"stream format version {version!r:.20} is not supported "
            f"(expected {FORMAT_VERSION} or 1)"
        )
    text, digest = meta.get("header"), meta.get("sha256")
    if not isinstance(text, str) or not isinstance(digest, str):
        raise bad("metadata lacks the header or the checksum")
    header = _as_dict(_json(text.encode(), "metadata header"), "metadata header")
    tensors = {}
    for name, e in top.items():
        e = _as_dict(e, f"tensor {name!r}")
        off = e.get("data_offsets")
        if not (isinstance(off, list) and len(off) == 2 and all(_is_int(o) for o in off)):
            raise bad(f"tensor {name!r}: invalid data_offsets")
        tensors[name] = (e.get("dtype"), e.get("shape"), off[0], off[1] - off[0])
    return Saved(header, tensors, memoryview(data)[8 + hlen :], data, 2, text.encode(), digest)


def _read_v1(data: bytes) -> Saved:
    if len(data) < _V1_PRE.size + _DIGEST:
        raise bad("not a bmojo_core stream (too short)")
    _, version, hlen = _V1_PRE.unpack_from(data)
    if version != 1:
        raise bad(f"stream format version {version} is not supported (expected 1 or 2)")
    body, digest = memoryview(data)[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise bad("checksum mismatch (corrupted or truncated stream)")
    if hlen > HEADER_LIMIT:
        raise bad(f"header is {hlen} bytes, more than the limit of {HEADER_LIMIT}")
    if _V1_PRE.size + hlen > len(body):
        raise bad("header length exceeds the data")
    header = _as_dict(_json(body[_V1_PRE.size : _V1_PRE.size + hlen], "header"), "header")
    entries = header.pop("tensors", None)
    if not isinstance(entries, list):
        raise bad("header lacks the tensor list")
    tensors = {}
    for e in entries:
        e = _as_dict(e, "tensor entry")
        name = e.get("name")
        if not isinstance(name, str) or name in tensors:
            raise bad(f"invalid or repeated tensor name {name!r:.80}")
        code = _V1_CODES.get(e.get("dtype"), e.get("dtype"))
        tensors[name] = (code, e.get("shape"),
                         e.get("offset"), e.get("nbytes"))  # fmt: skip
    return Saved(header, tensors, body[_V1_PRE.size + hlen :], data, 1)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_CODES = {v: k for k, v in _ST_DTYPES.items()}
_V1_CODES = {dtype_name(dt): code for dt, code in _CODES.items()}
"""Format 1 names dtypes as torch does ("float32"); both formats are checked by code."""


def decode(
    saved: Saved, expected: Mapping[str, Any], pieces: Sequence[Piece], batch: int
) -> dict[str, Tensor]:
    """The tensors of ``saved`` (from :func:`read`), whose header must match ``expected``
    on its keys and whose tensors must be exactly ``pieces`` with ``batch`` rows. All sizes
    are checked against the data before anything is allocated; returns new tensors in
    ``pieces``' order (nothing is written anywhere)."""
    header = saved.header
    for key, want in expected.items():
        if header.get(key) != want:
            raise bad(f"{key} {header.get(key)!r:.80} does not match this model's {want!r}")
    if set(saved.tensors) != {p.name for p in pieces}:
        raise bad("tensor list does not match the model's stream state")
    spans = []
    for p in pieces:
        code, shp, off, nb = saved.tensors[p.name]
        want_shape = [batch, *p.shape]
        if code != _CODES[p.dtype] or shp != want_shape:
            raise bad(
                f"tensor {p.name!r}: expected {dtype_name(p.dtype)} {want_shape}, "
                f"got {code!r:.20} {shp!r:.80}"
            )
        size = p.dtype.itemsize
        for s in want_shape:
            size *= s
        if not _is_int(off) or nb != size:
            raise bad(f"tensor {p.name!r}: bad offset/size")
        spans.append((off, size, p))
    # The tensors must tile the payload exactly: this bounds every allocation below by the
    # data's own length.
    spans.sort(key=lambda s: (s[0], s[1]))
    end = 0
    for off, size, p in spans:
        if off != end:
            raise bad(f"tensor {p.name!r}: bad offset/size")
        end += size
    if end != len(saved.payload):
        raise bad(f"the tensors hold {end} bytes but the data has {len(saved.payload)}")
    if saved.version == 1:
        return {p.name: _tensor(saved.payload[o : o + n], p, batch) for o, n, p in spans}
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        loaded = load(saved.data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise bad(f"invalid safetensors data ({e})") from None
    state = {p.name: loaded[p.name] for p in pieces}
    got = _checksum(saved.header_text, [_bytes(t) for t in state.values()])
    if got != saved.digest:
        raise bad("checksum mismatch (corrupted stream)")
    return state


def _tensor(raw: memoryview, p: Piece, batch: int) -> Tensor:
    buf = bytearray(raw)
    t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    t = t.view(p.dtype).reshape(batch, *p.shape)
    if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
        t = torch.from_numpy(t.numpy().byteswap())
    return t
