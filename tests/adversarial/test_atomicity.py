"""Failure atomicity: every in-place or streaming entry point, made to fail at each of its
validation steps, raises a ``BmojoError`` naming the argument and leaves every piece of
state bitwise as it was (design §6.4; README "Safety")."""

from __future__ import annotations

import bmojo_core as bm
import pytest
import torch
from bmojo_core.inference.state import MAX_POSITION
from bmojo_core.layers import BMojoLM


def _lm(dtype=torch.float32):
    torch.manual_seed(0)
    return BMojoLM(vocab_size=17, d_model=8, n_layers=2, window=3, n_fading=2, n_eidetic=2,
                   d_state=4, dtype=dtype)  # fmt: skip


def snapshot(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def assert_same(state: dict, before: dict) -> None:
    for k, v in state.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), f"{k} changed"


def _at(stream, position: int):
    """``stream`` with every slot's counters set to ``position`` (a valid state)."""
    st = snapshot(stream.state)
    for k in st:
        if k == "position" or k.endswith(("store_count", "innov_count")):
            st[k].fill_(position)
    stream.state = st
    return stream


@pytest.fixture(params=["fused", "python"])
def stream(request):
    s = _lm().stream(2)
    s.fused_decode = request.param == "fused"
    s.feed(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    return s


FEED_BAD = {
    "float list": ([1.5, 2.0], bm.BmojoTypeError, "tokens"),
    "float tensor": (torch.tensor([1.0, 2.0]), bm.BmojoTypeError, "tokens"),
    "bool list": ([True, False], bm.BmojoTypeError, "tokens"),
    "string": ("ab", bm.BmojoTypeError, "tokens"),
    "ragged": ([[1, 2], [3]], bm.BmojoTypeError, "tokens"),
    "wrong rows": (torch.tensor([1, 2, 3]), bm.BmojoValueError, "tokens"),
    "rank 3": (torch.zeros(2, 1, 1, dtype=torch.int64), bm.BmojoValueError, "tokens"),
    "id too big": (torch.tensor([1, 17]), bm.BmojoValueError, "tokens"),
    "negative id": (torch.tensor([[1, 2], [3, -1]]), bm.BmojoValueError, "tokens"),
    "int overflow": ([[1, 2**70]], bm.BmojoTypeError, "tokens"),
}


@pytest.mark.parametrize("case", sorted(FEED_BAD))
def test_feed_bad_tokens_change_nothing(stream, case):
    tokens, exc, name = FEED_BAD[case]
    before = snapshot(stream.state)
    with pytest.raises(exc, match=name):
        stream.feed(tokens)
    assert_same(stream.state, before)


@pytest.mark.parametrize("t", [1, 2, 5])
def test_feed_past_the_last_position_changes_nothing(stream, t):
    """Counters near overflow: checked before the first write, on both paths."""
    _at(stream, MAX_POSITION - t + 1)
    before = snapshot(stream.state)
    tokens = torch.tensor([1, 2]) if t == 1 else torch.ones(2, t, dtype=torch.int64)
    with pytest.raises(bm.BmojoValueError, match="position"):
        stream.feed(tokens)
    assert_same(stream.state, before)
    _at(stream, MAX_POSITION - t)
    stream.feed(tokens)  # exactly up to the last position is fine
    assert stream.positions.tolist() == [MAX_POSITION, MAX_POSITION]


GEN_BAD = {
    "n float": (dict(n=2.0), bm.BmojoTypeError, "n"),
    "n negative": (dict(n=-1), bm.BmojoValueError, "n"),
    "temperature": (dict(n=2, temperature=-1.0), bm.BmojoValueError, "temperature"),
    "temperature nan": (dict(n=2, temperature=float("nan")), bm.BmojoValueError, "temperature"),
    "top_k float": (dict(n=2, top_k=2.5), bm.BmojoTypeError, "top_k"),
    "top_k zero": (dict(n=2, top_k=0), bm.BmojoValueError, "top_k"),
    "seed float": (dict(n=2, seed=1.5), bm.BmojoTypeError, "seed"),
    "seed huge": (dict(n=2, seed=2**70), bm.BmojoValueError, "seed"),
}


@pytest.mark.parametrize("case", sorted(GEN_BAD))
def test_generate_bad_arguments_change_nothing(stream, case):
    kw, exc, name = GEN_BAD[case]
    before = snapshot(stream.state)
    with pytest.raises(exc, match=name):
        stream.generate(**kw)
    assert_same(stream.state, before)


def test_generate_checks_room_for_all_tokens_first(stream):
    _at(stream, MAX_POSITION - 3)
    before = snapshot(stream.state)
    with pytest.raises(bm.BmojoValueError, match="position"):
        stream.generate(4, temperature=0.0)
    assert_same(stream.state, before)


def test_generate_without_logits_changes_nothing(stream):
    stream.reset(0)
    before = snapshot(stream.state)
    with pytest.raises(bm.BmojoValueError, match="slots"):
        stream.generate(3)
    assert_same(stream.state, before)


RESET_BAD = {
    "float": (0.5, bm.BmojoTypeError),
    "float one": (1.0, bm.BmojoTypeError),
    "float list": ([0.5], bm.BmojoTypeError),
    "float tensor": (torch.tensor([1.0]), bm.BmojoTypeError),
    "out of range": ([2], bm.BmojoValueError),
    "negative out of range": (-3, bm.BmojoValueError),
    "mask length": (torch.tensor([True, False, True]), bm.BmojoValueError),
    "bool mask list length": ([True], bm.BmojoValueError),
    "string": ("0", bm.BmojoTypeError),
    "huge": (2**70, bm.BmojoTypeError),
}


@pytest.mark.parametrize("case", sorted(RESET_BAD))
def test_reset_bad_slots_change_nothing(stream, case):
    slots, exc = RESET_BAD[case]
    before = snapshot(stream.state)
    with pytest.raises(exc, match="slots"):
        stream.reset(slots)
    assert_same(stream.state, before)


def test_reset_accepts_ints_masks_and_int_arrays(stream):
    import numpy as np

    for slots in (1, [1], np.array([1]), torch.tensor([1], dtype=torch.int32), [False, True],
                  np.array([False, True]), []):  # fmt: skip
        s = _lm().stream(2)
        s.feed(torch.tensor([[1, 2], [3, 4]]))
        s.reset(slots)
        want = [2, 2] if len(np.atleast_1d(np.asarray(slots))) == 0 else [2, 0]
        assert s.positions.tolist() == want, slots


def _state_bad(stream):
    st = snapshot(stream.state)
    yield "missing key", {k: v for k, v in list(st.items())[1:]}
    yield "wrong shape", {**st, "position": st["position"][:1]}
    yield "wrong dtype", {**st, "position": st["position"].int()}
    yield "negative position", {**st, "position": st["position"] - 10}
    yield "past the last position", {**st, "position": st["position"] + MAX_POSITION}
    yield "has_logits", {**st, "has_logits": ~st["has_logits"]}
    yield "non-finite", {**st, "layers.0.ssm": st["layers.0.ssm"] * float("nan")}
    yield "counts", {**st, "layers.1.store_count": st["layers.1.store_count"] + 1}
    bad_store = st["layers.0.store_positions"].clone()
    bad_store[0, 0] = 10**6
    yield "store", {**st, "layers.0.store_positions": bad_store}


def test_state_setter_rejects_invalid_states_and_changes_nothing(stream):
    for why, st in _state_bad(stream):
        before = snapshot(stream.state)
        with pytest.raises(bm.BmojoValueError, match="state"):
            stream.state = st
        assert_same(stream.state, before)
        assert why


# ----------------------------------------------------------------------------- ops


def _step_kw():
    g = torch.Generator().manual_seed(0)
    b, d, n = 2, 3, 4
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(state=r(b, d, n), x=r(b, d), dt=r(b, d).abs(), A=-r(d, n).abs(), B=r(b, n),
                C=r(b, n), D=r(d), z=r(b, d), dt_bias=r(d))  # fmt: skip


def _step_bad():
    for name in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"):
        kw = _step_kw()
        yield f"{name} rank", name, {**kw, name: kw[name][None]}
        kw = _step_kw()
        yield f"{name} dtype", name, {**kw, name: kw[name].to(torch.int32)}
    kw = _step_kw()
    yield "x aliases state", "state", {**kw, "x": kw["state"][:, :, 0]}
    kw = _step_kw()
    yield "z aliases state", "state", {**kw, "z": kw["state"].view(-1)[:6].view(2, 3)}
    kw = _step_kw()
    yield "slots out of range", "state_batch_indices", {
        **kw, "state_batch_indices": torch.tensor([0, 5])}  # fmt: skip
    kw = _step_kw()
    yield "slots twice", "state_batch_indices", {**kw, "state_batch_indices": torch.tensor([1, 1])}


@pytest.mark.parametrize("case", list(_step_bad()), ids=lambda c: c[0])
def test_state_update_failures_change_nothing(case):
    _, name, kw = case
    before = kw["state"].clone()
    with pytest.raises(bm.BmojoError, match=name):
        bm.selective_state_update(**kw)
    assert torch.equal(kw["state"], before)


def test_state_update_rejects_expanded_state():
    kw = _step_kw()
    base = kw["state"][:1].clone()
    kw["state"] = base.expand(2, 3, 4)
    with pytest.raises(bm.BmojoValueError, match="state: elements share memory"):
        bm.selective_state_update(**kw)
    assert torch.equal(kw["state"][0], base[0])


def test_state_update_rejects_aliased_intermediate_states():
    kw = _step_kw()
    kw = {k: (v[:, None] if k in ("x", "dt", "z", "B", "C") else v) for k, v in kw.items()}
    snaps = kw["state"][:, None]
    before = kw["state"].clone()
    with pytest.raises(bm.BmojoValueError, match="shares memory"):
        bm.selective_state_update(**kw, intermediate_states=snaps)
    assert torch.equal(kw["state"], before)


def _conv_kw():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(2, 3), conv_state=r(2, 3, 3), weight=r(3, 4), bias=r(3))


