"""Context-parallel forwards of the layers' mixers over a sequence split along L in
contiguous shards, one per rank of a process group: the Mamba-1 mixer on the
context-parallel conv and scan, sliding-window attention on a halo of ``window - 1``
input tokens. Each function takes the module and this rank's shard ``(batch, L, d_model)``
and returns this shard's output; the module's parameters are the same on every rank and
their gradients are this rank's part (sum them over the group, as DDP does)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .. import _validate as V
from ..layers import SelectiveSSM, SlidingWindowAttention
from ._comm import agree, resolve
from ._halo import before, exchange
from .conv import causal_conv1d_fn
from .scan import selective_scan_fn

__all__ = ["selective_ssm", "sliding_window_attention"]


def selective_ssm(module: SelectiveSSM, u: Tensor, *, group: Any = None) -> Tensor:
    """``module(u)`` for this rank's shard ``u`` of the sequence: the conv's halo and the
    scan's state come from the earlier shards (:func:`.causal_conv1d_fn`,
    :func:`.selective_scan_fn`)."""
    if not isinstance(module, SelectiveSSM):
        raise V.BmojoTypeError(f"module: expected a SelectiveSSM, got {type(module).__name__}")
    conv = functools.partial(causal_conv1d_fn, group=group)
    scan = functools.partial(selective_scan_fn, group=group)
    return module.forward_with(u, conv, scan)


def sliding_window_attention(module: SlidingWindowAttention, x: Tensor, *,
                             group: Any = None) -> Tensor:  # fmt: skip
    """``module(x)`` (no memory tokens) for this rank's shard ``x (batch, L, d_model)``:
    each rank attends over ``[the window - 1 tokens before its shard, its shard]`` (the
    window is relative to each query, so where the chunks fall does not matter) and
    keeps its own positions' outputs."""
    if not isinstance(module, SlidingWindowAttention):
        raise V.BmojoTypeError(
            f"module: expected a SlidingWindowAttention, got {type(module).__name__}"
        )
    group, rank, world = resolve(group)
    err: BaseException | None = None
    meta: dict[str, Any] = {}
    try:
        V.tensor("x", x)
        V.shape("x", x, (None, None, module.d_model), "(batch, L, d_model)")
        trains = x.requires_grad or any(p.requires_grad for p in module.parameters())
        meta = {"shape": x.shape[0], "length": x.shape[1], "dtype": str(x.dtype),
                "grad": torch.is_grad_enabled() and trains}  # fmt: skip
    except Exception as exc:  # every rank must hear of it before any waits on a collective
        err = exc
    metas = agree(group, err, meta)
    for r, m in enumerate(metas):
        if (m["shape"], m["dtype"]) != (metas[0]["shape"], metas[0]["dtype"]):
            raise V.BmojoValueError(
                f"x: expected the same batch and dtype on every rank, got "
                f"{(metas[0]['shape'], metas[0]['dtype'])} on rank 0 and "
                f"{(m['shape'], m['dtype'])} on rank {r}"
            )
    h = module.window - 1
    if h == 0:
        return module(x)
    grad = any(m["grad"] for m in metas)
    parts = exchange(x.transpose(1, 2), h, None, group, rank, world, grad)
    halo, _ = before(parts, [m["length"] for m in metas], rank, h, fill=False)
    n = halo.shape[-1]
    out = module(torch.cat([halo.transpose(1, 2), x], dim=1))
    return out[:, n:]
