"""The context-parallel cases, shared by the tests (single-process reference) and the
worker processes (``python _cp.py STORE RANK WORLD OUT CASES``: one rank, gloo over a file
store). A case builds its full-length fp64 inputs from its seed, splits the sequence into
the case's shard lengths, and scores ``loss = Σ out·w + Σ last·v`` with fixed weights, so
outputs and every gradient can be compared with the single-process op."""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

import torch

CASES: dict[str, dict[str, Any]] = {
    # world 2: everything optional given, time-varying B/C, uneven shards
    "full": dict(
        lengths=(5, 7), bc="var", D=True, z=True, bias=True, softplus=True, h0=True, last=True
    ),  # fmt: skip
    # grouped B/C, packed sequences crossing and starting at shard boundaries
    "packed2": dict(
        lengths=(6, 6),
        bc="group",
        D=True,
        bias=True,
        softplus=True,
        last=True,
        seq=(0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2),
    ),  # fmt: skip
    # constant B/C, no last state (the first rank's output is tied to the exchange)
    "const2": dict(lengths=(3, 9), bc="const", D=True),
    # world 3: an empty shard, a one-step shard, packed sequences
    "packed3": dict(lengths=(4, 0, 1), bc="var", h0=True, last=True, seq=(0, 0, 1, 1, 1)),
    "uneven3": dict(
        lengths=(2, 9, 1),
        bc="group",
        D=True,
        z=True,
        bias=True,
        softplus=True,
        h0=True,
        last=True,
        seq=(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1),
    ),  # fmt: skip
}
# "full" with fast decays: the correction of the second shard stops after a few steps
CASES["fast2"] = dict(CASES["full"], lengths=(5, 20), fast=True)
# causal conv (op "conv"): width K, shards shorter than K-1 and empty, packed sequences
CASES.update({
    "conv2": dict(op="conv", k=4, lengths=(5, 6), bias=True, act="silu", h0=True, last=True),
    "conv2short": dict(op="conv", k=4, lengths=(2, 7), bias=True, last=True,
                       seq=(0, 0, 0, 0, 1, 1, 1, 1, 1)),
    "conv2k1": dict(op="conv", k=1, lengths=(3, 4), bias=True, last=True),
    "conv3": dict(op="conv", k=4, lengths=(1, 0, 1), h0=True, last=True),
    "conv3seq": dict(op="conv", k=3, lengths=(3, 1, 4), act="silu",
                     seq=(0, 0, 1, 1, 2, 2, 2, 2)),
})  # fmt: skip
# Mamba-2 SSD (op "ssd", sequence on dim 1): per-head D, grouped B/C, limits, packing
CASES.update({
    "ssd2": dict(op="ssd", lengths=(5, 8), D="h", z=True, bias=True, softplus=True, h0=True,
                 last=True, limit=(0.01, 2.0)),
    "ssd2seq": dict(op="ssd", lengths=(7, 4), D="hp", bias=True, softplus=True, last=True,
                    seq=(0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1)),
    "ssd3": dict(op="ssd", lengths=(3, 0, 6), bias=True, softplus=True, h0=True,
                 seq=(0, 0, 1, 1, 1, 1, 1, 1, 1)),
    # a sequence crossing into the last shard and another starting inside it (its rows
    # stop carrying the start state there), gated
    "ssd3in": dict(op="ssd", lengths=(2, 3, 6), z=True, bias=True, softplus=True, h0=True,
                   last=True, seq=(0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2)),
})  # fmt: skip
# layers (sequence on dim 1): the Mamba-1 mixer, sliding-window attention (window 4)
CASES.update(
    {
        "ssmlayer2": dict(op="ssmlayer", lengths=(2, 7)),
        "ssmlayer3": dict(op="ssmlayer", lengths=(5, 0, 4)),
        "swa2": dict(op="swa", lengths=(2, 9)),
        "swa3": dict(op="swa", lengths=(1, 2, 6)),
    }
)
# B'MOJO layers (window, n_fading): B'MOJO-F with shards off the chunk grid, more fading
# tokens than the window, an empty shard; the pure SSM and pure attention configurations
CASES.update(
    {
        "bmojof2": dict(op="bmojo", layer=(4, 2), lengths=(3, 6)),
        "bmojof3": dict(op="bmojo", layer=(2, 3), lengths=(3, 4, 2)),
        "bmojof3b": dict(op="bmojo", layer=(4, 4), lengths=(5, 0, 7)),
        "bmojossm2": dict(op="bmojo", layer=(0, 0), lengths=(2, 5)),
        "bmojoswa2": dict(op="bmojo", layer=(3, 0), lengths=(4, 4)),
        # B'MOJO (window, n_fading, n_eidetic[, policy, metric]): stores across shards
        "bmojo2": dict(op="bmojo", layer=(4, 2, 2), lengths=(7, 10)),
        "bmojo3": dict(op="bmojo", layer=(3, 1, 2, "topk", "chi2"), lengths=(5, 1, 11)),
        "bmojo3e": dict(op="bmojo", layer=(2, 0, 3, "fifo", "mse"), lengths=(4, 0, 9)),
        "bmojo3t": dict(op="bmojo", layer=(4, 2, 2, "threshold", "chi2"), lengths=(2, 3, 12)),
        # a 2-block B'MOJO language model (window 3, 1 fading, 2 eidetic tokens)
        "lm2": dict(op="lm", lengths=(6, 7)),
        "lm3": dict(op="lm", lengths=(5, 0, 8)),
        # the same model wrapped in DistributedDataParallel over the group (it averages)
        "ddp2": dict(op="lm", lengths=(8, 5), ddp=True),
        # the model under torch.compile (Dynamo + AOTAutograd; the exchanges run eagerly)
        "compile2": dict(op="lm", lengths=(6, 7), compile=True),
        # sharded by FSDP2 (fully_shard) over the same group (it averages, as DDP)
        "fsdp2": dict(op="lm", lengths=(7, 6), fsdp=True),
    }
)
# the pipelined schedule (forced: these inputs are too small for "auto" to choose it),
# over the same shapes as above
PIPELINED = ("full", "packed2", "const2", "packed3", "uneven3", "ssd2", "ssd2seq", "ssd3",
             "ssd3in")  # fmt: skip
