"""Streaming (token-by-token) step of the selective SSM, a drop-in for mamba_ssm's
``selective_state_update``, plus the multi-token form.

The public function validates its arguments, then calls the Rust kernel directly when it
runs eagerly on plain CPU tensors: the torch dispatcher costs several microseconds per
call, more than the step itself at decode sizes. Under ``torch.compile`` or another
tracing mode it goes through the registered op ``bmojo::selective_state_update``
instead. The step is inference-only (it updates ``state`` in place); train with
``selective_scan_fn``.

CUDA tensors run the kernel of ``cuda/step.cu`` (same semantics), with the same kind of
fast path: plain contiguous tensors in the state's dtype (float32/float64) and the
``(slots, dim, N)`` layout go straight to the launcher after a few shape checks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate as V
from ..runtime import cuda as _cuda
from ..runtime import launch as CU
from ._library import custom_op
from ._native import core, inout, view, view_opt
from .ssd import tied_head_update

_K_STEP = _cuda.declare("step.cu", "selective_state_update")
_STEP_NT = 128  # threads per block: one per channel


def _run(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, slots, snaps, out) -> None:
    """Kernel call on normalised tensors. The kernel validates everything (slot range,
    duplicate slots) before writing and raises BmojoValueError."""
    core.step.selective_state_update(
        inout(state), view(x), view(dt), view(A), view(B), view(C),
        view_opt(D), view_opt(z), view_opt(dt_bias), dt_softplus, view_opt(slots), inout(out),
        None if snaps is None else inout(snaps),
    )  # fmt: skip


@custom_op(
    "bmojo::selective_state_update",
    mutates_args=("state", "intermediate_states"),
    device_types="cpu",
)
def selective_state_update_op(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    state_batch_indices: Tensor | None,
    intermediate_states: Tensor | None,
) -> Tensor:
    """Normalised step: state (slots, dim, N) contiguous float32/float64, x/dt/z
    (batch, T, dim), B/C (batch, T, G, N), A (dim, N), D/dt_bias (dim,), indices int64,
    intermediate_states (batch, T, dim, N), all in the state's dtype. Returns out
    (batch, T, dim)."""
    out = x.new_empty(x.shape)
    _run(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
         intermediate_states, out)  # fmt: skip
    return out


def _launch(state, x, dt, A, B, C, D, z, dt_bias, softplus, slots, snaps, out, ntok, groups):
    """The kernel launch on contiguous tensors of one dtype whose shapes the caller has
    checked (x/dt/z/out hold (batch, ntok, dim) values, B/C (batch, ntok, groups, N))."""
    nslot, dim, n = state.shape
    batch = x.shape[0]
    if batch > CU.MAX_GRID_Y:
        raise V.BmojoValueError(f"x: at most {CU.MAX_GRID_Y} batch rows on CUDA, got {batch}")
    if batch == 0 or ntok == 0 or dim == 0:
        return
    _K_STEP.launch(
        CU.suffix(state), ((dim + _STEP_NT - 1) // _STEP_NT, batch, 1), (_STEP_NT, 1, 1),
        (state, x, dt, A, B, C, D, z, dt_bias, slots, out, snaps, batch, ntok, dim, n, groups,
         softplus, nslot),
        "pppppppppppp" "iiiiii" "l", 0, state.device,
    )  # fmt: skip


def _run_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, slots, snaps, out) -> None:
    """CUDA kernel call on normalised contiguous tensors of one dtype (shapes checked by
    the caller). Slots past the pool are never dereferenced (their output is NaN)."""
    _launch(state, x, dt, A, B, C, CU.ptr(D), CU.ptr(z), CU.ptr(dt_bias), int(dt_softplus),
            CU.ptr(slots), CU.ptr(snaps), out, x.shape[1], B.shape[2])  # fmt: skip


@selective_state_update_op.register_kernel("cuda")
def _step_cuda(
    state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, intermediate_states
):
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
             "intermediate_states": intermediate_states}  # fmt: skip
    for name, t in named.items():
        if t is not None and t.dtype != state.dtype:
            raise V.BmojoTypeError(
                f"{name}: the CUDA kernel expects dtype {V.dtype_name(state.dtype)} like state, "
                f"got {V.dtype_name(t.dtype)}"
            )
    if not state.is_contiguous() or (
        intermediate_states is not None and not intermediate_states.is_contiguous()
    ):
        raise V.BmojoValueError(
            "state/intermediate_states: the CUDA kernel updates contiguous tensors"
        )
    x, dt, A, B, C, D, z, dt_bias = (
        None if t is None else t.contiguous() for t in (x, dt, A, B, C, D, z, dt_bias)
    )
    slots = (
        None if state_batch_indices is None else state_batch_indices.to(torch.int64).contiguous()
    )
    out = x.new_empty(x.shape)
    _run_cuda(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, slots, intermediate_states, out)
    return out


def _cuda_fast(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """The CUDA decode path: plain contiguous tensors of the state's dtype on its device,
    in the (batch, dim, N) layout, one token, no state_batch_indices. Returns None (the
    validating path takes over) on anything else. Shapes, dtypes and devices are checked
    exactly here, as cheaply as possible (the launch takes raw pointers; the call must
    stay within a few microseconds)."""
    if type(state) is not Tensor or state.dim() != 3 or type(x) is not Tensor or x.dim() != 2:
        return None
    nslot, dim, n = state.shape
    batch = x.shape[0]
    dtype = state.dtype
    if nslot != batch or (dtype is not torch.float32 and dtype is not torch.float64):
        return None
    if type(B) is not Tensor:
        return None
    if B.dim() == 2:
        groups, bc = 1, (batch, n)
    else:
        groups = B.shape[1] if B.dim() == 3 else 0
        if groups == 0 or dim % groups:
            return None
        bc = (batch, groups, n)
    dev = state.get_device()
    xs = (batch, dim)
    for t, shp in ((x, xs), (dt, xs), (A, (dim, n)), (B, bc), (C, bc)):
        if (
            type(t) is not Tensor or t.dtype is not dtype or t.shape != shp
            or t.get_device() != dev or not t.is_contiguous()
        ):  # fmt: skip
            return None
    for t, shp in ((z, xs), (D, (dim,)), (dt_bias, (dim,))):  # optional
        if t is not None and (
            type(t) is not Tensor or t.dtype is not dtype or t.shape != shp
            or t.get_device() != dev or not t.is_contiguous()
        ):  # fmt: skip
            return None
    if not state.is_contiguous():
        return None
    out = torch.empty(xs, dtype=dtype, device=state.device)
    _launch(state, x, dt, A, B, C, 0 if D is None else D, 0 if z is None else z,
            0 if dt_bias is None else dt_bias, 1 if dt_softplus else 0, 0, 0, out, 1,
            groups)  # fmt: skip
    return out


@selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, intermediate_states):
    return x.new_empty(x.shape)


def _plain(ts) -> bool:
    """True when every tensor is an ordinary eager tensor (not fake, functional, ...)."""
    return all(t is None or type(t) is Tensor for t in ts)


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: Tensor | None = None,
    *,
    intermediate_states: Tensor | None = None,
) -> Tensor:
    """One (or several) decoding steps, updating ``state`` in place; returns the output.

    Layouts (mamba_ssm's): ``state`` ``(slots, dim, N)`` or heads ``(slots, H, P, N)``;
    ``x``, ``dt``, ``z`` ``(batch, dim)`` / ``(batch, H, P)``; ``A`` ``(dim, N)`` /
    ``(H, P, N)``; ``B``, ``C`` ``(batch, N)`` or grouped ``(batch, G, N)``; ``D``,
    ``dt_bias`` ``(dim,)`` / ``(H, P)``. Multi-token form: ``x``, ``dt``, ``z`` get a time
    axis after the batch (``(batch, T, dim)`` / ``(batch, T, H, P)``) and ``B``/``C``
    become ``(batch, T, N)`` / ``(batch, T, G, N)``; then ``intermediate_states``
    ``(batch, T, *state.shape[1:])`` may receive the state after every token (for
    speculative-decoding rollback).

    Row ``i`` reads and writes slot ``state_batch_indices[i]`` (default ``i``); a negative
    index marks a padding row (output zero, nothing written). Bad input raises a
    ``BmojoError`` before anything is written, so a failed call leaves ``state`` as it was.
    """
    if (
        intermediate_states is None
        and state_batch_indices is None  # indices are checked (a host sync) on the slow path
        and isinstance(state, Tensor)
        and state.is_cuda
        and not torch.compiler.is_compiling()
    ):
        out = _cuda_fast(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        if out is not None:
            return out
    elif intermediate_states is None and not torch.compiler.is_compiling():
        if state_batch_indices is None:
            # Mamba-2's layout (one decay per head, expanded with zero strides): the
            # per-head step on views, without materialising A over (P, N).
            out = tied_head_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
            if out is not None:
                return out
        # The decode path: plain contiguous CPU tensors already in the state's dtype, in
        # the (slots, dim, N) layout. The kernel checks every shape exactly and validates
        # everything before writing; on any mismatch (or a tensor NumPy cannot view) the
        # validating path below takes over and raises a clear error or converts.
        # (Tensor.numpy, not _native.array: 0.45 µs less per argument, which a decode step
        # feels; its never-resizable mark on these inference tensors is the price.)
        try:
            out = core.step.selective_state_update(
                state.numpy(), x.numpy(), dt.numpy(), A.numpy(), B.numpy(), C.numpy(),
                None if D is None else D.numpy(), None if z is None else z.numpy(),
                None if dt_bias is None else dt_bias.numpy(), bool(dt_softplus),
                None if state_batch_indices is None else state_batch_indices.numpy(),
                None, None,
            )  # fmt: skip
            return torch.from_numpy(out)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            pass
    V.device_tensor("state", state)
    V.device_tensor("x", x)
    heads = state.dim() == 4
    if state.dim() not in (3, 4):
        raise V.BmojoValueError(
            f"state: expected shape (slots, dim, N) or (slots, H, P, N), got {tuple(state.shape)}"
        )
    inner = tuple(state.shape[1:-1])  # (dim,) or (H, P)
    n = state.shape[-1]
    multi = x.dim() == state.dim()
    desc_t = "(batch, T, " if multi else "(batch, "
    tok_shape = (None, None, *inner) if multi else (None, *inner)
    V.shape("x", x, tok_shape, desc_t + ("H, P)" if heads else "dim)"))
    batch = x.shape[0]
    ntok = x.shape[1] if multi else 1
    lead = (batch, ntok) if multi else (batch,)
    xs = (*lead, *inner)
    V.device_tensor("dt", dt)
    V.shape("dt", dt, xs, "like x")
    V.device_tensor("A", A)
    V.shape("A", A, (*inner, n), "(" + ("H, P" if heads else "dim") + ", N)")
    for name, m in (("B", B), ("C", C)):
        V.device_tensor(name, m)
        if m.dim() == len(lead) + 1:
            V.shape(name, m, (*lead, n), desc_t + "N)")
        else:
            V.shape(name, m, (*lead, None, n), desc_t + "G, N)")
    groups = 1 if B.dim() == len(lead) + 1 else B.shape[-2]
    groups_c = 1 if C.dim() == len(lead) + 1 else C.shape[-2]
    dim = 1
    for s in inner:
        dim *= s
    if groups_c != groups:
        raise V.BmojoValueError(f"C: expected {groups} groups like B, got {groups_c}")
    if groups == 0 or (inner[0] if heads else dim) % groups:
        raise V.BmojoValueError(
            f"B: the number of groups {groups} must divide {'H' if heads else 'dim'}"
        )
    for name, t, shp in (("D", D, inner), ("z", z, xs), ("dt_bias", dt_bias, inner)):
        if t is not None:
            V.device_tensor(name, t)
            V.shape(name, t, shp, "like x" if name == "z" else str(inner))
    slots = state_batch_indices
    if slots is None and state.shape[0] != batch:
        raise V.BmojoValueError(
            f"state: expected {batch} slots (one per batch row) without state_batch_indices, "
            f"got {state.shape[0]}"
        )
    if slots is not None:
        V.device_tensor("state_batch_indices", slots, dtypes=V.INTS)
        V.shape("state_batch_indices", slots, (batch,), "(batch,)")
    if (
        slots is not None
        and not torch.compiler.is_compiling()
        and not (state.is_cuda and CU.capturing())
    ):
        # Checked again by the CPU kernel; here for the clear message (data-dependent, so
        # not while tracing or capturing a CUDA graph).
        used = slots[slots >= 0]
        if used.numel() and int(used.max()) >= state.shape[0]:
            raise V.BmojoValueError(
                f"state_batch_indices: entry {int(used.max())} is out of range for a state pool "
                f"of {state.shape[0]} slots"
            )
        if used.unique().numel() != used.numel():
            raise V.BmojoValueError(
                "state_batch_indices: a slot appears twice (rows would overwrite each other)"
            )
    if intermediate_states is not None:
        V.device_tensor("intermediate_states", intermediate_states)
        V.shape(
            "intermediate_states", intermediate_states, (batch, ntok, *state.shape[1:]),
            "(batch, T, *state.shape[1:])",
        )  # fmt: skip
    named = {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z,
             "dt_bias": dt_bias, "intermediate_states": intermediate_states}  # fmt: skip
    V.same_device({**named, "state_batch_indices": slots}, "state")
    reads = {k: t for k, t in named.items() if k not in ("state", "intermediate_states")}
    reads["state_batch_indices"] = slots
    V.writable("state", state, {**reads, "intermediate_states": intermediate_states})
    if intermediate_states is not None:
        V.writable("intermediate_states", intermediate_states, reads)
    cdt = V.compute_dtype(named, "state")

    def flat(t: Tensor | None, shp) -> Tensor | None:
        return None if t is None else t.to(cdt).reshape(shp).contiguous()

    xk = flat(x, (batch, ntok, dim))
    args = (
        xk,
        flat(dt, (batch, ntok, dim)),
        flat(A, (dim, n)),
        flat(B, (batch, ntok, groups, n)),
        flat(C, (batch, ntok, groups, n)),
        flat(D, (dim,)),
        flat(z, (batch, ntok, dim)),
        flat(dt_bias, (dim,)),
        bool(dt_softplus),
        None if slots is None else slots.to(torch.int64).contiguous(),
    )
    # The kernel updates a contiguous compute-dtype state; copy back only if we made one.
    direct = state.dtype == cdt and state.is_contiguous()
    st = state.view(state.shape[0], dim, n) if direct else flat(state, (state.shape[0], dim, n))
    snaps = None
    if intermediate_states is not None:
        direct_s = intermediate_states.dtype == cdt and intermediate_states.is_contiguous()
        snaps = (
            intermediate_states.view(batch, ntok, dim, n)
            if direct_s
            else flat(intermediate_states, (batch, ntok, dim, n))
        )
    if not torch.compiler.is_compiling() and _plain((st, snaps, *args[:8], args[9])):
        out = xk.new_empty(xk.shape)
        with torch.no_grad():
            run = _run_cuda if st.is_cuda else _run
            run(st, *args[:8], args[8], args[9], snaps, out)
    else:
        out = torch.ops.bmojo.selective_state_update(st, *args, snaps)
    if not direct:
        state.copy_(st.reshape(state.shape))
    if snaps is not None and snaps.data_ptr() != intermediate_states.data_ptr():
        intermediate_states.copy_(snaps.reshape(intermediate_states.shape))
    return out.reshape(x.shape).to(x.dtype)
