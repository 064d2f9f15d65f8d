"""MQAR generator: layout, labels, fill, query placement statistics, determinism, errors.

Oracles: per-row Python loops over the documented layout (independent of the vectorised
generator), exact enumeration of the without-replacement slot law, and a causal lookup
"model" that answers every query perfectly.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from bmojo_core import mqar
from bmojo_core.errors import BmojoTypeError, BmojoValueError
from bmojo_core.mqar import IGNORE_INDEX, MQARConfig, make_batch, make_test_set
from bmojo_core.train import evaluate
from hypothesis import given
from hypothesis import strategies as st

CONFIGS = [
    MQARConfig(vocab=20, seq_len=24, num_kv=4),
    MQARConfig(vocab=10, seq_len=17, num_kv=4),  # odd length, vocab at its minimum
    MQARConfig(vocab=64, seq_len=16, num_kv=4),  # queries fill every slot
    MQARConfig(vocab=512, seq_len=256, num_kv=32, power_a=0.01),
    MQARConfig(vocab=512, seq_len=256, num_kv=8, random_fill=True),
    MQARConfig(vocab=128, seq_len=64, num_kv=3, power_a=2.5, random_fill=True),
]


def check_row(cfg: MQARConfig, x: list[int], y: list[int]) -> list[int]:
    """Asserts the documented layout of one row; returns its query positions."""
    V, L, N = cfg.vocab, cfg.seq_len, cfg.num_kv
    assert len(x) == len(y) == L
    keys, vals = x[0 : 2 * N : 2], x[1 : 2 * N : 2]
    assert len(set(keys)) == N and all(1 <= k < V // 2 for k in keys), keys
    assert len(set(vals)) == N and all(V // 2 <= v < V for v in vals), vals
    table = dict(zip(keys, vals, strict=True))
    qpos = [t for t in range(L) if y[t] != IGNORE_INDEX]
    assert all(y[t] == IGNORE_INDEX for t in range(2 * N)), "label inside the context block"
    assert len(qpos) == N
    assert all(t >= 2 * N and (t - 2 * N) % 2 == 0 for t in qpos), qpos
    assert sorted(x[t] for t in qpos) == sorted(keys), "each key queried exactly once"
    for t in qpos:  # label at the query position = value of the queried key
        assert y[t] == table[x[t]]
    rest = [x[t] for t in range(2 * N, L) if t not in qpos]
    if not cfg.random_fill:
        assert all(v == 0 for v in rest)
    else:
        assert all(0 <= v < V for v in rest)
    return qpos


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_layout_and_labels(cfg):
    x, y = make_batch(cfg, 48, 7)
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == y.shape == (48, cfg.seq_len)
    for xr, yr in zip(x.tolist(), y.tolist(), strict=True):
        check_row(cfg, xr, yr)
    assert torch.equal(mqar.query_positions(y), (y != IGNORE_INDEX).nonzero()[:, 1].view(48, -1))


@st.composite
def configs(draw):
    n = draw(st.integers(1, 12))
    vocab = 2 * draw(st.integers(n + 1, n + 40))
    seq_len = draw(st.integers(4 * n, 4 * n + 40))
    a = draw(st.sampled_from([0.01, 0.5, 1.0, 2.0, 7.0]))
    return MQARConfig(vocab, seq_len, n, a, draw(st.booleans()))


@given(configs(), st.integers(1, 9), st.integers(0, 2**31))
def test_layout_property(cfg, batch, seed):
    x, y = make_batch(cfg, batch, seed)
    assert x.shape == y.shape == (batch, cfg.seq_len)
    for xr, yr in zip(x.tolist(), y.tolist(), strict=True):
        check_row(cfg, xr, yr)


def test_mixed_batch_layout_and_split():
    """Rows split as evenly as possible over the settings, in order; each block laid out as
    its own setting says and equal to make_batch drawn from the same generator."""
    cfgs = [MQARConfig(64, 48, n, random_fill=rf) for n, rf in ((2, False), (5, True), (8, False))]
    x, y = mqar.make_mixed_batch(cfgs, 11, 4)
    assert x.shape == y.shape == (11, 48)
    sizes = [4, 4, 3]
    g = torch.Generator().manual_seed(4)
    row = 0
    for cfg, k in zip(cfgs, sizes, strict=True):
        xb, yb = make_batch(cfg, k, g)
        assert torch.equal(x[row : row + k], xb) and torch.equal(y[row : row + k], yb)
        for xr, yr in zip(x[row : row + k].tolist(), y[row : row + k].tolist(), strict=True):
            check_row(cfg, xr, yr)
        row += k
    with pytest.raises(BmojoValueError, match="batch"):
        mqar.make_mixed_batch(cfgs, 2, 0)
    with pytest.raises(BmojoValueError, match="same vocab and seq_len"):
        mqar.make_mixed_batch([cfgs[0], MQARConfig(64, 40, 2)], 4, 0)
    with pytest.raises(BmojoTypeError, match="configs"):
        mqar.make_mixed_batch(cfgs[0], 4, 0)
    with pytest.raises(BmojoTypeError, match="configs"):
        mqar.make_mixed_batch([], 4, 0)


def test_next_token_convention_with_causal_lookup_model():
    """A causal model that looks up the current token among the keys seen so far and
    predicts its value reaches accuracy 1 exactly when labels sit at the query position;
    the same model shifted by one position (labels at the position after) scores 0."""
    cfg = MQARConfig(vocab=64, seq_len=40, num_kv=6, random_fill=True)

    class Lookup(torch.nn.Module):
        def __init__(self, shift: int):
            super().__init__()
            self.shift = shift
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            B, L = x.shape
            logits = torch.zeros(B, L, cfg.vocab)
            for b in range(B):
                seen: dict[int, int] = {}
                for t in range(L):
                    tok = int(x[b, t])
                    if t % 2 == 1 and t < 2 * cfg.num_kv:
                        seen[int(x[b, t - 1])] = tok
                    src = t - self.shift
                    if src >= 2 * cfg.num_kv and int(x[b, src]) in seen:
                        logits[b, t, seen[int(x[b, src])]] = 1.0
            return logits

    x, y = make_test_set(cfg, 16, 3)
    loss, acc, ok = evaluate(Lookup(0), x, y)
    assert acc == 1.0 and bool(ok.all()) and ok.shape == (16 * cfg.num_kv,)
    _, acc_shift, _ = evaluate(Lookup(1), x, y)
    assert acc_shift < 0.2


def test_zero_vs_random_fill():
    base = dict(vocab=256, seq_len=128, num_kv=4)
    xz, yz = make_batch(MQARConfig(**base), 64, 1)
    xr, yr = make_batch(MQARConfig(**base, random_fill=True), 64, 1)
    mask = torch.ones_like(xz, dtype=torch.bool)
    mask[:, :8] = False
    mask &= yz == IGNORE_INDEX
    assert bool((xz[mask] == 0).all())
    filler = xr[(yr == IGNORE_INDEX) & mask].double()
    # uniform on [0, 256): mean 127.5, sd 73.9; ~7.7k samples
    assert abs(filler.mean().item() - 127.5) < 5
    assert filler.unique().numel() > 240  # the whole vocabulary, keys and values included
    # the fill is drawn last: same seed, same task (context, queries, labels)
    assert torch.equal(yr, yz) and torch.equal(xr[~mask], xz[~mask])


def slot_hist(cfg: MQARConfig, rows: int, seed: int) -> torch.Tensor:
    _, y = make_batch(cfg, rows, seed)
    slots = (mqar.query_positions(y) - cfg.context_len) // 2
    return torch.bincount(slots.flatten(), minlength=cfg.num_slots).double()


def test_single_query_follows_power_law():
    cfg = MQARConfig(vocab=16, seq_len=2 + 2 * 12, num_kv=1, power_a=0.4)
    n = 20000
    freq = slot_hist(cfg, n, 11) / n
    p = torch.arange(1, 13, dtype=torch.float64) ** (0.4 - 1)
    p /= p.sum()
    assert torch.allclose(cfg.slot_probs(), p)
    assert (freq - p).abs().max() < 0.015


def test_pairs_follow_sequential_draws_without_replacement():
    """N = 2 keys in S = 4 slots: the law of the slot pair is that of two sequential
    weighted draws without replacement (enumerated exactly)."""
    cfg = MQARConfig(vocab=8, seq_len=4 + 8, num_kv=2, power_a=0.3)
    p = cfg.slot_probs().tolist()
    n = 20000
    _, y = make_batch(cfg, n, 5)
    slots = (mqar.query_positions(y) - 4) // 2
    for i, j in itertools.combinations(range(4), 2):
        want = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
        got = ((slots[:, 0] == i) & (slots[:, 1] == j)).double().mean().item()
        assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / n) + 1e-3, (i, j, got, want)


def test_power_a_one_is_uniform():
    cfg = MQARConfig(vocab=64, seq_len=8 + 2 * 20, num_kv=4, power_a=1.0)
    rows = 5000
    h = slot_hist(cfg, rows, 2)
    expected = rows * cfg.num_kv / cfg.num_slots
    chi2 = ((h - expected) ** 2 / expected).sum().item()
    assert chi2 < 60  # 19 dof: 99.99th percentile ~ 49; generous


def test_power_a_moves_queries():
    """Zoology's law p(g) ∝ g^(a-1): a < 1 pulls the queries to the context block, a > 1
    pushes them to the end; a = 1 puts the mean slot in the middle."""
    means = {}
    for a in (0.01, 1.0, 3.0):
        cfg = MQARConfig(vocab=512, seq_len=256, num_kv=8, power_a=a)
        h = slot_hist(cfg, 2000, 4)
        means[a] = (h * torch.arange(cfg.num_slots)).sum().item() / h.sum().item()
    S = MQARConfig(vocab=512, seq_len=256, num_kv=8).num_slots
    assert means[0.01] < 0.3 * (S - 1)
    assert abs(means[1.0] - 0.5 * (S - 1)) < 0.05 * S
    assert means[3.0] > 0.65 * (S - 1)


def test_determinism_and_global_rng_untouched():
    cfg = MQARConfig(num_kv=16, random_fill=True)
    state = torch.get_rng_state()
    a = make_test_set(cfg, 32, 123)
    torch.manual_seed(999)
    b = make_test_set(cfg, 32, 123)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = make_test_set(cfg, 32, 124)
    assert not torch.equal(a[0], c[0])
    torch.set_rng_state(state)
    make_batch(cfg, 4, 0)
    make_batch(cfg, 4, None)
    assert torch.equal(torch.get_rng_state(), state)
    # an explicit generator advances: fresh data at every call
    g = torch.Generator().manual_seed(123)
    first, second = make_batch(cfg, 32, g), make_batch(cfg, 32, g)
    assert torch.equal(first[0], a[0]) and not torch.equal(second[0], a[0])


def test_defaults():
    cfg = MQARConfig()
    assert (cfg.vocab, cfg.seq_len, cfg.power_a, cfg.random_fill) == (512, 256, 1.0, False)
    for n in (4, 8, 16, 32):
        x, y = make_batch(MQARConfig(num_kv=n), 2, 0, device="cpu")
        assert (y != IGNORE_INDEX).sum(1).tolist() == [n, n]
    MQARConfig(vocab=10, seq_len=16, num_kv=4)  # both limits exactly met
    c = MQARConfig(vocab=np.int64(64), seq_len=np.int32(32), num_kv=np.int16(4))
    assert type(c.vocab) is int and c == MQARConfig(vocab=64, seq_len=32, num_kv=4)
    assert torch.equal(make_test_set(c, 3, np.int64(5))[0], make_test_set(c, 3, 5)[0])


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(vocab=21, seq_len=24, num_kv=4), BmojoValueError, "vocab: expected an even"),
        (dict(vocab=8, seq_len=24, num_kv=4), BmojoValueError, "need vocab >= 10"),
        (dict(vocab=64, seq_len=15, num_kv=4), BmojoValueError, "need seq_len >= 16"),
        (dict(num_kv=0), BmojoValueError, "num_kv: expected an int >= 1"),
        (dict(vocab=2), BmojoValueError, "vocab: expected an int >= 4"),
        (dict(power_a=0.0), BmojoValueError, "power_a"),
        (dict(power_a=-1.0), BmojoValueError, "power_a"),
        (dict(power_a=float("nan")), BmojoValueError, "power_a"),
        (dict(power_a=float("inf")), BmojoValueError, "power_a"),
        (dict(power_a="1"), BmojoTypeError, "power_a"),
        (dict(vocab=512.0), BmojoTypeError, "vocab: expected an int"),
        (dict(num_kv=True), BmojoTypeError, "num_kv: expected an int"),
        (dict(random_fill=1), BmojoTypeError, "random_fill"),
    ],
)
def test_bad_configs(kw, err, match):
    with pytest.raises(err, match=match):
        MQARConfig(**kw)


def test_bad_batch_args():
    cfg = MQARConfig(num_kv=4)
    with pytest.raises(BmojoValueError, match="batch"):
        make_batch(cfg, 0, 0)
    with pytest.raises(BmojoTypeError, match="batch"):
        make_batch(cfg, 2.0, 0)
    with pytest.raises(BmojoTypeError, match="config"):
        make_batch({"num_kv": 4}, 2, 0)
    with pytest.raises(BmojoTypeError, match="generator"):
        make_batch(cfg, 2, "seed")
    with pytest.raises(BmojoValueError, match="seed"):
        make_batch(cfg, 2, -1)
    with pytest.raises(BmojoTypeError, match="seed"):
        make_test_set(cfg, 2, None)