CASES.update({f"{n}/pipe": dict(CASES[n], schedule="pipeline") for n in PIPELINED})
# layers whose scans pipeline by "auto" (the worker lowers the least work per block)
CASES.update(
    {
        f"{n}/pipe": dict(CASES[n], tiny_blocks=True)
        for n in ("ssmlayer3", "bmojo2", "bmojo3", "lm2", "lm3", "compile2", "ddp2", "fsdp2")
    }
)
WORLD_LAYERS = {"ssmlayer2": 2, "ssmlayer3": 3, "swa2": 2, "swa3": 3, "bmojof2": 2,
                "bmojof3": 3, "bmojof3b": 3, "bmojossm2": 2, "bmojoswa2": 2, "bmojo2": 2,
                "bmojo3": 3, "bmojo3e": 3, "bmojo3t": 3, "lm2": 2, "lm3": 3, "ddp2": 2,
                "compile2": 2, "fsdp2": 2}  # fmt: skip
WORLD = {**WORLD_LAYERS, "ssd2": 2, "ssd2seq": 2, "ssd3": 3, "ssd3in": 3, "full": 2,
         "fast2": 2, "packed2": 2, "const2": 2, "packed3": 3, "uneven3": 3, "conv2": 2,
         "conv2short": 2, "conv2k1": 2, "conv3": 3, "conv3seq": 3}  # fmt: skip
WORLD_LAYERS.update({f"{n}/pipe": WORLD[n] for n in CASES if f"{n}/pipe" in CASES
                     and CASES[f"{n}/pipe"].get("tiny_blocks")})  # fmt: skip
WORLD.update({n: WORLD[n.split("/")[0]] for n in CASES if n.endswith("/pipe")})
SHARDED = ("u", "delta", "z", "B", "C", "x", "dt", "tokens")  # split along L when time-varying
BATCH, DIM, N, G = 2, 4, 3, 2


