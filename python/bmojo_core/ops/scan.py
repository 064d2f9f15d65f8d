"""Diagonal and selective scans as torch custom ops with autograd.

Layering: the public functions (`diag_scan`, `selective_scan_fn`) validate and normalise
their arguments (dtype, contiguity, B/C layout) and call the ops in the ``bmojo``
namespace. Each op has a CPU kernel (the Rust core), a fake implementation for tracing
and `torch.compile`, and, for the forwards, an autograd formula whose backward is itself
an op. Every op has a CPU kernel (Rust) and a CUDA kernel (``cuda/scan.cu``, compiled
by NVRTC on first use, registered with ``register_kernel(..., "cuda")``) with the same
outputs. On CUDA the selective scan keeps float16/bfloat16 activations in their dtype
(the kernels accumulate in float32); parameters and states are float32 there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _validate as V
from ..runtime import cuda as _cuda
from ..runtime import launch as CU
from ._library import custom_op
from ._native import array, core, eager_no_grad, view, view_opt

CHUNK: int = core.scan.CHECKPOINT_CHUNK

# CUDA kernels (cuda/scan.cu): one block of _NT threads per (batch row, channel [block]).
_K_DIAG = _cuda.declare("scan.cu", "diag_scan")
_K_SEL_FWD = _cuda.declare("scan.cu", "selective_scan_fwd")
_K_SEL_BWD = _cuda.declare("scan.cu", "selective_scan_bwd")
_NT = 128
_SEL_BWD_CB = 16  # most channels per backward block with a variable B/C
# Dynamic shared memory available without opting in: 48 KiB less the kernels' static
# buffers (the forward stages three tiles, about 13 KiB; the backward under 1 KiB).
_SMEM_FWD = 35 * 1024
_SMEM = 47 * 1024
_HALF = (torch.float16, torch.bfloat16)


def _want(name: str, t: Tensor | None, dtype: torch.dtype) -> None:
    """Dtype contract of a CUDA op kernel (the public wrappers always satisfy it)."""
    if t is not None and t.dtype != dtype:
        raise V.BmojoTypeError(
            f"{name}: the CUDA kernel expects dtype {V.dtype_name(dtype)}, got "
            f"{V.dtype_name(t.dtype)}"
        )


def _n_chunks(length):
    return (length + CHUNK - 1) // CHUNK


# ----------------------------------------------------------------------------- diagonal


@custom_op("bmojo::diag_scan_fwd", mutates_args=(), device_types="cpu")
def diag_scan_fwd(
    a: Tensor, b: Tensor, initial_state: Tensor | None, reverse: bool
) -> tuple[Tensor, Tensor]:
    """a, b: (lanes, L) float32/float64; initial_state (lanes,). Returns (h, last)."""
    a, b = a.contiguous(), b.contiguous()
    h = torch.empty_like(b)
    last = b.new_empty(b.shape[0])
    core.scan.diag_scan(view(a), view(b), view_opt(initial_state), array(h), array(last), reverse)
    return h, last


def _diag_cuda(a, b, h0, h, last, reverse) -> None:
    """h, last <- scan of contiguous (lanes, L) a, b on the GPU (one block per lane)."""
    lanes, length = b.shape
    for name, t in (("a", a), ("initial_state", h0)):
        _want(name, t, b.dtype)
    if lanes == 0:
        return
    _K_DIAG.launch(
        CU.suffix(b), grid=(lanes, 1, 1), block=(_NT, 1, 1),
        args=(a, b, CU.ptr(h0), h, last, length, int(reverse)), fmt="ppppp" "li",
        device=b.device,
    )  # fmt: skip


@diag_scan_fwd.register_kernel("cuda")
def _diag_fwd_cuda(a, b, initial_state, reverse):
    a, b = a.contiguous(), b.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    h = torch.empty_like(b)
    last = b.new_empty(b.shape[0])
    _diag_cuda(a, b, h0, h, last, reverse)
    return h, last


@diag_scan_fwd.register_fake
def _(a, b, initial_state, reverse):
    return torch.empty_like(b), b.new_empty(b.shape[0])


@custom_op("bmojo::diag_scan_bwd", mutates_args=(), device_types="cpu")
def diag_scan_bwd(
    a: Tensor,
    h: Tensor,
    initial_state: Tensor | None,
    dh: Tensor,
    dlast: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (da, db, dinitial_state) of `diag_scan_fwd`.

    The adjoint G of a forward scan obeys G_t = dh_t + a_{t+1} G_{t+1}, a reverse scan
    with the coefficients shifted by one step (and vice versa for a reverse scan); then
    db = G, da_t = G_t h_prev(t) and dinitial_state = a_first G_first.
    """
    return _diag_bwd(a, h, initial_state, dh, dlast, reverse, False)