def _conv_bad():
    for name in ("x", "weight", "bias"):
        kw = _conv_kw()
        yield f"{name} rank", name, {**kw, name: kw[name][None]}
        kw = _conv_kw()
        yield f"{name} dtype", name, {**kw, name: kw[name].to(torch.int64)}
    kw = _conv_kw()
    yield "x aliases conv_state", "conv_state", {**kw, "x": kw["conv_state"][:, :, 0]}
    kw = _conv_kw()
    yield "weight aliases conv_state", "conv_state", {
        **kw, "weight": kw["conv_state"].view(-1)[:12].view(3, 4)}  # fmt: skip
    kw = _conv_kw()
    yield "indices out of range", "conv_state_indices", {
        **kw, "conv_state_indices": torch.tensor([0, 2])}  # fmt: skip
    kw = _conv_kw()
    yield "cache_seqlens float", "cache_seqlens", {**kw, "cache_seqlens": torch.tensor([1.0, 2])}


@pytest.mark.parametrize("case", list(_conv_bad()), ids=lambda c: c[0])
def test_conv_update_failures_change_nothing(case):
    _, name, kw = case
    before = kw["conv_state"].clone()
    with pytest.raises(bm.BmojoError, match=name):
        bm.causal_conv1d_update(**kw)
    assert torch.equal(kw["conv_state"], before)