def inputs(name: str) -> dict[str, Any]:
    case = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    length = sum(case["lengths"])

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    if case.get("op") == "lm":
        w = torch.randn(BATCH, length, 16, generator=g, dtype=torch.float64)
        tokens = torch.randint(0, 16, (BATCH, length), generator=g)
        return {"kw": {"tokens": tokens}, "w": w, "v": None, "bc": None, "op": "lm",
                "axis": 1, "last": False}  # fmt: skip
    if case.get("op") in ("ssmlayer", "swa", "bmojo"):
        w = torch.randn(BATCH, length, 8, generator=g, dtype=torch.float64)
        return {"kw": {"u": r(BATCH, length, 8)}, "w": w, "v": None, "bc": None,
                "op": case["op"], "axis": 1, "last": False}  # fmt: skip
    if case.get("op") == "ssd":
        h, p, n = 4, 3, 5  # heads, head_dim, state; 2 groups
        kw = {"x": r(BATCH, length, h, p), "dt": r(BATCH, length, h, scale=0.5),
              "A": (-torch.rand(h, generator=g, dtype=torch.float64) - 0.2).requires_grad_(),
              "B": r(BATCH, length, 2, n), "C": r(BATCH, length, 2, n),
              "chunk_size": 4}  # fmt: skip
        if case.get("D"):
            kw["D"] = r(h) if case["D"] == "h" else r(h, p)
        if case.get("z"):
            kw["z"] = r(BATCH, length, h, p)
        if case.get("bias"):
            kw["dt_bias"] = r(h, scale=0.3)
        if case.get("h0"):
            kw["initial_states"] = r(BATCH, h, p, n)
        if "seq" in case:
            seq = torch.tensor(case["seq"], dtype=torch.int64)
            kw["seq_idx"] = torch.stack([seq, torch.zeros_like(seq)])
        kw["dt_softplus"] = bool(case.get("softplus"))
        if "limit" in case:
            kw["dt_limit"] = case["limit"]
        kw["return_final_states"] = bool(case.get("last"))
        if "schedule" in case:
            kw["schedule"] = case["schedule"]
        w = torch.randn(BATCH, length, h, p, generator=g, dtype=torch.float64)
        v = torch.randn(BATCH, h, p, n, generator=g, dtype=torch.float64)
        return {"kw": kw, "w": w, "v": v, "bc": None, "op": "ssd", "axis": 1,
                "last": kw["return_final_states"]}  # fmt: skip
    if case.get("op") == "conv":
        k = case["k"]
        kw = {"x": r(BATCH, DIM, length), "weight": r(DIM, k), "bias": None}
        if case.get("bias"):
            kw["bias"] = r(DIM)
        if case.get("h0"):
            kw["initial_states"] = r(BATCH, DIM, k - 1)
        if "seq" in case:
            seq = torch.tensor(case["seq"], dtype=torch.int64)
            kw["seq_idx"] = torch.stack([seq, torch.zeros_like(seq)])
        kw["return_final_states"] = bool(case.get("last"))
        kw["activation"] = case.get("act")
        w = torch.randn(BATCH, DIM, length, generator=g, dtype=torch.float64)
        v = torch.randn(BATCH, DIM, k - 1, generator=g, dtype=torch.float64)
        return {"kw": kw, "w": w, "v": v, "bc": None, "op": "conv", "axis": -1,
                "last": kw["return_final_states"]}  # fmt: skip

    kw: dict[str, Any] = {
        "u": r(BATCH, DIM, length),
        "delta": r(BATCH, DIM, length, scale=0.5),
        "A": (-torch.rand(DIM, N, generator=g, dtype=torch.float64) - 0.2).requires_grad_(),
    }
    if case.get("fast"):
        kw["A"] = (kw["A"].detach() * 200).requires_grad_()
    bc = case["bc"]
    shape = {"var": (BATCH, N, length), "group": (BATCH, G, N, length), "const": (DIM, N)}[bc]
    kw["B"], kw["C"] = r(*shape), r(*shape)
    if case.get("D"):
        kw["D"] = r(DIM)
    if case.get("z"):
        kw["z"] = r(BATCH, DIM, length)
    if case.get("bias"):
        kw["delta_bias"] = r(DIM, scale=0.3)
    kw["delta_softplus"] = bool(case.get("softplus"))
    kw["return_last_state"] = bool(case.get("last"))
    if case.get("h0"):
        kw["initial_state"] = r(BATCH, DIM, N)
    if "seq" in case:
        seq = torch.tensor(case["seq"], dtype=torch.int64)
        kw["seq_idx"] = torch.stack([seq, torch.zeros_like(seq)])  # row 1: one sequence
    if "schedule" in case:
        kw["schedule"] = case["schedule"]
    w = torch.randn(BATCH, DIM, length, generator=g, dtype=torch.float64)
    v = torch.randn(BATCH, DIM, N, generator=g, dtype=torch.float64)
    return {"kw": kw, "w": w, "v": v, "bc": bc, "op": "scan", "axis": -1,
            "last": kw["return_last_state"]}  # fmt: skip


