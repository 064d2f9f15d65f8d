"""Causal depthwise convolution (nilpotent shift state, design §3): drop-ins for the
``causal-conv1d`` package's ``causal_conv1d_fn`` and ``causal_conv1d_update``, any width.

``y_t[d] = bias[d] + Σ_{i<K} weight[d, K-1-i] · x_{t-i}[d]`` (inputs before the start are
zero or come from ``initial_states``), then an optional SiLU. The state of the streaming
form is the window of the last inputs (a shift register; with ``cache_seqlens`` a ring
buffer).

Ops: ``bmojo::causal_conv1d_fwd`` (with autograd), ``bmojo::causal_conv1d_bwd``,
``bmojo::causal_conv1d_update`` (mutates ``conv_state``). ``causal_conv1d_update`` hands
plain contiguous tensors straight to the Rust kernel (which checks every shape and
validates everything before writing); anything else takes the validating op path.

Every op also has a CUDA kernel (``cuda/conv.cu``): CUDA tensors in, CUDA tensors out, the
same semantics; the weight / bias gradients are reduced in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate as V
from ..runtime import cuda as _cuda
from ..runtime import launch as CU
from ._library import custom_op
from ._native import array, core, eager_no_grad, inout, view, view_opt

# CUDA kernels (cuda/conv.cu): element-wise forward / backward, weight-gradient partials
# reduced in chunk order, and the update (one thread per row and channel).
_K_FWD = _cuda.declare("conv.cu", "causal_conv1d_fwd")
_K_FINAL = _cuda.declare("conv.cu", "causal_conv1d_final")
_K_DPRE = _cuda.declare("conv.cu", "causal_conv1d_dpre")
_K_DX = _cuda.declare("conv.cu", "causal_conv1d_dx")
_K_DINIT = _cuda.declare("conv.cu", "causal_conv1d_dinit")
_K_DW_PART = _cuda.declare("conv.cu", "causal_conv1d_dw_part")
_K_DW_REDUCE = _cuda.declare("conv.cu", "causal_conv1d_dw_reduce")
_K_UPDATE = _cuda.declare("conv.cu", "causal_conv1d_update")
_DW_CHUNK = 4096  # (batch, time) elements per weight-gradient partial (a fixed cut)


def silu_flag(activation) -> bool:
    if activation is None:
        return False
    if isinstance(activation, str) and activation in ("silu", "swish"):
        return True
    raise V.BmojoValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")


# ----------------------------------------------------------------------------- ops


@custom_op("bmojo::causal_conv1d_fwd", mutates_args=(), device_types="cpu")
def causal_conv1d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seq_idx: Tensor | None,
    initial_states: Tensor | None,
    silu: bool,
) -> tuple[Tensor, Tensor]:
    """Normalised forward: x (B, D, L), weight (D, K), bias (D,), initial_states
    (B, D, K-1) all float32 or all float64; seq_idx (B, L) int64. Returns (out,
    final_states)."""
    return _fwd_cpu(x, weight, bias, seq_idx, initial_states, silu)


def _fwd_cpu(x, weight, bias, seq_idx, initial_states, silu, final: bool = True):
    """The CPU kernel; the final states only if ``final`` (else None)."""
    b, d, length = x.shape
    out = x.new_empty(b, d, length)
    fin = x.new_empty(b, d, weight.shape[1] - 1) if final else None
    core.conv.causal_conv1d_fwd(
        view(x), view(weight), view_opt(bias), view_opt(seq_idx),
        view_opt(initial_states), silu, array(out), None if fin is None else array(fin),
    )  # fmt: skip
    return out, fin


@causal_conv1d_fwd.register_kernel("cuda")
def _(x, weight, bias, seq_idx, initial_states, silu):
    b, d, length = x.shape
    k = weight.shape[1]
    out = x.new_empty(b, d, length)
    fin = x.new_empty(b, d, k - 1)
    sfx, dev = CU.suffix(x), x.device
    if out.numel():
        _K_FWD.launch(
            sfx, grid=CU.grid1(out.numel()), block=(CU.BLOCK, 1, 1),
            args=(x, weight, CU.ptr(bias), CU.ptr(seq_idx), CU.ptr(initial_states), out,
                  b, d, length, k, int(silu)),
            fmt="pppppp" "iiiii", device=dev,
        )  # fmt: skip
    if fin.numel():
        _K_FINAL.launch(
            sfx, grid=CU.grid1(fin.numel()), block=(CU.BLOCK, 1, 1),
            args=(x, CU.ptr(initial_states), fin, b, d, length, k), fmt="ppp" "iiii",
            device=dev,
        )  # fmt: skip
    return out, fin


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, silu):
    b, d, length = x.shape
    return x.new_empty(b, d, length), x.new_empty(b, d, weight.shape[1] - 1)


@custom_op("bmojo::causal_conv1d_bwd", mutates_args=(), device_types="cpu")
def causal_conv1d_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    seq_idx: Tensor | None,
    initial_states: Tensor | None,
    dout: Tensor,
    dfinal_states: Tensor | None,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias, dinitial_states) of `causal_conv1d_fwd`; the
    pre-activation is recomputed, not stored. dinitial_states is empty without
    initial_states. Deterministic (weight/bias gradients are reduced in a fixed order)."""
    b, d, _ = x.shape
    k = weight.shape[1]
    dx, dw, db = torch.empty_like(x), torch.empty_like(weight), x.new_empty(d)
    di = x.new_empty(b, d, k - 1) if initial_states is not None else x.new_empty(0)
    core.conv.causal_conv1d_bwd(
        view(x), view(weight), view_opt(bias), view_opt(seq_idx),
        view_opt(initial_states), view(dout), view_opt(dfinal_states), silu, array(dx),
        array(dw), array(db), None if initial_states is None else array(di),
    )  # fmt: skip
    return dx, dw, db, di


