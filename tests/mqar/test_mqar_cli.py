"""``bmojo mqar``: the experiment end to end (quick version), its files, table and flip rate.

Oracles: chance level 1/(V/2) for "the models learn"; the negative flip rate and the
accuracies recomputed from the saved per-query correctness; the same (model, N) trained
in a spawned worker of a separate ``python -m bmojo_core.cli`` process and in this process
give the same correctness (every run is seeded on its own).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from bmojo_core import mqar
from bmojo_core.cli import main
from bmojo_core.errors import BmojoTypeError, BmojoValueError
from bmojo_core.mqar import experiment, value_lags
from bmojo_core.mqar.experiment import _seed
from bmojo_core.mqar.stats import recall_ceiling, wilson_interval

ATTENTION = ("swa", "bmojo-f", "bmojo")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One in-process ``bmojo mqar --quick`` (workers=1): (results, stdout, out dir)."""
    out = tmp_path_factory.mktemp("mqar")
    import contextlib
    import io

    import bmojo_core

    buf = io.StringIO()
    n = torch.get_num_threads(), bmojo_core.get_num_threads()
    with contextlib.redirect_stdout(buf):
        rc = main(["mqar", "--quick", "--out", str(out), "--no-progress", "--workers", "1"])
    # the run (on 1 thread) restores both thread counts
    assert (torch.get_num_threads(), bmojo_core.get_num_threads()) == n
    assert rc == 0
    with open(out / "results.json", encoding="utf-8") as f:
        return json.load(f), buf.getvalue(), out


def test_files_and_table(quick):
    res, text, out = quick
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = mqar.ExperimentConfig.quick()
    assert res["config"]["num_kv"] == list(cfg.num_kv)
    assert [r["model"] for r in res["runs"]] == list(mqar.MODELS) * len(cfg.num_kv)
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("accuracy % (95% interval)"))
    assert lines[top].split()[4:] == [f"N={n}" for n in cfg.num_kv]
    lines = lines[top:]
    for label in ("SSM", "SWA (w=28)", "B'MOJO-F", "B'MOJO", "neg. flip"):
        row = next(line for line in lines if line.startswith(label))
        assert len(row.split()) >= len(cfg.num_kv) + 1
        if label != "neg. flip":  # accuracy (low-high) per N
            assert len(re.findall(r"\d+\.\d \(\d+\.\d-\d+\.\d\)", row)) == len(cfg.num_kv)
    ceil = lines.index(next(line for line in lines if line.startswith("ceiling %")))
    labels = [line.split("  ")[1] for line in lines[ceil + 1 : ceil + 4]]
    assert labels == ["SWA (w=28)", "B'MOJO-F", "B'MOJO"]  # the SSM has no exact ceiling
    assert "results written to" in text


def test_intervals_and_ceilings(quick):
    """Each run's interval is the Wilson interval of its saved correctness and its ceiling
    the share of its test set's answers within its window (plus its eidetic tokens)."""
    res, _, _ = quick
    cfg = mqar.ExperimentConfig.quick()
    specs = cfg.specs()
    for r in res["runs"]:
        ok = torch.tensor(r["correct"])
        assert r["ci95"] == list(wilson_interval(int(ok.sum()), ok.numel()))
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        test = mqar.make_test_set(cfg.task(r["num_kv"]), cfg.test_size, _seed(cfg, 1, r["num_kv"]))
        spec = specs[r["model"]]
        assert r["ceiling"] == recall_ceiling(value_lags(*test), spec.window, spec.n_eidetic)
        assert (r["ceiling"] is None) == (r["model"] == "ssm")


