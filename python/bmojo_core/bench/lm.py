"""Language-model decode cases (group ``lm_decode``) and their inputs: streaming decode of a
4-layer d_model=256 :class:`~bmojo_core.layers.BMojoLM` (vocab 512, window 128, 4 fading
and 32 eidetic tokens) at batch 1 and 32, one and two kernel threads: tokens per second of
``Stream.feed`` through the fused native step (:mod:`bmojo_core.ops.decode`), against the
Python step path (``stream.fused_decode = False``, one torch thread).
"""

from __future__ import annotations

from typing import Any

import torch

from ..layers import BMojoLM
from .harness import Case, Result

__all__ = ["LM_DECODE_BATCHES", "lm_decode_cases", "make_lm_decode_inputs"]

LM_DECODE_BATCHES = (1, 32)


def make_lm_decode_inputs(batch: int, warm: int = 300) -> dict[str, Any]:
    """A 4-layer d=256 BMojoLM and two streams (fused, Python path) fed ``warm`` tokens."""
    torch.manual_seed(0)
    model = BMojoLM(vocab_size=512, d_model=256, n_layers=4, window=128, n_fading=4, n_eidetic=32)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 512, (batch, warm), generator=gen)
    fused, ref = model.stream(batch), model.stream(batch)
    fused.fused_decode, ref.fused_decode = True, False
    fused.feed(prompt)
    ref.feed(prompt)
    tok = torch.randint(0, 512, (batch,), generator=gen)
    return {"model": model, "fused": fused, "ref": ref, "tok": tok}


def _python_lm_step(inp: dict[str, Any]) -> Any:
    """The Python step path on one torch thread (its small matmuls lose to OpenMP start-up
    and, on a busy machine, to spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return inp["ref"].feed(inp["tok"])
    finally:
        torch.set_num_threads(n)


def _finish_lm_decode(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    b = case.params["batch"]
    parts = []
    if res.bmojo_s:
        res.metrics["tokens_per_s"] = b / res.bmojo_s
        res.metrics["us_per_step"] = res.bmojo_s * 1e6
        parts.append(f"{b / res.bmojo_s:.0f} tok/s fused")
    if res.reference_s:
        res.metrics["reference_tokens_per_s"] = b / res.reference_s
        parts.append(f"{b / res.reference_s:.0f} tok/s python")
    res.extra = "; ".join(parts)


def lm_decode_cases(quick: bool) -> list[Case]:
    cases = []
    for batch in LM_DECODE_BATCHES:
        for threads in (1, 2):
            cases.append(
                Case(
                    name=f"lm decode B={batch} threads={threads}",
                    group="lm_decode",
                    description="BMojoLM d=256 x4 streaming decode, one token per slot",
                    setup=lambda b=batch: make_lm_decode_inputs(b),
                    bmojo=lambda inp: inp["fused"].feed(inp["tok"]),
                    reference=_python_lm_step,
                    reference_label="Python step path (1 torch thread)",
                    repeat=5,
                    warmup=10,
                    inner=20 if quick else 100,
                    ref_repeat=3,
                    ref_warmup=2,
                    ref_inner=5 if quick else 20,
                    threads=threads,
                    tokens=batch,
                    finish=_finish_lm_decode,
                    params={"batch": batch, "threads": threads},
                )
            )
    return cases