def test_conv_update_rejects_expanded_state():
    kw = _conv_kw()
    kw["conv_state"] = kw["conv_state"][:1].expand(2, 3, 3)
    with pytest.raises(bm.BmojoValueError, match="conv_state"):
        bm.causal_conv1d_update(**kw)


def _store():
    s = bm.EideticStore(2, 3)
    s.push(torch.rand(2, 5, dtype=torch.float64))
    return s


def _store_state(s):
    return {"positions": s.positions.clone(), "scores": s.scores.clone(), "count": s.count.clone()}


STORE_BAD = [
    ("push rank", lambda s: s.push(torch.rand(2, 3, 1)), "scores"),
    ("push rows", lambda s: s.push(torch.rand(3, 2)), "scores"),
    ("push dtype", lambda s: s.push(torch.ones(2, 2, dtype=torch.int64)), "scores"),
    ("push nan", lambda s: s.push(torch.tensor([[0.1, float("nan")], [0.2, 0.3]])), "scores"),
    ("push aliases store", lambda s: s.push(s.scores[:, :2]), "shares memory"),
    ("reset float", lambda s: s.reset(0.5), "rows"),
    ("reset range", lambda s: s.reset([5]), "rows"),
    ("load bad", lambda s: s.load_state_dict({**_store_state(s), "count": s.count * 0}), "state"),
    ("load missing", lambda s: s.load_state_dict({"positions": s.positions}), "state"),
]


