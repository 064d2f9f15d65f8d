"""``bmojo_core.train.train`` data- and context-parallel on ranks started by torchrun:
data-parallel equals a one-process run with as many row parts bit for bit (every rank
holds the same model), context-parallel equals a one-process run to fp64 rounding; and
the MQAR experiment with ``nproc=2`` gives the scores of ``micro_batches=2`` exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import _train_worker as W
import bmojo_core
import pytest
import torch
from bmojo_core import get_num_threads, set_num_threads
from bmojo_core.errors import BmojoTypeError, BmojoValueError
from bmojo_core.train import train

HERE = os.path.dirname(os.path.abspath(__file__))


def _torchrun(tmp_path, mode: str, nproc: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = os.path.dirname(os.path.dirname(bmojo_core.__file__))
    env["PYTHONPATH"] = os.pathsep.join([src, HERE, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), os.path.join(HERE, "_train_worker.py"), mode, str(tmp_path)]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]


@pytest.fixture
def one_thread():
    old = torch.get_num_threads(), get_num_threads()
    torch.set_num_threads(1)
    set_num_threads(1)
    yield
    torch.set_num_threads(old[0])
    set_num_threads(old[1])


def test_data_parallel_equals_one_process_with_as_many_parts(tmp_path, one_thread):
    # 3 ranks (sums of two are the same in either order; of three, not)
    ranks = _torchrun(tmp_path, "data", 3)
    params, losses = W.run("data", micro_batches=3)
    _, whole_losses = W.run("data")
    for got in ranks:
        assert got["losses"] == losses
        for k, v in params.items():
            assert torch.equal(got["params"][k], v), k
    # and the one-part run differs by rounding only
    assert max(abs(a - b) for a, b in zip(whole_losses, losses, strict=True)) < 1e-4


def test_context_parallel_equals_one_process(tmp_path, one_thread):
    ranks = _torchrun(tmp_path, "context", 2)
    params, losses = W.run("context")
    for got in ranks:  # the cross-entropy runs in float32 (train's loss), the model in fp64
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
        for k, v in params.items():
            torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for k in params:  # the ranks took the same steps
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k


def test_parallel_argument_errors():
    m = W.model(torch.float32)
    with pytest.raises(BmojoValueError, match="parallel: expected one of"):
        train(m, W.batch, steps=1, parallel="pipeline", progress=False)
    with pytest.raises(BmojoValueError, match="torch.distributed is not initialised"):
        train(m, W.batch, steps=1, parallel="data", progress=False)
    with pytest.raises(BmojoValueError, match="group: given without parallel"):
        train(m, W.batch, steps=1, group=object(), progress=False)
    with pytest.raises(BmojoValueError, match="micro_batches"):
        train(m, W.batch, steps=1, micro_batches=0, progress=False)


def test_context_parallel_needs_a_bmojo_lm(tmp_path):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        lin = torch.nn.Sequential(torch.nn.Embedding(16, 16))
        with pytest.raises(BmojoTypeError, match="parallel='context' trains a BMojoLM"):
            train(lin, W.batch, steps=1, parallel="context", progress=False)
    finally:
        dist.destroy_process_group()


def test_micro_batches_match_one_part_to_rounding(one_thread):
    p1, l1 = W.run("context")  # fp64 model, float32 cross-entropy
    p3, l3 = W.run("context", micro_batches=3)
    torch.testing.assert_close(torch.tensor(l3), torch.tensor(l1), rtol=1e-6, atol=1e-6)
    for k in p1:
        torch.testing.assert_close(p3[k], p1[k], rtol=1e-5, atol=1e-6, msg=k)


def test_mqar_nproc_gives_the_micro_batch_results(one_thread):
    from bmojo_core import mqar

    kw = dict(models=("bmojo",), steps=6, batch_size=4, test_size=8, workers=1)
    two = mqar.run_experiment(mqar.ExperimentConfig.quick(nproc=2, **kw), progress=False)
    one = mqar.run_experiment(mqar.ExperimentConfig.quick(micro_batches=2, **kw),
                              progress=False)  # fmt: skip
    for a, b in zip(two["runs"], one["runs"], strict=True):
        for k in ("accuracy", "test_loss", "train_loss", "correct"):
            assert a[k] == b[k], k
    with pytest.raises(BmojoValueError, match="micro_batches: with nproc=2"):
        mqar.ExperimentConfig.quick(nproc=2, micro_batches=3)
