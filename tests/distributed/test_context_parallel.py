"""Context-parallel selective scan on 2 and 3 gloo processes spawned here: outputs, the
last state and every gradient against the single-process op (fp64, 1e-12), uneven and
empty shards, one-step shards, packed sequences crossing and starting at shard
boundaries, an initial state; a bad argument on one rank fails every rank with the same
error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import _cp
import bmojo_core
import pytest
import torch
from bmojo_core import causal_conv1d_fn, mamba_chunk_scan_combined, selective_scan_fn
from bmojo_core.errors import BmojoValueError

HERE = os.path.dirname(os.path.abspath(__file__))


def _launch(tmp_path, world: int, names: list[str]) -> list[dict]:
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(bmojo_core.__file__))  # the package under test
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "_cp.py"),
                str(store),
                str(r),
                str(world),
                str(tmp_path),
                json.dumps(names),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _reference(name: str) -> dict:
    data = _cp.inputs(name)
    if data["op"] in ("ssmlayer", "swa", "bmojo", "lm"):
        data["module"] = _cp.module(name)
        out = data["module"](data["kw"]["u" if "u" in data["kw"] else "tokens"])
    else:
        fn = {"conv": causal_conv1d_fn, "scan": selective_scan_fn,
              "ssd": mamba_chunk_scan_combined}[data["op"]]  # fmt: skip
        out = fn(**{k: v for k, v in data["kw"].items() if k != "schedule"})
    _cp.loss(out, data["w"], data["v"], data["last"]).backward()
    return data, out


def _check(name: str, ranks: list[dict]) -> None:
    data, ref = _reference(name)
    world = len(ranks)
    last = data["last"]
    y = ref[0] if last else ref
    axis = data["axis"]
    got = torch.cat([r[name]["out"] for r in ranks], dim=axis)
    torch.testing.assert_close(got, y.detach(), rtol=0, atol=1e-12)
    if _cp.CASES[name].get("schedule") == "pipeline" and data["op"] == "scan":
        # the same computation as one process: each channel is one SIMD lane of the same
        # kernel on this machine, whatever its block, from the exactly carried state
        assert torch.equal(got, y.detach())
    if last:
        for r in ranks:  # the state after the whole sequence, bitwise the same on every rank
            assert torch.equal(r[name]["last"], ranks[0][name]["last"])
        torch.testing.assert_close(ranks[0][name]["last"], ref[1].detach(), rtol=0, atol=1e-12)
    for k, t in data["kw"].items():
        if not (isinstance(t, torch.Tensor) and t.requires_grad):
            continue
        sharded = [_cp.shard(name, data, r) for r in range(world)]
        grads = [ranks[r][name]["grads"].get(k) for r in range(world)]
        if k in ("initial_state", "initial_states"):  # read on the first rank only
            torch.testing.assert_close(grads[0], t.grad, rtol=0, atol=1e-12)
            assert all(g is None or not g.any() for g in grads[1:]), k
        elif sharded[0]["kw"][k].shape != t.shape:  # a shard: its slice of the gradient
            got = torch.cat(grads, dim=axis if k != "seq_idx" else -1)
            torch.testing.assert_close(got, t.grad, rtol=0, atol=1e-12, msg=k)
        else:  # shared: each rank's part, summing to the whole
            total = sum(g for g in grads if g is not None)
            torch.testing.assert_close(total, t.grad, rtol=0, atol=1e-12, msg=k)
    for k, p in data.get("module", torch.nn.Module()).named_parameters():  # a layer's
        if p.grad is None:  # not reached (an SSM that only selects eidetic tokens)
            assert all(r[name]["params"][k] is None for r in ranks), k
            continue
        total = sum(r[name]["params"][k] for r in ranks if r[name]["params"][k] is not None)
        torch.testing.assert_close(total, p.grad, rtol=0, atol=1e-12, msg=k)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    names = [n for n, w in _cp.WORLD.items() if w == 2]
    names += ["bad-shape", "bad-cu", "mismatch", "bad-schedule", "mixed-schedule"]
    return _launch(tmp_path_factory.mktemp("cp2"), 2, names)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    names = [n for n, w in _cp.WORLD.items() if w == 3]
    return _launch(tmp_path_factory.mktemp("cp3"), 3, names)


@pytest.mark.parametrize("name", [n for n, w in _cp.WORLD.items() if w == 2])
def test_two_ranks_equal_the_single_process_op(two, name):
    if two[0][name] == "skipped":
        pytest.skip("FSDP2 on CPU needs torch >= 2.6")
    _check(name, two)


@pytest.mark.parametrize("name", [n for n, w in _cp.WORLD.items() if w == 3])
def test_three_ranks_equal_the_single_process_op(three, name):
    _check(name, three)


def test_ddp_over_the_group_averages_the_parts(two):
    """Wrapped in DistributedDataParallel over the same group, every rank holds the mean
    of the ranks' parts (its all-reduces interleave with the exchanges' in the backward)."""
    a, b = (r["ddp2"]["params"] for r in two)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_bad_argument_on_one_rank_fails_every_rank_alike(two):
    msgs = [r["bad-shape"] for r in two]
    assert msgs[0] == msgs[1], msgs
    assert msgs[0].startswith("BmojoValueError:") and "(on rank 1 of 2)" in msgs[0], msgs[0]


def test_unsupported_or_inconsistent_arguments_fail_every_rank_alike(two):
    cu = [r["bad-cu"] for r in two]
    assert cu[0] == cu[1] and cu[0].startswith("BmojoValueError: cu_seqlens:"), cu
    assert "(on rank 0 of 2)" in cu[0]
    mm = [r["mismatch"] for r in two]
    assert mm[0] == mm[1] and "expected the same state shape on every rank" in mm[0], mm


def test_a_bad_or_inconsistent_schedule_fails_every_rank_alike(two):
    bad = [r["bad-schedule"] for r in two]
    assert bad[0] == bad[1] and bad[0].startswith("BmojoValueError: schedule:"), bad
    assert "'fastest'" in bad[0] and "(on rank 1 of 2)" in bad[0], bad[0]
    mixed = [r["mixed-schedule"] for r in two]
    assert mixed[0] == mixed[1], mixed
    assert "schedule: expected the same on every rank" in mixed[0], mixed[0]


def test_pipeline_blocks_keep_every_grouped_input_a_slice():
    from bmojo_core.distributed._pipeline import block_ranges

    for channels, groups, blocks in [(12, [], 5), (12, [3], 2), (12, [3], 7), (12, [2, 3], 2),
                                     (12, [4, 4], 16), (6, [6], 4), (1536, [1], 32)]:  # fmt: skip
        ranges = block_ranges(channels, groups, blocks)
        assert ranges[0][0] == 0 and ranges[-1][1] == channels
        pairs = zip(ranges, ranges[1:], strict=False)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in pairs)
        for g in groups:  # whole groups of every grouped input, or a part of one
            q = channels // g
            for c0, c1 in ranges:
                assert (c0 % q == 0 and c1 % q == 0) or c0 // q == (c1 - 1) // q
        assert len(ranges) >= min(blocks, channels)


def test_auto_pipelines_only_when_its_bubble_is_small():
    from bmojo_core.distributed import _pipeline as P
    from bmojo_core.distributed._affine import _schedule

    def metas(most, work, world):
        return [{"most": most, "work": work}] * world

    long = 1536 * 16 * 32768  # the benchmark's shard: 32 blocks, a 1/32 bubble
    assert _schedule("auto", metas(1536, long, 2), 2) == P.BLOCKS_PER_BOUNDARY
    assert _schedule("auto", metas(1536, 1000, 2), 2) == 0  # too little work per block
    assert _schedule("auto", metas(24, long, 2), 2) == 24  # SSD: one block per head
    assert _schedule("auto", metas(24, long, 8), 8) == 0  # 7 / 24 of a scan idle: exchange
    assert _schedule("auto", metas(1536, long, 1), 1) == 0
    assert _schedule("exchange", metas(1536, long, 2), 2) == 0
    assert _schedule("pipeline", metas(4, 10, 3), 3) == 4


def test_needs_an_initialised_process_group():
    from bmojo_core import distributed as bd

    data = _cp.inputs("full")
    with pytest.raises(BmojoValueError, match="group: torch.distributed is not initialised"):
        bd.selective_scan_fn(**data["kw"])


def test_not_imported_with_the_package():
    code = "import sys, bmojo_core; assert 'bmojo_core.distributed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_scan_correction_stops_where_the_start_state_has_decayed():
    import math

    from bmojo_core.distributed import scan

    a = -torch.tensor([[1.0, 3.0], [2.0, 5.0]], dtype=torch.float64)  # slowest rates 1, 2
    pre = torch.full((1, 2, 100), math.log(math.expm1(0.7)), dtype=torch.float64)  # Δ = 0.7
    assert scan.HORIZON == 45.0
    # channel 0 passes HORIZON at its 65th step (0.7 · 65 = 45.5), channel 1 at its 33rd
    assert scan._reach(pre, None, True, a, None) == 64
    assert scan._reach(pre[..., :50], None, True, a, None) == 50  # not in the shard
    seq = torch.zeros(1, 100, dtype=torch.int64)
    seq[:, 30:] = 1
    assert scan._reach(pre, None, True, a, seq) == 30  # a packed sequence starts at 30
    assert scan._reach(pre, None, True, -a, None) == 100  # growing modes
    assert scan._reach(pre, None, False, a, None) == 100  # Δ not a softplus
    assert scan._reach(pre[..., :0], None, True, a, None) == 0
    total = torch.full((1, 2), 0.7 * 100, dtype=torch.float64)  # the summed steps: both pass
    assert scan._reach(pre, None, True, a, None, total) == 64
    assert scan._reach(pre[..., :50], None, True, a, seq, total[..., :1] / 2) == 30
    old = scan._BLOCK
    try:  # the same across blocks (the running sum carried over)
        scan._BLOCK = 7
        assert scan._reach(pre, None, True, a, None) == 64
        assert scan._reach(pre, None, True, a, seq) == 30
    finally:
        scan._BLOCK = old


def test_the_summed_steps_and_their_gradient_block_by_block():
    from bmojo_core.distributed import scan

    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 15).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    old = scan._BLOCK
    try:
        scan._BLOCK = 4
        for softplus in (True, False):
            assert torch.autograd.gradcheck(
                lambda d, b, sp=softplus: scan._StepSum.apply(d, b, sp, torch.float64),
                (delta, bias),
            )
            x = delta + bias[:, None]
            want = (torch.nn.functional.softplus(x) if softplus else x).sum(-1)
            got = scan._StepSum.apply(delta, bias, softplus, torch.float64)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    finally:
        scan._BLOCK = old
