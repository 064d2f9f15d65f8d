"""Context-parallel forwards of the layers' mixers over a sequence split along L in
contiguous shards, one per rank of a process group: the Mamba-1 mixer on the
context-parallel conv and scan, sliding-window attention on a halo of ``window - 1``
input tokens. Each function takes the module and this rank's shard ``(batch, L, d_model)``
and returns this shard's output; the module's parameters are the same on every rank and
their gradients are this rank's part (sum them over the group, as DDP does)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from .. import _validate as V
from ..layers import BMojoLayer, BMojoLM, SelectiveSSM, SlidingWindowAttention
from ._comm import agree, gather_finish, resolve
from ._eidetic import eidetic_tokens
from ._halo import before, exchange_start
from .conv import causal_conv1d_fn
from .scan import selective_scan_fn

__all__ = ["bmojo_layer", "bmojo_lm", "selective_ssm", "sliding_window_attention"]


def selective_ssm(module: SelectiveSSM, u: Tensor, *, group: Any = None) -> Tensor:
    """``module(u)`` for this rank's shard ``u`` of the sequence: the conv's halo and the
    scan's state come from the earlier shards (:func:`.causal_conv1d_fn`,
    :func:`.selective_scan_fn`)."""
    if not isinstance(module, SelectiveSSM):
        raise V.BmojoTypeError(f"module: expected a SelectiveSSM, got {type(module).__name__}")
    conv = functools.partial(causal_conv1d_fn, group=group)
    scan = functools.partial(selective_scan_fn, group=group)
    return module.forward_with(u, conv, scan)


def _lengths(group: Any, x: Any, module: Any) -> tuple[Any, int, int, list[dict[str, Any]], bool]:
    """Check this rank's shard ``x (batch, L, d_model)`` and agree with the other ranks on
    batch, dtype and everyone's length: ``(group, rank, world, metas, grad)``, ``grad``
    whether any rank builds a graph (then every rank's exchange is differentiated: its
    backward is a collective every rank must reach)."""
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
    return group, rank, world, metas, any(m["grad"] for m in metas)


def _halo_start(x: Tensor, h: int, group: Any, rank: int, world: int,
                grad: bool) -> tuple[Any, ...]:  # fmt: skip
    """Starts gathering the last ``h`` positions of every rank's ``x (batch, L, d)``."""
    return exchange_start(x.transpose(1, 2), h, None, group, rank, world, grad)


def _halo_finish(started: tuple[Any, ...], n: int, h: int, metas: list[dict[str, Any]],
                 group: Any, rank: int) -> Tensor:  # fmt: skip
    """The ``n ≤ h`` positions of the sequence just before this rank's shard,
    ``(batch, n, d)``, from a :func:`_halo_start` (every rank passes the same ``h``, its
    largest ``n``)."""
    parts = gather_finish(started, group, rank)
    halo, _ = before(parts, [m["length"] for m in metas], rank, h, fill=False)
    return halo[..., halo.shape[-1] - n :].transpose(1, 2)


def _halo(x: Tensor, n: int, h: int, metas: list[dict[str, Any]], group: Any, rank: int,
          world: int, grad: bool) -> Tensor:  # fmt: skip
    """:func:`_halo_finish` of :func:`_halo_start` at once."""
    return _halo_finish(_halo_start(x, h, group, rank, world, grad), n, h, metas, group, rank)


def bmojo_layer(module: BMojoLayer, u: Tensor, *, group: Any = None) -> Tensor:
    """``module(u)`` for this rank's shard ``u (batch, L, d_model)`` of the sequence: the
    SSM over shards (:func:`selective_ssm`), and the attention over
    ``[the earlier tokens back to a chunk boundary, the shard]`` so that its chunks, and
    the fading tokens each chunk reads, are the whole sequence's (a halo of the inputs and
    of the SSM outputs of up to ``window · ceil(max(window, n_fading) / window) + window
    - 1`` positions); the eidetic store each chunk reads is passed from rank to rank and
    its tokens are gathered from their owners (:mod:`._eidetic`)."""
    if not isinstance(module, BMojoLayer):
        raise V.BmojoTypeError(f"module: expected a BMojoLayer, got {type(module).__name__}")
    if module.attn is None:
        return selective_ssm(module.ssm, u, group=group)
    if module.ssm is None:
        return sliding_window_attention(module.attn, u, group=group)
    group, rank, world, metas, grad = _lengths(group, u, module)
    w, mf = module.window, module.n_fading
    back = w * math.ceil(max(w, mf) / w)  # whole chunks, enough for every fading token
    start = sum(m["length"] for m in metas[:rank])
    n = start - max(0, start // w * w - back)  # back to a chunk boundary
    h = back + w - 1
    u_halo = _halo_start(u, h, group, rank, world, grad)  # travels while the SSM runs
    y = selective_ssm(module.ssm, u, group=group)
    u_ext = torch.cat([_halo_finish(u_halo, n, h, metas, group, rank), u], dim=1)
    y_ext = None
    if mf:
        y_ext = torch.cat([_halo(y, n, h, metas, group, rank, world, grad), y], dim=1)
    eid = None
    if module.n_eidetic:
        eid = eidetic_tokens(module, u, y, start, start - n, n + u.shape[1], group, rank, world,
                             grad)  # fmt: skip
    mem = module.memory(u_ext, y_ext, eidetic=eid)
    return module.attn(u_ext, *(mem if mem is not None else (None, None)))[:, n:]


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
    group, rank, world, metas, grad = _lengths(group, x, module)
    h = module.window - 1
    if h == 0:
        return module(x)
    n = min(h, sum(m["length"] for m in metas[:rank]))
    out = module(torch.cat([_halo(x, n, h, metas, group, rank, world, grad), x], dim=1))
    return out[:, n:]


def bmojo_lm(model: BMojoLM, tokens: Tensor, label_mask: Tensor | None = None, *,
             group: Any = None) -> Tensor:  # fmt: skip
    """``model(tokens, label_mask)`` for this rank's shard ``tokens (batch, L)`` of the
    sequences: every block's mixer over shards (:func:`bmojo_layer`), the rest (embedding,
    norms, MLPs, head) position by position. Returns this shard's logits. The parameters'
    gradients are this rank's part: sum them over the group (DDP over the same group does)."""
    if not isinstance(model, BMojoLM):
        raise V.BmojoTypeError(f"model: expected a BMojoLM, got {type(model).__name__}")
    return model.forward_with(tokens, functools.partial(bmojo_layer, group=group), label_mask)
