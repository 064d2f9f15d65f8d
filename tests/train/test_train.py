"""GreedyLR, cosine schedule, trainer, evaluate and negative flip rate.

Oracles: hand-computed learning-rate trajectories, an independent (functional) GreedyLR
model over random metric streams, closed-form cosine values, hand-made logits and
correctness tensors, and learning from chance to near-perfect accuracy on tasks a tiny
model can solve.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from bmojo_core import mqar
from bmojo_core.errors import BmojoTypeError, BmojoValueError
from bmojo_core.train import (
    GreedyLR,
    cosine_schedule,
    evaluate,
    negative_flip_rate,
    train,
)
from conftest import STRICT
from hypothesis import given
from hypothesis import strategies as st
from torch.optim.lr_scheduler import LRScheduler


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and leave the other cores alone)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- GreedyLR


def make_opt(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs or (1.0,)]
    return torch.optim.SGD(groups, lr=1.0)


def trajectory(metrics, lr=1.0, **kw) -> list[float]:
    opt = make_opt(lr)
    kw = {"factor": 0.5, "patience": 0, "threshold": 0.0, **kw}
    s = GreedyLR(opt, **kw)
    out = []
    for m in metrics:
        s.step(m)
        assert s.get_last_lr() == [opt.param_groups[0]["lr"]]
        out.append(opt.param_groups[0]["lr"])
    return out


def test_is_an_lr_scheduler():
    s = GreedyLR(make_opt(0.3))
    assert isinstance(s, LRScheduler)
    assert s.get_last_lr() == [0.3]


def test_up_on_improvement_down_otherwise_and_clamped():
    # 10, 9, 8 improve; 8 ties (no improvement); 9 worse; 7 beats best 8
    assert trajectory([10, 9, 8, 8, 9, 7], max_lr=8.0) == [2, 4, 8, 4, 2, 4]
    # clamped at max_lr, then down to min_lr
    got = trajectory([9, 8, 7, 6, 5, 5, 5, 5, 5, 5, 5, 5, 5], max_lr=8.0, min_lr=0.1)
    assert got == [2, 4, 8, 8, 8, 4, 2, 1, 0.5, 0.25, 0.125, 0.1, 0.1]


def test_max_lr_default_is_ten_times_initial():
    assert trajectory([5, 4, 3, 2, 1], lr=0.5) == [1, 2, 4, 5, 5]


def test_patience():
    # good counts 1, 2, 3 -> up (reset), 1, 2, 3 -> up; then bad 1, 2, good (reset),
    # bad 1, 2, 3 -> down
    m = [10, 9, 8, 7, 6, 5, 5, 5, 4, 5, 5, 5]
    assert trajectory(m, patience=2, max_lr=100) == [1, 1, 2, 2, 2, 4, 4, 4, 4, 4, 4, 2]


def test_threshold_rel_and_abs():
    # rel 0.1: 9.5 is not below 10 * 0.9 (bad); 8.9 is (good)
    assert trajectory([10, 9.5, 8.9], threshold=0.1, max_lr=100) == [2, 1, 2]
    # abs 0.5: 9.6 is within 0.5 of 10 (bad); 9.4 is not (good)
    assert trajectory([10, 9.6, 9.4], threshold=0.5, threshold_mode="abs", max_lr=100) == [
        2,
        1,
        2,
    ]
    # rel threshold on negative metrics: needs a drop of 10% of |best|
    assert trajectory([-10, -10.5, -11.5], threshold=0.1, max_lr=100) == [2, 1, 2]


def test_smoothing_window():
    m = [9, 3, 3, 9, 9]
    # raw: 9 good, 3 good, 3 tie (bad), 9 bad, 9 bad
    assert trajectory(m, max_lr=100) == [2, 4, 2, 1, 0.5]
    # window 3: 9, 6, 5, 5, 7 -> good, good, good, tie (bad), bad
    assert trajectory(m, smooth=3, max_lr=100) == [2, 4, 8, 4, 2]


def test_cooldown_keeps_direction():
    # after the decrease at step 2, two evaluations may not raise the rate
    assert trajectory([10, 11, 5, 4, 3, 2], cooldown=2, max_lr=100) == [2, 1, 1, 1, 2, 4]
    # ... but may lower it further
    assert trajectory([10, 11, 12, 13], cooldown=2, max_lr=100) == [2, 1, 0.5, 0.25]
    assert trajectory([10, 11, 5, 4, 3, 2], cooldown=0, max_lr=100) == [2, 1, 2, 4, 8, 16]


def test_warmup_keeps_direction():
    # after an increase, two evaluations may not lower the rate
    assert trajectory([10, 11, 12, 13, 14], warmup=2, max_lr=100) == [2, 2, 2, 1, 0.5]
    # ... but may raise it further (each increase restarts the warmup)
    assert trajectory([10, 9, 12, 13, 14, 15], warmup=2, max_lr=100) == [2, 4, 4, 4, 2, 1]


def test_mode_max_and_nonfinite_metrics():
    assert trajectory([0.1, 0.2, 0.2, 0.15], mode="max", max_lr=100) == [2, 4, 2, 1]
    # NaN / inf count as the worst value: the rate goes down
    assert trajectory([1.0, float("nan"), float("inf"), 0.5], max_lr=100) == [2, 1, 0.5, 1]
    assert trajectory([torch.tensor(3.0), torch.tensor([2.0])], max_lr=100) == [2, 4]


def test_param_groups_with_own_bounds():
    opt = make_opt(1.0, 0.1)
    s = GreedyLR(opt, factor=0.5, patience=0, threshold=0, max_lr=[2.0, 1.0], min_lr=[0.5, 0])
    lrs = []
    for m in [3, 2, 1, 5, 5, 5]:
        s.step(m)
        lrs.append([g["lr"] for g in opt.param_groups])
        assert s.get_last_lr() == lrs[-1]
    assert lrs == [[2, 0.2], [2, 0.4], [2, 0.8], [1, 0.4], [0.5, 0.2], [0.5, 0.1]]


def greedy_model(metrics, *, factor, patience, threshold, smooth, cooldown, warmup, lo, hi):
    """Independent functional model of the documented rule (mode min, rel threshold)."""
    lr, best, good, bad, cool, warm, out = 1.0, None, 0, 0, 0, 0, []
    for i in range(len(metrics)):
        window = metrics[max(0, i + 1 - smooth) : i + 1]
        cur = sum(window) / len(window)
        improved = best is None or cur < best - threshold * abs(best)
        if improved:
            best = cur
        good, bad = (good + 1, 0) if improved else (0, bad + 1)
        if cool:
            cool, good = cool - 1, 0
        if warm:
            warm, bad = warm - 1, 0
        if bad > patience:
            lr, cool, bad = max(lr * factor, lo), cooldown, 0
        elif good > patience:
            lr, warm, good = min(lr / factor, hi), warmup, 0
        out.append(lr)
    return out


greedy_settings = st.fixed_dictionaries(
    {
        "factor": st.sampled_from([0.5, 0.8]),
        "patience": st.integers(0, 2),
        "threshold": st.sampled_from([0.0, 0.05]),
        "smooth": st.integers(1, 3),
        "cooldown": st.integers(0, 2),
        "warmup": st.integers(0, 2),
    }
)


@given(
    greedy_settings,
    st.lists(st.integers(1, 40).map(lambda v: v / 4), min_size=1, max_size=30),
)
def test_matches_independent_model(kw, metrics):
    got = trajectory(metrics, min_lr=0.05, max_lr=6.0, **kw)
    want = greedy_model(metrics, lo=0.05, hi=6.0, **kw)
    assert got == pytest.approx(want, rel=1e-12)


def test_state_dict_round_trip_resumes_identically():
    gen = torch.Generator().manual_seed(0)
    metrics = (torch.rand(40, generator=gen) + torch.linspace(2, 0, 40)).tolist()
    kw = dict(factor=0.7, patience=1, smooth=3, cooldown=2, warmup=1, max_lr=5.0, min_lr=0.01)
    opt_a = make_opt(1.0)
    a = GreedyLR(opt_a, **kw)
    for m in metrics[:20]:
        a.step(m)
    buf = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "sched": a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    opt_b = make_opt(0.123)
    b = GreedyLR(opt_b)  # other settings: all restored from the state
    opt_b.load_state_dict(saved["opt"])
    b.load_state_dict(saved["sched"])
    assert b.get_last_lr() == a.get_last_lr()
    for m in metrics[20:]:
        a.step(m)
        b.step(m)
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
    assert a.get_last_lr() == b.get_last_lr()
    # the state is a copy: stepping `a` further does not change a saved dict
    sd = a.state_dict()
    before = copy.deepcopy(sd)
    a.step(100.0)
    assert sd == before


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(factor=0.0), BmojoValueError, "factor"),
        (dict(factor=1.0), BmojoValueError, "factor"),
        (dict(factor=1.5), BmojoValueError, "factor"),
        (dict(factor="0.5"), BmojoTypeError, "factor"),
        (dict(patience=-1), BmojoValueError, "patience"),
        (dict(patience=1.5), BmojoTypeError, "patience"),
        (dict(threshold=-0.1), BmojoValueError, "threshold"),
        (dict(threshold=float("nan")), BmojoValueError, "threshold"),
        (dict(smooth=0), BmojoValueError, "smooth"),
        (dict(cooldown=-1), BmojoValueError, "cooldown"),
        (dict(warmup=True), BmojoTypeError, "warmup"),
        (dict(min_lr=-1.0), BmojoValueError, "min_lr"),
        (dict(min_lr=[0.1, 0.2]), BmojoValueError, "min_lr: expected one value per"),
        (dict(min_lr=0.5, max_lr=0.1), BmojoValueError, "max_lr"),
        (dict(mode="minimum"), BmojoValueError, "mode"),
        (dict(threshold_mode="relative"), BmojoValueError, "threshold_mode"),
    ],
)
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        GreedyLR(make_opt(1.0), **kw)


def test_bad_step_and_state():
    with pytest.raises(BmojoTypeError, match="optimizer"):
        GreedyLR([nn.Parameter(torch.zeros(1))])
    s = GreedyLR(make_opt(1.0))
    with pytest.raises(BmojoTypeError, match="metrics"):
        s.step()
    with pytest.raises(BmojoTypeError, match="metrics"):
        s.step("1.0")
    with pytest.raises(BmojoValueError, match="metrics"):
        s.step(torch.ones(2))
    with pytest.raises(BmojoValueError, match="epoch"):
        s.step(1.0, 3)
    with pytest.raises(BmojoValueError, match="state_dict"):
        s.load_state_dict({"last_epoch": 3})
    with pytest.raises(BmojoTypeError, match="state_dict"):
        s.load_state_dict([1, 2])
    assert s.last_epoch == 0 and s.get_last_lr() == [1.0]


# ----------------------------------------------------------------------------- cosine


def lrs_of(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_values():
    opt = make_opt(2.0)
    got = lrs_of(cosine_schedule(opt, 10, warmup_steps=2, min_ratio=0.1), opt, 12)
    want = [1.0, 2.0] + [
        2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 2) / 8))))
        for s in range(2, 12)
    ]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[-1] == pytest.approx(0.2) and got[2] == pytest.approx(2.0)
    opt = make_opt(1.0)
    got = lrs_of(cosine_schedule(opt, 4), opt, 5)
    assert got == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.1464466094, 0.0])


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((0,), BmojoValueError, "total_steps"),
        ((10, 10), BmojoValueError, "warmup_steps"),
        ((10, -1), BmojoValueError, "warmup_steps"),
        ((10, 0, 1.5), BmojoValueError, "min_ratio"),
        ((10.0,), BmojoTypeError, "total_steps"),
    ],
)
def test_cosine_bad_arguments(args, err, match):
    with pytest.raises(err, match=match):
        cosine_schedule(make_opt(1.0), *args)


# ----------------------------------------------------------------------------- evaluate


class FixedLogits(nn.Module):
    """Returns row ``x[b, 0]`` of a fixed logits table (the first token is a row id)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        assert not self.training
        return self.logits[x[:, 0]]


