"""Eidetic retention (design §6.1, §6.2): innovation scores against the pure-torch fp64
reference (whole and in pieces), the store (chunked builder and streaming heap) against a
brute-force top-m over past scores, the retention properties, thread/SIMD invariance,
opcheck, gather gradients and argument errors."""

from __future__ import annotations

import bmojo_core as bm
import pytest
import torch
from bmojo_core import reference as ref
from bmojo_core.errors import BmojoTypeError, BmojoValueError
from bmojo_core.testing import chunkings
from conftest import FLOAT_DTYPES, TOL, assert_close, stable_seed
from hypothesis import given
from hypothesis import strategies as st

POLICIES = (("topk", 0.0), ("threshold", 2.0), ("fifo", 2.0), ("fifo", 0.0))


def rnd(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def tied_scores(b, length, seed):
    """Scores with many exact ties (small integers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (b, length), generator=g).to(torch.float64)


# ------------------------------------------------------------------------ innovation


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("custom", [False, True])
@pytest.mark.parametrize("metric", ["mse", "chi2"])
def test_innovation_equals_reference(dtype, k, custom, metric):
    seed = stable_seed("innov", str(dtype), k, custom, metric)
    y = rnd(3, 23, 19, seed=seed, dtype=dtype)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = (rnd(k, seed=seed + 1, dtype=wdt) / k + 1.0 / k) if custom else None
    got = bm.innovation_scores(y, taps=k, weights=w, metric=metric)
    assert got.dtype == dtype and got.shape == (3, 23) and not got.requires_grad
    want = ref.innovation_scores_ref(y, taps=k, weights=w, metric=metric)
    assert_close(got, want, dtype, f"k{k} {metric}")


@pytest.mark.parametrize("metric", ["mse", "chi2"])
@pytest.mark.parametrize("h", [0, 1, 3])
def test_innovation_with_history(metric, h):
    y = rnd(2, 9, 5, seed=h)
    hist = rnd(2, h, 5, seed=h + 10)
    got = bm.innovation_scores(y, metric=metric, history=hist)
    want = ref.innovation_scores_ref(y, metric=metric, history=hist)
    assert_close(got, want, torch.float64, f"h{h}")
    # the history is the beginning of the sequence: the tail of the whole scores
    whole = ref.innovation_scores_ref(torch.cat([hist, y], 1), metric="mse")
    if metric == "mse":
        assert_close(got, whole[:, h:], torch.float64, "history == prefix")


@given(st.data())
def test_innovation_pieces_equal_whole(data):
    length = data.draw(st.integers(0, 30), label="L")
    sizes = data.draw(chunkings(length), label="pieces")
    k = data.draw(st.sampled_from([1, 2, 4, 7]), label="k")
    metric = data.draw(st.sampled_from(["mse", "chi2"]), label="metric")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    y = rnd(2, length, 6, seed=length * 7 + k, dtype=dtype)
    whole, fin = bm.innovation_scores(y, taps=k, metric=metric, return_state=True)
    state, parts, t = None, [], 0
    for n in sizes:
        s, state = bm.innovation_scores(
            y[:, t : t + n], taps=k, metric=metric, state=state, return_state=True
        )
        parts.append(s)
        t += n
    got = torch.cat(parts, 1) if parts else whole
    # Bitwise by design: the kernel carries its history, count and average between calls
    # and runs the same operations in the same order as on the whole sequence.
    assert torch.equal(got, whole)
    if state is not None:
        for key in ("history", "count", "ema"):
            assert torch.equal(state[key], fin[key]), key


def test_innovation_not_differentiable():
    y = rnd(1, 5, 3, seed=3).requires_grad_(True)
    s = bm.innovation_scores(y)
    assert not s.requires_grad and s.grad_fn is None


def test_explained_sequence_has_zero_innovation_after_warmup():
    """y constant (mean predictor, k = 4) and y linear in t (taps c = (2, -1)) are
    predicted exactly from position k on: the scores there are exactly 0, for both metrics
    and in float32 and float64 (integer-valued data, power-of-two taps)."""
    t = torch.arange(40, dtype=torch.float64)
    const = torch.full((2, 40, 3), 3.0, dtype=torch.float64)
    lin = (t[None, :, None] * torch.tensor([1.0, -2.0, 0.5])).expand(2, 40, 3).contiguous()
    for dtype in (torch.float32, torch.float64):
        for metric in ("mse", "chi2"):
            s = bm.innovation_scores(const.to(dtype), metric=metric)
            assert (s[:, 4:] == 0).all() and (s[:, 0] > 0).all()
            w = torch.tensor([2.0, -1.0], dtype=dtype)
            s = bm.innovation_scores(lin.to(dtype), weights=w, metric=metric)
            assert (s[:, 2:] == 0).all() and (s[:, 1] > 0).all()


# ------------------------------------------------------------------------ store


@given(st.data())
def test_select_equals_brute_force(data):
    """Chunked builder == brute-force top-m at every chunk start, for any chunk size; the
    same run continued in pieces (cut at chunk multiples, carrying the store) is equal."""
    length = data.draw(st.integers(0, 40), label="L")
    cap = data.draw(st.integers(1, 7), label="capacity")
    chunk = data.draw(st.integers(1, 12), label="chunk")
    policy, tau = data.draw(st.sampled_from(POLICIES), label="policy")
    scores = tied_scores(2, length, stable_seed(length, cap, chunk, policy))
    got, store = bm.eidetic_select(scores, cap, chunk, policy, tau, return_store=True)
    want = ref.eidetic_select_ref(scores, cap, chunk, policy, tau)
    assert torch.equal(got, want)
    assert ((got >= 0).sum(-1) <= cap).all()
    n_chunks = got.shape[1]
    cuts = sorted(data.draw(st.lists(st.integers(0, n_chunks), max_size=3), label="cuts"))
    prev, parts, st_ = 0, [], None
    for c in [*cuts, n_chunks]:
        lo, hi = prev * chunk, min(c * chunk, length)
        p, st_ = bm.eidetic_select(
            scores[:, lo:hi], cap, chunk, policy, tau, store=st_, return_store=True
        )
        parts.append(p)
        prev = c
    assert torch.equal(torch.cat(parts, 1), got)
    for key in ("positions", "scores", "count"):
        assert torch.equal(st_[key], store[key]), key


@given(st.data())
def test_streaming_store_equals_brute_force(data):
    length = data.draw(st.integers(0, 40), label="L")
    sizes = data.draw(chunkings(length), label="pieces")
    cap = data.draw(st.integers(1, 6), label="capacity")
    policy, tau = data.draw(st.sampled_from(POLICIES), label="policy")
    scores = tied_scores(3, length, stable_seed("stream", length, cap, policy))
    store = bm.EideticStore(3, cap, policy, tau)
    t = 0
    for n in sizes:
        store.push(scores[:, t : t + n].to(torch.float32))
        t += n
        assert torch.equal(store.held(), ref.eidetic_held_ref(scores, t, cap, policy, tau))
        assert (store.size() <= cap).all() and (store.count == t).all()
    # the streaming heap and the chunked builder end in the very same state
    _, built = bm.eidetic_select(scores, cap, 5, policy, tau, return_store=True)
    for key, v in store.state_dict().items():
        assert torch.equal(v, built[key]), key
    # held_scores are the scores of the held positions
    hs = store.held_scores()
    h = store.held()
    if length:
        want = torch.where(h >= 0, scores.gather(1, h.clamp(min=0)), 0.0)
        assert torch.equal(hs, want)
    else:
        assert (hs == 0).all()


def test_store_round_trip_and_select_from_store():
    scores = tied_scores(2, 30, 5)
    a = bm.EideticStore(2, 4)
    a.push(scores[:, :17])
    b = bm.EideticStore(2, 4)
    b.load_state_dict(a.state_dict())
    a.push(scores[:, 17:])
    b.push(scores[:, 17:])
    assert torch.equal(a.positions, b.positions) and torch.equal(a.count, b.count)
    # continuing the chunked builder from a streaming store
    s = bm.EideticStore(2, 4)
    s.push(scores[:, :10])
    got = bm.eidetic_select(scores[:, 10:], 4, 5, store=s)
    assert torch.equal(got, ref.eidetic_select_ref(scores, 4, 5)[:, 2:])


def test_reset_clears_chosen_rows_only():
    scores = tied_scores(3, 12, 8)
    s = bm.EideticStore(3, 3)
    s.push(scores)
    before = s.state_dict()
    s.reset([1])
    assert torch.equal(s.positions[[0, 2]], before["positions"][[0, 2]])
    assert (s.positions[1] == -1).all() and s.count.tolist() == [12, 0, 12]
    s.push(scores[:, :4])
    assert torch.equal(s.held()[1], ref.eidetic_held_ref(scores[1:2], 4, 3)[0])
    s.reset(torch.tensor([True, False, False]))
    assert s.count.tolist() == [0, 4, 16]
    s.reset()
    assert (s.count == 0).all() and (s.positions == -1).all()


def test_explained_sequence_inserts_nothing_after_warmup():
    """Constant y (mean predictor, k = 4): scores are exactly 0 from position 4 on.
    "threshold" (τ = 0) then never admits a position >= 4; "topk" admits a position >= 4
    only into a free slot, so with capacity <= 4 every held position is < 4 and with a
    larger capacity the held set is exactly the first ``capacity`` positions."""
    y = torch.full((2, 50, 8), -1.5)
    scores = bm.innovation_scores(y)
    for cap in (1, 2, 4, 6, 9):
        held = bm.eidetic_select(scores, cap, 7, "threshold", 0.0)
        assert (held < 4).all()
        held = bm.eidetic_select(scores, cap, 7)
        if cap <= 4:
            assert (held < 4).all()
        else:
            last = held[:, -1]
            assert torch.equal(last, torch.arange(cap).expand(2, cap))


@pytest.mark.parametrize("cap", [1, 3, 5])
@pytest.mark.parametrize(("policy", "tau"), [("topk", 0.0), ("threshold", 0.5), ("fifo", 1.0)])
def test_single_spike_is_retained(cap, policy, tau):
    """A spike (+10) in a nearly constant sequence (noise 1e-3, y_0 = 0 so the start-up
    innovation is small), scored and stored in streaming pieces, has the largest score and
    is held at every later step under "topk" and "threshold" for any capacity >= 1. Under
    FIFO (τ = 1) the candidates are the spike and its 4 echoes (positions whose predictor
    window contains it, ε ≈ 6.25): the spike stays iff capacity >= 5, else the store ends
    with the last ``capacity`` echoes."""
    g = torch.Generator().manual_seed(cap)
    y = 2.0 + 1e-3 * torch.randn(2, 60, 4, generator=g, dtype=torch.float64)
    y[:, 0] = 0.0
    p0 = 13
    y[:, p0] += 10.0
    store = bm.EideticStore(2, cap, policy, tau)
    state, t = None, 0
    for n in (5, 1, 9, 20, 25):
        s, state = bm.innovation_scores(y[:, t : t + n], state=state, return_state=True)
        store.push(s)
        t += n
        if t > p0 and (policy != "fifo" or cap >= 5):
            assert (store.held() == p0).any(1).all(), (t, store.held())
    if policy == "fifo":
        held = store.held()
        want = list(range(p0, p0 + 5))[5 - cap :]
        assert held.tolist() == [want, want]


def test_spike_retained_fifo_when_alone():
    scores = torch.zeros(1, 40)
    scores[0, 7] = 5.0
    s = bm.EideticStore(1, 1, "fifo", 1.0)
    for t in range(40):
        s.push(scores[:, t : t + 1])
        if t >= 7:
            assert s.held().tolist() == [[7]]


# ------------------------------------------------------------------------ runtime


def test_threads_bitwise(restore_runtime):
    y = rnd(4, 512, 64, seed=1, dtype=torch.float32)
    outs = []
    for n in (1, 2):
        bm.set_num_threads(n)
        s = bm.innovation_scores(y, metric="chi2")
        h = bm.eidetic_select(s, 16, 64)
        outs.append((s, h))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_simd_level(restore_runtime, dtype):
    y = rnd(3, 40, 37, seed=2, dtype=dtype)
    w = torch.tensor([0.5, 0.3, -0.2, 0.4, 0.1], dtype=dtype)
    bm.set_simd_level("scalar")
    base = bm.innovation_scores(y, weights=w, metric="chi2")
    want = ref.innovation_scores_ref(y, weights=w, metric="chi2")
    assert_close(base, want, dtype, "scalar")
    for level in bm.simd_levels():
        bm.set_simd_level(level)
        got = bm.innovation_scores(y, weights=w, metric="chi2")
        assert_close(got, want, dtype, level)
        torch.testing.assert_close(got, base, **TOL[dtype])


def test_opcheck():
    y = rnd(2, 9, 5, seed=4)
    calls = [
        (
            torch.ops.bmojo.innovation_scores.default,
            (
                y,
                torch.full((3,), 1 / 3, dtype=torch.float64),
                rnd(2, 3, 5, seed=5),
                torch.tensor([0, 7]),
                torch.tensor([[0.0, 0.0], [0.4, 0.5]], dtype=torch.float64),
                True,
                0.0625,
                1e-6,
            ),
        ),
        (
            torch.ops.bmojo.innovation_scores.default,
            (
                y.float(),
                torch.tensor([2.0, -1.0]),
                torch.zeros(2, 2, 5),
                torch.zeros(2, dtype=torch.int64),
                torch.zeros(2, 2),
                False,
                0.5,
                1e-3,
            ),
        ),
    ]
    scores = tied_scores(2, 11, 6)
    for policy, tau in POLICIES:
        _, store = bm.eidetic_select(scores, 3, 4, policy, tau, return_store=True)
        calls.append(
            (
                torch.ops.bmojo.eidetic_select.default,
                (scores, store["positions"], store["scores"], store["count"], 4, policy, tau),
            )
        )
        calls.append(
            (
                torch.ops.bmojo.eidetic_push.default,
                (
                    store["positions"].clone(),
                    store["scores"].clone(),
                    store["count"].clone(),
                    scores[:, :5].contiguous(),
                    policy,
                    tau,
                ),
            )
        )
    for func, args in calls:
        torch.library.opcheck(func, args)


# ------------------------------------------------------------------------ gather


def test_gather_positions_values_and_grad():
    x = rnd(2, 10, 3, seed=7).requires_grad_(True)
    pos = torch.tensor([[[0, 4, -1], [2, 9, -1]], [[-1, -1, -1], [1, 2, 3]]])
    out, mask = bm.gather_positions(x, pos)
    assert out.shape == (2, 2, 3, 3) and torch.equal(mask, pos >= 0)
    for b in range(2):
        for c in range(2):
            for j in range(3):
                p = int(pos[b, c, j])
                want = x[b, p] if p >= 0 else torch.zeros(3, dtype=torch.float64)
                assert torch.equal(out[b, c, j], want)
    assert torch.autograd.gradcheck(lambda x: bm.gather_positions(x, pos)[0], (x,))
    out2, _ = bm.gather_positions(x[:, 4:], pos.clamp(min=4).masked_fill(pos < 0, -1), offset=4)
    assert torch.equal(out2[0, 0, 1], x[0, 4])


# ------------------------------------------------------------------------ errors


def test_innovation_errors():
    y = torch.randn(2, 5, 3)
    cases = [
        (dict(y=torch.randn(5, 3)), BmojoValueError, "y"),
        (dict(y=y.to(torch.int64)), BmojoTypeError, "y"),
        (dict(y=y, taps=0), BmojoValueError, "taps"),
        (dict(y=y, taps=2.0), BmojoTypeError, "taps"),
        (dict(y=y, weights=torch.ones(3), taps=2), BmojoValueError, "taps"),
        (dict(y=y, weights=torch.ones(0)), BmojoValueError, "weights"),
        (dict(y=y, weights=torch.ones(2, 2)), BmojoValueError, "weights"),
        (dict(y=y, weights=torch.ones(2, dtype=torch.float64)), BmojoTypeError, "weights"),
        (dict(y=y, metric="mae"), BmojoValueError, "metric"),
        (dict(y=y, history=torch.zeros(2, 5, 3)), BmojoValueError, "history"),
        (dict(y=y, history=torch.zeros(2, 2, 4)), BmojoValueError, "history"),
        (dict(y=y, chi2_rate=0.0), BmojoValueError, "chi2_rate"),
        (dict(y=y, chi2_floor=-1.0), BmojoValueError, "chi2_floor"),
        (dict(y=y, state={"history": torch.zeros(2, 4, 3)}), BmojoValueError, "state"),
        (dict(y=y, state=[1]), BmojoTypeError, "state"),
        (
            dict(
                y=y,
                state=dict(
                    history=torch.zeros(2, 4, 3), count=torch.tensor([0, -1]), ema=torch.zeros(2, 2)
                ),
            ),
            BmojoValueError,
            "count",
        ),
        (
            dict(
                y=y,
                state=dict(
                    history=torch.zeros(2, 4, 3), count=torch.zeros(2), ema=torch.zeros(2, 2)
                ),
            ),
            BmojoTypeError,
            "state['count']",
        ),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name.replace("[", r"\[").replace("]", r"\]")):
            bm.innovation_scores(**kw)


def test_select_errors():
    s = torch.rand(2, 9)
    cases = [
        (dict(scores=s, capacity=0, chunk=2), BmojoValueError, "capacity"),
        (dict(scores=s, capacity=2, chunk=0), BmojoValueError, "chunk"),
        (dict(scores=s, capacity=True, chunk=2), BmojoTypeError, "capacity"),
        (dict(scores=s, capacity=2, chunk=2, policy="lru"), BmojoValueError, "policy"),
        (dict(scores=s, capacity=2, chunk=2, policy=1), BmojoTypeError, "policy"),
        (
            dict(scores=s, capacity=2, chunk=2, policy="fifo", threshold=-1.0),
            BmojoValueError,
            "threshold",
        ),
        (dict(scores=s, capacity=2, chunk=2, threshold=float("nan")), BmojoValueError, "threshold"),
        (dict(scores=s[0], capacity=2, chunk=2), BmojoValueError, "scores"),
        (
            dict(scores=s.masked_fill(s > 0.5, float("nan")), capacity=2, chunk=2),
            BmojoValueError,
            "NaN",
        ),
        (dict(scores=s, capacity=2, chunk=2, start=-1), BmojoValueError, "start"),
        (
            dict(scores=s, capacity=2, chunk=2, store={"positions": torch.full((2, 3), -1)}),
            BmojoValueError,
            "store",
        ),
        (
            dict(
                scores=s,
                capacity=2,
                chunk=2,
                store={"positions": torch.tensor([[0, 1], [-1, -1]]), "scores": torch.zeros(2, 2)},
                start=1,
            ),
            BmojoValueError,
            "heap order|held twice|not before",
        ),
        (
            dict(
                scores=s,
                capacity=2,
                chunk=2,
                store={"positions": torch.tensor([[5, -1], [-1, -1]]), "scores": torch.zeros(2, 2)},
                start=3,
            ),
            BmojoValueError,
            "not before",
        ),
        (
            dict(
                scores=s,
                capacity=2,
                chunk=2,
                store={
                    "positions": torch.full((2, 2), -1),
                    "scores": torch.zeros(2, 2),
                    "count": torch.tensor([3, 3]),
                },
                start=2,
            ),
            BmojoValueError,
            "start",
        ),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            bm.eidetic_select(**kw)


def test_store_errors_leave_it_unchanged():
    with pytest.raises(BmojoValueError, match="capacity"):
        bm.EideticStore(2, 0)
    with pytest.raises(BmojoValueError, match="policy"):
        bm.EideticStore(2, 2, policy="random")
    with pytest.raises(BmojoValueError, match="threshold"):
        bm.EideticStore(2, 2, policy="threshold", threshold=-0.5)
    s = bm.EideticStore(2, 3)
    s.push(tied_scores(2, 8, 1))
    good = s.state_dict()

    def unchanged():
        for k, v in good.items():
            assert torch.equal(getattr(s, k), v), k

    for bad, exc, name in [
        (torch.rand(3, 2), BmojoValueError, "scores"),
        (torch.rand(2), BmojoValueError, "scores"),
        (torch.ones(2, 2, dtype=torch.int64), BmojoTypeError, "scores"),
        (torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), BmojoValueError, "NaN"),
        ("x", BmojoTypeError, "scores"),
    ]:
        with pytest.raises(exc, match=name):
            s.push(bad)
        unchanged()
    heap = good["positions"].clone()
    heap[0, [0, 1]] = heap[0, [1, 0]]
    sc = good["scores"].clone()
    sc[0, [0, 1]] = sc[0, [1, 0]]
    corrupt = [
        ({**good, "positions": heap, "scores": sc}, BmojoValueError, "heap order"),
        ({**good, "count": torch.tensor([2, 8])}, BmojoValueError, "not before"),
        ({**good, "positions": good["positions"].float()}, BmojoTypeError, "positions"),
        ({**good, "scores": good["scores"][:, :2]}, BmojoValueError, "scores"),
        ({k: v for k, v in good.items() if k != "count"}, BmojoValueError, "count"),
        ({**good, "extra": torch.zeros(1)}, BmojoValueError, "extra"),
        (
            {**good, "positions": torch.tensor([[0, -1, 3], [-1, -1, -1]])},
            BmojoValueError,
            "empty slots",
        ),
        (
            {
                **good,
                "scores": good["scores"].masked_fill(
                    good["positions"] == good["positions"][0, 0], float("inf")
                ),
            },
            BmojoValueError,
            "finite",
        ),
        (
            {
                **good,
                "positions": torch.tensor([[1, 1, -1], [-1, -1, -1]]),
                "scores": torch.zeros(2, 3, dtype=torch.float64),
            },
            BmojoValueError,
            "twice",
        ),
        ("state", BmojoTypeError, "state"),
    ]
    for bad, exc, name in corrupt:
        with pytest.raises(exc, match=name):
            s.load_state_dict(bad)
        unchanged()
    for rows, exc in [
        ([5], BmojoValueError),
        ("a", BmojoTypeError),
        (torch.ones(3, dtype=torch.bool), BmojoValueError),
    ]:
        with pytest.raises(exc, match="rows"):
            s.reset(rows)
        unchanged()


def test_gather_errors():
    x = torch.randn(2, 5, 3)
    with pytest.raises(BmojoValueError, match="positions"):
        bm.gather_positions(x, torch.tensor([[[5]], [[0]]]))
    with pytest.raises(BmojoValueError, match="positions"):
        bm.gather_positions(x, torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(BmojoTypeError, match="positions"):
        bm.gather_positions(x, torch.zeros(2, 1))
    with pytest.raises(BmojoValueError, match="x"):
        bm.gather_positions(x[0], torch.zeros(2, 1, dtype=torch.int64))


def test_torch_compile_fullgraph():
    def f(y):
        s, state = bm.innovation_scores(y, metric="chi2", return_state=True)
        held = bm.eidetic_select(s, 4, 8)
        out, mask = bm.gather_positions(y, held)
        return out.sum() + state["ema"].sum()

    y = rnd(2, 30, 5, seed=11, dtype=torch.float32).requires_grad_(True)
    y2 = y.detach().clone().requires_grad_(True)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(y)
    want = f(y2)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(y.grad, y2.grad)
