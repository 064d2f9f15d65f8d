"""Context-parallel ops vs one process, at equal total cores.

    python benches/context_parallel.py [--op scan|scan-init|ssd|lm|all] [--length L]
        [--procs 2] [--repeat 5] [--rounds 3] [--schedule auto|pipeline|exchange]
        [--json FILE]

Times forward + backward on the whole sequence in one process with ``procs`` threads, then
through :mod:`bmojo_core.distributed` on ``procs`` gloo processes (loopback) with one
thread each, the sequence split evenly; fp32, batch 1:

- ``scan``: Mamba-1 ``selective_scan_fn`` (time-varying B/C, D, z gate, Δ bias and
  softplus), D=1536, N=16, L=65536; ``scan-init``: the same with Mamba's initialisation
  of A and Δ (see ``_scan_inputs``);
- ``ssd``: Mamba-2 ``mamba_chunk_scan_combined`` (24 heads × 64 = 1536 channels, N=16,
  one group, chunk 256, D, z, Δ bias and softplus), L=65536;
- ``lm``: a 2-layer B'MOJO ``BMojoLM`` (d_model 256, window 128, 32 fading and 32 eidetic
  tokens, top-k), L=32768, the loss a sum over the logits.

The two are timed in alternating rounds (one process, then the processes, ``rounds``
times; each the fastest and the median of ``repeat`` runs): this VM's speed drifts by tens
of per cent over minutes, and alternating keeps each pair under the same conditions. Prints
each round, the median over the rounds of the context-parallel overhead (the processes'
fastest time over the one process's, minus one; and the same of the medians) and what rank 1
passed to the collectives per call (counted by wrapping them: the tensors given to
all-gather / all-reduce / send / isend; the small ``all_gather_object`` agreement step
apart). ``--schedule`` picks the scans' schedule over shards (default "auto": the pipeline
at these sizes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DEFAULT_LENGTH = {"scan": 65536, "scan-init": 65536, "ssd": 65536, "lm": 32768}


def _split(t: torch.Tensor, axis: int, lo: int, hi: int) -> torch.Tensor:
    return t.narrow(axis, lo, hi - lo).contiguous()


def _scan_inputs(length: int, lo: int, hi: int, mamba_init: bool = False) -> dict:
    """Random inputs (Δ = softplus(N(0, 0.5²) + bias) ≈ 0.7, |A| in [0.5, 1.5]), or, with
    ``mamba_init``, Mamba's initialisation: A[d, n] = -(n + 1), Δ's bias the inverse
    softplus of steps log-uniform in [0.001, 0.1] (slow channels: the start state of a
    shard reaches through all of it)."""
    g = torch.Generator().manual_seed(0)
    dim, n = 1536, 16

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    full = {
        "u": r(1, dim, length), "delta": r(1, dim, length, scale=0.5),
        "A": -torch.rand(dim, n, generator=g) - 0.5, "B": r(1, n, length),
        "C": r(1, n, length), "D": r(dim), "z": r(1, dim, length),
        "delta_bias": r(dim, scale=0.1),
    }  # fmt: skip
    if mamba_init:
        full["A"] = -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1)
        dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3))  # fmt: skip
        full["delta_bias"] = dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹
        full["delta"] = r(1, dim, length, scale=0.1)
    return {k: (_split(t, 2, lo, hi) if t.dim() == 3 else t).requires_grad_()
            for k, t in full.items()}  # fmt: skip


def _ssd_inputs(length: int, lo: int, hi: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, p, n = 24, 64, 16

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    full = {
        "x": r(1, length, h, p), "dt": r(1, length, h, scale=0.5),
        "A": -torch.rand(h, generator=g) - 0.5, "B": r(1, length, 1, n),
        "C": r(1, length, 1, n), "D": r(h), "z": r(1, length, h, p), "dt_bias": r(h, scale=0.1),
    }  # fmt: skip
    return {k: (_split(t, 1, lo, hi) if t.dim() >= 3 else t).requires_grad_()
            for k, t in full.items()}  # fmt: skip


def _lm(length: int, lo: int, hi: int):
    from bmojo_core import BMojoLM

    torch.manual_seed(0)
    model = BMojoLM(vocab_size=64, d_model=256, n_layers=2, window=128, n_fading=32,
                    n_eidetic=32)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (1, length), generator=g)[:, lo:hi].contiguous()
    return model, tokens


def _step(op: str, length: int, lo: int, hi: int, sharded: bool, schedule: str = "auto"):
    """A function running one forward + backward on positions [lo, hi) (``schedule``: the
    scans' over shards)."""
    if op == "lm":
        model, tokens = _lm(length, lo, hi)
        if sharded:
            from bmojo_core.distributed import bmojo_lm

            return lambda: bmojo_lm(model, tokens).sum().backward()
        return lambda: model(tokens).sum().backward()
    if op in ("scan", "scan-init"):
        from bmojo_core import selective_scan_fn as single
        from bmojo_core.distributed import selective_scan_fn as dist_fn

        kw = _scan_inputs(length, lo, hi, mamba_init=op == "scan-init")
        if sharded:
            kw["schedule"] = schedule
        fn = dist_fn if sharded else single
        return lambda: fn(**kw, delta_softplus=True).sum().backward()
    from bmojo_core import mamba_chunk_scan_combined as single
    from bmojo_core.distributed import mamba_chunk_scan_combined as dist_fn

    kw = _ssd_inputs(length, lo, hi)
    if sharded:
        kw["schedule"] = schedule
    fn = dist_fn if sharded else single
    return lambda: fn(**kw, chunk_size=256, dt_softplus=True).sum().backward()


def _time(fn, repeat: int) -> tuple[float, float]:
    """(fastest, median) of ``repeat`` timed calls after a warm-up. The fastest is the
    figure to compare: on this VM, runs stall at random (a backward of two processes at
    once now and then takes three times as long, with or without any exchange)."""
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def single(op: str, length: int, procs: int, repeat: int) -> tuple[float, float]:
    from bmojo_core import set_num_threads

    torch.set_num_threads(procs)
    set_num_threads(procs)
    return _time(_step(op, length, 0, length, False), repeat)


def record_calls(calls: list) -> dict:
    """Wraps the collectives the distributed module uses so that each call appends
    ``[kind, bytes this rank gives it]`` to ``calls`` (0 for the agreement step's object
    all-gather); returns the originals, to put back."""
    import torch.distributed as dist

    originals = {}
    for name in ("all_gather", "all_reduce", "send", "isend", "all_gather_object"):
        orig = getattr(dist, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            if _name == "all_gather_object":
                calls.append([_name, 0])
            else:
                t = a[1] if _name == "all_gather" else a[0]
                calls.append([_name, t.numel() * t.element_size()])
            return _orig(*a, **k)

        originals[name] = orig
        setattr(dist, name, wrapped)
    return originals


def worker(store: str, rank: int, world: int, a: dict, out: str) -> None:
    import torch.distributed as dist
    from bmojo_core import set_num_threads

    torch.set_num_threads(1)
    set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))  # fmt: skip
    per = a["length"] // world
    lo, hi = rank * per, (a["length"] if rank == world - 1 else (rank + 1) * per)
    step = _step(a["op"], a["length"], lo, hi, True, a["schedule"])

    def run():
        dist.barrier()
        step()
        dist.barrier()  # the slowest rank's time

    t = _time(run, a["repeat"])  # the slowest rank's times (the barriers)
    calls: list = []
    record_calls(calls)
    step()
    counts: dict = {}
    for kind, nbytes in calls:  # bytes per collective kind (the agreement step apart)
        if kind != "all_gather_object":
            counts[kind] = counts.get(kind, 0) + nbytes
    if rank == min(1, world - 1):
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"time": t, "bytes": counts}, f)
    dist.destroy_process_group()