def _diag_bwd(a, h, initial_state, dh, dlast, reverse, gpu):
    """The backward formula; its adjoint scan runs on the CUDA kernel if `gpu`."""
    lanes, length = a.shape
    h0 = a.new_zeros(lanes) if initial_state is None else initial_state
    if length == 0:
        g0 = dlast if dlast is not None else torch.zeros_like(h0)
        return torch.empty_like(a), torch.empty_like(a), g0.clone()
    one = a.new_ones(lanes, 1)
    dh = dh.contiguous()
    if not reverse:
        shifted = torch.cat([a[:, 1:], one], dim=1)
        prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)
        first = 0
    else:
        shifted = torch.cat([one, a[:, :-1]], dim=1)
        prev = torch.cat([h[:, 1:], h0[:, None]], dim=1)
        first = length - 1
    g = torch.empty_like(dh)
    g_end = dh.new_empty(lanes)
    if gpu:
        dl = None if dlast is None else dlast.contiguous()
        _diag_cuda(shifted.contiguous(), dh, dl, g, g_end, not reverse)
    else:
        core.scan.diag_scan(
            view(shifted), view(dh), view_opt(dlast), array(g), array(g_end), not reverse
        )
    return g * prev, g, a[:, first] * g[:, first]


@diag_scan_bwd.register_kernel("cuda")
def _diag_bwd_cuda(a, h, initial_state, dh, dlast, reverse):
    return _diag_bwd(a.contiguous(), h, initial_state, dh.contiguous(), dlast, reverse, True)


@diag_scan_bwd.register_fake
def _(a, h, initial_state, dh, dlast, reverse):
    return torch.empty_like(a), torch.empty_like(a), a.new_empty(a.shape[0])


def _diag_setup(ctx, inputs, output):
    a, b, initial_state, reverse = inputs
    ctx.reverse = reverse
    ctx.has_init = initial_state is not None
    ctx.save_for_backward(a, output[0], initial_state)


def _diag_backward(ctx, dh, dlast):
    a, h, initial_state = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(h)
    da, db, dh0 = torch.ops.bmojo.diag_scan_bwd(a, h, initial_state, dh, dlast, ctx.reverse)
    return da, db, (dh0 if ctx.has_init else None), None


diag_scan_fwd.register_autograd(_diag_backward, setup_context=_diag_setup)


def diag_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Tensor | None = None,
    reverse: bool = False,
    return_last_state: bool = False,
):
    """First-order diagonal scan over independent lanes (design §2.1).

    ``h_t = a_t * h_{t-1} + b_t`` along the last axis (``h_0 = initial_state``); with
    ``reverse=True``, ``h_t = a_t * h_{t+1} + b_t`` from the end. ``a`` and ``b`` have
    shape ``(..., L)``; ``initial_state`` ``(...)``. Returns ``h`` (shape of ``b``, dtype
    of ``b``), plus the state after the last step consumed if ``return_last_state``.
    Differentiable in ``a``, ``b`` and ``initial_state``.
    """
    V.device_tensor("a", a)
    V.device_tensor("b", b)
    if b.dim() < 1:
        raise V.BmojoValueError(
            f"b: expected shape (..., L) with at least 1 dimension, got {tuple(b.shape)}"
        )
    V.shape("a", a, tuple(b.shape), "(the shape of b)")
    lead = tuple(b.shape[:-1])
    if initial_state is not None:
        V.device_tensor("initial_state", initial_state)
        V.shape("initial_state", initial_state, lead, "(b's shape without the last axis)")
    V.same_device({"b": b, "a": a, "initial_state": initial_state}, "b")
    cdt = V.compute_dtype({"b": b, "a": a, "initial_state": initial_state}, "b")
    length = b.shape[-1]
    lanes = math.prod(lead)  # explicit: reshape(-1, 0) is ambiguous when L == 0
    a2 = a.to(cdt).reshape(lanes, length).contiguous()
    b2 = b.to(cdt).reshape(lanes, length).contiguous()
    h0 = None if initial_state is None else initial_state.to(cdt).reshape(-1).contiguous()
    h, last = torch.ops.bmojo.diag_scan_fwd(a2, b2, h0, bool(reverse))
    h = h.reshape(b.shape).to(b.dtype)
    if return_last_state:
        return h, last.reshape(lead)
    return h


