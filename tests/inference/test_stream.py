"""Streaming inference (design §6.4): stream == parallel forward for every layer variant and
any feeding schedule, independent slots, generation, save/load (bitwise round trip, other
process, corrupted data), failed feeds leave the stream unchanged, constant memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import bmojo_core
import numpy as np
import pytest
import torch
from bmojo_core.inference import Stream
from bmojo_core.layers import BMojoLM
from conftest import assert_close, needs, stable_seed, stream_parts, write_stream
from hypothesis import given, settings
from hypothesis import strategies as st

VARIANTS = [(4, 2, 3), (4, 3, 0), (0, 0, 0), (4, 0, 0), (4, 0, 3), (3, 5, 4)]
VIDS = [f"w{w}-f{f}-e{e}" for w, f, e in VARIANTS]
SCHEDULES = [[1] * 23, [5, 5, 5, 5, 3], [23], [7, 1, 0, 9, 6], [2, 3, 11, 7]]


def make_lm(w=4, mf=2, me=3, dtype=torch.float64, seed=0, vocab=40, layers=2, d=8):
    torch.manual_seed(seed)
    return BMojoLM(vocab, d, layers, w, mf, me, d_state=4, n_heads=2, dtype=dtype)


def tokens(b, length, vocab=40, seed=0):
    return torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed))


def feed_schedule(stream, tok, schedule):
    outs, a = [], 0
    for c in schedule:
        outs.append(stream.feed(tok[:, a : a + c]))
        a += c
    assert a == tok.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["tok", "5s", "whole", "mixed", "odd"])
def test_stream_equals_parallel_fp64(variant, schedule):
    lm = make_lm(*variant)
    tok = tokens(3, 23, seed=stable_seed(variant))
    ref = lm(tok)
    got = feed_schedule(lm.stream(3), tok, schedule)
    assert_close(got, ref, torch.float64, "stream")


@settings(max_examples=15, deadline=None)
@given(
    w=st.integers(0, 5),
    mf=st.integers(0, 4),
    me=st.integers(0, 4),
    cuts=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_stream_equals_parallel_property(w, mf, me, cuts, seed):
    """Random variant (window, fading, eidetic) and random feeding schedule."""
    if w == 0:
        mf = me = 0
    lm = make_lm(w, mf, me, layers=1, seed=seed % 7)
    length = sum(cuts)
    tok = tokens(2, length, seed=seed)
    got = feed_schedule(lm.stream(2), tok, cuts)
    assert_close(got, lm(tok), torch.float64, "stream")


@pytest.mark.parametrize("variant", [(4, 2, 3), (16, 4, 8)], ids=str)
def test_stream_equals_parallel_fp32(variant):
    lm = make_lm(*variant, dtype=torch.float32, d=16)
    tok = tokens(2, 50, seed=1)
    lm64 = make_lm(*variant, dtype=torch.float32, d=16).double()
    lm64.load_state_dict({k: v.double() for k, v in lm.state_dict().items()})
    ref = lm64(tok)
    got = feed_schedule(lm.stream(2), tok, [13, 1, 1, 1, 17, 17])
    assert_close(got, ref, torch.float32, "stream fp32")


def test_single_token_feed_shape():
    lm = make_lm()
    s = lm.stream(2)
    tok = tokens(2, 5)
    out = torch.stack([s.feed(tok[:, i]) for i in range(5)], dim=1)
    assert s.feed(tok[:, 0]).shape == (2, 40)
    assert_close(out, lm(tok), torch.float64, "one by one")
    assert s.positions.tolist() == [6, 6]


# ----------------------------------------------------------------------------- slots


def test_slots_are_independent():
    """Reset slot 1 mid-stream: slots 0 and 2 continue their sequences, slot 1 starts a new
    one at a different chunk phase; each equals the parallel forward of its own sequence."""
    lm = make_lm(3, 2, 3)
    s = lm.stream(3)
    first = tokens(3, 10, seed=1)
    s.feed(first)
    s.reset(1)
    assert s.positions.tolist() == [10, 0, 10]
    second = tokens(3, 14, seed=2)
    got = feed_schedule(s, second, [1, 6, 7])
    full = torch.cat([first, second], dim=1)
    ref_full = lm(full)[:, 10:]
    ref_new = lm(second[1:2])
    assert_close(got[[0, 2]], ref_full[[0, 2]], torch.float64, "kept slots")
    assert_close(got[1:2], ref_new, torch.float64, "reset slot")


def test_reset_variants():
    lm = make_lm()
    s = lm.stream(3)
    s.feed(tokens(3, 6))
    s.reset(torch.tensor([True, False, True]))
    assert s.positions.tolist() == [0, 6, 0]
    s.reset()
    assert s.positions.tolist() == [0, 0, 0]
    assert s.save() == lm.stream(3).save()  # a reset slot is exactly a fresh one
    with pytest.raises(bmojo_core.BmojoValueError, match="slots"):
        s.reset(3)


# ----------------------------------------------------------------------------- generate


def test_generate_greedy_matches_parallel_argmax():
    lm = make_lm()
    s = lm.stream(2)
    prompt = tokens(2, 5)
    s.feed(prompt)
    gen = s.generate(7, temperature=0.0)
    seq = torch.cat([prompt, gen], dim=1)
    logits = lm(seq)[:, 4:-1]
    # The stream and the parallel forward round differently, so their argmaxes could differ
    # on a near-tie: each generated token must be a maximiser of the parallel forward's
    # logits up to rounding (here every runner-up is >= 4e-4 below the maximum).
    chosen = logits.gather(-1, gen[..., None])[..., 0]
    torch.testing.assert_close(chosen, logits.max(-1).values, rtol=1e-12, atol=1e-12)
    assert s.positions.tolist() == [12, 12]


def test_generate_seeded_and_top_k():
    lm = make_lm()
    prompt = tokens(2, 5)
    outs = []
    for _ in range(2):
        s = lm.stream(2)
        s.feed(prompt)
        outs.append(s.generate(6, temperature=0.8, top_k=5, seed=123))
    assert torch.equal(outs[0], outs[1])  # bitwise: the same computation and seed
    s = lm.stream(2)
    s.feed(prompt)
    greedy = s.generate(4, temperature=0.0)
    s = lm.stream(2)
    s.feed(prompt)
    assert torch.equal(s.generate(4, temperature=1.3, top_k=1, seed=5), greedy)
    s = lm.stream(2)
    with pytest.raises(bmojo_core.BmojoValueError, match="feed a prompt"):
        s.generate(1)


# ----------------------------------------------------------------------------- failed feed


@pytest.mark.parametrize(
    "bad, err",
    [
        (torch.tensor([[1, 2], [3, 40]]), bmojo_core.BmojoValueError),  # id out of range
        (torch.tensor([[1, 2], [-1, 0]]), bmojo_core.BmojoValueError),
        (torch.tensor([[1, 2, 3]]), bmojo_core.BmojoValueError),  # wrong batch
        (torch.zeros(2, 2, 2, dtype=torch.int64), bmojo_core.BmojoValueError),
        (torch.zeros(2, 3), bmojo_core.BmojoTypeError),  # float tokens
        ("ab", bmojo_core.BmojoTypeError),
    ],
    ids=["id", "negative", "batch", "3d", "float", "str"],
)
def test_failed_feed_leaves_stream_unchanged(bad, err):
    lm = make_lm()
    s = lm.stream(2)
    s.feed(tokens(2, 6))
    before = s.save()
    with pytest.raises(err):
        s.feed(bad)
    assert s.save() == before


# ----------------------------------------------------------------------------- save / load


def test_save_load_roundtrip_bitwise():
    lm = make_lm(3, 2, 3)
    s = lm.stream(2)
    s.feed(tokens(2, 11, seed=4))
    data = s.save()
    t = Stream.load(lm, data)
    assert t.save() == data
    more = tokens(2, 8, seed=5)
    assert torch.equal(s.feed(more), t.feed(more))
    assert torch.equal(s.generate(3, seed=1), t.generate(3, seed=1))


def test_load_in_another_process(tmp_path):
    lm = make_lm(3, 2, 3, seed=11)
    s = lm.stream(2)
    s.feed(tokens(2, 9, seed=6))
    (tmp_path / "state.bin").write_bytes(s.save())
    torch.save(lm.state_dict(), tmp_path / "model.pt")
    more = tokens(2, 5, seed=7)
    torch.save(more, tmp_path / "more.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from bmojo_core.layers import BMojoLM
        from bmojo_core.inference import Stream
        lm = BMojoLM(40, 8, 2, 3, 2, 3, d_state=4, n_heads=2, dtype=torch.float64)
        lm.load_state_dict(torch.load({str(tmp_path / "model.pt")!r}))
        s = Stream.load(lm, open({str(tmp_path / "state.bin")!r}, "rb").read())
        torch.save(s.feed(torch.load({str(tmp_path / "more.pt")!r})),
                   {str(tmp_path / "out.pt")!r})
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert torch.equal(torch.load(tmp_path / "out.pt"), s.feed(more))


def _rewrite(data: bytes, lm, edit, entries=None, meta=None) -> bytes:
    """Re-encodes a saved stream after ``edit(header, tensors)`` (valid checksum)."""
    header, _, tensors = stream_parts(data)
    header, tensors = edit(header, tensors)
    order = [p.name for p in Stream(lm, 1).pieces]
    return write_stream(header, tensors, order, entries, meta)


def _same(h, t):
    return h, t


def test_corrupted_or_foreign_data_raises():
    lm = make_lm(3, 2, 3)
    s = lm.stream(2)
    s.feed(tokens(2, 7))
    data = s.save()
    err = bmojo_core.BmojoValueError
    assert Stream.load(lm, _rewrite(data, lm, _same)).save() == data
    flipped = bytearray(data)
    flipped[-50] ^= 0x10  # in the tensors
    with pytest.raises(err, match="checksum"):
        Stream.load(lm, bytes(flipped))
    with pytest.raises(err, match="bytes but the data has"):
        Stream.load(lm, data[:-5])
    with pytest.raises(err, match="limit|exceeds"):
        Stream.load(lm, b"PK\x03\x04" + data[4:])
    with pytest.raises(err, match="too short"):
        Stream.load(lm, b"")
    with pytest.raises(err, match="no bmojo_core metadata"):
        Stream.load(lm, _rewrite(data, lm, _same, meta={"format": "other"}))
    with pytest.raises(bmojo_core.BmojoTypeError):
        Stream.load(lm, "text")
    with pytest.raises(err, match="version"):
        Stream.load(lm, _rewrite(data, lm, _same, meta={"version": 99}))
    other = make_lm(3, 2, 2)  # different n_eidetic
    with pytest.raises(err, match="model"):
        Stream.load(other, data)
    with pytest.raises(err, match="dtype"):
        Stream.load(make_lm(3, 2, 3, dtype=torch.float32), data)
    with pytest.raises(err, match="expected"):
        Stream.load(lm, _rewrite(data, lm, _same, entries={"layers.0.ssm": {"shape": [1]}}))

    def store(h, t):  # a duplicate position in an eidetic store (valid checksum)
        sp = t["layers.0.store_positions"]
        sp[0, 1] = sp[0, 0]
        return h, t

    with pytest.raises(err, match="eidetic store"):
        Stream.load(lm, _rewrite(data, lm, store))

    def extra(h, t):
        return h, {**t, "extra": torch.zeros(1)}

    with pytest.raises(err, match="tensor list"):
        Stream.load(lm, _rewrite(data, lm, extra))
    with pytest.raises(err, match="bytes but the data has"):
        Stream.load(lm, data + b"\0")


# ----------------------------------------------------------------------------- memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@needs(os.path.exists("/proc/self/statm"), "/proc")
def test_memory_flat_over_long_stream():
    """20k tokens: state size constant, resident memory flat."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: avoid OpenMP spinning on a busy machine
    try:
        _long_stream()
    finally:
        torch.set_num_threads(threads)


