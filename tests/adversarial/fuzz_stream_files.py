"""Hostile stream files against ``Stream.load`` (run by test_isolated.py in a child process
under a memory limit: a regression that allocates what a header asks for fails the run
instead of taking the machine).

Files start from real saved streams (format 2, and the earlier build's format-1 file in
tests/inference/data) and are broken two ways: raw bytes (flips, cuts, insertions; the
checksum or the parser must catch them), and semantically, *re-checksummed* by a writer
of our own (so the checksum is not the defence): header fields, tensor names, dtypes,
shapes, offsets and values. Property: ``Stream.load`` raises ``BmojoValueError`` /
``BmojoTypeError``, or returns a stream that is valid (a feed returns logits or raises a
``BmojoError`` that leaves the state bitwise unchanged).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import bmojo_core as bm
import numpy as np
import pytest
import torch
from bmojo_core.inference import format as F
from bmojo_core.inference.state import MAX_POSITION
from bmojo_core.layers import BMojoLM
from conftest import stream_parts, write_stream
from hypothesis import given, settings
from hypothesis import strategies as st

Stream = bm.Stream
DATA = Path(__file__).resolve().parent.parent / "inference" / "data"


def _model():
    torch.manual_seed(0)
    return BMojoLM(vocab_size=17, d_model=8, n_layers=2, window=3, n_fading=2, n_eidetic=2,
                   d_state=4)  # fmt: skip


MODEL = _model()


def _saved() -> bytes:
    s = MODEL.stream(2)
    s.feed(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]))
    return s.save()


GOOD = _saved()


def _v1():
    """The earlier build's file and its model (as tests/inference/test_stream.py)."""
    lm = BMojoLM(32, 8, 2, 4, 2, 3, d_state=4, n_heads=2, dtype=torch.float64)
    with np.load(DATA / "stream_v1_model.npz", allow_pickle=False) as params:
        lm.load_state_dict({k: torch.from_numpy(params[k]) for k in params.files})
    return lm, (DATA / "stream_v1.bin").read_bytes()


parts, write = stream_parts, write_stream


HEADER, ENTRIES, TENSORS = parts(GOOD)
ORDER = [p.name for p in Stream(MODEL, 2).pieces]


def check(model, data) -> None:
    """The property: a clean error, or a stream that feeds (or fails cleanly)."""
    try:
        s = Stream.load(model, data)
    except (bm.BmojoValueError, bm.BmojoTypeError):
        return
    before = {k: v.clone() for k, v in s.state.items()}
    for tokens in (torch.tensor([1, 2]), torch.tensor([[1, 2, 3], [4, 5, 6]])):
        tokens = tokens[: s.batch_size] if tokens.shape[0] >= s.batch_size else None
        if tokens is None:
            continue
        try:
            s.feed(tokens)
        except bm.BmojoError:
            for k, v in s.state.items():
                assert torch.equal(v, before[k]), f"a failed feed changed {k}"
        before = {k: v.clone() for k, v in s.state.items()}


# ----------------------------------------------------------------------------- tests


def test_writer_round_trips():
    s = Stream.load(MODEL, write(HEADER, TENSORS, ORDER))
    assert torch.equal(s.state["position"], torch.tensor([5, 5]))


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(data=st.data())
def test_raw_byte_mutations(data):
    raw = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "append", "head"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del raw[i : i + data.draw(st.integers(1, 64))]
        elif kind == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "append":
            raw += data.draw(st.binary(min_size=1, max_size=16))
        else:  # the header length field
            raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
        if not raw:
            break
    check(MODEL, bytes(raw))


def test_v1_raw_mutations_rechecksummed():
    lm, v1 = _v1()
    Stream.load(lm, v1)  # the intact file loads
    rng = np.random.default_rng(0)
    for _ in range(200):
        body = bytearray(v1[:-32])
        i = int(rng.integers(0, len(body)))
        body[i] ^= int(rng.integers(1, 256))
        check(lm, bytes(body) + hashlib.sha256(body).digest())


BAD_BATCH = [0, -1, 1, 3, 2**40, 10**7, 2**63, 1.5, "2", None, True, [2]]


@pytest.mark.parametrize("batch", BAD_BATCH)
def test_header_batch_size(batch):
    """A header's batch_size never drives an allocation: 2**40 and 10**7 fail at once."""
    t0 = time.perf_counter()
    with pytest.raises(bm.BmojoValueError, match="data:"):
        Stream.load(MODEL, write({**HEADER, "batch_size": batch}, TENSORS, ORDER))
    assert time.perf_counter() - t0 < 5


def test_header_batch_size_with_matching_declared_shapes():
    """Entries that declare the huge batch consistently still cannot pass the byte budget."""
    entries = {n: {"shape": [10**7, *t.shape[1:]]} for n, t in TENSORS.items()}
    data = write({**HEADER, "batch_size": 10**7}, TENSORS, ORDER, entries)
    with pytest.raises(bm.BmojoValueError, match="data:"):
        Stream.load(MODEL, data)


def test_short_payload_rechecksummed():
    """A tensor shorter than the header declares: our error, not a reshape's."""
    short = dict(TENSORS)
    name = "layers.0.ssm"
    short[name] = short[name].flatten()[:-3]
    entries = {name: {"shape": list(TENSORS[name].shape)}}
    with pytest.raises(bm.BmojoValueError, match="data:"):
        Stream.load(MODEL, write(HEADER, short, ORDER, entries))