# ----------------------------------------------------------------------------- selective


@custom_op("bmojo::selective_scan_fwd", mutates_args=(), device_types="cpu")
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    seq_idx: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised selective scan: every float input in one dtype (float32/float64), B and
    C either (dim, N) or (batch, G, N, L), seq_idx int64. Returns (out, last_state,
    checkpoints); the checkpoints (states before every CHUNK-step chunk) feed the
    backward. On CUDA, u/delta/z and a variable B/C may also be float16/bfloat16 (one
    dtype); the rest (A, D, delta_bias, initial_state, a constant B/C) is then float32,
    the dtype of last_state and the checkpoints."""
    return _sel_fwd_cpu(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                        delta_softplus)  # fmt: skip


def _sel_fwd_cpu(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus):
    """The CPU kernel on normalised tensors (see :func:`selective_scan_fwd`)."""
    batch, dim, length = u.shape
    n = A.shape[1]
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = A.new_empty(batch, dim, n)
    ckpt = A.new_empty(batch, dim, _n_chunks(length), n)
    core.scan.selective_scan_fwd(
        view(u), view(delta), view(A), view(B), view(C), view_opt(D), view_opt(z),
        view_opt(delta_bias), view_opt(initial_state), view_opt(seq_idx), delta_softplus,
        array(out), array(last), array(ckpt),
    )  # fmt: skip
    return out, last, ckpt


def _sel_cuda_check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, extra=()):
    """Dtype contract of the CUDA selective-scan kernels: activations (u, delta, z, a
    variable B/C, `extra`) in u's dtype, the rest in the compute dtype (A's)."""
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    for name, t in (("delta", delta), ("z", z), *extra):
        _want(name, t, u.dtype)
    for name, t in (
        ("A", A),
        ("D", D),
        ("delta_bias", delta_bias),
        ("initial_state", initial_state),
    ):
        _want(name, t, cdt)
    for name, t in (("B", B), ("C", C)):
        _want(name, t, u.dtype if t.dim() == 4 else cdt)
    if seq_idx is not None:
        _want("seq_idx", seq_idx, torch.int64)
    if u.shape[0] > CU.MAX_GRID_Y:
        raise V.BmojoValueError(f"u: at most {CU.MAX_GRID_Y} batch rows on CUDA, got {u.shape[0]}")
    return cdt


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


@selective_scan_fwd.register_kernel("cuda")
def _sel_fwd_cuda(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus):
    _sel_cuda_check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx = map(
        _c, (u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    )
    batch, dim, length = u.shape
    n = A.shape[1]
    nck = _n_chunks(length)
    out = torch.empty_like(u)
    last = A.new_empty(batch, dim, n)
    ckpt = A.new_empty(batch, dim, nck, n)
    smem = n * A.element_size()
    if smem > _SMEM_FWD:
        raise V.BmojoValueError(f"A: N = {n} is too large for the CUDA kernel")
    if batch and dim:
        _K_SEL_FWD.launch(
            CU.suffix(u), grid=(dim, batch, 1), block=(_NT, 1, 1),
            args=(u, delta, A, B, C, CU.ptr(D), CU.ptr(z), CU.ptr(delta_bias),
                  CU.ptr(initial_state), CU.ptr(seq_idx), out, last, ckpt, dim, length, n,
                  B.shape[1] if B.dim() == 4 else 0, C.shape[1] if C.dim() == 4 else 0,
                  int(delta_softplus), CHUNK, nck),
            fmt="p" * 13 + "i" * 8, shared_mem=smem, device=u.device,
        )  # fmt: skip
    return out, last, ckpt


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus):
    batch, dim, length = u.shape
    n = A.shape[1]
    return (
        u.new_empty(batch, dim, length),
        A.new_empty(batch, dim, n),
        A.new_empty(batch, dim, _n_chunks(length), n),
    )


@custom_op("bmojo::selective_scan_bwd", mutates_args=(), device_types="cpu")
def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    seq_idx: Tensor | None,
    delta_softplus: bool,
    checkpoints: Tensor,
    dout: Tensor,
    dlast_state: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); those of
    absent optional inputs are empty tensors. Deterministic."""
    batch, dim, length = u.shape
    n = A.shape[1]
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA, dB, dC = torch.empty_like(A), torch.empty_like(B), torch.empty_like(C)
    dh0 = A.new_empty(batch, dim, n)
    dD = torch.empty_like(D) if D is not None else u.new_empty(0)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dbias = torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty(0)
    core.scan.selective_scan_bwd(
        view(u), view(delta), view(A), view(B), view(C), view_opt(D), view_opt(z),
        view_opt(delta_bias), None, view_opt(seq_idx), delta_softplus, view(checkpoints),
        view(dout), view_opt(dlast_state), array(du), array(ddelta), array(dA),
        array(dB), array(dC), None if D is None else array(dD),
        None if z is None else array(dz), None if delta_bias is None else array(dbias),
        array(dh0),
    )  # fmt: skip
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0