def _long_stream():
    lm = make_lm(16, 2, 4, dtype=torch.float32, layers=1)
    s = lm.stream(2)
    nbytes = s.nbytes()
    tok = tokens(2, 20_000, seed=3)
    for a in range(0, 2_000, 97):
        s.feed(tok[:, a : min(a + 97, 2_000)])
    rss0 = _rss()
    for a in range(2_000, 20_000, 97):
        s.feed(tok[:, a : min(a + 97, 20_000)])
    growth = _rss() - rss0
    assert s.nbytes() == nbytes
    assert s.positions.tolist() == [20_000, 20_000]
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"
    assert len(s.save()) < nbytes + 16_384


def test_loads_a_stream_saved_by_format_version_1():
    """Bytes saved by an earlier build (format version 1, two slots at position 7) load,
    and the next token's logits are the ones that build computed (same model)."""
    data_dir = Path(__file__).parent / "data"
    lm = BMojoLM(32, 8, 2, 4, 2, 3, d_state=4, n_heads=2, dtype=torch.float64)
    with np.load(data_dir / "stream_v1_model.npz", allow_pickle=False) as params:
        lm.load_state_dict({k: torch.from_numpy(params[k]) for k in params.files})
    s = Stream.load(lm, (data_dir / "stream_v1.bin").read_bytes())
    assert s.positions.tolist() == [7, 7]
    want = torch.from_numpy(np.load(data_dir / "stream_v1_next_logits.npy", allow_pickle=False))
    torch.testing.assert_close(s.feed(torch.tensor([9, 10])), want, rtol=1e-12, atol=1e-12)