@causal_conv1d_bwd.register_kernel("cuda")
def _(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu):
    b, d, length = x.shape
    k = weight.shape[1]
    sfx, dev, blk = CU.suffix(x), x.device, (CU.BLOCK, 1, 1)
    dims = (b, d, length, k)
    dx, dw, db = torch.empty_like(x), torch.empty_like(weight), x.new_empty(d)
    di = x.new_empty(b, d, k - 1) if initial_states is not None else x.new_empty(0)
    n = x.numel()
    if silu and n:
        dpre = torch.empty_like(x)
        _K_DPRE.launch(
            sfx, grid=CU.grid1(n), block=blk,
            args=(x, weight, CU.ptr(bias), CU.ptr(seq_idx), CU.ptr(initial_states), dout, dpre,
                  *dims),
            fmt="ppppppp" "iiii", device=dev,
        )  # fmt: skip
    else:
        dpre = dout
    if n:
        _K_DX.launch(
            sfx, grid=CU.grid1(n), block=blk,
            args=(weight, CU.ptr(seq_idx), dpre, CU.ptr(dfinal_states), dx, *dims),
            fmt="ppppp" "iiii", device=dev,
        )  # fmt: skip
    if di.numel():
        _K_DINIT.launch(
            sfx, grid=CU.grid1(di.numel()), block=blk,
            args=(weight, dpre, CU.ptr(dfinal_states), di, *dims), fmt="pppp" "iiii", device=dev,
        )  # fmt: skip
    # Weight / bias gradients: partials over fixed chunks of (batch, time), then summed in
    # chunk order (deterministic; the cut depends on the shape only).
    rows = b * length
    chunk = max(_DW_CHUNK, -(-rows // 65535))
    nch = -(-rows // chunk) if rows else 0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = x.new_empty(max(nch, 1) * d * (k + 1), dtype=acc)
    if nch and d:
        _K_DW_PART.launch(
            sfx, grid=(d, nch, 1), block=blk,
            args=(x, CU.ptr(seq_idx), CU.ptr(initial_states), dpre, part, *dims, chunk),
            fmt="ppppp" "iiii" "l", device=dev,
        )  # fmt: skip
    if d:
        _K_DW_REDUCE.launch(
            sfx, grid=CU.grid1(d * (k + 1)), block=blk, args=(part, dw, db, d, k, nch),
            fmt="ppp" "iii", device=dev,
        )  # fmt: skip
    return dx, dw, db, di


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu):
    b, d, _ = x.shape
    k = weight.shape[1]
    di = x.new_empty(b, d, k - 1) if initial_states is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), x.new_empty(d), di


def _setup(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, silu = inputs
    ctx.silu = silu
    ctx.present = (bias is not None, initial_states is not None)
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)


def _backward(ctx, dout, dfinal):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    dx, dw, db, di = torch.ops.bmojo.causal_conv1d_bwd(
        x, weight, bias, seq_idx, initial_states, dout.contiguous(),
        None if dfinal is None else dfinal.contiguous(), ctx.silu,
    )  # fmt: skip
    has_bias, has_init = ctx.present
    return dx, dw, (db if has_bias else None), None, (di if has_init else None), None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup)


