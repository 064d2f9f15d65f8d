"""The meaning of an MQAR number: value lags and recall ceilings against brute-force counts
over the test set, and the Wilson interval against its closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from bmojo_core.errors import BmojoValueError
from bmojo_core.mqar import MQARConfig, make_test_set, value_lags
from bmojo_core.mqar.data import IGNORE_INDEX
from bmojo_core.mqar.stats import recall_ceiling, wilson_interval


def _brute_lags(inputs, labels):
    out = []
    for x, y in zip(inputs.tolist(), labels.tolist(), strict=True):
        row = []
        n = sum(v != IGNORE_INDEX for v in y)
        for t, v in enumerate(y):
            if v == IGNORE_INDEX:
                continue
            (p,) = [2 * j + 1 for j in range(n) if x[2 * j] == x[t]]
            assert x[p] == v  # the value token holds the label
            row.append(t - p)
        out.append(row)
    return out


def _brute_ceiling(lags, window, n_eidetic):
    if window == 0:
        return None
    seen = 0
    for row in lags:
        inside = sum(lag < window for lag in row)
        seen += inside + min(len(row) - inside, n_eidetic)
    return seen / sum(len(r) for r in lags)


CASES = [
    MQARConfig(512, 256, 4),
    MQARConfig(512, 256, 32),
    MQARConfig(128, 64, 2, power_a=0.3, random_fill=True),
    MQARConfig(64, 40, 10, power_a=2.0),
]


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_value_lags_and_ceilings_match_brute_force(cfg):
    inputs, labels = make_test_set(cfg, 48, seed=cfg.num_kv)
    lags = value_lags(inputs, labels)
    brute = _brute_lags(inputs, labels)
    assert lags.tolist() == brute
    for window, e in [
        (0, 0),
        (0, 8),
        (1, 0),
        (8, 0),
        (32, 0),
        (32, 16),
        (56, 0),
        (16, 3),
        (500, 0),
    ]:
        got = recall_ceiling(lags, window, e)
        want = _brute_ceiling(brute, window, e)
        assert got == pytest.approx(want, abs=0) if want is not None else got is None


def test_ceiling_bounds():
    inputs, labels = make_test_set(MQARConfig(512, 256, 8), 64, seed=3)
    lags = value_lags(inputs, labels)
    assert recall_ceiling(lags, 256) == 1.0  # the whole sequence
    assert recall_ceiling(lags, 1, 8) == 1.0  # one eidetic token per query
    assert recall_ceiling(lags, 1) == 0.0  # a query never is its own answer
    cs = [recall_ceiling(lags, w) for w in (2, 8, 32, 64, 128)]
    assert cs == sorted(cs)


def test_value_lags_bad_input():
    inputs, labels = make_test_set(MQARConfig(64, 32, 4), 4, seed=0)
    with pytest.raises(BmojoValueError, match="inputs, labels"):
        value_lags(inputs[:, :-1], labels)
    bad = inputs.clone()
    bad[:, 0] = bad[:, 2]  # two context pairs with the same key
    with pytest.raises(BmojoValueError, match="exactly one key"):
        value_lags(bad, labels)
    with pytest.raises(BmojoValueError, match="lags"):
        recall_ceiling(torch.zeros(0, 4, dtype=torch.int64), 4)


def test_wilson_interval():
    z = 1.959963984540054
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z * z / (10 + z * z), rel=1e-12)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z * z), rel=1e-12)
    # the closed form at p = 1/2 is symmetric about it
    lo, hi = wilson_interval(50, 100)
    assert lo + hi == pytest.approx(1.0, rel=1e-12)
    assert hi - lo == pytest.approx(
        2 * z * math.sqrt(0.25 / 100 + z * z / 40000) / (1 + z * z / 100)
    )
    for k, n in [(1, 1024), (37, 1024), (900, 1024)]:
        lo, hi = wilson_interval(k, n)
        assert lo < k / n < hi
    narrow, wide = wilson_interval(30, 3000), wilson_interval(3, 300)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(BmojoValueError, match="successes"):
        wilson_interval(11, 10)
