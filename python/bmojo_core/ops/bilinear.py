"""Bilinear and time-varying dense scans, design §5.

``x_t = A_t x_{t-1} + B u_t``, ``y_t = C x_t + D u_t`` with a dense state of size
``n <= 64`` and ``A_t`` either modulated, ``A_t = A0 + Σ_j v_{t,j} N_j`` (bilinear;
``N = None`` is the LTI case), or given per step ``A (batch, L, n, n)``.

The recurrence ``X_t = A_t X_{t-1} + b_t`` and its adjoint run in Rust (ops
``bmojo::bilinear_scan_fwd/bwd`` for the modulated form, ``bmojo::bilinear_tv_scan_fwd/bwd``
for per-step matrices); ``b_t = B u_t`` and the read-out are torch ops around them. The
ops have CUDA kernels (``cuda/bilinear.cu``; ``method`` only matters on the CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate as V
from ..runtime import cuda as _cuda
from ..runtime import launch as CU
from ..runtime.settings import get_num_threads
from ._library import custom_op
from ._native import array, core, view, view_opt

# CUDA kernels (cuda/bilinear.cu): one block per batch row, sequential in time, the n×n
# mat-vec spread over the threads; the backward's matrix gradients and dv are parallel
# kernels over (λ_t, X_{t-1}) afterwards, dA0/dN summed over fixed chunks in order.
_K_FWD = _cuda.declare("bilinear.cu", "bilinear_scan_fwd")
_K_BWD = _cuda.declare("bilinear.cu", "bilinear_scan_bwd")
_K_REDUCE = _cuda.declare("bilinear.cu", "bilinear_reduce")
_K_DA_STEP = _cuda.declare("bilinear.cu", "bilinear_dA_step")
_K_DV = _cuda.declare("bilinear.cu", "bilinear_dv")
_K_DMAT = _cuda.declare("bilinear.cu", "bilinear_dmat_part")
_THREADS = 64  # = MAX_STATE: thread i owns state component i
_DMAT_CHUNK = 1024  # (batch, time) steps per dA0/dN partial (a fixed cut)

MAX_STATE: int = core.bilinear.MAX_STATE
PAR_CHUNK: int = core.bilinear.PAR_CHUNK
METHODS = ("auto", "sequential", "parallel")


# ----------------------------------------------------------------------------- CUDA


def _cuda_state_size(n: int) -> None:
    if not 1 <= n <= MAX_STATE:  # one thread per state component, _THREADS of them
        raise V.BmojoValueError(f"A: state size n must be in 1..{MAX_STATE}, got {n}")


def _cuda_fwd(b, A, per_step, N, v, initial_state):
    batch, length, n = b.shape
    _cuda_state_size(n)
    m = 0 if per_step else N.shape[0]
    xs = torch.empty_like(b, memory_format=torch.contiguous_format)
    last = b.new_empty(batch, n)
    if batch:
        _K_FWD.launch(
            CU.suffix(b), grid=(batch, 1, 1), block=(_THREADS, 1, 1),
            args=(b, A, int(per_step), CU.ptr(N), CU.ptr(v), CU.ptr(initial_state), xs, last,
                  length, n, m),
            fmt="ppipppppiii", device=b.device,
        )  # fmt: skip
    return xs, last


def _cuda_bwd(A, per_step, N, v, initial_state, xs, dxs, dlast):
    batch, length, n = xs.shape
    _cuda_state_size(n)
    m = 0 if per_step else N.shape[0]
    db = torch.empty_like(xs)  # = λ, the adjoint of every state
    dA = torch.empty_like(A)
    dN = None if per_step else torch.empty_like(N)
    dv = None if per_step else torch.empty_like(v)
    dh0 = xs.new_empty(batch, n)
    sfx, dev, blk = CU.suffix(xs), xs.device, (CU.BLOCK, 1, 1)
    h0 = CU.ptr(initial_state)
    if batch:
        _K_BWD.launch(
            sfx, grid=(batch, 1, 1), block=(_THREADS, 1, 1),
            args=(A, int(per_step), CU.ptr(N), CU.ptr(v), dxs, CU.ptr(dlast), db, dh0, length,
                  n, m),
            fmt="pipppppp" "iii", device=dev,
        )  # fmt: skip
    if per_step:
        if dA.numel():
            _K_DA_STEP.launch(
                sfx, grid=CU.grid1(dA.numel()), block=blk,
                args=(xs, h0, db, dA, batch, length, n), fmt="pppp" "iii", device=dev,
            )  # fmt: skip
        return db, dA, dN, dv, dh0
    if dv.numel():
        _K_DV.launch(
            sfx, grid=CU.grid1(dv.numel()), block=blk,
            args=(N, xs, h0, db, dv, batch, length, n, m), fmt="ppppp" "iiii", device=dev,
        )  # fmt: skip
    # [dA0; dN]: partials over fixed chunks of (batch, time), summed in chunk order.
    per = (m + 1) * n * n
    rows = batch * length
    chunk = max(_DMAT_CHUNK, -(-rows // 65535))
    nch = -(-rows // chunk) if rows else 0
    acc = torch.float64 if xs.dtype == torch.float64 else torch.float32
    part = xs.new_empty(max(nch, 1) * per, dtype=acc)
    if nch:
        _K_DMAT.launch(
            sfx, grid=(-(-per // CU.BLOCK), nch, 1), block=blk,
            args=(CU.ptr(v), xs, h0, db, part, batch, length, n, m, chunk),
            fmt="ppppp" "iiii" "l", device=dev,
        )  # fmt: skip
    for out, off in ((dA, 0), (dN, n * n)):
        if out.numel():
            _K_REDUCE.launch(
                sfx, grid=CU.grid1(out.numel()), block=blk,
                args=(part, out, nch, per, off, out.numel()), fmt="ppilll", device=dev,
            )  # fmt: skip
    return db, dA, dN, dv, dh0


# ----------------------------------------------------------------------------- modulated


@custom_op("bmojo::bilinear_scan_fwd", mutates_args=(), device_types="cpu")
def bilinear_scan_fwd(
    b: Tensor, A0: Tensor, N: Tensor, v: Tensor, initial_state: Tensor | None, parallel: bool
) -> tuple[Tensor, Tensor]:
    """``X_t = (A0 + Σ_j v_{t,j} N_j) X_{t-1} + b_t``. b (batch, L, n), A0 (n, n),
    N (m, n, n), v (batch, L, m), initial_state (batch, n); one float dtype
    (float32/float64). Returns (states (batch, L, n), final state (batch, n))."""
    xs = torch.empty_like(b, memory_format=torch.contiguous_format)
    last = b.new_empty(b.shape[0], b.shape[2])
    core.bilinear.scan_fwd(
        view(b), view(A0), view(N), view(v), view_opt(initial_state), parallel, array(xs),
        array(last),
    )  # fmt: skip
    return xs, last


@bilinear_scan_fwd.register_kernel("cuda")
def _(b, A0, N, v, initial_state, parallel):
    return _cuda_fwd(b, A0, False, N, v, initial_state)


@bilinear_scan_fwd.register_fake
def _(b, A0, N, v, initial_state, parallel):
    return torch.empty_like(b), b.new_empty(b.shape[0], b.shape[2])


@custom_op("bmojo::bilinear_scan_bwd", mutates_args=(), device_types="cpu")
def bilinear_scan_bwd(
    b: Tensor,
    A0: Tensor,
    N: Tensor,
    v: Tensor,
    initial_state: Tensor | None,
    xs: Tensor,
    dxs: Tensor,
    dlast: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (db, dA0, dN, dv, dinitial_state) of `bilinear_scan_fwd` by the adjoint
    recurrence (sequential over time, parallel over the batch, deterministic)."""
    db, dv = torch.empty_like(b), torch.empty_like(v)
    dA0, dN = torch.empty_like(A0), torch.empty_like(N)
    dh0 = b.new_empty(b.shape[0], b.shape[2])
    core.bilinear.scan_bwd(
        view(b), view(A0), view(N), view(v), view_opt(initial_state), view(xs), view(dxs),
        view_opt(dlast), array(db), array(dA0), array(dN), array(dv), array(dh0),
    )  # fmt: skip
    return db, dA0, dN, dv, dh0


