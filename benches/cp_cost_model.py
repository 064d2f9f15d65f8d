"""Cost model of context parallelism: the exchange of each layer against its compute.

    python benches/cp_cost_model.py [--json FILE]

1. Measures, on this machine: the latency α and bandwidth β of a gloo all-gather between
   2 processes over loopback (a least-squares fit of t = α + bytes / β over 8 B – 4 MB);
   the collectives one forward + backward of each layer makes on rank 1 of 2 (every call
   of all_gather / all_reduce / send and the agreement step, with its bytes: wrapped and
   recorded); and each layer's compute per token (forward + backward on one thread).
2. Extrapolates to R = 8 … 64 ranks on 25 – 400 Gb/s networks (α = 10 µs per message,
   RDMA-class; the loopback α is printed for reference): a ring all-gather of b bytes per
   rank costs (R − 1)(α + b/β), an all-reduce of b bytes 2(R − 1)(α + b/(Rβ)), the
   agreement step 2(R − 1)α, the eidetic relay (a chain through the ranks) (R − 1)(α +
   b/β). Prints the exchange time per layer and the tokens per rank above which it is
   under 10 % (the overhead target) and under 100 % of the layer's compute (where it
   could hide behind it, were it overlapped) — for the exchange schedule of the scans.
3. For the pipelined scans, the tokens per rank above which the pipeline's cost (the last
   rank starts ``R − 1`` blocks and messages late, forward and backward; blocks by the
   library's rule, ``_pipeline.block_count``) is under 10 % of the compute.

Layers: the Mamba-1 scan (D=1536, N=16), the Mamba-2 SSD scan (24 × 64 channels, N=16)
and one B'MOJO block of the 2-layer BMojoLM of ``benches/context_parallel.py`` (d_model
256, window 128, 32 fading + 32 eidetic tokens; half of the model's figures).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import context_parallel as cp  # noqa: E402

SIZES = [8, 1024, 16384, 65536, 262144, 1048576, 4194304]
LAYERS = {"scan": ("Mamba-1 scan", 1.0), "ssd": ("Mamba-2 SSD", 1.0),
          "lm": ("B'MOJO block", 0.5)}  # fmt: skip
LOCAL = 4096  # tokens per rank in the recorded runs


def worker(store: str, rank: int, out: str) -> None:
    import torch.distributed as dist
    from bmojo_core import set_num_threads

    torch.set_num_threads(1)
    set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    res: dict = {"allgather": {}}
    for size in SIZES:
        t = torch.zeros(size // 4)
        parts = [torch.empty_like(t) for _ in range(2)]
        for _ in range(3):
            dist.all_gather(parts, t)
        ts = []
        for _ in range(20):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_gather(parts, t)
            ts.append(time.perf_counter() - t0)
        res["allgather"][size] = statistics.median(ts)
    res["calls"] = {}
    from bmojo_core.distributed import _pipeline as P

    P.MAX_BUBBLE = -1.0  # the exchange schedule everywhere (the pipeline is modelled apart)
    for op in LAYERS:
        step = cp._step(op, 2 * LOCAL, rank * LOCAL, (rank + 1) * LOCAL, True)
        step()  # warm-up
        calls: list = []
        originals = cp.record_calls(calls)
        step()
        for name, orig in originals.items():
            setattr(dist, name, orig)
        res["calls"][op] = calls
    if rank == 1:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def measure_comm() -> dict:
    with tempfile.TemporaryDirectory() as d:
        store, out = os.path.join(d, "store"), os.path.join(d, "out.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", store, str(r), out],
                                  env=env) for r in range(2)]  # fmt: skip
        if any(p.wait() for p in procs):
            raise SystemExit("a worker failed")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def fit(points: dict) -> tuple[float, float]:
    """Least squares t = α + b / β."""
    xs = [float(b) for b in points]
    ys = list(points.values())
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return max(my - slope * mx, 0.0), 1.0 / slope


def per_token(op: str, length: int = 8192) -> float:
    from bmojo_core import set_num_threads

    torch.set_num_threads(1)
    set_num_threads(1)
    return cp._time(cp._step(op, length, 0, length, False), 3)[0] / length


def exchange_time(calls: list, share: float, ranks: int, alpha: float, beta: float) -> float:
    t = 0.0
    for kind, b in calls:
        if kind == "all_gather":
            t += (ranks - 1) * (alpha + b / beta)
        elif kind == "all_reduce":
            t += 2 * (ranks - 1) * (alpha + b / (ranks * beta))
        elif kind == "all_gather_object":  # sizes, then the pickled metadata
            t += 2 * (ranks - 1) * alpha
        else:  # the eidetic relay: one message per rank, one after another
            t += (ranks - 1) * (alpha + b / beta)
    return t * share


# The pipelined scans (``bmojo_core.distributed._pipeline``): its block rule, and the state
# bytes per rank (batch 1, fp32) and most blocks (channels / heads) of each scan.
PIPELINED = {"scan": (1536 * 16 * 4, 1536, 1536 * 16), "ssd": (24 * 64 * 16 * 4, 24, 24 * 64 * 16)}


def pipeline_fraction(op: str, tok: float, length: int, ranks: int, alpha: float,
                      beta: float) -> float:  # fmt: skip
    """The pipelined scan's cost over a shard's compute, at ``length`` tokens per rank:
    the last rank starts ``ranks - 1`` blocks (and messages) late, forward and backward
    alike (the bubble), plus the agreement step; the other messages travel while blocks
    are computed."""
    from bmojo_core.distributed import _pipeline as P

    nbytes, most, per_token_work = PIPELINED[op]
    k = P.block_count(ranks, most, per_token_work * length)
    compute = tok * length
    exposed = (ranks - 1) * (compute / k + 2 * (alpha + nbytes / (k * beta)))
    return (exposed + 2 * (ranks - 1) * alpha) / compute


def pipeline_tokens(op: str, tok: float, ranks: int, alpha: float, beta: float,
                    target: float = 0.1) -> float | None:  # fmt: skip
    """The fewest tokens per rank for which the pipeline's cost is under ``target`` of the
    compute (None: never, too few blocks for the ranks)."""
    hi = 1 << 26
    if pipeline_fraction(op, tok, hi, ranks, alpha, beta) > target:
        return None
    lo = 1
    while hi - lo > 1:  # the fraction falls with the length (more, then cheaper, messages)
        mid = (lo + hi) // 2
        if pipeline_fraction(op, tok, mid, ranks, alpha, beta) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    comm = measure_comm()
    a_loop, b_loop = fit({int(k): v for k, v in comm["allgather"].items()})
    print(f"loopback gloo all-gather (2 processes): alpha {a_loop * 1e6:.0f} us, "
          f"beta {b_loop / 1e9:.2f} GB/s")  # fmt: skip
    rows = []
    for op, (label, share) in LAYERS.items():
        calls = comm["calls"][op]
        tok = per_token(op) * share
        nbytes = sum(b for _, b in calls) * share
        ncalls = len(calls) * share
        print(
            f"\n{label}: {tok * 1e6:.1f} us per token (forward + backward, 1 thread); "
            f"per layer and rank: {ncalls:g} collective calls, {nbytes / 1e3:.1f} kB given"
        )
        print(f"  {'ranks':>5} {'Gb/s':>5} {'exchange':>10} {'L/rank for <=10 %':>18} "
              f"{'L/rank for <=100 %':>19}")  # fmt: skip
        for ranks in (8, 16, 32, 64):
            for gbps in (25, 100, 400):
                t = exchange_time(calls, share, ranks, 10e-6, gbps * 1e9 / 8)
                l10, l100 = t / (0.1 * tok), t / tok
                rows.append({"layer": op, "ranks": ranks, "gbps": gbps, "exchange_s": t,
                             "per_token_s": tok, "bytes": nbytes, "calls": ncalls,
                             "tokens_10pct": l10, "tokens_100pct": l100})  # fmt: skip
                print(f"  {ranks:>5} {gbps:>5} {t * 1e3:>8.2f} ms {l10:>18,.0f} {l100:>19,.0f}")
        if op not in PIPELINED:
            continue
        print("  pipelined: tokens per rank for bubble + exposed messages <= 10 %")
        print(f"  {'ranks':>5} {'Gb/s':>5} {'L/rank':>10}")
        for ranks in (2, 4, 8, 16, 32, 64):
            for gbps in (25, 400):
                n = pipeline_tokens(op, tok, ranks, 10e-6, gbps * 1e9 / 8)
                rows.append({"layer": op, "schedule": "pipeline", "ranks": ranks, "gbps": gbps,
                             "per_token_s": tok, "tokens_10pct": n})  # fmt: skip
                print(f"  {ranks:>5} {gbps:>5} {'never' if n is None else f'{n:,}':>10}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"alpha_loopback_s": a_loop, "beta_loopback_Bps": b_loop,
                       "calls": comm["calls"], "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