def test_accuracy_and_flip_rate_match_saved_correctness(quick):
    res, text, _ = quick
    ok = {(r["model"], r["num_kv"]): torch.tensor(r["correct"], dtype=torch.bool)
          for r in res["runs"]}  # fmt: skip
    for (m, n), c in ok.items():
        assert c.shape == (res["config"]["test_size"], n)
        assert res["accuracy"][m][str(n)] == pytest.approx(c.float().mean().item(), abs=1e-12)
    for n in res["config"]["num_kv"]:
        f, b = ok[("bmojo-f", n)], ok[("bmojo", n)]
        by_hand = sum(
            bool(x) and not bool(y) for x, y in zip(f.flatten(), b.flatten(), strict=True)
        )
        rate = res["flip_rate"][str(n)]
        assert 0.0 <= rate <= 1.0
        assert rate == pytest.approx(by_hand / f.numel(), abs=1e-12)
        row = next(line for line in text.splitlines() if line.startswith("neg. flip"))
        assert f"{100 * rate:.1f}" in row.split()


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, read from /proc."""
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_stop_when_the_parent_dies(tmp_path):
    """A worker whose parent was killed stops within a few training steps instead of
    training on to the end (the process pool does not stop its workers then)."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(mqar.__file__)))  # python/
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "bmojo_core.cli", "mqar", "--quick", "--out", str(tmp_path)]
    cmd += ["--models", "ssm", "swa", "--steps", "1000000", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline:  # the pool and its tracker
            time.sleep(0.5)
            workers = _children(proc.pid)
        assert len(workers) >= 2, "the workers did not start"
        time.sleep(15)  # into their trainings (spawn, import, first steps)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(map(_alive, workers)), "workers outlived their parent"
    finally:
        proc.kill()
        for pid in workers:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def test_attention_models_learn(quick):
    res, _, _ = quick
    chance = 2 / res["config"]["vocab"]
    assert res["chance"] == chance
    best = {m: max(res["accuracy"][m].values()) for m in ATTENTION}
    # every attention-bearing model well above chance at some N, and clearly so on average
    for m, acc in best.items():
        assert acc > 4 * chance, (m, acc, chance)
    assert sum(best.values()) / len(best) > 10 * chance, best


def test_subprocess_worker_reproduces_in_process_runs(quick, tmp_path):
    """The console entry point (``python -m bmojo_core.cli``) with 2 spawned workers gives
    the same per-query correctness as the in-process trainings of the same models (every
    training is seeded on its own)."""
    res, _, _ = quick
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(mqar.__file__)))  # python/
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "bmojo_core.cli", "mqar", "--quick", "--out", str(tmp_path)]
    cmd += ["--models", "ssm", "swa", "--workers", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy %" in proc.stdout and "neg. flip" not in proc.stdout
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        sub = json.load(f)
    assert "flip_rate" not in sub
    ref = {(r["model"], r["num_kv"]): r for r in res["runs"]}
    assert [(r["model"], r["num_kv"]) for r in sub["runs"]] == [
        ("ssm", 2), ("swa", 2), ("ssm", 4), ("swa", 4)
    ]  # fmt: skip
    for r in sub["runs"]:
        assert r["correct"] == ref[(r["model"], r["num_kv"])]["correct"]
        assert r["accuracy"] == ref[(r["model"], r["num_kv"])]["accuracy"]


def test_mixture_shares_one_training_per_model(quick):
    """One training per model: every N of a model reports the same training (time, final
    training loss), B'MOJO-F and B'MOJO (same parameter shapes) start from the same
    weights, and the quick config mixes both N in each batch."""
    res, _, _ = quick
    assert res["config"]["mixture"] is True
    for m in mqar.MODELS:
        runs = [r for r in res["runs"] if r["model"] == m]
        assert len({r["time_s"] for r in runs}) == 1
        assert len({r["train_loss"] for r in runs}) == 1
    cfg = mqar.ExperimentConfig.quick()
    inits = []
    for m in ("bmojo-f", "bmojo"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(experiment._seed(cfg, 2, 0))
            inits.append(cfg.build(cfg.specs()[m]).state_dict())
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])