@bilinear_scan_bwd.register_kernel("cuda")
def _(b, A0, N, v, initial_state, xs, dxs, dlast):
    db, dA0, dN, dv, dh0 = _cuda_bwd(A0, False, N, v, initial_state, xs, dxs, dlast)
    return db, dA0, dN, dv, dh0


@bilinear_scan_bwd.register_fake
def _(b, A0, N, v, initial_state, xs, dxs, dlast):
    return (
        torch.empty_like(b),
        torch.empty_like(A0),
        torch.empty_like(N),
        torch.empty_like(v),
        b.new_empty(b.shape[0], b.shape[2]),
    )


def _mod_setup(ctx, inputs, output):
    b, A0, N, v, initial_state, parallel = inputs
    ctx.has_init = initial_state is not None
    ctx.save_for_backward(b, A0, N, v, initial_state, output[0])


def _mod_backward(ctx, dxs, dlast):
    b, A0, N, v, initial_state, xs = ctx.saved_tensors
    if dxs is None:
        dxs = torch.zeros_like(xs)
    db, dA0, dN, dv, dh0 = torch.ops.bmojo.bilinear_scan_bwd(
        b, A0, N, v, initial_state, xs, dxs.contiguous(),
        None if dlast is None else dlast.contiguous(),
    )  # fmt: skip
    return db, dA0, dN, dv, (dh0 if ctx.has_init else None), None