def module(name: str) -> torch.nn.Module:
    """The case's layer, the same on every rank (seeded), in fp64."""
    from bmojo_core.layers import BMojoLayer, BMojoLM, SelectiveSSM, SlidingWindowAttention

    torch.manual_seed(sum(map(ord, name)))
    if CASES[name]["op"] == "lm":
        return BMojoLM(16, 8, 2, 3, 1, 2, d_state=4, n_heads=2, dtype=torch.float64)
    if CASES[name]["op"] == "bmojo":
        w, f, *rest = CASES[name]["layer"]  # (window, n_fading[, n_eidetic, policy, metric])
        e = rest[0] if rest else 0
        policy, metric = rest[1:] or ("topk", "mse")
        return BMojoLayer(8, w, f, e, d_state=4, n_heads=2 if w else None,
                          innovation_taps=2, innovation_metric=metric, eidetic_policy=policy,
                          eidetic_threshold=0.5, dtype=torch.float64)  # fmt: skip
    if CASES[name]["op"] == "ssmlayer":
        return SelectiveSSM(8, d_state=4, d_conv=4, dtype=torch.float64)
    return SlidingWindowAttention(8, 4, n_heads=2, dtype=torch.float64)


class _ContextParallel(torch.nn.Module):
    """A module whose forward runs the model over the shards, for DDP to wrap."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from bmojo_core import distributed as bd

        return bd.bmojo_lm(self.model, tokens)


def loss(out: Any, w: torch.Tensor, v: torch.Tensor, last: bool) -> torch.Tensor:
    if last:
        y, h = out
        return (y * w).sum() + (h * v).sum()
    return (out * w).sum()


def shard(name: str, data: dict[str, Any], rank: int) -> dict[str, Any]:
    """This rank's arguments: sequence-shaped tensors cut to its shard (as new leaves)."""
    lengths = CASES[name]["lengths"]
    lo = sum(lengths[:rank])
    hi = lo + lengths[rank]
    kw = {}
    for k, t in data["kw"].items():
        if isinstance(t, torch.Tensor):
            t = t.detach()
            time_varying = k in SHARDED and not (k in "BC" and data["bc"] == "const")
            if k == "seq_idx":
                t = t[:, lo:hi].contiguous()
            elif time_varying:
                t = t.narrow(data["axis"] % t.dim(), lo, hi - lo).contiguous()
            if t.is_floating_point():
                t = t.clone().requires_grad_()
        kw[k] = t
    w = data["w"].narrow(data["axis"] % data["w"].dim(), lo, hi - lo)
    return {"kw": kw, "w": w, "lo": lo, "hi": hi}