def test_per_n_mode_trains_each_n_alone(tmp_path, capsys):
    """``--per-n``: one training per (model, N), seeded by N alone, so the N=2 training of a
    run over N in {2, 4} equals the one of a run asked for N=2 only."""
    args = ["mqar", "--quick", "--models", "swa", "--steps", "20", "--no-progress", "--per-n"]
    assert main([*args, "--workers", "1", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--num-kv", "2", "--workers", "1", "--out", str(tmp_path / "b")]) == 0
    assert "one training per N" in capsys.readouterr().out
    runs = {}
    for d in ("a", "b"):
        with open(tmp_path / d / "results.json", encoding="utf-8") as f:
            runs[d] = json.load(f)["runs"]
    assert [r["num_kv"] for r in runs["a"]] == [2, 4]
    assert runs["a"][0]["time_s"] != runs["a"][1]["time_s"]
    assert runs["a"][0]["correct"] == runs["b"][0]["correct"]
    assert runs["a"][0]["train_loss"] == runs["b"][0]["train_loss"]


def test_eidetic_sweep(tmp_path, capsys):
    """``--eidetic-sweep``: B'MOJO at the config's window/fading for each n_eidetic (0 =
    B'MOJO-F), a table row per value, a PNG of accuracy vs n_eidetic and a summary whose
    best value matches the accuracies."""
    out = tmp_path / "sweep"
    argv = ["mqar", "--quick", "--eidetic-sweep", "8,0,4", "--steps", "30", "--workers", "1"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (out / "eidetic_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "results.json", encoding="utf-8") as f:
        res = json.load(f)
    cfg = mqar.ExperimentConfig.quick()
    assert res["sweep"] == {"window": cfg.window, "n_fading": cfg.n_fading, "n_eidetic": [0, 4, 8]}
    specs = res["models"]
    assert list(specs) == ["e0", "e4", "e8"] and "flip_rate" not in res
    for k, e in zip(specs, (0, 4, 8), strict=True):
        assert (specs[k]["window"], specs[k]["n_fading"], specs[k]["n_eidetic"]) == (
            cfg.window, cfg.n_fading, e
        )  # fmt: skip
    for label in ("B'MOJO-F (e=0, f=4)", "B'MOJO e=4", "B'MOJO e=8"):
        assert any(line.startswith(label) for line in text.splitlines())
    for n in cfg.num_kv:
        acc = [res["accuracy"][k][str(n)] for k in specs]
        line = next(x for x in text.splitlines() if x.startswith(f"N={n}: accuracy vs n_eidetic"))
        assert f"best e={(0, 4, 8)[acc.index(max(acc))]}," in line
    # the e=0 variant is B'MOJO-F with the same window/fading: the same model as a main run
    # with n_eidetic=0 would build (same parameter shapes as B'MOJO)
    lm = cfg.build(mqar.ModelSpec("e0", "x", cfg.window, cfg.n_fading, 0))
    assert all(b.mixer.n_eidetic == 0 and b.mixer.n_fading == cfg.n_fading for b in lm.blocks)


def test_label_mask_logits_match_full_forward():
    """BMojoLM's ``label_mask`` path (used by the trainer) gives the full forward's logits at
    the masked positions, and evaluate() agrees with a wrapper that hides the option."""
    from bmojo_core.train import evaluate

    cfg = mqar.ExperimentConfig.quick()
    torch.manual_seed(0)
    lm = cfg.build(cfg.specs()["bmojo"])
    x, y = mqar.make_mixed_batch([cfg.task(n) for n in cfg.num_kv], 6, 1)
    mask = y != mqar.IGNORE_INDEX
    with torch.no_grad():
        full = lm(x)
        part = lm(x, label_mask=mask)
    torch.testing.assert_close(part, full[mask], rtol=1e-5, atol=1e-5)

    class Plain(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens):
            return self.m(tokens)

    a, b = evaluate(lm, x, y), evaluate(Plain(lm), x, y)
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    # The two paths run the head on different shapes (label_mask: the labelled rows only),
    # so their logits agree to rounding, not bitwise: compare the per-query correctness
    # (an argmax) where the top-2 gap is far above rounding (every query with this seed).
    top2 = full[mask].topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-4
    assert clear.float().mean() >= 0.9
    assert torch.equal(a[2][clear], b[2][clear])
    with pytest.raises(BmojoTypeError, match="label_mask"):
        lm(x, label_mask=mask.long())
    with pytest.raises(BmojoValueError, match="label_mask"):
        lm(x, label_mask=mask[:, 1:])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--num-kv", "0"], "num_kv"),
        (["--num-kv", "4", "4"], "num_kv"),
        (["--num-kv", "200"], "num_kv"),
        (["--models", "mamba"], "models"),
        (["--steps", "0"], "steps"),
        (["--seed", "-1"], "seed"),
        (["--threads", "0"], "threads"),
        (["--workers", "0"], "workers"),
        (["--eidetic-sweep", "4,4"], "eidetic_sweep"),
        (["--eidetic-sweep=-1,4"], "eidetic_sweep"),
        (["--batch-size", "1"], "batch_size"),
        (["--lr", "0"], "lr"),
        (["--short-frac", "1"], "short_frac"),
        (["--short-frac=-0.1"], "short_frac"),
        (["--short-len", "3"], "short_len"),
        (["--short-len", "512"], "short_len"),  # longer than the rows
        (["--model-lr", "mamba=1e-3"], "model_lr"),
        (["--model-lr", "ssm=0"], "model_lr"),
        (["--model-lr", "ssm=1e-3", "ssm=2e-3"], "model_lr"),
        (["--model-lr", "ssm=inf"], "model_lr"),
    ],
)
def test_bad_arguments(args, needle, capsys, tmp_path):
    assert main(["mqar", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bmojo mqar: error:") and needle in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--schedule", "linear"], "--schedule"),
        (["--eidetic-sweep", "4,x"], "--eidetic-sweep"),
        (["--model-lr", "ssm"], "--model-lr"),  # not MODEL=LR
        (["--model-lr", "ssm=x"], "--model-lr"),
    ],
)
def test_bad_option_values_are_rejected_by_argparse(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["mqar", *args])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(BmojoValueError, match="n_heads"):
        mqar.ExperimentConfig(n_heads=5)
    with pytest.raises(BmojoValueError, match="lr"):
        mqar.ExperimentConfig(lr=0.0)
    with pytest.raises(BmojoTypeError, match="models"):
        mqar.ExperimentConfig(models="bmojo")
    with pytest.raises(BmojoValueError, match="vocab"):
        mqar.ExperimentConfig(vocab=511)
    with pytest.raises(BmojoValueError, match="weight_decay"):
        mqar.ExperimentConfig(weight_decay=-0.1)
    with pytest.raises(BmojoTypeError, match="mixture"):
        mqar.ExperimentConfig(mixture=1)
    with pytest.raises(BmojoValueError, match="batch_size"):
        mqar.ExperimentConfig(batch_size=3)  # fewer rows than values of N
    mqar.ExperimentConfig(batch_size=3, mixture=False)
    assert mqar.ExperimentConfig(eidetic_sweep=[8, 0]).eidetic_sweep == (0, 8)
    # models are kept in the canonical order whatever the order asked
    assert mqar.ExperimentConfig(models=("bmojo", "ssm")).models == ("ssm", "bmojo")