@pytest.mark.parametrize("depth", [9, 1000, 100_000])
def test_deeply_nested_header(depth):
    nested = "[" * depth + "]" * depth
    text = json.dumps({**HEADER}).replace('"model"', f'"x": {nested}, "model"', 1)
    for data in (
        write(
            json.loads(text) if depth < 500 else HEADER, TENSORS, ORDER, meta={"header": text}
        ),  # fmt: skip
        struct.pack("<Q", 2 * depth) + nested.encode(),
    ):
        with pytest.raises(bm.BmojoValueError, match="data:"):
            Stream.load(MODEL, data)


def test_oversized_header():
    data = struct.pack("<Q", F.HEADER_LIMIT + 1) + b" " * (F.HEADER_LIMIT + 1)
    with pytest.raises(bm.BmojoValueError, match="limit"):
        Stream.load(MODEL, data)


@pytest.mark.parametrize("value", [-1, MAX_POSITION + 1, 2**63 - 1])
def test_positions_out_of_range_rejected(value):
    t = dict(TENSORS)
    for n in ("position", "layers.0.store_count", "layers.0.innov_count",
              "layers.1.store_count", "layers.1.innov_count"):  # fmt: skip
        t[n] = torch.full_like(t[n], value)
    with pytest.raises(bm.BmojoValueError, match="position"):
        Stream.load(MODEL, write(HEADER, t, ORDER))


SEMANTIC = ["drop", "extra", "rename", "dtype", "shape", "values", "offsets", "header_key",
            "model", "dtype_name", "version", "format"]  # fmt: skip


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(data=st.data(), kind=st.sampled_from(SEMANTIC))
def test_semantic_mutations_rechecksummed(data, kind):
    header, tensors, entries, meta = dict(HEADER), dict(TENSORS), {}, {}
    name = data.draw(st.sampled_from(ORDER))
    t = tensors[name]
    if kind == "drop":
        del tensors[name]
    elif kind == "extra":
        tensors["extra"] = torch.zeros(2, 3)
    elif kind == "rename":
        tensors[name + "x"] = tensors.pop(name)
    elif kind == "dtype":
        tensors[name] = t.to(data.draw(st.sampled_from(list(F._CODES))))
    elif kind == "shape":
        shp = data.draw(st.lists(st.integers(0, 2**62), min_size=0, max_size=4))
        entries[name] = {"shape": shp}
    elif kind == "values":
        x = t.clone()
        if x.numel():
            i = data.draw(st.integers(0, x.numel() - 1))
            if x.dtype == torch.bool:
                x.view(-1)[i] = not bool(x.view(-1)[i])
            elif x.is_floating_point():
                x.view(-1)[i] = data.draw(st.sampled_from([float("nan"), float("inf"), 1e30,
                                                           -1.0, 0.0]))  # fmt: skip
            else:
                x.view(-1)[i] = data.draw(st.integers(-(2**63), 2**63 - 1))
        tensors[name] = x
    elif kind == "offsets":
        entries[name] = {"data_offsets": data.draw(
            st.lists(st.one_of(st.integers(-5, 2**64), st.none(), st.text(max_size=2)),
                     min_size=0, max_size=3))}  # fmt: skip
    elif kind == "header_key":
        key = data.draw(st.sampled_from(sorted(header)))
        header[key] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=4),
                                          st.just({}), st.just([])))  # fmt: skip
    elif kind == "model":
        cfg = dict(header["model"])
        key = data.draw(st.sampled_from(sorted(cfg)))
        cfg[key] = data.draw(st.one_of(st.integers(-3, 10**6), st.none(), st.text(max_size=3)))
        header["model"] = cfg
    elif kind == "dtype_name":
        header["dtype"] = data.draw(st.sampled_from(["float64", "bfloat16", "int8", "x"]))
    elif kind == "version":
        meta["version"] = data.draw(st.sampled_from(["2", 1, 3, "", 2.0, None]))
    else:
        meta["format"] = data.draw(st.sampled_from(["", "bmojo_core.streamx", "safetensors"]))
    check(MODEL, write(header, tensors, ORDER, entries, meta))


def test_not_bytes():
    for data in (None, "text", 3, [1, 2]):
        with pytest.raises(bm.BmojoTypeError, match="data"):
            Stream.load(MODEL, data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absurd_stream_sizes_raise(dtype):
    """A stream or store too large for memory raises naming the size (native buffers use
    fallible allocation: never an abort). Here under the child's address-space limit."""
    lm = BMojoLM(vocab_size=17, d_model=8, n_layers=1, window=3, n_fading=2, n_eidetic=2,
                 d_state=4, dtype=dtype)  # fmt: skip
    for batch in (2**40, 2**33):
        with pytest.raises(bm.BmojoValueError, match="batch_size"):
            lm.stream(batch)
    with pytest.raises(bm.BmojoValueError, match="batch"):
        bm.EideticStore(2**40, 8)
    with pytest.raises(bm.BmojoValueError, match="capacity"):
        bm.EideticStore(2, 2**21)