def _channels_per_block(dim: int, n: int, esize: int, mats) -> int:
    """Channels per backward block: 1 unless B or C varies (then a block sums its
    channels' dB/dC partials): the largest divisor of every varying matrix's group size
    that is <= _SEL_BWD_CB and fits the shared memory."""
    size = 0
    for m in mats:
        if m.dim() == 4:
            size = math.gcd(size, dim // m.shape[1])
    best = 1
    for cb in range(1, min(size, _SEL_BWD_CB) + 1):
        if size % cb == 0 and (4 * n + 2) * cb * esize <= _SMEM:
            best = cb
    return best


@selective_scan_bwd.register_kernel("cuda")
def _sel_bwd_cuda(
    u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, checkpoints, dout, dlast
):
    cdt = _sel_cuda_check(
        u, delta, A, B, C, D, z, delta_bias, None, seq_idx,
        extra=(("dout", dout),),
    )  # fmt: skip
    _want("checkpoints", checkpoints, cdt)
    _want("dlast_state", dlast, cdt)
    u, delta, A, B, C, D, z, delta_bias, seq_idx, checkpoints, dout, dlast = map(
        _c, (u, delta, A, B, C, D, z, delta_bias, seq_idx, checkpoints, dout, dlast)
    )
    batch, dim, length = u.shape
    n = A.shape[1]
    cb = _channels_per_block(dim, n, A.element_size(), (B, C))
    smem = (4 * n + 2) * cb * A.element_size()
    if smem > _SMEM:
        raise V.BmojoValueError(f"A: N = {n} is too large for the CUDA kernel")
    nblk = dim // cb if dim else 0
    du, ddelta, dh0 = torch.empty_like(u), torch.empty_like(u), A.new_empty(batch, dim, n)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    # Per-block partials in the compute dtype (the kernel writes every entry), summed
    # below in a fixed order: reproducible, no atomics.
    pA, pD, pbias = A.new_empty(batch, dim, n), A.new_empty(batch, dim), A.new_empty(batch, dim)

    def part(m):
        return A.new_empty(batch, nblk, n, length) if m.dim() == 4 else A.new_empty(batch, dim, n)

    pB, pC = part(B), part(C)
    if batch and dim:
        _K_SEL_BWD.launch(
            CU.suffix(u), grid=(nblk, batch, 1), block=(_NT, 1, 1),
            args=(u, delta, A, B, C, CU.ptr(D), CU.ptr(z), CU.ptr(delta_bias), CU.ptr(seq_idx),
                  checkpoints, dout, CU.ptr(dlast), du, ddelta, dz if z is not None else 0, dh0,
                  pA, pB, pC, pD, pbias, dim, length, n,
                  B.shape[1] if B.dim() == 4 else 0, C.shape[1] if C.dim() == 4 else 0,
                  int(delta_softplus), CHUNK, _n_chunks(length), cb),
            fmt="p" * 21 + "i" * 9, shared_mem=smem, device=u.device,
        )  # fmt: skip
    elif dlast is not None:
        dh0.copy_(dlast)
    else:
        dh0.zero_()

    def reduce(p, m):
        if m.dim() == 4:
            g = m.shape[1]
            return p.view(batch, g, nblk // g, n, length).sum(2).to(m.dtype)
        return p.sum(0)

    dD = pD.sum(0) if D is not None else u.new_empty(0)
    dbias = pbias.sum(0) if delta_bias is not None else u.new_empty(0)
    return du, ddelta, pA.sum(0), reduce(pB, B), reduce(pC, C), dD, dz, dbias, dh0


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, checkpoints, dout, dlast):
    batch, dim, _ = u.shape
    return (
        torch.empty_like(u),
        torch.empty_like(u),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        u.new_empty(0) if D is None else torch.empty_like(D),
        u.new_empty(0) if z is None else torch.empty_like(z),
        u.new_empty(0) if delta_bias is None else torch.empty_like(delta_bias),
        A.new_empty(batch, dim, A.shape[1]),
    )


def _sel_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus = inputs
    ctx.delta_softplus = delta_softplus
    ctx.present = (D is not None, z is not None, delta_bias is not None, initial_state is not None)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, output[2])