def test_short_rows():
    """Short rows: the N that fit, as many rows as keep the tokens per step, drawn on the
    share of the steps asked for (from the training stream, so reproducible); none when
    off or when no N fits a per-N training."""
    cfg = mqar.ExperimentConfig()
    tasks, rows = cfg.short_tasks(cfg.num_kv)
    assert [(t.seq_len, t.num_kv) for t in tasks] == [(64, 4), (64, 8), (64, 16)]
    assert rows * cfg.short_len == cfg.batch_size * cfg.seq_len
    assert cfg.short_tasks((32,)) == ([], rows)
    assert mqar.ExperimentConfig(short_frac=0).short_tasks(cfg.num_kv) == ([], 0)
    # the share of short steps in a training stream, through _run_one's batch function
    seen = []

    def fake_train(model, batch, *, steps, **kw):
        g = torch.Generator().manual_seed(kw["seed"])
        seen.extend(batch(g)[0].shape for _ in range(steps))
        raise KeyboardInterrupt  # stop before scoring

    small = mqar.ExperimentConfig(models=("swa",), steps=400, short_frac=0.75, workers=1)
    import unittest.mock as um

    with um.patch.object(experiment, "train", fake_train), pytest.raises(KeyboardInterrupt):
        experiment._run_one(small, "swa", None)
    short = sum(s == (64, 64) for s in seen)
    assert set(seen) == {(64, 64), (16, 256)}
    assert 0.68 < short / len(seen) < 0.82, short


