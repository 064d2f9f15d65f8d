"""Context-parallel selective scan vs one process, at equal total cores.

    python benches/context_parallel.py [--length 65536] [--dim 1536] [--state 16]
                                       [--procs 2] [--repeat 3]

Times the forward + backward of ``selective_scan_fn`` (Mamba-1 settings: time-varying
B/C, D, z gate, Δ bias and softplus; fp32, batch 1) on the whole sequence in one process
with ``procs`` threads, then of ``bmojo_core.distributed.selective_scan_fn`` on ``procs``
gloo processes (loopback) with one thread each, the sequence split evenly. Prints the
median times, the context-parallel overhead (its time over the single process's, minus
one), and the bytes each rank sends per call (forward all-gather of its decay product and
end state; backward all-reduce of the gathered tensor's gradient).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _inputs(length: int, dim: int, n: int, lo: int = 0, hi: int | None = None):
    g = torch.Generator().manual_seed(0)
    hi = length if hi is None else hi

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    full = {
        "u": r(1, dim, length), "delta": r(1, dim, length, scale=0.5),
        "A": -torch.rand(dim, n, generator=g) - 0.5, "B": r(1, n, length),
        "C": r(1, n, length), "D": r(dim), "z": r(1, dim, length),
        "delta_bias": r(dim, scale=0.1),
    }  # fmt: skip
    out = {}
    for k, t in full.items():
        if k in ("u", "delta", "B", "C", "z"):
            t = t[..., lo:hi].contiguous()
        out[k] = t.requires_grad_()
    return out


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def single(args) -> float:
    from bmojo_core import selective_scan_fn, set_num_threads

    torch.set_num_threads(args.procs)
    set_num_threads(args.procs)
    kw = _inputs(args.length, args.dim, args.state)

    def run():
        out = selective_scan_fn(**kw, delta_softplus=True)
        out.sum().backward()

    return _time(run, args.repeat)


def worker(store: str, rank: int, world: int, a: dict, out: str) -> None:
    import torch.distributed as dist
    from bmojo_core import set_num_threads
    from bmojo_core.distributed import selective_scan_fn

    torch.set_num_threads(1)
    set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))  # fmt: skip
    per = a["length"] // world
    kw = _inputs(a["length"], a["dim"], a["state"], rank * per, (rank + 1) * per)

    def run():
        dist.barrier()
        o = selective_scan_fn(**kw, delta_softplus=True)
        o.sum().backward()
        dist.barrier()  # the slowest rank's time

    t = _time(run, a["repeat"])
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"time": t}, f)
    dist.destroy_process_group()


def parallel(args) -> float:
    with tempfile.TemporaryDirectory() as d:
        store, out = os.path.join(d, "store"), os.path.join(d, "out.json")
        a = json.dumps(vars(args))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", store, str(r), a, out], env=env
            )  # fmt: skip
            for r in range(args.procs)
        ]
        if any(p.wait() for p in procs):
            raise SystemExit("a worker failed")
        with open(out, encoding="utf-8") as f:
            return json.load(f)["time"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, store, rank, a, out = sys.argv
        ns = json.loads(a)
        worker(store, int(rank), ns["procs"], ns, out)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t1 = single(args)
    tp = parallel(args)
    state = args.dim * args.state * 4  # fp32 bytes of one (batch 1) state
    fwd = 2 * state  # this rank's (P, s), sent to every other rank
    bwd = args.procs * 2 * state  # the gradient of the gathered (world, 2, ...) tensor
    print(f"selective scan fwd+bwd, B=1, D={args.dim}, N={args.state}, L={args.length}, fp32")
    print(f"  1 process x {args.procs} threads:   {t1 * 1e3:9.1f} ms")
    print(f"  {args.procs} processes x 1 thread:   {tp * 1e3:9.1f} ms  "
          f"(context-parallel overhead {100 * (tp / t1 - 1):+.0f} %)")  # fmt: skip
    print(f"  per rank and call: forward all-gather {fwd / 1e3:.0f} kB sent, backward "
          f"all-reduce of {bwd / 1e3:.0f} kB")  # fmt: skip


if __name__ == "__main__":
    main()
