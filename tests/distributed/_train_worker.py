"""A rank of tests/distributed/test_train_parallel.py, started by torchrun
(``python -m torch.distributed.run``): trains the shared tiny model with
``train(parallel=...)`` and saves its parameters and history."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def model(dtype: torch.dtype) -> torch.nn.Module:
    from bmojo_core import BMojoLM

    torch.manual_seed(0)
    return BMojoLM(vocab_size=16, d_model=8, n_layers=2, window=4, n_fading=2, n_eidetic=2,
                   d_state=4, n_heads=2, dtype=dtype)  # fmt: skip


def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Five rows of 23 tokens (rows and positions do not split evenly), every third
    position labelled with the next token."""
    x = torch.randint(0, 16, (5, 23), generator=g)
    y = torch.full_like(x, -100)
    y[:, :-1:3] = x[:, 1::3]
    return x, y


def run(mode: str, **kw):
    from bmojo_core.train import train

    m = model(torch.float64 if mode == "context" else torch.float32)
    hist = train(m, batch, steps=4, lr=3e-2, seed=3, progress=False, **kw)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, hist["train_loss"]


def main(mode: str, out: str) -> None:
    from bmojo_core import set_num_threads

    torch.set_num_threads(1)
    set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        params, losses = run(mode, parallel=mode)
        torch.save({"params": params, "losses": losses}, f"{out}/rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