def test_learning_rates_per_model_and_per_parameter(tmp_path):
    """The pure SSM at its own rate by default (budget variants too), the rest at lr;
    --lr alone sets every model; ssm_lr scales the SSM's parameters against the model's
    rate; the training gets the model's rate and that scale."""
    cfg = mqar.ExperimentConfig()
    assert (cfg.lr, cfg.model_lr) == (2e-3, (("ssm", 6e-3),))
    assert [cfg.model_rate(m) for m in ("ssm", "swa", "bmojo-f", "bmojo")] == [
        6e-3, 2e-3, 2e-3, 2e-3]  # fmt: skip
    assert cfg.model_rate("ssm@0.5") == 6e-3 and cfg.model_rate("e4") == 2e-3
    as_map = mqar.ExperimentConfig(model_lr={"bmojo": 1e-3, "ssm": 5e-3})
    assert as_map.model_lr == (("ssm", 5e-3), ("bmojo", 1e-3))  # MODELS order
    both = mqar.ExperimentConfig(ssm_lr=4e-3)
    assert both.lr_scale("ssm", "layers.0.ssm.A_log") == pytest.approx(4e-3 / 6e-3)
    assert both.lr_scale("bmojo", "layers.0.ssm.A_log") == pytest.approx(2.0)
    assert both.lr_scale("bmojo", "layers.0.attn.qkv.weight") == 1.0
    assert cfg.lr_scale("bmojo", "layers.0.ssm.A_log") == 1.0
    with pytest.raises(BmojoTypeError, match="model_lr"):
        mqar.ExperimentConfig(model_lr="ssm=1")
    with pytest.raises(BmojoTypeError, match="model_lr"):
        mqar.ExperimentConfig(model_lr=(("ssm", 1e-3, 2),))
    # through the command line: --lr alone clears the per-model rates
    from bmojo_core.cli import build_parser

    assert build_parser().parse_args(["mqar", "--model-lr", "ssm=1e-3", "swa=2"]).model_lr == [
        ("ssm", 1e-3), ("swa", 2.0)]  # fmt: skip
    got = {}

    def fake_run(c, **kw):
        got["cfg"] = c
        raise KeyboardInterrupt

    import unittest.mock as um

    for argv, want in (([], (("ssm", 6e-3),)), (["--lr", "1e-3"], ()),
                       (["--lr", "1e-3", "--model-lr", "swa=3e-3"], (("swa", 3e-3),))):  # fmt: skip
        with um.patch.object(mqar, "run_experiment", fake_run), pytest.raises(KeyboardInterrupt):
            main(["mqar", "--no-progress", "--workers", "1", "--out", str(tmp_path), *argv])
        assert got["cfg"].model_lr == want
    # the training receives the model's rate and its parameter scale
    seen = {}

    def fake_train(model, batch, **kw):
        seen[kw["lr"]] = kw["lr_scale"]("layers.0.ssm.A_log")
        raise KeyboardInterrupt

    small = mqar.ExperimentConfig(models=("ssm", "swa"), ssm_lr=3e-3, workers=1)
    for name in ("ssm", "swa"):
        with um.patch.object(experiment, "train", fake_train), pytest.raises(KeyboardInterrupt):
            experiment._run_one(small, name, None)
    assert seen == {6e-3: pytest.approx(0.5), 2e-3: pytest.approx(1.5)}


def test_model_specs_equal_budget():
    specs = mqar.model_specs(32, 8, 16)
    assert {s.attention_budget for k, s in specs.items() if k != "ssm"} == {56}
    assert (specs["bmojo"].n_fading, specs["bmojo"].n_eidetic) == (8, 16)
    assert (specs["bmojo-f"].n_fading, specs["bmojo-f"].n_eidetic) == (24, 0)
    assert (specs["swa"].window, specs["ssm"].window) == (56, 0)


def test_greedy_schedule_runs():
    """The GreedyLR path end to end on a tiny run (5 steps, 2 models, N=2)."""
    cfg = mqar.ExperimentConfig.quick(
        models=("bmojo-f", "bmojo"), num_kv=(2,), steps=5, schedule="greedy", workers=1,
        test_size=8,
    )  # fmt: skip
    res = mqar.run_experiment(cfg, progress=False)
    assert set(res["flip_rate"]) == {"2"} and 0 <= res["flip_rate"]["2"] <= 1
    assert len(res["runs"]) == 2 and all(len(r["correct"]) == 8 for r in res["runs"])