def _sel_backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = torch.ops.bmojo.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, seq_idx, ctx.delta_softplus, ckpt,
        dout.contiguous(), None if dlast is None else dlast.contiguous(),
    )  # fmt: skip
    has_d, has_z, has_bias, has_h0 = ctx.present
    return (
        du, ddelta, dA, dB, dC,
        dD if has_d else None,
        dz if has_z else None,
        dbias if has_bias else None,
        dh0 if has_h0 else None,
        None, None,
    )  # fmt: skip


selective_scan_fwd.register_autograd(_sel_backward, setup_context=_sel_setup)


def _one_step(u, delta, A, B, C, D, z, delta_bias, h0, softplus, cdt):
    """A length-1 scan as one step of the decode kernel (CPU, no gradient)."""
    c = V.as_compute
    batch, dim, _ = u.shape
    n = A.shape[1]
    last = c(h0, cdt).clone() if h0 is not None else u.new_zeros(batch, dim, n, dtype=cdt)

    def col(t):  # the one position of a (..., 1) tensor
        return None if t is None else c(t[..., 0], cdt)

    out = core.step.selective_state_update(
        array(last), view(col(u)), view(col(delta)), view(c(A, cdt)), view(col(B)),
        view(col(C)), view_opt(c(D, cdt)), view_opt(col(z)), view_opt(c(delta_bias, cdt)),
        softplus, None, None, None,
    )  # fmt: skip
    return torch.from_numpy(out)[..., None], last


def _check_bc(name: str, t: Tensor, batch: int, dim: int, n: int, length: int) -> Tensor:
    """B/C: (dim, N) constant, (batch, N, L) variable or (batch, G, N, L) grouped;
    returns the kernel layout ((dim, N) or (batch, G, N, L))."""
    if t.is_complex():
        raise V.BmojoTypeError(f"{name}: complex B/C are not supported")
    if t.dim() == 2:
        V.shape(name, t, (dim, n), "(dim, N) for a constant matrix")
        return t
    if t.dim() == 3:
        V.shape(name, t, (batch, n, length), "(batch, N, L) for a variable matrix")
        return t.unsqueeze(1)
    if t.dim() == 4:
        V.shape(name, t, (batch, None, n, length), "(batch, G, N, L) for a grouped matrix")
        groups = t.shape[1]
        if groups == 0 or dim % groups != 0:
            raise V.BmojoValueError(f"{name}: the number of groups {groups} must divide dim {dim}")
        return t
    raise V.BmojoValueError(
        f"{name}: expected shape (dim, N), (batch, N, L) or (batch, G, N, L), got {tuple(t.shape)}"
    )


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
):
    """Mamba-1 selective scan, a drop-in for ``mamba_ssm``'s ``selective_scan_fn``.

    Shapes: ``u``, ``delta``, ``z`` ``(batch, dim, L)``; ``A`` ``(dim, N)``; ``B``/``C``
    ``(dim, N)``, ``(batch, N, L)`` or ``(batch, G, N, L)``; ``D``, ``delta_bias``
    ``(dim,)``; ``initial_state`` ``(batch, dim, N)``; ``seq_idx`` ``(batch, L)`` integer
    (the state resets wherever it changes: packed sequences).

    ``Δ = softplus(delta + delta_bias)`` (identity above 20) if ``delta_softplus``;
    ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``; ``y_t = C_t·h_t + D u_t``;
    ``out = y * silu(z)`` if ``z`` is given.

    Returns ``out`` (dtype of ``u``), or ``(out, last_state)`` with ``last_state``
    ``(batch, dim, N)`` in the compute dtype (float64 for float64 inputs, else float32).
    Differentiable in every tensor input and through ``last_state``.
    """
    Bk, Ck, cdt = check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    batch, dim, length = u.shape
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
             "delta_bias": delta_bias, "initial_state": initial_state}  # fmt: skip
    c = V.as_compute
    if not u.is_cuda and eager_no_grad(named):
        # Nothing to differentiate, plain CPU tensors: the kernel directly. The dispatcher
        # and the autograd wrapper cost more than a short scan (~150 µs at L = 1).
        sq = None if seq_idx is None else seq_idx.to(torch.int64).contiguous()
        if length == 1 and Bk.dim() == 4 and Ck.dim() == 4 and Bk.shape[1] == Ck.shape[1]:
            # One position is one decoding step from the initial state: the step kernel
            # has none of the scan's per-block set-up (chunk buffers, transposes).
            out, last = _one_step(u, delta, A, Bk, Ck, D, z, delta_bias, initial_state,
                                  bool(delta_softplus), cdt)  # fmt: skip
            out = out.to(u.dtype)
            return (out, last) if return_last_state else out
        out, last, _ = _sel_fwd_cpu(
            c(u, cdt), c(delta, cdt), c(A, cdt), c(Bk, cdt), c(Ck, cdt), c(D, cdt), c(z, cdt),
            c(delta_bias, cdt), c(initial_state, cdt), sq, bool(delta_softplus),
        )  # fmt: skip
        out = out.to(u.dtype)
        return (out, last) if return_last_state else out
    # The CUDA kernels read float16/bfloat16 activations as they are (half the traffic);
    # the CPU kernels take everything in the compute dtype.
    act = u.dtype if u.is_cuda and u.dtype in _HALF else cdt
    out, last, _ = torch.ops.bmojo.selective_scan_fwd(
        c(u, act), c(delta, act), c(A, cdt), c(Bk, act if Bk.dim() == 4 else cdt),
        c(Ck, act if Ck.dim() == 4 else cdt), c(D, cdt), c(z, act), c(delta_bias, cdt),
        c(initial_state, cdt),
        None if seq_idx is None else seq_idx.to(torch.int64).contiguous(),
        bool(delta_softplus),
    )  # fmt: skip
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