def test_evaluate_hand_made():
    logits = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]],
        ]
    )
    inputs = torch.tensor([[0, 5], [1, 5]])  # first token = row id for FixedLogits
    labels = torch.tensor([[0, -100], [1, 0]])
    m = FixedLogits(logits)
    m.train()
    for bs in (1, 2, 256):
        loss, acc, ok = evaluate(m, inputs, labels, batch_size=bs)
        # labelled: (row0,t0) label 0 argmax 0 ok; (row1,t0) label 1 argmax 2 wrong;
        # (row1,t1) label 0 argmax 0 ok
        assert ok.tolist() == [True, False, True] and ok.dtype == torch.bool
        assert acc == pytest.approx(2 / 3)
        lse = [math.log(math.e**2 + 2), math.log(2 + math.e**3), math.log(math.e + 2)]
        want = ((lse[0] - 2) + (lse[1] - 0) + (lse[2] - 1)) / 3
        assert loss == pytest.approx(want, rel=1e-6)
        assert m.training  # mode restored


def test_evaluate_errors():
    m = FixedLogits(torch.zeros(2, 3, 4))
    x = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(BmojoValueError, match="no labelled"):
        evaluate(m, x, torch.full((2, 3), -100))
    with pytest.raises(BmojoTypeError, match="inputs"):
        evaluate(m, x.float(), x)
    with pytest.raises(BmojoValueError, match="labels"):
        evaluate(m, x, x[:, :2])
    with pytest.raises(BmojoValueError, match="model: expected logits"):
        evaluate(nn.Identity(), x, x)
    with pytest.raises(BmojoValueError, match=r"labels: .* \[0, 4\)"):
        evaluate(m, x, torch.full((2, 3), 4))