def _small(**kw):
    base = dict(models=("ssm", "swa"), steps=12, test_size=16, workers=1)
    base.update(kw)
    return mqar.ExperimentConfig.quick(**base)


def _untimed(run):
    return {k: v for k, v in run.items() if k not in ("time_s", "cpu_s")}


def _same(a, b):
    """The same results, but the wall and CPU times of trainings run again."""
    for key in ("accuracy", "ci95", "ceiling"):
        assert a[key] == b[key], key
    assert a.get("spread") == b.get("spread")
    assert [_untimed(r) for r in a["runs"]] == [_untimed(r) for r in b["runs"]]


def test_resume_skips_finished_trainings_and_gives_the_same_table(tmp_path, monkeypatch):
    cfg = _small()
    first = mqar.run_experiment(cfg, progress=False, record=tmp_path)
    files = sorted(p.name for p in (tmp_path / "trainings").iterdir())
    assert files == ["ssm-mix-seed0.json", "swa-mix-seed0.json"]
    (tmp_path / "trainings" / "swa-mix-seed0.json").unlink()  # an interrupted experiment
    calls = []
    real = experiment._run_one
    monkeypatch.setattr(experiment, "_run_one", lambda c, n, k: calls.append(n) or real(c, n, k))
    again = mqar.run_experiment(cfg, progress=False, record=tmp_path, resume=True)
    assert calls == ["swa"] and again["resumed"] == 1
    _same(first, again)
    assert mqar.format_table(first) == mqar.format_table(again)
    assert mqar.summarize(first) == mqar.summarize(again)
    calls.clear()
    assert mqar.run_experiment(cfg, progress=False, record=tmp_path, resume=True)["resumed"] == 2
    assert calls == []
    # other settings, a damaged record, or no resume: trained again
    (tmp_path / "trainings" / "ssm-mix-seed0.json").write_text('{"key": ')
    other = mqar.run_experiment(_small(lr=1e-3), progress=False, record=tmp_path, resume=True)
    assert sorted(calls) == ["ssm", "swa"] and other["resumed"] == 0
    calls.clear()
    mqar.run_experiment(_small(lr=1e-3), progress=False, record=tmp_path)
    assert sorted(calls) == ["ssm", "swa"]