def _fully_shard():
    """FSDP2's ``fully_shard`` (torch >= 2.6; None before: its CPU support is newer)."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6):
        return None
    from torch.distributed.fsdp import fully_shard

    return fully_shard


def _full(g: Any) -> Any:
    """A gradient as a plain tensor (FSDP2's are sharded DTensors)."""
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def _outcome(fn: Any, kw: dict[str, Any]) -> str:
    """What a call expected to fail on every rank raised (or "no error")."""
    try:
        fn(**kw)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def main(store: str, rank: int, world: int, out_dir: str, names: list[str]) -> None:
    import torch.distributed as dist
    from bmojo_core import distributed as bd
    from bmojo_core.distributed import _pipeline as P

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    results: dict[str, Any] = {}
    least = P.MIN_BLOCK_WORK
    try:
        for name in names:
            if name == "bad-shape":  # a bad argument on rank 1 only
                d = shard("full", inputs("full"), min(rank, 1))
                if rank == 1:
                    d["kw"]["u"] = d["kw"]["u"][:, :, :-1]  # shorter than delta
                results[name] = _outcome(bd.selective_scan_fn, d["kw"])
                continue
            if name in ("bad-schedule", "mixed-schedule"):  # on rank 1 / different per rank
                d = shard("full", inputs("full"), rank)
                if name == "bad-schedule":
                    d["kw"]["schedule"] = "fastest" if rank == 1 else "auto"
                else:
                    d["kw"]["schedule"] = ("pipeline", "exchange")[rank % 2]
                results[name] = _outcome(bd.selective_scan_fn, d["kw"])
                continue
            if name in ("bad-cu", "mismatch"):  # cu_seqlens on rank 0; other dims on rank 1
                d = shard("ssd2", inputs("ssd2"), rank)
                if name == "bad-cu" and rank == 0:
                    d["kw"]["cu_seqlens"] = torch.tensor([0, d["kw"]["x"].shape[1]])
                if name == "mismatch" and rank == 1:
                    d["kw"]["x"] = d["kw"]["x"][:, :, :, :2]
                    d["kw"]["z"] = d["kw"]["z"][:, :, :, :2]
                    d["kw"]["initial_states"] = None
                results[name] = _outcome(bd.mamba_chunk_scan_combined, d["kw"])
                continue
            data = inputs(name)
            d = shard(name, data, rank)
            mod = None
            P.MIN_BLOCK_WORK = 1 if CASES[name].get("tiny_blocks") else least
            if data["op"] in ("ssmlayer", "swa", "bmojo", "lm"):
                mod = module(name)
                fn = {"ssmlayer": bd.selective_ssm, "swa": bd.sliding_window_attention,
                      "bmojo": bd.bmojo_layer, "lm": bd.bmojo_lm}[data["op"]]  # fmt: skip
                x = d["kw"]["u" if "u" in d["kw"] else "tokens"]
                if CASES[name].get("fsdp"):
                    shard_fn = _fully_shard()
                    if shard_fn is None:
                        results[name] = "skipped"
                        continue
                    wrapped = _ContextParallel(mod)
                    shard_fn(wrapped)
                    out = wrapped(x)
                elif CASES[name].get("compile"):  # graph breaks at the exchanges
                    out = torch.compile(fn, backend="aot_eager")(mod, x)
                elif CASES[name].get("ddp"):
                    from torch.nn.parallel import DistributedDataParallel

                    ddp = DistributedDataParallel(_ContextParallel(mod))
                    out = ddp(x)
                else:
                    out = fn(mod, x)
            else:
                fn = {"conv": bd.causal_conv1d_fn, "scan": bd.selective_scan_fn,
                      "ssd": bd.mamba_chunk_scan_combined}[data["op"]]  # fmt: skip
                out = fn(**d["kw"])
            # the whole-sequence loss is the sum of the ranks' losses: the last state,
            # returned on every rank, is scored on one
            v = data["v"] if rank == world - 1 or data["v"] is None else 0 * data["v"]
            loss(out, d["w"], v, data["last"]).backward()
            res = {"out": (out[0] if isinstance(out, tuple) else out).detach()}
            if isinstance(out, tuple):
                res["last"] = out[1].detach()
            res["grads"] = {k: t.grad for k, t in d["kw"].items()
                            if isinstance(t, torch.Tensor) and t.grad is not None}  # fmt: skip
            if mod is not None:  # (under DDP every rank holds the mean: they sum alike)
                res["params"] = {k: _full(p.grad) for k, p in mod.named_parameters()}
            results[name] = res
    finally:
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
