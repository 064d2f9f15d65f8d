"""Save/load time of a stream that has consumed 100k tokens per slot (the `bmojo bench`
decode model: 4 layers, d_model 256, window 128, 4 fading and 32 eidetic tokens; batch 8).

    python benches/stream_io.py [--tokens 100000] [--batch 8] [--repeat 20]

Prints the saved size and the median save and load times (the state has a fixed size, so
the figures do not depend on the stream's length; the tokens make the state realistic).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bmojo_core import Stream
from bmojo_core.layers import BMojoLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = BMojoLM(vocab_size=512, d_model=256, n_layers=4, window=128, n_fading=4, n_eidetic=32)
    s = model.stream(args.batch)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for a in range(0, args.tokens, 2048):
        n = min(2048, args.tokens - a)
        s.feed(torch.randint(0, 512, (args.batch, n), generator=gen))
    fed = time.perf_counter() - t0
    saves, loads = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        data = s.save()
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = Stream.load(model, data)
        loads.append(time.perf_counter() - t0)
    assert all(torch.equal(r.state[k], s.state[k]) for k in s.state)
    print(
        f"stream of {args.tokens} tokens x {args.batch} slots (fed in {fed:.1f} s): "
        f"{len(data) / 2**20:.2f} MiB saved; save {statistics.median(saves) * 1e3:.1f} ms, "
        f"load {statistics.median(loads) * 1e3:.1f} ms (median of {args.repeat})"
    )


if __name__ == "__main__":
    main()
