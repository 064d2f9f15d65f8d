"""Fused streaming decode step of :class:`bmojo_core.layers.BMojoLM` (one native call per
token for the whole model; SPEC §6.4).

:meth:`bmojo_core.stream.Stream.feed` (and ``generate``) route one-token feeds here when
the model is fp32 or fp64 on the CPU; the result equals the Python step path
(``BMojoLayer._step1``) within SPEC §1's tolerances and the state transitions are the same
(identical eidetic positions). Streaming never builds a graph, so parameters that require
grad do not matter.

**Plan.** :class:`DecodePlan` copies the model's parameters once into native memory (the
layout the kernel reads) and keeps the NumPy views of the stream's state tensors. It is
rebuilt when a parameter changes: an in-place update (optimizer step,
``load_state_dict``, ``copy_``) bumps the parameter's ``_version``, a replacement
(``model.to``, ``.data =``) changes its ``data_ptr``; both are compared per token. The
state views are rebuilt when ``stream.state`` is replaced (``Stream.load``); ``reset``
writes the same tensors in place.

**Choice.** The fused path is on by default; ``BMOJO_FUSED_DECODE=0`` in the environment,
or ``stream.fused_decode = False`` on a stream, selects the Python step path;
``stream.fused_decode = True`` forces the fused one whatever the environment.
"""

from __future__ import annotations

import operator
import os

import torch
from torch import Tensor

from . import _core
from .eidetic import CHI2_FLOOR, CHI2_RATE

__all__ = ["DecodePlan", "enabled"]

ENV = "BMOJO_FUSED_DECODE"
_VERSION = operator.attrgetter("_version")
_PTR = Tensor.data_ptr


def enabled(stream) -> bool:
    """Whether ``stream``'s one-token feeds take the fused path: ``stream.fused_decode``
    if set (True/False), else ``BMOJO_FUSED_DECODE`` (default on)."""
    flag = getattr(stream, "fused_decode", None)
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV, "1") != "0"


def _arr(t: Tensor | None):
    return None if t is None else t.detach().contiguous().numpy()


def _norm(prefix: str, ln, out: dict) -> None:
    out[f"{prefix}_w"] = _arr(ln.weight)
    out[f"{prefix}_b"] = _arr(ln.bias)
    out[f"{prefix}_eps"] = float(ln.eps)


def _lin(prefix: str, lin, out: dict) -> None:
    out[f"{prefix}_w"] = _arr(lin.weight)
    out[f"{prefix}_b"] = _arr(lin.bias)


def _layer_spec(blk) -> dict:
    layer = blk.mixer
    spec: dict = {
        "window": layer.window,
        "n_fading": layer.n_fading,
        "n_eidetic": layer.n_eidetic,
        "taps": layer.innovation_taps,
        "chi2": layer.innovation_metric == "chi2",
        "rate": CHI2_RATE,
        "floor": CHI2_FLOOR,
        "policy": layer.eidetic_policy,
        "threshold": layer.eidetic_threshold,
        "d_ff": blk.mlp[0].out_features,
    }
    _norm("norm1", blk.norm1, spec)
    _norm("norm2", blk.norm2, spec)
    _lin("fc1", blk.mlp[0], spec)
    _lin("fc2", blk.mlp[2], spec)
    if layer.ssm is not None:
        s = layer.ssm
        ssm = {
            "d_inner": s.d_inner,
            "d_state": s.d_state,
            "dt_rank": s.dt_rank,
            "d_conv": s.d_conv,
            "conv_w": _arr(s.conv_weight),
            "conv_b": _arr(s.conv_bias),
            "a": _arr(-torch.exp(s.A_log.detach())),  # as the Python path computes it
            "d": _arr(s.D),
        }
        _lin("in_proj", s.in_proj, ssm)
        _lin("x_proj", s.x_proj, ssm)
        _lin("dt_proj", s.dt_proj, ssm)
        _lin("out_proj", s.out_proj, ssm)
        spec["ssm"] = ssm
    if layer.attn is not None:
        a = layer.attn
        attn = {"n_heads": a.n_heads}
        _lin("qkv", a.qkv, attn)
        _lin("out_proj", a.out_proj, attn)
        spec["attn"] = attn
    return spec


class DecodePlan:
    """A model's parameters in native memory plus a stream's state views (module doc)."""

    def __init__(self, model):
        self.model = model
        self.params = list(model.parameters())
        self.key = self._key()
        w = model.embedding.weight
        self.usable = w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64)
        self.native = None
        if self.usable:
            with torch.no_grad():
                top: dict = {"embedding": _arr(w)}
                _norm("norm_f", model.norm_f, top)
                layers = [_layer_spec(blk) for blk in model.blocks]
            self.native = _core.decode.DecodePlan(
                model.vocab_size, model.config["d_model"], top, layers, w.dtype == torch.float64
            )
        self.state_id = None
        self.state_arrays: list = []

    def _key(self) -> tuple[list, list]:
        return list(map(_VERSION, self.params)), list(map(_PTR, self.params))

    def fresh(self) -> bool:
        """Whether the parameters are still the ones copied (~80 attribute reads: a few
        µs per token)."""
        v, p = self.key
        return list(map(_VERSION, self.params)) == v and list(map(_PTR, self.params)) == p

    def bind(self, state: dict[str, Tensor], n_layers: int) -> list:
        """The state arrays in the native order (cached per state dict)."""
        if self.state_id is not state:
            arrays = [state["position"].numpy(), state["logits"].numpy()]
            arrays.append(state["has_logits"].numpy())
            fdt = state["logits"].dtype
            ints = {"innov_count", "store_positions", "store_count", "mem_positions"}
            for i in range(n_layers):
                for name in _core.decode.DecodePlan.state_names():
                    t = state.get(f"layers.{i}.{name}")
                    if t is None:
                        dt = (
                            torch.int64
                            if name in ints
                            else torch.float64
                            if name == "store_scores"
                            else torch.bool
                            if name == "mem_mask"
                            else fdt
                        )
                        # A distinct empty array each (the native side borrows each).
                        arrays.append(torch.empty(0, dtype=dt).numpy())
                    else:
                        arrays.append(t.numpy())
            self.state_arrays = arrays
            self.state_id = state
        return self.state_arrays


def plan_for(stream) -> DecodePlan | None:
    """The stream's plan (rebuilt when the parameters changed), or None when the fused path
    does not apply to the model."""
    plan = getattr(stream, "_decode_plan", None)
    if plan is None or plan.model is not stream.model or not plan.fresh():
        plan = DecodePlan(stream.model)
        stream._decode_plan = plan
    return plan if plan.usable else None


def step(stream, plan: DecodePlan, tok: Tensor) -> Tensor:
    """One token per slot ``tok (batch,)`` int64 (range-checked natively, before anything
    is written) through the fused step; returns the logits ``(batch, vocab)``."""
    st = stream.state
    arrays = plan.bind(st, len(stream.model.blocks))
    plan.native.step(tok.contiguous().numpy(), arrays)
    return st["logits"].clone()
