"""Whole transformers models with and without bmojo_core (group ``transformers``):
prefill (L=1024, batch 1 and 8), greedy decode tokens/s (batch 1, 32 new tokens) and a
training step (batch 1, L=512) of a Mamba2 model (d_model 768, 4 layers, head_dim 64,
state 128) and of the Mamba-1 model of the same width, built from random configurations
(no downloads; vocabulary 1024). "bmojo" runs inside
:func:`bmojo_core.integrations.transformers.use_bmojo_core`, the reference is the same
model on transformers' own CPU path, at the default thread settings. Skipped where
transformers is not installed.
"""

from __future__ import annotations

from typing import Any

import torch

from .harness import Case, Result, finish_parity

__all__ = ["make_model_inputs", "transformers_available", "transformers_cases"]

VOCAB = 1024
NEW_TOKENS = 32


def transformers_available() -> bool:
    """Whether transformers' Mamba and Mamba2 models can be imported here."""
    try:
        from transformers import Mamba2Config, MambaConfig  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _model(family: str, quick: bool) -> Any:
    import transformers as tf

    width, layers = (256, 2) if quick else (768, 4)
    common = {"hidden_size": width, "num_hidden_layers": layers, "vocab_size": VOCAB,
              "eos_token_id": None, "pad_token_id": 0, "bos_token_id": 0}  # fmt: skip
    if family == "mamba2":
        cfg = tf.Mamba2Config(head_dim=64, num_heads=2 * width // 64, state_size=128,
                              expand=2, n_groups=1, chunk_size=256, **common)  # fmt: skip
        return tf.Mamba2ForCausalLM(cfg).eval()
    cfg = tf.MambaConfig(state_size=16, expand=2, **common)
    return tf.MambaForCausalLM(cfg).eval()


def make_model_inputs(family: str, batch: int, length: int, quick: bool) -> dict[str, Any]:
    """A seeded random model of ``family`` ("mamba" or "mamba2") and token ids."""
    torch.manual_seed(0)
    model = _model(family, quick)
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    return {"model": model, "ids": ids}


def _enabled(fn):
    def call(inp: dict[str, Any]) -> Any:
        from ..integrations.transformers import use_bmojo_core

        with use_bmojo_core():
            return fn(inp)

    return call


def _prefill(inp: dict[str, Any]) -> torch.Tensor:
    return inp["model"](inp["ids"], use_cache=False).logits


def _decode(inp: dict[str, Any]) -> torch.Tensor:
    return inp["model"].generate(inp["ids"], max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False)  # fmt: skip


def _train_step(inp: dict[str, Any]) -> list[torch.Tensor]:
    model = inp["model"]
    model.zero_grad(set_to_none=True)
    model(inp["ids"], labels=inp["ids"]).loss.backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


def _finish_tokens(case: Case, inputs: dict, res: Result, out: Any, ref_out: Any) -> None:
    if case.params["kind"] == "decode":
        if out is not None and ref_out is not None:
            same = bool(torch.equal(out, ref_out))
            res.metrics["same_tokens_as_reference"] = same
            res.extra = "same tokens" if same else "TOKENS DIFFER"
    else:
        finish_parity(case, inputs, res, out, ref_out)
    tokens = case.params["new_tokens"] * case.params["batch"]
    if res.bmojo_s:
        res.metrics["tokens_per_s"] = tokens / res.bmojo_s
        text = f"{tokens / res.bmojo_s:.0f} tok/s"
        if res.reference_s:
            res.metrics["reference_tokens_per_s"] = tokens / res.reference_s
            text += f" (vs {tokens / res.reference_s:.0f})"
        res.extra = text + (f"; {res.extra}" if res.extra else "")


def transformers_cases(quick: bool) -> list[Case]:
    available = transformers_available()
    length = 128 if quick else 1024
    cases = []
    for family in ("mamba2", "mamba"):
        runs = [("prefill", b, length, _prefill, False) for b in (1, 8)]
        runs.append(("decode", 1, 8, _decode, False))
        runs.append(("train step", 1, length // 2, _train_step, True))
        for kind, b, L, fn, grad in runs:
            new = NEW_TOKENS if kind == "decode" else L
            cases.append(
                Case(
                    name=f"transformers {family} {kind} b={b} L={L}",
                    group="transformers",
                    description=f"{family} ({'d256, 2' if quick else 'd768, 4'} layers) "
                    f"{kind} with use_bmojo_core() vs transformers' CPU path",
                    setup=lambda family=family, b=b, L=L: make_model_inputs(family, b, L, quick),
                    bmojo=_enabled(fn),
                    reference=fn,
                    reference_label="transformers (torch CPU path)",
                    grad=grad,
                    repeat=3,
                    warmup=1,
                    # transformers trains Mamba-1 with a Python loop over time (~40 s a
                    # step at L=512): time that reference once after its warm-up
                    ref_repeat=1 if grad and family == "mamba" else 3,
                    ref_warmup=1,
                    tokens=b * new,
                    finish=_finish_tokens,
                    params={
                        "family": family,
                        "kind": kind.split()[0],
                        "batch": b,
                        "L": L,
                        "new_tokens": new,
                        "available": available,
                        "requires": "transformers",
                    },  # fmt: skip
                )
            )
    return cases