def parallel(op: str, length: int, procs: int, repeat: int, schedule: str = "auto") -> dict:
    with tempfile.TemporaryDirectory() as d:
        store, out = os.path.join(d, "store"), os.path.join(d, "out.json")
        a = json.dumps({"op": op, "length": length, "repeat": repeat, "schedule": schedule})
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs_ = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", store, str(r), str(procs), a, out], env=env
            )  # fmt: skip
            for r in range(procs)
        ]
        if any(p.wait() for p in procs_):
            raise SystemExit("a worker failed")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


TITLE = {
    "scan": "Mamba-1 selective scan, D=1536, N=16",
    "scan-init": "Mamba-1 selective scan, D=1536, N=16, Mamba's initialisation",
    "ssd": "Mamba-2 SSD scan, 24 heads x 64, N=16, chunk 256",
    "lm": "2-layer B'MOJO BMojoLM, d_model 256, window 128, 32 fading + 32 eidetic",
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, store, rank, world, a, out = sys.argv
        worker(store, int(rank), int(world), json.loads(a), out)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=("scan", "scan-init", "ssd", "lm", "all"), default="all")
    ap.add_argument("--length", type=int, default=None, help="default: 65536 (lm: 32768)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument(
        "--schedule",
        choices=("auto", "pipeline", "exchange"),
        default="auto",
        help="the scans' schedule over shards (auto: pipelined at these sizes)",
    )
    args = ap.parse_args()
    rows = []
    for op in ("scan", "scan-init", "ssd", "lm") if args.op == "all" else (args.op,):
        length = args.length or DEFAULT_LENGTH[op]
        print(f"{TITLE[op]}, L={length}, B=1, fp32, forward + backward (fastest / median "
              f"of {args.repeat}; schedule {args.schedule})", flush=True)  # fmt: skip
        rounds = []
        for i in range(args.rounds):
            t1, m1 = single(op, length, args.procs, args.repeat)
            res = parallel(op, length, args.procs, args.repeat, args.schedule)
            (tp, mp), counts = res["time"], res["bytes"]
            rounds.append({"single_s": t1, "single_median_s": m1, "parallel_s": tp,
                           "parallel_median_s": mp})  # fmt: skip
            print(f"  round {i + 1}: 1 process x {args.procs} threads {t1 * 1e3:7.1f} / "
                  f"{m1 * 1e3:7.1f} ms, {args.procs} processes x 1 thread {tp * 1e3:7.1f} / "
                  f"{mp * 1e3:7.1f} ms ({100 * (tp / t1 - 1):+.0f} % / "
                  f"{100 * (mp / m1 - 1):+.0f} %)", flush=True)  # fmt: skip
        fast = statistics.median(r["parallel_s"] / r["single_s"] - 1 for r in rounds)
        med = statistics.median(r["parallel_median_s"] / r["single_median_s"] - 1 for r in rounds)
        rows.append({"op": op, "length": length, "procs": args.procs, "rounds": rounds,
                     "overhead": fast, "overhead_of_medians": med, "bytes": counts,
                     "schedule": args.schedule})  # fmt: skip
        print(f"  context-parallel overhead, median over {args.rounds} rounds: "
              f"{100 * fast:+.0f} % (fastest runs) / {100 * med:+.0f} % (medians)")  # fmt: skip
        parts = ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in sorted(counts.items()))
        print(f"  rank 1 per call: {parts}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