bilinear_scan_fwd.register_autograd(_mod_backward, setup_context=_mod_setup)


# ----------------------------------------------------------------------------- per-step A


@custom_op("bmojo::bilinear_tv_scan_fwd", mutates_args=(), device_types="cpu")
def bilinear_tv_scan_fwd(
    b: Tensor, A: Tensor, initial_state: Tensor | None, parallel: bool
) -> tuple[Tensor, Tensor]:
    """``X_t = A_t X_{t-1} + b_t`` with A (batch, L, n, n). Returns (states, final state)."""
    xs = torch.empty_like(b, memory_format=torch.contiguous_format)
    last = b.new_empty(b.shape[0], b.shape[2])
    core.bilinear.tv_scan_fwd(
        view(b), view(A), view_opt(initial_state), parallel, array(xs), array(last)
    )
    return xs, last


@bilinear_tv_scan_fwd.register_kernel("cuda")
def _(b, A, initial_state, parallel):
    return _cuda_fwd(b, A, True, None, None, initial_state)


@bilinear_tv_scan_fwd.register_fake
def _(b, A, initial_state, parallel):
    return torch.empty_like(b), b.new_empty(b.shape[0], b.shape[2])


@custom_op("bmojo::bilinear_tv_scan_bwd", mutates_args=(), device_types="cpu")
def bilinear_tv_scan_bwd(
    b: Tensor,
    A: Tensor,
    initial_state: Tensor | None,
    xs: Tensor,
    dxs: Tensor,
    dlast: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (db, dA, dinitial_state) of `bilinear_tv_scan_fwd`."""
    db, dA = torch.empty_like(b), torch.empty_like(A)
    dh0 = b.new_empty(b.shape[0], b.shape[2])
    core.bilinear.tv_scan_bwd(
        view(b), view(A), view_opt(initial_state), view(xs), view(dxs), view_opt(dlast),
        array(db), array(dA), array(dh0),
    )  # fmt: skip
    return db, dA, dh0


@bilinear_tv_scan_bwd.register_kernel("cuda")
def _(b, A, initial_state, xs, dxs, dlast):
    db, dA, _, _, dh0 = _cuda_bwd(A, True, None, None, initial_state, xs, dxs, dlast)
    return db, dA, dh0


@bilinear_tv_scan_bwd.register_fake
def _(b, A, initial_state, xs, dxs, dlast):
    return torch.empty_like(b), torch.empty_like(A), b.new_empty(b.shape[0], b.shape[2])


def _tv_setup(ctx, inputs, output):
    b, A, initial_state, parallel = inputs
    ctx.has_init = initial_state is not None
    ctx.save_for_backward(b, A, initial_state, output[0])


def _tv_backward(ctx, dxs, dlast):
    b, A, initial_state, xs = ctx.saved_tensors
    if dxs is None:
        dxs = torch.zeros_like(xs)
    db, dA, dh0 = torch.ops.bmojo.bilinear_tv_scan_bwd(
        b, A, initial_state, xs, dxs.contiguous(),
        None if dlast is None else dlast.contiguous(),
    )  # fmt: skip
    return db, dA, (dh0 if ctx.has_init else None), None


bilinear_tv_scan_fwd.register_autograd(_tv_backward, setup_context=_tv_setup)


# ----------------------------------------------------------------------------- public API


# One-thread speedup of the parallel forward over the sequential one, by state size (f32,
# AVX-512, m = 2, batch 1 and 4, L = 1024-16384, best of 5-9 runs), rounded down.
_R1_MODULATED = {1: 3.0, 2: 3.0, 3: 3.0, 4: 2.0, 5: 1.8, 6: 1.4, 7: 1.3, 8: 1.0}
_R1_PER_STEP = {1: 2.5, 2: 2.5, 3: 1.5, 4: 1.4, 5: 1.1, 6: 1.05, 7: 0.8, 8: 0.7}
# Lanes assumed per group of chunks (AVX-512 f32), for the number of parallel tasks.
_LANES = 16


def use_parallel(batch: int, length: int, n: int, threads: int, per_step: bool = False) -> bool:
    """The ``method="auto"`` rule.

    The parallel forward runs ``W`` chunks of ``PAR_CHUNK`` steps in lockstep (one per
    SIMD lane): pass 1 builds every chunk's affine map (``n + 1`` lane states per step),
    pass 3 reruns the chunks from their true starts. This is throughput-bound where the
    sequential scan is one latency-bound chain per step, so it wins on a single thread
    at small ``n`` and loses at large ``n``, where the map's ``(n + 1) n²`` work per step
    dominates. Measured one-thread speedups ``r(n)`` (``timing_parallel_vs_sequential``
    in ``rust/kernels/tests/bilinear.rs``; f32, AVX-512, m = 2, L ≥ 1024):

    ========  ===  ===  ===  ===  ===  ====  ====  ====  ====
    n          2    3    4    5    6    7     8     16    64
    modulated  3.6  3.2  2.5  1.9  1.5  1.4   1.1   0.15  0.03
    per-step   3.3  1.5  1.7  1.1  1.1  0.85  0.75  0.15  0.06
    ========  ===  ===  ===  ===  ===  ====  ====  ====  ====

    The sequential scan uses ``min(batch, threads)`` threads (one row each), the parallel
    one up to ``batch · ceil(L / (W · PAR_CHUNK))`` lane groups (``W = 16`` assumed).
    Predicted gain ``r(n) · s(par_threads) / s(seq_threads)`` with ``s(k) = (1 + k) / 2``
    (extra threads counted at half value: two threads gave the parallel path only
    1.0-1.5× on the shared 2-core machine these figures come from); "auto" picks the
    parallel path when ``L ≥ 16 · PAR_CHUNK`` and the gain is at least 1.5. On one
    thread that is ``n ≤ 5`` (modulated) and ``n ≤ 3`` (per-step); never ``n > 8``.
    """
    if length < 16 * PAR_CHUNK or n > 8 or threads < 1:
        return False
    r1 = (_R1_PER_STEP if per_step else _R1_MODULATED)[n]
    groups = batch * -(-length // (_LANES * PAR_CHUNK))
    gain = r1 * (1 + min(threads, groups)) / (1 + min(batch, threads))
    return gain >= 1.5


def bilinear_scan(
    u: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor | None = None,
    D: Tensor | None = None,
    N: Tensor | None = None,
    v: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    method: str = "auto",
):
    """Bilinear / time-varying dense state-space scan (design §5).

    ``x_t = A_t x_{t-1} + B u_t`` and ``y_t = C x_t + D u_t`` (``x_t`` is the state
    after consuming ``u_t``; ``x_0 = initial_state``, default zero), with

    * ``A (n, n)`` and optional ``N (m, n, n)``: ``A_t = A + Σ_j v_{t,j} N_j`` where
      ``v (batch, L, m)`` defaults to ``u`` (then ``m`` must equal ``p``);
    * ``A (batch, L, n, n)``: the transition of every step (``N``/``v`` not allowed).

    Shapes: ``u (batch, L, p)``, ``B (n, p)``, ``C (q, n)``, ``D (q, p)`` (needs ``C``),
    ``initial_state (batch, n)``; ``1 <= n <= 64``. Returns ``y (batch, L, q)`` — the
    states ``(batch, L, n)`` when ``C`` is None — in ``u``'s dtype, plus the final state
    ``(batch, n)`` in the compute dtype (float64 for float64 inputs, else float32) when
    ``return_final_state``. Differentiable in every tensor input, through the final state
    too. ``method``: ``"sequential"``, ``"parallel"`` (chunked affine-map composition with the
    chunks in SIMD lanes: faster for long sequences at small ``n``, ``n <= 8``; the
    backward is sequential either way) or ``"auto"``
    (:func:`use_parallel`).
    """
    V.device_tensor("u", u)
    if u.dim() != 3:
        raise V.BmojoValueError(f"u: expected shape (batch, L, p), got {tuple(u.shape)}")
    batch, length, p = u.shape
    V.device_tensor("A", A)
    if A.dim() == 2:
        per_step = False
        n = A.shape[0]
        V.shape("A", A, (n, n), "(n, n) for a constant or modulated A")
    elif A.dim() == 4:
        per_step = True
        n = A.shape[2]
        V.shape("A", A, (batch, length, n, n), "(batch, L, n, n) for a per-step A")
    else:
        raise V.BmojoValueError(
            f"A: expected shape (n, n) or (batch, L, n, n), got {tuple(A.shape)}"
        )
    if not 1 <= n <= MAX_STATE:
        raise V.BmojoValueError(f"A: state size n must be in 1..{MAX_STATE}, got {n}")
    V.device_tensor("B", B)
    V.shape("B", B, (n, p), "(n, p)")
    if N is not None:
        if per_step:
            raise V.BmojoValueError(
                "N: only allowed with a constant A (n, n); with a per-step A (batch, L, n, n) "
                "fold the modulation into A"
            )
        V.device_tensor("N", N)
        V.shape("N", N, (None, n, n), "(m, n, n)")
        m = N.shape[0]
        if v is None:
            if m not in (p, 0):
                raise V.BmojoValueError(
                    f"v: required when N has m = {m} matrices and u has p = {p} channels "
                    "(v defaults to u only when m == p)"
                )
        else:
            V.device_tensor("v", v)
            V.shape("v", v, (batch, length, m), "(batch, L, m)")
    elif v is not None:
        raise V.BmojoValueError("v: given without N (v modulates A through N)")
    if C is not None:
        V.device_tensor("C", C)
        V.shape("C", C, (None, n), "(q, n)")
    if D is not None:
        if C is None:
            raise V.BmojoValueError("D: needs C (y = C x + D u); pass C as well")
        V.device_tensor("D", D)
        V.shape("D", D, (C.shape[0], p), "(q, p)")
    if initial_state is not None:
        V.device_tensor("initial_state", initial_state)
        V.shape("initial_state", initial_state, (batch, n), "(batch, n)")
    if not isinstance(method, str) or method not in METHODS:
        raise V.BmojoValueError(f"method: expected one of {METHODS}, got {method!r}")
    named = {"u": u, "A": A, "B": B, "C": C, "D": D, "N": N, "v": v,
             "initial_state": initial_state}  # fmt: skip
    V.same_device(named, "u")
    cdt = V.compute_dtype(named, "u")
    c = V.as_compute
    uc = c(u, cdt)
    b = torch.matmul(uc, c(B, cdt).t()).contiguous()
    h0 = c(initial_state, cdt)
    if method == "auto":
        # Under torch.compile the thread count is not traceable: stay sequential there.
        # (The CUDA kernels have one path: the flag is ignored there.)
        threads = 1 if torch.compiler.is_compiling() else get_num_threads()
        parallel = use_parallel(batch, length, n, threads, per_step)
    else:
        parallel = method == "parallel"
    if per_step:
        xs, last = torch.ops.bmojo.bilinear_tv_scan_fwd(b, c(A, cdt), h0, parallel)
    else:
        if N is None or N.shape[0] == 0:
            Nk = b.new_zeros(0, n, n) if N is None else c(N, cdt)
            vk = b.new_zeros(batch, length, 0)
        else:
            Nk = c(N, cdt)
            vk = uc if v is None else c(v, cdt)
        xs, last = torch.ops.bmojo.bilinear_scan_fwd(b, c(A, cdt), Nk, vk, h0, parallel)
    if C is None:
        y = xs
    else:
        y = torch.matmul(xs, c(C, cdt).t())
        if D is not None:
            y = y + torch.matmul(uc, c(D, cdt).t())
    y = y.to(u.dtype)
    return (y, last) if return_final_state else y