@custom_op("bmojo::causal_conv1d_update", mutates_args=("conv_state",), device_types="cpu")
def causal_conv1d_update_op(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    silu: bool,
    cache_seqlens: Tensor | None,
    conv_state_indices: Tensor | None,
) -> Tensor:
    """Normalised update: x (B, D, T), conv_state (slots, D, S) contiguous, weight (D, K),
    bias (D,) in one float dtype; cache_seqlens / conv_state_indices (B,) int64.
    Updates conv_state in place and returns out (B, D, T)."""
    out = x.new_empty(x.shape)
    core.conv.causal_conv1d_update(
        view(x), inout(conv_state), view(weight),
        view_opt(bias), silu, view_opt(cache_seqlens), view_opt(conv_state_indices), array(out),
    )  # fmt: skip
    return out


@causal_conv1d_update_op.register_kernel("cuda")
def _(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices):
    b, d, ntok = x.shape
    k = weight.shape[1]
    out = x.new_empty(x.shape)
    if b * d:
        _K_UPDATE.launch(
            CU.suffix(x), grid=CU.grid1(b * d), block=(CU.BLOCK, 1, 1),
            args=(x, conv_state, weight, CU.ptr(bias), int(silu), CU.ptr(cache_seqlens),
                  CU.ptr(conv_state_indices), out, b, d, ntok, k, conv_state.shape[2],
                  conv_state.shape[0]),
            fmt="pppp" "i" "ppp" "iiiiii", device=x.device,
        )  # fmt: skip
    return out


@causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------- public


