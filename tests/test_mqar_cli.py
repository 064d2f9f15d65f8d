"""``bmojo mqar``: the experiment end to end (quick version), its files, table and flip rate.

Oracles: chance level 1/(V/2) for "the models learn"; the negative flip rate and the
accuracies recomputed from the saved per-query correctness; the same (model, N) trained
in a spawned worker of a separate ``python -m bmojo_core.cli`` process and in this process
give the same correctness (every run is seeded on its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from bmojo_core import mqar
from bmojo_core.cli import main
from bmojo_core.errors import BmojoTypeError, BmojoValueError

ATTENTION = ("swa", "bmojo-f", "bmojo")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One in-process ``bmojo mqar --quick`` (workers=1): (results, stdout, out dir)."""
    out = tmp_path_factory.mktemp("mqar")
    import contextlib
    import io

    buf = io.StringIO()
    n = torch.get_num_threads()
    with contextlib.redirect_stdout(buf):
        rc = main(["mqar", "--quick", "--out", str(out), "--no-progress", "--workers", "1"])
    assert torch.get_num_threads() == n  # the run restores the thread count
    assert rc == 0
    with open(out / "results.json", encoding="utf-8") as f:
        return json.load(f), buf.getvalue(), out


def test_files_and_table(quick):
    res, text, out = quick
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = mqar.ExperimentConfig.quick()
    assert res["config"]["num_kv"] == list(cfg.num_kv)
    assert [r["model"] for r in res["runs"]] == list(mqar.MODELS) * len(cfg.num_kv)
    header = next(line for line in text.splitlines() if line.startswith("accuracy (%)"))
    assert header.split()[2:] == [f"N={n}" for n in cfg.num_kv]
    for label in ("SSM", "SWA (w=28)", "B'MOJO-F", "B'MOJO", "neg. flip"):
        row = next(line for line in text.splitlines() if line.startswith(label))
        assert len(row.split()) >= len(cfg.num_kv) + 1
    assert "results written to" in text


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
    the same per-query correctness as the in-process runs of the same (model, N)."""
    res, _, _ = quick
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(mqar.__file__)), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, "-m", "bmojo_core.cli", "mqar", "--quick", "--out", str(tmp_path)]
    cmd += ["--models", "swa", "bmojo", "--num-kv", "2", "--workers", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy (%)" in proc.stdout and "neg. flip" not in proc.stdout
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        sub = json.load(f)
    assert "flip_rate" not in sub
    ref = {(r["model"], r["num_kv"]): r for r in res["runs"]}
    assert [(r["model"], r["num_kv"]) for r in sub["runs"]] == [("swa", 2), ("bmojo", 2)]
    for r in sub["runs"]:
        assert r["correct"] == ref[(r["model"], r["num_kv"])]["correct"]
        assert r["accuracy"] == ref[(r["model"], r["num_kv"])]["accuracy"]


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
    ],
)
def test_bad_arguments(args, needle, capsys, tmp_path):
    assert main(["mqar", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bmojo mqar: error:") and needle in err
    assert not (tmp_path / "x").exists()


def test_bad_schedule_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        main(["mqar", "--schedule", "linear"])
    assert e.value.code == 2
    assert "--schedule" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(BmojoValueError, match="n_heads"):
        mqar.ExperimentConfig(n_heads=5)
    with pytest.raises(BmojoValueError, match="lr"):
        mqar.ExperimentConfig(lr=0.0)
    with pytest.raises(BmojoTypeError, match="models"):
        mqar.ExperimentConfig(models="bmojo")
    with pytest.raises(BmojoValueError, match="vocab"):
        mqar.ExperimentConfig(vocab=511)
    # models are kept in the canonical order whatever the order asked
    assert mqar.ExperimentConfig(models=("bmojo", "ssm")).models == ("ssm", "bmojo")


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