@pytest.mark.parametrize("case", STORE_BAD, ids=lambda c: c[0])
def test_store_failures_change_nothing(case):
    _, call, match = case
    s = _store()
    before = _store_state(s)
    with pytest.raises(bm.BmojoError, match=match):
        call(s)
    assert_same(_store_state(s), before)


def test_store_count_overflow_changes_nothing():
    s = _store()
    st = _store_state(s)
    st["count"].fill_(2**63 - 2)
    st["positions"].copy_(torch.tensor([[2**63 - 5, 2**63 - 4, 2**63 - 3]] * 2))
    s.load_state_dict(st)
    before = _store_state(s)
    with pytest.raises(bm.BmojoValueError):
        s.push(torch.rand(2, 3, dtype=torch.float64))
    assert_same(_store_state(s), before)


# ----------------------------------------------------------------------------- runtime


@pytest.mark.parametrize(
    "n, exc",
    [(0, bm.BmojoValueError), (-1, bm.BmojoValueError), (2**40, bm.BmojoValueError),
     (2**64, bm.BmojoValueError), (1025, bm.BmojoValueError), (2.0, bm.BmojoTypeError),
     ("2", bm.BmojoTypeError), (True, bm.BmojoTypeError), (None, bm.BmojoTypeError)],
)  # fmt: skip
def test_thread_count_bounded_and_unchanged_on_failure(n, exc, restore_runtime):
    before = bm.get_num_threads()
    with pytest.raises(exc, match="n: expected an int"):
        bm.set_num_threads(n)
    assert bm.get_num_threads() == before


def test_thread_count_upper_bound_accepted(restore_runtime):
    from bmojo_core.runtime.settings import MAX_THREADS

    bm.set_num_threads(MAX_THREADS)
    assert bm.get_num_threads() == MAX_THREADS
    bm.set_num_threads(1)
    torch.testing.assert_close(bm.diag_scan(torch.ones(2, 3), torch.ones(2, 3))[:, -1],
                               torch.full((2,), 3.0))  # fmt: skip


def test_simd_level_unchanged_on_failure(restore_runtime):
    before = bm.simd_level()
    for bad, exc in (("avx9000", bm.BmojoValueError), (3, bm.BmojoTypeError)):
        with pytest.raises(exc):
            bm.set_simd_level(bad)
        assert bm.simd_level() == before


def test_bindings_reject_aliased_writes():
    """The Rust bindings check aliasing themselves (the ops' fast paths call them
    directly, and NumPy's borrow tracking cannot see two views of one torch storage)."""
    from bmojo_core.ops._native import core

    state = torch.randn(2, 3, 1)
    x = state.view(2, 3)  # the very memory the step writes
    before = state.clone()
    with pytest.raises(bm.BmojoValueError, match="state: shares memory with x"):
        core.step.selective_state_update(
            state.numpy(), x.numpy(), torch.ones(2, 3).numpy(), -torch.ones(3, 1).numpy(),
            torch.ones(2, 1).numpy(), torch.ones(2, 1).numpy(), None, None, None, False, None,
            None, None,
        )  # fmt: skip
    assert torch.equal(state, before)
    conv = torch.randn(2, 3, 1)
    with pytest.raises(bm.BmojoValueError, match="conv_state: shares memory with x"):
        core.conv.causal_conv1d_update(
            conv.view(2, 3).numpy(), conv.numpy(), torch.ones(3, 2).numpy(), None, False, None,
            None, None,
        )  # fmt: skip
    s = _store()
    with pytest.raises(bm.BmojoValueError, match="scores: shares memory with new_scores"):
        core.eidetic.push(
            s.positions.numpy(), s.scores.numpy(), s.count.numpy(),
            s.scores.view(-1)[:2].view(2, 1).numpy(), "topk", 0.0,
        )  # fmt: skip