def check_args(x, weight, bias, seq_idx, initial_states) -> tuple[int, int, int, int]:
    """The checks of :func:`causal_conv1d_fn`'s tensors (also run on each shard by the
    context-parallel op); returns ``(batch, dim, L, K)``."""
    V.device_tensor("x", x)
    V.shape("x", x, (None, None, None), "(batch, dim, L)")
    b, d, length = x.shape
    V.device_tensor("weight", weight)
    V.shape("weight", weight, (d, None), "(dim, K)")
    k = weight.shape[1]
    if k < 1:
        raise V.BmojoValueError("weight: the width K must be >= 1, got 0")
    if bias is not None:
        V.device_tensor("bias", bias)
        V.shape("bias", bias, (d,), "(dim,)")
    if seq_idx is not None:
        V.device_tensor("seq_idx", seq_idx, dtypes=V.INTS)
        V.shape("seq_idx", seq_idx, (b, length), "(batch, L)")
    if initial_states is not None:
        V.device_tensor("initial_states", initial_states)
        V.shape("initial_states", initial_states, (b, d, k - 1), "(batch, dim, K-1)")
    if seq_idx is not None and initial_states is not None:
        raise V.BmojoValueError(
            "seq_idx: cannot be combined with initial_states (as in causal-conv1d)"
        )
    return b, d, length, k


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: Tensor | None = None,
    activation: str | None = None,
):
    """Causal depthwise convolution, a drop-in for ``causal_conv1d.causal_conv1d_fn``
    (any width K ≥ 1).

    ``x`` ``(batch, dim, L)``; ``weight`` ``(dim, K)``; ``bias`` ``(dim,)``; ``seq_idx``
    ``(batch, L)`` int32/int64 (packed sequences: taps never reach across a change of
    ``seq_idx``; not combinable with ``initial_states``); ``initial_states``
    ``(batch, dim, K-1)``, the inputs before ``x``, oldest first; ``activation`` None,
    ``"silu"`` or ``"swish"``.

    Returns ``out`` (x's shape and dtype), or ``(out, final_states)`` with
    ``final_states`` ``(batch, dim, K-1)`` the last K-1 inputs (initial ones included when
    L < K-1), written into ``final_states_out`` if given. Differentiable in ``x``,
    ``weight``, ``bias`` and ``initial_states``, also through ``final_states``.
    """
    silu = silu_flag(activation)
    b, d, length, k = check_args(x, weight, bias, seq_idx, initial_states)
    if final_states_out is not None:
        if not return_final_states:
            raise V.BmojoValueError("final_states_out: only valid with return_final_states=True")
        V.device_tensor("final_states_out", final_states_out)
        V.shape("final_states_out", final_states_out, (b, d, k - 1), "(batch, dim, K-1)")
        V.writable("final_states_out", final_states_out, {})  # copied into after the op
    V.same_device(
        {"x": x, "weight": weight, "bias": bias, "seq_idx": seq_idx,
         "initial_states": initial_states, "final_states_out": final_states_out}, "x",
    )  # fmt: skip
    cdt = V.compute_dtype(
        {"x": x, "weight": weight, "bias": bias, "initial_states": initial_states}, "x"
    )
    args = (
        x.to(cdt).contiguous(),
        weight.to(cdt).contiguous(),
        V.as_compute(bias, cdt),
        None if seq_idx is None else seq_idx.to(torch.int64).contiguous(),
        V.as_compute(initial_states, cdt),
        silu,
    )
    named = {"x": x, "weight": weight, "bias": bias, "initial_states": initial_states}
    if not x.is_cuda and eager_no_grad(named):
        # Nothing to differentiate, plain CPU tensors: the kernel directly (the dispatcher
        # and the autograd wrapper cost more than a short convolution).
        out, fin = _fwd_cpu(*args, final=return_final_states)
    else:
        out, fin = torch.ops.bmojo.causal_conv1d_fwd(*args)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    fin = fin.to(x.dtype)
    if final_states_out is not None:
        final_states_out.copy_(fin)
        fin = final_states_out
    return out, fin


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: Tensor | None = None,
    conv_state_indices: Tensor | None = None,
) -> Tensor:
    """Streaming step(s), a drop-in for ``causal_conv1d.causal_conv1d_update``; updates
    ``conv_state`` in place and returns the output (x's shape and dtype).

    ``x`` ``(batch, dim)`` or ``(batch, dim, T)`` (T tokens); ``conv_state``
    ``(batch, dim, S)`` with S ≥ K-1 (or a pool ``(slots, dim, S)`` with
    ``conv_state_indices``); ``weight`` ``(dim, K)``; ``bias`` ``(dim,)``.

    Without ``cache_seqlens`` the state is a shift buffer (newest input last). With
    ``cache_seqlens`` ``(batch,)`` int it is a circular buffer: the window is read ending
    just before index ``cache_seqlens % S`` and x is written from there on.
    ``conv_state_indices`` ``(batch,)`` int: row i uses slot ``conv_state_indices[i]``; a
    negative index is a padding row (output zero, nothing written). Bad input raises a
    ``BmojoError`` before anything is written.
    """
    silu = silu_flag(activation)
    if not torch.compiler.is_compiling() and not getattr(x, "is_cuda", False):
        # Decode path: plain contiguous CPU tensors of one float dtype go straight to the
        # kernel, which checks every shape and validates slots before writing. On any
        # mismatch the validating path below raises a clear error or converts.
        # (Tensor.numpy, not _native.array: 0.45 µs less per argument, which a decode step
        # feels; its never-resizable mark on these inference tensors is the price.)
        try:
            out = core.conv.causal_conv1d_update(
                x.numpy(), conv_state.numpy(), weight.numpy(),
                None if bias is None else bias.numpy(), silu,
                None if cache_seqlens is None else cache_seqlens.numpy(),
                None if conv_state_indices is None else conv_state_indices.numpy(), None,
            )  # fmt: skip
            return torch.from_numpy(out)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            pass
    V.device_tensor("x", x)
    if x.dim() not in (2, 3):
        raise V.BmojoValueError(
            f"x: expected shape (batch, dim) or (batch, dim, T), got {tuple(x.shape)}"
        )
    b, d = x.shape[:2]
    ntok = x.shape[2] if x.dim() == 3 else 1
    V.device_tensor("conv_state", conv_state)
    V.shape("conv_state", conv_state, (None, d, None), "(batch, dim, state_len)")
    V.device_tensor("weight", weight)
    V.shape("weight", weight, (d, None), "(dim, K)")
    k = weight.shape[1]
    if k < 1:
        raise V.BmojoValueError("weight: the width K must be >= 1, got 0")
    s = conv_state.shape[2]
    if s < k - 1:
        raise V.BmojoValueError(f"conv_state: the state length {s} must be >= K-1 = {k - 1}")
    if bias is not None:
        V.device_tensor("bias", bias)
        V.shape("bias", bias, (d,), "(dim,)")
    for name, t in (("cache_seqlens", cache_seqlens), ("conv_state_indices", conv_state_indices)):
        if t is not None:
            V.device_tensor(name, t, dtypes=V.INTS)
            V.shape(name, t, (b,), "(batch,)")
    if conv_state_indices is None and conv_state.shape[0] != b:
        raise V.BmojoValueError(
            f"conv_state: expected {b} slots (one per batch row) without conv_state_indices, "
            f"got {conv_state.shape[0]}"
        )
    reads = {"x": x, "weight": weight, "bias": bias, "cache_seqlens": cache_seqlens,
             "conv_state_indices": conv_state_indices}  # fmt: skip
    V.writable("conv_state", conv_state, reads)
    if not conv_state.is_contiguous():
        raise V.BmojoValueError("conv_state: expected a contiguous tensor (it is updated in place)")
    V.same_device(
        {"x": x, "conv_state": conv_state, "weight": weight, "bias": bias,
         "cache_seqlens": cache_seqlens, "conv_state_indices": conv_state_indices}, "x",
    )  # fmt: skip
    if (
        conv_state_indices is not None
        and not torch.compiler.is_compiling()
        and not (x.is_cuda and CU.capturing())
    ):
        # Checked again by the CPU kernel (the CUDA kernel treats an out-of-range slot as
        # padding; duplicates are only caught here: under graph capture the caller owns it).
        used = conv_state_indices[conv_state_indices >= 0]
        if used.numel() and int(used.max()) >= conv_state.shape[0]:
            raise V.BmojoValueError(
                f"conv_state_indices: entry {int(used.max())} is out of range for a pool of "
                f"{conv_state.shape[0]} slots"
            )
        if used.unique().numel() != used.numel():
            raise V.BmojoValueError(
                "conv_state_indices: a slot appears twice (rows would overwrite each other)"
            )
    cdt = V.compute_dtype({"x": x, "conv_state": conv_state, "weight": weight, "bias": bias}, "x")
    st = conv_state if conv_state.dtype == cdt else conv_state.to(cdt)
    with torch.no_grad():
        out = torch.ops.bmojo.causal_conv1d_update(
            x.to(cdt).reshape(b, d, ntok).contiguous(),
            st,
            weight.to(cdt).contiguous(),
            V.as_compute(bias, cdt),
            silu,
            None if cache_seqlens is None else cache_seqlens.to(torch.int64).contiguous(),
            None if conv_state_indices is None else conv_state_indices.to(torch.int64).contiguous(),
        )
        if st is not conv_state:
            conv_state.copy_(st)
    return out.reshape(x.shape).to(x.dtype)