def test_negative_flip_rate_hand_made():
    a = torch.tensor([True, True, False, False, True])
    b = torch.tensor([True, False, True, False, False])
    assert negative_flip_rate(a, b) == pytest.approx(2 / 5)
    assert negative_flip_rate(b, a) == pytest.approx(1 / 5)
    assert negative_flip_rate(a, a) == 0.0
    assert negative_flip_rate(a.int(), b.long()) == pytest.approx(2 / 5)
    assert negative_flip_rate(a.view(1, 5), b.view(1, 5)) == pytest.approx(2 / 5)
    with pytest.raises(BmojoValueError, match="correct_b"):
        negative_flip_rate(a, b[:4])
    with pytest.raises(BmojoTypeError, match="correct_a"):
        negative_flip_rate(a.float(), b)
    with pytest.raises(BmojoTypeError, match="correct_b"):
        negative_flip_rate(a, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(BmojoValueError, match="empty"):
        negative_flip_rate(a[:0], b[:0])


# ----------------------------------------------------------------------------- trainer

V, L = 16, 12


class PrevToken(nn.Module):
    """Sees tokens t and t-1: enough for the previous-token task."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, V))

    def forward(self, x):
        e = self.emb(x)
        prev = nn.functional.pad(e, (0, 0, 1, 0))[:, :-1]
        return self.head(torch.cat([e, prev], -1))


def prev_token_batch(g: torch.Generator, rows: int = 32):
    x = torch.randint(0, V, (rows, L), generator=g)
    y = torch.full_like(x, -100)
    y[:, 1::2] = x[:, 0:-1:2]  # label = previous token, on odd positions
    return x, y


TEST = prev_token_batch(torch.Generator().manual_seed(1234), 128)


@pytest.mark.parametrize("schedule", ["cosine", "greedy", "constant"])
def test_learns_prev_token_with_each_schedule(schedule):
    torch.manual_seed(0)
    m = PrevToken()
    _, acc0, _ = evaluate(m, *TEST)
    assert acc0 < 0.25  # chance: 1/16
    hist = train(
        m,
        prev_token_batch,
        steps=60,
        lr=1e-2,
        schedule=schedule,
        eval_every=20,
        eval_fn=TEST,
        weight_decay=0.0,
        progress=False,
        warmup_steps=5,
        greedy_kwargs=dict(patience=0, factor=0.8),
    )
    assert hist["eval_step"] == [20, 40, 60]
    assert len(hist["train_loss"]) == len(hist["lr"]) == 60
    assert hist["eval_accuracy"][-1] > 0.9
    _, acc, _ = evaluate(m, *TEST)
    assert acc == hist["eval_accuracy"][-1]
    lr = hist["lr"]
    if schedule == "constant":
        assert set(lr) == {1e-2}
    elif schedule == "cosine":
        assert lr[0] == pytest.approx(1e-2 / 5) and lr[4] == pytest.approx(1e-2)
        assert all(a >= b for a, b in zip(lr[4:], lr[5:], strict=False))
    else:  # changes only right after an evaluation (steps 20 and 40), up on improvement
        changes = [i for i in range(1, 60) if lr[i] != lr[i - 1]]
        assert changes and set(changes) <= {20, 40}
        assert lr[20] == pytest.approx(1e-2 / 0.8)


def test_train_deterministic_and_eval_fallbacks():
    def run(eval_fn):
        torch.manual_seed(1)
        return train(
            PrevToken(), prev_token_batch, steps=12, eval_every=5, eval_fn=eval_fn, seed=3,
            progress=False,
        )  # fmt: skip

    h1, h2 = run(None), run(None)
    assert h1["train_loss"] == h2["train_loss"] and h1["eval_step"] == [5, 10, 12]
    # no eval_fn: the mean training loss since the previous evaluation, no accuracy
    tl = h1["train_loss"]
    assert h1["eval_loss"] == pytest.approx([sum(tl[:5]) / 5, sum(tl[5:10]) / 5, sum(tl[10:]) / 2])
    assert all(math.isnan(a) for a in h1["eval_accuracy"])
    # a callable eval_fn: its keys are recorded
    calls = []

    def fn(model):
        assert not model.training and not torch.is_grad_enabled()
        calls.append(1)
        return {"loss": 1.5, "accuracy": 0.25, "recall": len(calls)}

    h3 = run(fn)
    assert h3["train_loss"] == h1["train_loss"]  # evaluation does not disturb the data stream
    assert h3["eval_loss"] == [1.5] * 3 and h3["eval_recall"] == [1.0, 2.0, 3.0]
    assert h3["time_s"] > 0


def test_lr_scale_gives_each_parameter_its_rate(monkeypatch):
    """``lr_scale``: Adam's first step moves every entry with a gradient by its group's
    rate (weight decay off), so the scaled layer moves 3x as far; GreedyLR's scalar bounds
    are scaled per group; bad scales are refused by name."""
    torch.manual_seed(0)
    m = PrevToken()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    scale = lambda name: 3.0 if name.startswith("head.0") else 1.0  # noqa: E731
    train(m, prev_token_batch, steps=1, lr=1e-3, schedule="constant", weight_decay=0.0,
          progress=False, lr_scale=scale)  # fmt: skip
    for n, p in m.named_parameters():
        step = (p.detach() - before[n]).abs().max().item()
        assert step == pytest.approx(1e-3 * scale(n), rel=1e-3), n
    from bmojo_core.train import loop

    seen = {}

    class Spy(loop.GreedyLR):
        def __init__(self, opt, **kw):
            seen.update(kw, lrs=[g["lr"] for g in opt.param_groups])
            super().__init__(opt, **kw)

    monkeypatch.setattr(loop, "GreedyLR", Spy)
    train(PrevToken(), prev_token_batch, steps=1, lr=1e-3, schedule="greedy", progress=False,
          lr_scale=scale, greedy_kwargs={"min_lr": 1e-4, "max_lr": 2e-3})  # fmt: skip
    ks = [lr / 1e-3 for lr in seen["lrs"]]
    assert sorted(ks) == pytest.approx([1, 1, 3, 3])  # (decayed, not) x (1, 3)
    assert seen["min_lr"] == pytest.approx([1e-4 * k for k in ks])
    assert seen["max_lr"] == pytest.approx([2e-3 * k for k in ks])
    with pytest.raises(BmojoValueError, match="lr_scale.*head.0.weight"):
        train(PrevToken(), prev_token_batch, steps=1, progress=False,
              lr_scale=lambda n: 0.0 if n == "head.0.weight" else 1.0)  # fmt: skip
    with pytest.raises(BmojoTypeError, match="lr_scale"):
        train(PrevToken(), prev_token_batch, steps=1, progress=False, lr_scale=2.0)


def test_progress_bar(capsys):
    if not STRICT:
        pytest.importorskip("tqdm")
    train(PrevToken(), prev_token_batch, steps=3, eval_fn=TEST, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "acc=" in err, repr(err)


class TinyAttention(nn.Module):
    def __init__(self, vocab: int, length: int, d: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(length, d))
        self.att = nn.ModuleList(nn.MultiheadAttention(d, 2, batch_first=True) for _ in range(2))
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(length, length, dtype=torch.bool), 1))

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        for att in self.att:
            h = h + att(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        return self.out(h)


def test_learns_small_mqar():
    """End to end with the MQAR generator: a 2-layer attention model recalls the values
    (guessing among the row's values would give 1/3)."""
    cfg = mqar.MQARConfig(vocab=32, seq_len=16, num_kv=3)
    test = mqar.make_test_set(cfg, 256, 1)
    torch.manual_seed(0)
    m = TinyAttention(cfg.vocab, cfg.seq_len)
    hist = train(
        m,
        lambda g: mqar.make_batch(cfg, 64, g),
        steps=150,
        lr=3e-3,
        eval_every=50,
        eval_fn=test,
        progress=False,
    )
    assert hist["eval_accuracy"][-1] > 0.8
    _, _, ok = evaluate(m, *test)
    assert ok.shape == (256 * 3,)
    assert negative_flip_rate(ok, torch.zeros_like(ok)) == pytest.approx(ok.float().mean().item())


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(schedule="linear"), BmojoValueError, "schedule"),
        (dict(steps=0), BmojoValueError, "steps"),
        (dict(lr=-1.0), BmojoValueError, "lr"),
        (dict(lr=float("nan")), BmojoValueError, "lr"),
        (dict(eval_every=0), BmojoValueError, "eval_every"),
        (dict(eval_fn="test"), BmojoTypeError, "eval_fn"),
        (dict(eval_fn=(TEST[0], TEST[1][:, :3])), BmojoValueError, "labels"),
        (dict(weight_decay=-0.1), BmojoValueError, "weight_decay"),
        (dict(grad_clip=0.0), BmojoValueError, "grad_clip"),
        (dict(seed=-1), BmojoValueError, "seed"),
        (dict(greedy_kwargs=dict(factor=2.0), schedule="greedy"), BmojoValueError, "factor"),
        (dict(warmup_steps=10), BmojoValueError, "warmup_steps"),
    ],
)
def test_train_bad_arguments(kw, err, match):
    kw = {"steps": 10, "progress": False, **kw}
    with pytest.raises(err, match=match):
        train(PrevToken(), prev_token_batch, **kw)


class Pooled(nn.Module):
    """Wrong interface: one logit vector per row, (B, V)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, V)

    def forward(self, x):
        return self.emb(x).mean(1)


def test_train_bad_model_and_batches():
    with pytest.raises(BmojoTypeError, match="model"):
        train(lambda x: x, prev_token_batch, steps=1)
    with pytest.raises(BmojoTypeError, match="make_batch_fn"):
        train(PrevToken(), TEST, steps=1)
    with pytest.raises(BmojoValueError, match="model: expected logits"):
        train(Pooled(), prev_token_batch, steps=1, progress=False)
    with pytest.raises(BmojoValueError, match=r"labels: .* \[0, 4\)"):
        train(nn.Embedding(V, 4), prev_token_batch, steps=1, progress=False)
    with pytest.raises(BmojoTypeError, match="inputs"):
        train(PrevToken(), lambda g: (TEST[0].float(), TEST[1]), steps=1, progress=False)