def test_resume_from_the_command_line(tmp_path, capsys):
    argv = ["mqar", "--quick", "--models", "ssm", "--steps", "8", "--workers", "1",
            "--no-progress", "--resume", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "1 training(s) read back" in again and "read back" not in first

    def table(text):
        return text[text.index("accuracy % (95% interval)") : text.index("total time")]

    assert table(first) == table(again)


def test_seeds_mean_and_spread():
    two = mqar.run_experiment(_small(seeds=2, seed=3), progress=False)
    one = {s: mqar.run_experiment(_small(seed=s), progress=False) for s in (3, 4)}
    assert [(r["model"], r["num_kv"], r["seed"]) for r in two["runs"]] == [
        (m, n, s) for n in (2, 4) for m in ("ssm", "swa") for s in (3, 4)
    ]
    for r in two["runs"]:  # each seed's training is the single-seed experiment's
        (same,) = [
            x
            for x in one[r["seed"]]["runs"]
            if (x["model"], x["num_kv"]) == (r["model"], r["num_kv"])
        ]
        assert _untimed(r) == _untimed(same)
    for m in ("ssm", "swa"):
        for n in ("2", "4"):
            accs = [one[s]["accuracy"][m][n] for s in (3, 4)]
            assert two["accuracy"][m][n] == pytest.approx(sum(accs) / 2, abs=1e-15)
            assert two["spread"][m][n] == [min(accs), max(accs)]
            k = sum(
                sum(map(sum, r["correct"]))
                for r in two["runs"]
                if (r["model"], str(r["num_kv"])) == (m, n)
            )
            assert two["ci95"][m][n] == list(wilson_interval(k, 2 * 16 * int(n)))
    text = mqar.format_table(two)
    assert "seed spread % (2 seeds)" in text
    assert "holds beyond the intervals and the seed spread" in mqar.summarize(two)


def _formula_floats(cfg, spec):
    """Memory per the paper's count, from the architecture: per layer the SSM state
    (d_inner x d_state) and conv buffer (d_inner x (d_conv - 1)) when the layer has an SSM,
    plus keys and values (2 x d_model) of every attended token."""
    d_inner, d_conv = 2 * cfg.d_model, 4
    has_ssm = spec.window == 0 or spec.n_fading + spec.n_eidetic > 0
    ssm = d_inner * (spec.d_state or cfg.d_state) + d_inner * (d_conv - 1) if has_ssm else 0
    attn = 2 * cfg.d_model * (spec.window + spec.n_fading + spec.n_eidetic)
    return cfg.n_layers * (ssm + attn)


def test_budget_specs_and_memory_floats():
    cfg = mqar.ExperimentConfig(budget_sweep=(0.25, 1, 2))
    specs = cfg.specs()
    assert list(specs) == [f"{m}@{k}" for m in mqar.MODELS for k in ("0.25", "1", "2")]
    at1 = {m: specs[f"{m}@1"] for m in mqar.MODELS}
    default = mqar.model_specs(cfg.window, cfg.n_fading, cfg.n_eidetic)
    for m in ("swa", "bmojo-f", "bmojo"):  # scale 1 is the default model
        d = default[m]
        assert (at1[m].window, at1[m].n_fading, at1[m].n_eidetic) == (
            d.window,
            d.n_fading,
            d.n_eidetic,
        )
    assert at1["ssm"].d_state == cfg.d_state and specs["ssm@2"].d_state == 2 * cfg.d_state
    assert specs["bmojo@0.25"].label == "B'MOJO (w=8, f=2, e=4)"
    floats = {}
    for key, spec in specs.items():
        model = cfg.build(spec)
        floats[key] = mqar.memory_floats(model)
        assert floats[key] == _formula_floats(cfg, spec), key
        assert spec.base == key.split("@")[0]
    for m in mqar.MODELS:  # more memory at every larger scale
        assert floats[f"{m}@0.25"] < floats[f"{m}@1"] < floats[f"{m}@2"]
    with pytest.raises(BmojoValueError, match="budget_sweep"):
        mqar.ExperimentConfig(budget_sweep=(1, 1))
    with pytest.raises(BmojoValueError, match="budget_sweep"):
        mqar.ExperimentConfig(budget_sweep=(0,))
    with pytest.raises(BmojoValueError, match="budget_sweep"):
        mqar.ExperimentConfig(budget_sweep=(1,), eidetic_sweep=(0, 4))


def test_bare_budget_sweep_means_the_default_scales():
    from bmojo_core.cli import build_parser

    args = build_parser().parse_args(["mqar", "--budget-sweep", "--out", "x"])
    assert args.out == "x" and args.budget_sweep is not None
    assert build_parser().parse_args(["mqar", "--budget-sweep", "1,2"]).budget_sweep == (1.0, 2.0)
    assert build_parser().parse_args(["mqar"]).budget_sweep is None


def test_budget_sweep_run_files_and_resume(tmp_path, capsys):
    argv = ["mqar", "--quick", "--models", "ssm", "swa", "--budget-sweep", "0.5,1", "--steps",
            "8", "--workers", "1", "--no-progress", "--resume", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert (tmp_path / "budget_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        res = json.load(f)
    assert sorted(res["budget"]) == ["ssm@0.5", "ssm@1", "swa@0.5", "swa@1"]
    cfg = mqar.ExperimentConfig.quick(models=("ssm", "swa"), budget_sweep=(0.5, 1))
    for key, b in res["budget"].items():
        assert b["model"] == key.split("@")[0] and b["scale"] == float(key.split("@")[1])
        assert b["floats"] == mqar.memory_floats(cfg.build(cfg.specs()[key]))
    assert "accuracy with growing memory" in first
    assert main(argv) == 0  # resumed: nothing trained again, the same table
    again = capsys.readouterr().out
    assert "4 training(s) read back" in again
    assert (
        first[first.index("accuracy %") :].split("total time")[0]
        == (again[again.index("accuracy %") :].split("total time")[0])
    )