def check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
    """The argument checks of :func:`selective_scan_fn` (also run by its context-parallel
    version before the ranks exchange anything); returns B and C in the kernel layout and
    the compute dtype."""
    V.device_tensor("u", u)
    if u.dim() != 3:
        raise V.BmojoValueError(f"u: expected shape (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    V.device_tensor("delta", delta)
    V.shape("delta", delta, (batch, dim, length), "(batch, dim, L) like u")
    if isinstance(A, Tensor) and A.is_complex():
        raise V.BmojoTypeError("A: complex A is not supported yet; pass a real (dim, N) tensor")
    V.device_tensor("A", A)
    if A.dim() != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise V.BmojoValueError(f"A: expected shape ({dim}, N) with N >= 1, got {tuple(A.shape)}")
    n = A.shape[1]
    if isinstance(B, Tensor) and B.is_complex() or isinstance(C, Tensor) and C.is_complex():
        raise V.BmojoTypeError("B/C: complex matrices are not supported")
    V.device_tensor("B", B)
    V.device_tensor("C", C)
    Bk = _check_bc("B", B, batch, dim, n, length)
    Ck = _check_bc("C", C, batch, dim, n, length)
    for name, t, shp, desc in (
        ("D", D, (dim,), "(dim,)"),
        ("z", z, (batch, dim, length), "(batch, dim, L) like u"),
        ("delta_bias", delta_bias, (dim,), "(dim,)"),
        ("initial_state", initial_state, (batch, dim, n), "(batch, dim, N)"),
    ):
        if t is not None:
            V.device_tensor(name, t)
            V.shape(name, t, shp, desc)
    if seq_idx is not None:
        V.device_tensor("seq_idx", seq_idx, dtypes=V.INTS)
        V.shape("seq_idx", seq_idx, (batch, length), "(batch, L)")
    # Activations share u's dtype; parameters and the state may also be float32 (as in
    # mamba_ssm, where they stay float32 under autocast).
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            want, got = V.dtype_name(u.dtype), V.dtype_name(t.dtype)
            raise V.BmojoTypeError(f"{name}: expected dtype {want} like u, got {got}")
    params = (("A", A), ("D", D), ("delta_bias", delta_bias), ("initial_state", initial_state))
    for name, t in params:
        if t is not None and t.dtype not in (u.dtype, torch.float32):
            want, got = V.dtype_name(u.dtype), V.dtype_name(t.dtype)
            raise V.BmojoTypeError(f"{name}: expected dtype {want} (like u) or float32, got {got}")
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
             "delta_bias": delta_bias, "initial_state": initial_state}  # fmt: skip
    V.same_device({**named, "seq_idx": seq_idx}, "u")
    cdt = V.compute_dtype(named, "u")
    return Bk, Ck, cdt
