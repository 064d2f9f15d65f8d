"""Realization toolkit for linear time-invariant systems (SPEC §7).

Convention (SciPy's and python-control's, see ORACLES.md)::

    x_{t+1} = A x_t + B u_t,     y_t = C x_t + D u_t,     x_0 given (default 0)

so the output y_t reads the state *before* u_t, and the Markov parameters are
``h_0 = D`` and ``h_k = C A^{k-1} B``. (The scans of SPEC §1 read the state *after* u_t;
``simulate`` shifts their states by one step.)

Classes (small immutable objects; arrays may be NumPy arrays, torch tensors, lists or
scalars; every result comes back as a torch tensor if any defining array was a tensor,
else as a NumPy array; analysis results are float64/complex128):

* ``LTI(A, B, C, D)`` — dense, MIMO, real or complex.
* ``Diagonal(poles, B, C, D)`` — ``A = diag(poles)``, real or complex poles.
* ``Companion(alpha, beta, c, D)`` — first row ``alpha``, ones on the sub-diagonal,
  ``B = beta e_1``, ``C = c`` (scipy ``tf2ss`` / control ``'reachable'`` layout). With the
  companion signal ``s_t = sum_i alpha_i s_{t-i} + beta u_t`` the state is
  ``x_t = (s_{t-1}, ..., s_{t-n})``.
* ``Shift(c, D)`` — window ``K = len(c)``, ``A`` the K×K down-shift, ``B = e_1``, ``C = c``:
  ``y_t = sum_{i=1}^K c_{i-1} u_{t-i} + D u_t``; the state is ``(u_{t-1}, ..., u_{t-K})``.
* ``Bilinear(A0, N, B, C, D)`` — ``x_{t+1} = (A0 + sum_j v_{t,j} N_j) x_t + B u_t``.

Channel batches: ``LTI``, ``Diagonal``, ``Companion`` and ``Shift`` accept one optional
leading axis of H independent systems ("channels"), e.g. ``poles (H, n)``; every result
then has a leading H axis.

Sequence shapes for ``simulate`` (``...`` = any batch dimensions, possibly none):

* SISO systems (one input, one output): ``u (..., L)`` → ``y (..., L)``;
* MIMO systems: ``u (..., L, p)`` → ``y (..., L, q)``;
* with H channels the channel axis comes just before L: ``u (..., H, L[, p])``
  (channel-major, like the scans);
* ``x0`` and the final state: ``(..., [H,] n)``; ``x0`` may omit the batch dimensions.

``simulate`` runs the fast kernels: ``diag_scan`` (real ``Diagonal``), ``companion_scan``
(``Companion``), ``causal_conv1d_fn`` (``Shift``) and ``bilinear_scan`` (``LTI``,
``Bilinear``, complex ``Diagonal``: complex systems run as a real system of twice the
order, at most ``MAX_DENSE_ORDER``). It computes in float64 for float64 inputs and in
float32 otherwise, and returns the dtype and kind (NumPy or torch) of ``u``; complex
systems give complex outputs unless their input–output map is real (conjugate-closed
poles and residues), when the real part is returned. Torch inputs stay differentiable.

Numerical guards (each failure raises ``BmojoValueError`` naming the argument and why):
similarity transforms and conversions refuse matrices whose condition number exceeds
``MAX_COND``; diagonalisation refuses poles closer than ``MIN_POLE_SEPARATION`` (relative
to ``max(1, max|pole|)``); rank decisions use singular values relative to the system's norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import BmojoTypeError, BmojoValueError

__all__ = [
    "LTI",
    "MAX_COND",
    "MAX_DENSE_ORDER",
    "MIN_POLE_SEPARATION",
    "RANK_TOL",
    "Bilinear",
    "Companion",
    "Diagonal",
    "Shift",
]

#: Largest condition number accepted for a similarity transform (``similar``, and the
#: eigenvector / Vandermonde / controllability matrices of the conversions).
MAX_COND: float = 1e8
#: Smallest distance between two poles, relative to ``max(1, max|pole|)``, for a
#: diagonalisation (``to_diagonal``, ``Diagonal.to_companion``).
MIN_POLE_SEPARATION: float = 1e-6
#: Default relative tolerance of rank decisions (ranks, ``minimal``, controllability).
RANK_TOL: float = 1e-9
#: Largest (real) state dimension of the dense systems ``simulate`` runs through
#: ``bilinear_scan`` (LTI, Bilinear; complex systems count twice their order).
MAX_DENSE_ORDER: int = 64
# Relative size of an imaginary part treated as rounding when deciding real-ness.
_REAL_TOL = 1e-8


# ------------------------------------------------------------------------------- helpers


def _to_np(name: str, x: Any, *, allow_complex: bool = True) -> tuple[np.ndarray, bool]:
    """(array as float64/complex128, was it a torch tensor); checks type and finiteness."""
    if isinstance(x, torch.Tensor):
        is_torch = True
        t = x.detach().cpu()
        if t.is_complex():
            arr = t.resolve_conj().to(torch.complex128).numpy()
        elif t.dtype == torch.bool:
            raise BmojoTypeError(f"{name}: expected a real or complex array, got dtype bool")
        else:
            arr = t.to(torch.float64).numpy()
    elif isinstance(x, (np.ndarray, list, tuple, int, float, complex, np.number)) and not (
        isinstance(x, bool)
    ):
        is_torch = False
        try:
            arr = np.asarray(x)
        except ValueError as e:
            raise BmojoValueError(f"{name}: not a rectangular array ({e})") from None
        if arr.dtype.kind in "iuf":
            arr = arr.astype(np.float64)
        elif arr.dtype.kind == "c":
            arr = arr.astype(np.complex128)
        else:
            raise BmojoTypeError(f"{name}: expected a real or complex array, got dtype {arr.dtype}")
    else:
        raise BmojoTypeError(
            f"{name}: expected a numpy array, torch tensor, list or number, got {type(x).__name__}"
        )
    if arr.dtype.kind == "c" and not allow_complex:
        raise BmojoTypeError(f"{name}: expected a real array, got a complex one")
    if not np.all(np.isfinite(arr)):
        raise BmojoValueError(f"{name}: contains NaN or infinity")
    return np.array(arr, copy=True), is_torch


def _real_if_close(x: np.ndarray, tol: float = _REAL_TOL) -> np.ndarray:
    if np.iscomplexobj(x) and np.all(np.abs(x.imag) <= tol * (1.0 + np.abs(x))):
        return np.ascontiguousarray(x.real)
    return x


def _shape_err(name: str, want: str, got) -> BmojoValueError:
    return BmojoValueError(f"{name}: expected shape {want}, got {tuple(got)}")


def _expand(name: str, x: np.ndarray, core: tuple[int, ...], H: int | None, desc: str):
    """Brings x to shape (H or 1, *core): accepts core, (H, *core), a scalar broadcast when
    ``desc`` allows it (callers pre-handle scalars)."""
    want = ("(H, " if H is not None else "(") + ", ".join(map(str, core)) + ")"
    if x.shape == core:
        out = x[None]
        if H is not None:
            out = np.repeat(out, H, axis=0)
        return out
    if H is not None and x.shape == (H, *core):
        return x
    raise _shape_err(name, f"{want} {desc}", x.shape)


def _check_cond(name: str, M: np.ndarray, what: str) -> None:
    c = np.linalg.cond(M) if M.size else 1.0
    if not np.isfinite(c) or c > MAX_COND:
        raise BmojoValueError(
            f"{name}: {what} is singular or ill-conditioned (condition number {c:.3g} > "
            f"MAX_COND = {MAX_COND:.0e})"
        )


def _check_separation(name: str, poles: np.ndarray) -> None:
    n = poles.shape[-1]
    if n < 2:
        return
    scale = max(1.0, float(np.max(np.abs(poles))))
    d = np.abs(poles[:, None] - poles[None, :])
    np.fill_diagonal(d, np.inf)
    i, j = np.unravel_index(np.argmin(d), d.shape)
    if d[i, j] < MIN_POLE_SEPARATION * scale:
        raise BmojoValueError(
            f"{name}: repeated or too-close poles {poles[i]:.6g} and {poles[j]:.6g} "
            f"(distance {d[i, j]:.3g} < MIN_POLE_SEPARATION = {MIN_POLE_SEPARATION:g} relative): "
            "not diagonalisable in a well-conditioned way"
        )


def _krylov(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """[B, AB, ..., A^{n-1} B] for one system."""
    n = A.shape[0]
    blocks, cur = [], B
    for _ in range(n):
        blocks.append(cur)
        cur = A @ cur
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((0, 0), A.dtype)


def _reachable_basis(A: np.ndarray, B: np.ndarray, thresh: float) -> np.ndarray:
    """Orthonormal basis of the reachable subspace of (A, B) by the staircase (block
    Arnoldi) iteration with SVD rank decisions: columns are added block by block, each
    block orthogonalised against the previous ones (twice, for stability)."""
    n = A.shape[0]
    Q = np.zeros((n, 0), dtype=np.result_type(A, B))
    new = B.astype(Q.dtype)
    while Q.shape[1] < n and new.shape[1] > 0:
        for _ in range(2):
            new = new - Q @ (Q.conj().T @ new)
        U, s, _ = np.linalg.svd(new, full_matrices=False)
        r = int(np.sum(s > thresh))
        if r == 0:
            break
        U = U[:, :r]
        Q = np.concatenate([Q, U], axis=1)
        new = A @ U
    return Q


def _io_matrix(name, M, n, H, batched, vec_axis):
    """Diagonal's B or C to (H, n, p) / (H, q, n). A vector (n,) — or (H, n) with
    channels — means one input (B) or one output (C)."""
    hs = "H, " if batched else ""
    if M.ndim == 1 or (batched and M.ndim == 2):
        if M.shape[-1] != n:
            raise _shape_err(
                name,
                f"({hs}n) or ({hs}{'n, p' if vec_axis == -1 else 'q, n'}) with n = {n}",
                M.shape,
            )
        M = M[..., :, None] if vec_axis == -1 else M[..., None, :]
    core = (n, M.shape[-1]) if vec_axis == -1 else (M.shape[-2], n)
    return _expand(name, M, core, H if batched else None, f"with n = {n}")


def _psd_factor(W: np.ndarray) -> np.ndarray:
    """L with W = L L^H for a (numerically) positive semi-definite Hermitian W."""
    w, U = np.linalg.eigh((W + W.conj().T) / 2)
    return U * np.sqrt(np.clip(w, 0.0, None))


def _vandermonde(poles: np.ndarray) -> np.ndarray:
    """Columns (λ^{n-1}, ..., λ, 1): the eigenvectors of the first-row companion matrix."""
    n = poles.shape[0]
    return poles[None, :] ** np.arange(n - 1, -1, -1)[:, None]


def _companion_matrix(alpha: np.ndarray) -> np.ndarray:
    n = alpha.shape[-1]
    A = np.zeros((n, n), dtype=alpha.dtype)
    A[0, :] = alpha
    A[np.arange(1, n), np.arange(n - 1)] = 1.0
    return A


# ------------------------------------------------------------------------------- base


class _Realization:
    """Methods shared by the LTI classes. Subclasses set, in ``__post_init__``, the
    channel-batched NumPy matrices ``_A (H,n,n) _B (H,n,p) _C (H,q,n) _D (H,q,p)``,
    ``_batched`` (whether the user gave a channel axis) and ``_torch`` (result kind)."""

    _B: np.ndarray
    _C: np.ndarray
    _D: np.ndarray
    _batched: bool
    _torch: bool

    # ------------------------------------------------------------------ plumbing
    def _init_common(self, A, B, C, D, batched, is_torch):
        object.__setattr__(self, "_A_dense", A)  # None: built on first use (Shift)
        object.__setattr__(self, "_B", B)
        object.__setattr__(self, "_C", C)
        object.__setattr__(self, "_D", D)
        object.__setattr__(self, "_batched", batched)
        object.__setattr__(self, "_torch", is_torch)
        complex_sys = any(np.iscomplexobj(m) for m in (A, B, C, D))
        object.__setattr__(self, "_complex", complex_sys)
        real_io = True
        if complex_sys:
            h = self._markov_np(2 * self.order + 2)
            real_io = bool(np.all(np.abs(h.imag) <= _REAL_TOL * (1.0 + np.abs(h))))
        object.__setattr__(self, "_real_io", real_io)

    @property
    def _A(self) -> np.ndarray:
        A = self._A_dense
        if A is None:
            A = self._build_A()
            object.__setattr__(self, "_A_dense", A)
        return A

    def _build_A(self) -> np.ndarray:
        # Only classes that defer their dense A (Shift) override this; the others pass A.
        raise AssertionError(f"{type(self).__name__} has no dense A to build")

    def _charpoly(self) -> np.ndarray:
        """det(zI - A) per channel, descending powers: (H, n+1)."""
        if self.order == 0:
            return np.ones((self._B.shape[0], 1))
        return np.stack([np.poly(p) for p in self._poles_np()])

    def _out(self, x: np.ndarray, channel_axis: bool = True):
        if channel_axis and not self._batched:
            x = x[0]
        if self._torch:
            return torch.from_numpy(np.ascontiguousarray(x))
        return x

    @property
    def order(self) -> int:
        """State dimension n."""
        return self._B.shape[-2]

    @property
    def inputs(self) -> int:
        """Number of inputs p."""
        return self._B.shape[-1]

    @property
    def outputs(self) -> int:
        """Number of outputs q."""
        return self._C.shape[-2]

    @property
    def channels(self) -> int | None:
        """Number of channels H, or None without a channel axis."""
        return self._B.shape[0] if self._batched else None

    @property
    def is_siso(self) -> bool:
        """One input and one output: sequences are (..., L) instead of (..., L, p)."""
        return self.inputs == 1 and self.outputs == 1

    @property
    def real_io(self) -> bool:
        """True when the input–output map is real (always for real matrices)."""
        return self._real_io

    def _per_channel(self, fn):
        return [fn(self._A[h], self._B[h], self._C[h], self._D[h]) for h in range(self._B.shape[0])]

    # ------------------------------------------------------------------ Markov & co
    def _markov_np(self, k: int) -> np.ndarray:
        A, B, C, D = self._A, self._B, self._C, self._D
        H, q, p = A.shape[0], C.shape[-2], B.shape[-1]
        out = np.zeros((H, k, q, p), dtype=np.result_type(A, B, C, D))
        if k > 0:
            out[:, 0] = D
        cur = B
        for i in range(1, k):
            out[:, i] = C @ cur
            cur = A @ cur
        return out

    def _squeeze_io(self, h: np.ndarray) -> np.ndarray:
        """(H, k, q, p) → (H, k) for SISO systems."""
        return h[..., 0, 0] if self.is_siso else h

    def markov(self, k: int):
        """The first k Markov parameters h_0 = D, h_i = C A^{i-1} B: shape ``([H,] k)``
        for SISO systems, ``([H,] k, q, p)`` otherwise."""
        k = _count("k", k)
        h = self._markov_np(k)
        if self._real_io:
            h = _real_if_close(h, np.inf)
        return self._out(self._squeeze_io(h))

    def impulse(self, L: int):
        """Response to a unit impulse at t = 0 over L steps (column j: impulse on input j);
        equals ``markov(L)``."""
        return self.markov(L)

    def step(self, L: int):
        """Response to a unit step over L steps: the running sum of the Markov parameters."""
        L = _count("L", L)
        h = self._markov_np(L)
        if self._real_io:
            h = _real_if_close(h, np.inf)
        return self._out(self._squeeze_io(np.cumsum(h, axis=1)))

    def transfer_function(self):
        """``(num, den)`` of H(z) = C (zI - A)^{-1} B + D in descending powers of z, like
        ``scipy.signal.ss2tf``: ``den (n+1,)`` = det(zI - A) (monic) and ``num (n+1,)``
        (SISO) or ``(q, p, n+1)``; with channels a leading H axis. Computed from the
        Markov parameters: num_i = sum_{k<=i} den_{i-k} h_k."""
        n = self.order
        dens = self._charpoly()
        h = self._markov_np(n + 1)  # (H, n+1, q, p)
        num = np.zeros(h.shape[:1] + h.shape[2:] + (n + 1,), dtype=np.result_type(h, dens))
        H, q, p = num.shape[:3]
        for c in range(H):  # num = (den * h) truncated to degree n
            for i in range(q):
                for j in range(p):
                    num[c, i, j] = np.convolve(dens[c], h[c, :, i, j])[: n + 1]
        if not self._complex or self._real_io:
            num, dens = _real_if_close(num, np.inf), _real_if_close(dens, np.inf)
        if self.is_siso:
            num = num[:, 0, 0]
        return self._out(num), self._out(dens)

    def poles(self):
        """Eigenvalues of A: ``([H,] n)`` (complex when any is)."""
        return self._out(self._poles_np())

    def _poles_np(self) -> np.ndarray:
        ev = np.stack([np.linalg.eigvals(A) for A in self._A])
        return _real_if_close(ev, 0.0) if np.iscomplexobj(ev) else ev

    def spectral_radius(self):
        """max |pole|: a float (or an ``(H,)`` array with channels)."""
        r = np.abs(self._poles_np()).max(axis=-1, initial=0.0)
        return float(r[0]) if not self._batched else self._out(r)

    def is_stable(self) -> bool:
        """True when the spectral radius is below 1 (for every channel)."""
        return bool(np.all(np.abs(self._poles_np()) < 1.0))

    # ------------------------------------------------------------------ structure
    def controllability(self):
        """Controllability (reachability) matrix [B, AB, ..., A^{n-1}B]: ``([H,] n, n p)``."""
        return self._out(np.stack(self._per_channel(lambda A, B, C, D: _krylov(A, B))))

    def observability(self):
        """Observability matrix [C; CA; ...; C A^{n-1}]: ``([H,] n q, n)``."""
        return self._out(np.stack(self._per_channel(lambda A, B, C, D: _krylov(A.T, C.T).T)))

    def _scale(self, A, B, C) -> float:
        return max(
            float(np.linalg.norm(A, 2)) if A.size else 0.0,
            float(np.linalg.norm(B, 2)) if B.size else 0.0,
            float(np.linalg.norm(C, 2)) if C.size else 0.0,
            np.finfo(float).tiny,
        )

    def controllability_rank(self, tol: float = RANK_TOL):
        """Dimension of the reachable subspace (staircase with SVD rank decisions; a singular
        value counts when above ``tol`` times the system's norm). An int, or a list with
        channels."""
        r = self._per_channel(
            lambda A, B, C, D: _reachable_basis(A, B, tol * self._scale(A, B, C)).shape[1]
        )
        return r if self._batched else r[0]

    def observability_rank(self, tol: float = RANK_TOL):
        """Dimension of the observable subspace (see ``controllability_rank``)."""
        r = self._per_channel(
            lambda A, B, C, D: _reachable_basis(
                A.conj().T, C.conj().T, tol * self._scale(A, B, C)
            ).shape[1]
        )
        return r if self._batched else r[0]

    def _require_stable(self, what: str) -> None:
        rho = np.abs(self._poles_np()).max(initial=0.0)
        if rho >= 1.0:
            raise BmojoValueError(
                f"{what}: the system is not stable (spectral radius {rho:.6g} >= 1); the "
                "infinite-horizon Gramians do not exist"
            )

    def gramians(self):
        """``(Wc, Wo)``: controllability and observability Gramians, the solutions of
        ``A Wc A^H - Wc + B B^H = 0`` and ``A^H Wo A - Wo + C^H C = 0``
        (``scipy.linalg.solve_discrete_lyapunov``). Needs a stable system."""
        self._require_stable("gramians")
        import scipy.linalg  # deferred: only the Gramians need SciPy, not `import bmojo_core`

        wc = self._per_channel(
            lambda A, B, C, D: scipy.linalg.solve_discrete_lyapunov(A, B @ B.conj().T)
        )
        wo = self._per_channel(
            lambda A, B, C, D: scipy.linalg.solve_discrete_lyapunov(A.conj().T, C.conj().T @ C)
        )
        return self._out(np.stack(wc)), self._out(np.stack(wo))

    def hankel_singular_values(self):
        """Hankel singular values, descending: ``([H,] n)``; the singular values of
        ``Lo^H Lc`` with ``Wc = Lc Lc^H``, ``Wo = Lo Lo^H`` (square-root method: more
        accurate for the small ones than the eigenvalues of ``Wc Wo``). Needs a stable
        system."""
        self._require_stable("hankel_singular_values")
        wc, wo = self.gramians()
        wc, wo = np.asarray(wc), np.asarray(wo)
        if not self._batched:
            wc, wo = wc[None], wo[None]
        hsv = np.stack(
            [
                np.linalg.svd(_psd_factor(o).conj().T @ _psd_factor(c), compute_uv=False)
                for c, o in zip(wc, wo, strict=True)
            ]
        )
        return self._out(hsv)

    # ------------------------------------------------------------------ transforms
    def to_lti(self) -> LTI:
        """The same system as a dense ``LTI``."""
        return LTI._make(self._A, self._B, self._C, self._D, self._batched, self._torch)

    def similar(self, T) -> LTI:
        """The similar system (T A T^-1, T B, C T^-1, D) (new state z = T x; control's
        convention). ``T (n, n)`` or ``(H, n, n)``; refuses cond(T) > MAX_COND."""
        Tn, tt = _to_np("T", T)
        n = self.order
        Tn = _expand("T", Tn, (n, n), self.channels, "(square, of the state dimension)")
        Tn = np.broadcast_to(Tn, (self._B.shape[0], n, n))
        A, B, C = [], [], []
        for h in range(self._B.shape[0]):
            _check_cond("T", Tn[h], "the similarity transform")
            A.append(Tn[h] @ np.linalg.solve(Tn[h].T, self._A[h].T).T)
            B.append(Tn[h] @ self._B[h])
            C.append(np.linalg.solve(Tn[h].T, self._C[h].T).T)
        return LTI._make(
            np.stack(A), np.stack(B), np.stack(C), self._D.copy(), self._batched, self._torch or tt
        )

    def minimal(self, tol: float = RANK_TOL) -> LTI:
        """A minimal realization (same Markov parameters, smallest order): the reachable
        part is kept by an orthogonal staircase decomposition, then its observable part;
        singular values below ``tol`` times the system's norm count as zero. With channels,
        every channel must reduce to the same order."""
        parts = []
        for h in range(self._B.shape[0]):
            A, B, C, D = self._A[h], self._B[h], self._C[h], self._D[h]
            thresh = tol * self._scale(A, B, C)
            Q = _reachable_basis(A, B, thresh)
            A1, B1, C1 = Q.conj().T @ A @ Q, Q.conj().T @ B, C @ Q
            P = _reachable_basis(A1.conj().T, C1.conj().T, thresh)
            parts.append((P.conj().T @ A1 @ P, P.conj().T @ B1, C1 @ P, D))
        orders = {p[0].shape[0] for p in parts}
        if len(orders) > 1:
            raise BmojoValueError(
                f"minimal: channels reduce to different orders {sorted(orders)}; reduce them "
                "one at a time"
            )
        A, B, C, D = (np.stack(x) for x in zip(*parts, strict=True))
        return LTI._make(A, B, C, D, self._batched, self._torch)

    # ------------------------------------------------------------------ simulation
    def simulate(self, u, x0=None, return_final_state: bool = False):
        """Runs the system on ``u`` (shapes: module docstring) from ``x0`` (default 0).
        Returns ``y``, or ``(y, x_L)`` with the state after the last input when
        ``return_final_state`` (feed it back as ``x0`` to continue the sequence)."""
        ut, was_torch, out_dtype = _seq_to_torch("u", u)
        H, n, p, q = self._B.shape[0], self.order, self.inputs, self.outputs
        core = (0 if self.is_siso else 1) + 1 + (1 if self._batched else 0)
        want = (
            ("(..., H, L" if self._batched else "(..., L") + ("" if self.is_siso else ", p") + ")"
        )
        if ut.dim() < core:
            raise _shape_err("u", want, ut.shape)
        lead = tuple(ut.shape[: ut.dim() - core])
        if self._batched and ut.shape[len(lead)] != H:
            raise BmojoValueError(
                f"u: expected shape {want} with H = {H} channels, got {tuple(ut.shape)}"
            )
        if not self.is_siso and ut.shape[-1] != p:
            raise BmojoValueError(
                f"u: expected shape {want} with p = {p} inputs, got {tuple(ut.shape)}"
            )
        L = ut.shape[-1] if self.is_siso else ut.shape[-2]
        nb = math.prod(lead)
        U = ut.reshape(nb, H, L, p)
        cdt = U.dtype
        X0 = None
        if x0 is not None:
            xs = (H,) if self._batched else ()
            X0 = _state_to_torch("x0", x0, lead, xs, n, cdt, self._complex)
            X0 = X0.reshape(nb, H, n) if X0.dim() > len(xs) + 1 else X0.reshape(1, H, n)
            X0 = X0.expand(nb, H, n).contiguous()
        if n == 0 or L == 0:
            Y, XL = self._trivial(U, X0, L)
        else:
            Y, XL = self._run(U, X0)
        if self._complex and self._real_io and Y.is_complex():
            Y = Y.real
        y_shape = lead + ((H,) if self._batched else ()) + (L,) + (() if self.is_siso else (q,))
        Y = Y.reshape(y_shape)
        Y = Y.to(out_dtype) if not Y.is_complex() else Y
        XL = XL.reshape(lead + ((H,) if self._batched else ()) + (n,))
        if not was_torch:
            Y, XL = Y.detach().numpy(), XL.detach().numpy()
        return (Y, XL) if return_final_state else Y

    def _zeros_state(self, nb, dtype):
        H, n = self._B.shape[0], self.order
        dt = _complex_of(dtype) if self._complex else dtype
        return torch.zeros(nb, H, n, dtype=dt)

    def _trivial(self, U, X0, L):
        nb = U.shape[0]
        X0 = self._zeros_state(nb, U.dtype) if X0 is None else X0
        D = _t(self._D, U.dtype)
        cd = _common(U, D)
        return torch.einsum("hqp,bhlp->bhlq", D.to(cd), U.to(cd)), X0

    def _run(self, U, X0):
        """Generic path: dense A through ``bilinear_scan`` (per channel)."""
        return _dense_run(self._A, self._B, self._C, self._D, U, X0, self._complex)


# ------------------------------------------------------------------------------- torch glue


def _count(name, k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise BmojoTypeError(f"{name}: expected an int >= 0, got {k!r}")
    if k < 0:
        raise BmojoValueError(f"{name}: expected an int >= 0, got {k}")
    return int(k)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype in (torch.float64, torch.complex128) else torch.complex64


def _real_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _t(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """NumPy system matrix → torch in the compute dtype (complex if x is)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(_complex_of(dtype) if t.is_complex() else _real_of(dtype))


def _common(*ts: torch.Tensor) -> torch.dtype:
    if any(t.is_complex() for t in ts):
        return _complex_of(ts[0].dtype)
    return ts[0].dtype


def _seq_to_torch(name, u):
    """u as a torch tensor in the compute dtype; (tensor, was_torch, output dtype)."""
    if isinstance(u, torch.Tensor):
        if u.is_complex() or not u.is_floating_point():
            raise BmojoTypeError(
                f"{name}: expected a real floating tensor, got dtype {str(u.dtype)[6:]}"
            )
        if u.device.type != "cpu":
            raise BmojoValueError(f"{name}: expected a CPU tensor, got device {u.device}")
        cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        return u.to(cdt), True, u.dtype
    arr, _ = _to_np(name, u, allow_complex=False)
    src = u.dtype if isinstance(u, np.ndarray) else np.dtype(np.float64)
    if src in (np.float32, np.float16):
        out = torch.float32 if src == np.float32 else torch.float16
        return torch.from_numpy(arr.astype(np.float32)), False, out
    return torch.from_numpy(arr), False, torch.float64


def _state_to_torch(name, x, lead, xs, n, cdt, complex_ok):
    if isinstance(x, torch.Tensor):
        if x.is_complex() and not complex_ok:
            raise BmojoTypeError(f"{name}: expected a real state for a real system")
        t = x.to(_complex_of(cdt) if x.is_complex() else cdt)
    else:
        arr, _ = _to_np(name, x, allow_complex=complex_ok)
        t = torch.from_numpy(arr)
        t = t.to(_complex_of(cdt) if t.is_complex() else cdt)
    if complex_ok and not t.is_complex():
        t = t.to(_complex_of(cdt))
    full = lead + xs + (n,)
    if tuple(t.shape) not in (full, xs + (n,)):
        want = "(..., " + ", ".join(["H"] * len(xs) + ["n"]) + ")"
        raise BmojoValueError(
            f"{name}: expected shape {want} = {full} or {xs + (n,)}, got {tuple(t.shape)}"
        )
    return t


def _readout(states, X0, C, D, U):
    """y_t = C x_t + D u_t with x_t the state before u_t: states (nb,H,L,n) hold the states
    after each input, so shift them by one step and put x0 first."""
    nb, H, L, n = states.shape
    if X0 is None:
        X0 = torch.zeros(nb, H, n, dtype=states.dtype)
    prev = torch.cat([X0.to(states.dtype)[:, :, None], states[:, :, :-1]], dim=2)
    cd = _common(prev, C, D, U)
    y = torch.einsum("hqn,bhln->bhlq", C.to(cd), prev.to(cd))
    return y + torch.einsum("hqp,bhlp->bhlq", D.to(cd), U.to(cd))


def _realify(A, B):
    """Complex (A, B) with real inputs → the real system of order 2n on (Re x, Im x)."""
    Ar, Ai = A.real, A.imag
    Ab = np.block([[Ar, -Ai], [Ai, Ar]])
    Bb = np.concatenate([B.real, B.imag], axis=0)
    return Ab, Bb


def _dense_run(A, B, C, D, U, X0, is_complex, N=None, V=None):
    from .bilinear import bilinear_scan

    nb, H, L, p = U.shape
    n = A.shape[-1]
    if n * (2 if is_complex else 1) > MAX_DENSE_ORDER:
        raise BmojoValueError(
            f"simulate: a dense {'complex ' if is_complex else ''}system of order {n} exceeds "
            f"what bilinear_scan runs (real order <= {MAX_DENSE_ORDER}; complex systems run at "
            "twice their order); use to_diagonal() for a real diagonal form if one exists"
        )
    cdt = U.dtype
    states, finals = [], []
    for h in range(H):
        if is_complex:
            Ah, Bh = _realify(A[h], B[h])
            x0 = None
            if X0 is not None:
                x0 = torch.cat([X0[:, h].real, X0[:, h].imag], dim=-1).to(cdt).contiguous()
        else:
            Ah, Bh = A[h], B[h]
            x0 = None if X0 is None else X0[:, h].contiguous()
        kw: dict[str, Any] = {}
        if N is not None:
            kw = dict(N=_t(N, cdt), v=V)
        s, f = bilinear_scan(
            U[:, h].contiguous(),
            _t(Ah, cdt),
            _t(Bh, cdt),
            initial_state=x0,
            return_final_state=True,
            **kw,
        )
        if is_complex:
            s = torch.complex(s[..., :n], s[..., n:])
            f = torch.complex(f[..., :n], f[..., n:])
        states.append(s)
        finals.append(f)
    S = torch.stack(states, dim=1)
    F = torch.stack(finals, dim=1)
    return _readout(S, X0, _t(C, cdt), _t(D, cdt), U), F


# ------------------------------------------------------------------------------- LTI


def _lti_normalize(A, B, C, D):
    """Checks and brings (A, B, C, D) to channel-batched (H, ...) arrays."""
    An, ta = _to_np("A", A)
    if An.ndim not in (2, 3) or An.shape[-1] != An.shape[-2]:
        raise _shape_err("A", "(n, n) or (H, n, n) (square)", An.shape)
    batched = An.ndim == 3
    H, n = (An.shape[0] if batched else 1), An.shape[-1]
    ad = An.ndim
    An = An if batched else An[None]
    Hs = H if batched else None
    Bn, tb = _to_np("B", B)
    if Bn.ndim == ad - 1:  # vector: one input
        Bn = Bn[..., None]
    if Bn.ndim != ad or Bn.shape[-2] != n:
        raise _shape_err("B", f"({'H, ' if batched else ''}n, p) with n = {n}", Bn.shape)
    Bn = Bn if batched else Bn[None]
    if Bn.shape[0] != H:
        raise _shape_err("B", f"(H, n, p) with H = {H}", Bn.shape)
    p = Bn.shape[-1]
    Cn, tc = _to_np("C", C)
    if Cn.ndim == ad - 1:  # vector: one output
        Cn = Cn[..., None, :]
    if Cn.ndim != ad or Cn.shape[-1] != n:
        raise _shape_err("C", f"({'H, ' if batched else ''}q, n) with n = {n}", Cn.shape)
    Cn = Cn if batched else Cn[None]
    if Cn.shape[0] != H:
        raise _shape_err("C", f"(H, q, n) with H = {H}", Cn.shape)
    q = Cn.shape[-2]
    Dn, td = _to_np("D", 0.0 if D is None else D)
    if Dn.ndim == 0:
        Dn = np.full((H, q, p), Dn.item(), dtype=Dn.dtype)
    else:
        Dn = _expand("D", Dn, (q, p), Hs, "(a scalar, or outputs × inputs)")
    return An, Bn, Cn, Dn, batched, ta or tb or tc or td


@dataclass(frozen=True, eq=False)
class LTI(_Realization):
    """Dense linear time-invariant system ``x_{t+1} = A x_t + B u_t, y_t = C x_t + D u_t``.

    ``A (n, n)``, ``B (n, p)`` (or ``(n,)``: one input), ``C (q, n)`` (or ``(n,)``: one
    output), ``D (q, p)`` or a scalar (default 0); a leading channel axis H on A (and
    optionally on B, C, D) gives H independent systems. Real or complex.

    Example::

        >>> import numpy as np
        >>> from bmojo_core.realization import LTI
        >>> sys = LTI(np.array([[0.5, 0.1], [0.0, 0.3]]), [1.0, 1.0], [1.0, 0.0], 0.0)
        >>> sys.markov(3)
        array([0. , 1. , 0.6])
        >>> y = sys.simulate(np.ones(8))        # runs bilinear_scan
    """

    A: Any
    B: Any
    C: Any
    D: Any = 0.0

    def __post_init__(self):
        A, B, C, D, batched, tt = _lti_normalize(self.A, self.B, self.C, self.D)
        self._init_common(A, B, C, D, batched, tt)
        for name, m in zip("ABCD", (A, B, C, D), strict=True):
            object.__setattr__(self, name, self._out(m))

    @classmethod
    def _make(cls, A, B, C, D, batched, is_torch) -> LTI:
        def wrap(m):
            m = m if batched else m[0]
            return torch.from_numpy(np.ascontiguousarray(m)) if is_torch else m

        return cls(wrap(A), wrap(B), wrap(C), wrap(D))

    def to_companion(self, return_transform: bool = False):
        """Controllable canonical form (control's ``canonical_form(sys, 'reachable')``):
        a ``Companion`` (SISO only). With ``return_transform`` also T (new state z = T x).
        Raises for uncontrollable systems and when the controllability matrix has
        condition number above MAX_COND."""
        if not self.is_siso:
            raise BmojoValueError(
                f"to_companion: needs a single-input single-output system, got "
                f"{self.inputs} inputs and {self.outputs} outputs"
            )
        n = self.order
        alphas, cs, Ts = [], [], []
        for h in range(self._B.shape[0]):
            A, B, C = self._A[h], self._B[h], self._C[h]
            W = _krylov(A, B)
            rank = _reachable_basis(A, B, RANK_TOL * self._scale(A, B, C)).shape[1]
            if rank < n:
                raise BmojoValueError(
                    f"to_companion: the system is not controllable (reachable subspace of "
                    f"dimension {rank} < n = {n}); use minimal() first"
                )
            _check_cond("to_companion", W, "the controllability matrix")
            alpha = -np.poly(np.linalg.eigvals(A))[1:]
            alpha = _real_if_close(alpha) if not np.iscomplexobj(A) else alpha
            Wc = _krylov(_companion_matrix(alpha), np.eye(n, 1, dtype=alpha.dtype))
            T = Wc @ np.linalg.inv(W)
            c = C @ W @ np.linalg.inv(Wc)
            alphas.append(alpha)
            cs.append(c[0])
            Ts.append(T)
        if any(np.iscomplexobj(x) for x in alphas + cs):
            raise BmojoValueError(
                "to_companion: the system has complex coefficients; Companion is real"
            )
        comp = Companion._make(
            np.stack(alphas), np.ones(len(alphas)), np.stack(cs), self._D[:, 0, 0],
            self._batched, self._torch,
        )  # fmt: skip
        return (comp, self._out(np.stack(Ts))) if return_transform else comp

    def to_diagonal(self) -> Diagonal:
        """Modal form ``Diagonal(eig(A), V^-1 B, C V, D)``. Raises for repeated/too-close
        poles and an eigenvector matrix with condition number above MAX_COND."""
        poles, Bs, Cs = [], [], []
        for h in range(self._B.shape[0]):
            ev, V = np.linalg.eig(self._A[h])
            _check_separation("to_diagonal", ev)
            _check_cond("to_diagonal", V, "the eigenvector matrix")
            poles.append(ev)
            Bs.append(np.linalg.solve(V, self._B[h]))
            Cs.append(self._C[h] @ V)
        P = np.stack(poles)
        if not np.iscomplexobj(P):
            Bs, Cs = [b.real if np.iscomplexobj(b) else b for b in Bs], Cs
        return Diagonal._make(
            P, np.stack(Bs), np.stack(Cs), self._D, self._batched, self._torch, siso=False
        )


# ------------------------------------------------------------------------------- Diagonal


@dataclass(frozen=True, eq=False)
class Diagonal(_Realization):
    """Diagonal system ``A = diag(poles)`` (real or complex poles).

    ``poles (n,)`` (or ``(H, n)``); ``B (n,)`` (one input, default ones) or ``(n, p)``;
    ``C (n,)`` (one output, default ones) or ``(q, n)``; ``D`` scalar/``(H,)`` (SISO) or
    ``(q, p)`` (default 0). Outputs are real when the system is conjugate-closed (poles and
    residues in conjugate pairs), else complex.

    Example::

        >>> from bmojo_core.realization import Diagonal
        >>> sys = Diagonal([0.9, 0.5], B=[1.0, 1.0], C=[1.0, -1.0])
        >>> sys.markov(3)                        # h_k = 0.9^(k-1) - 0.5^(k-1)
        array([0. , 0. , 0.4])
        >>> sys.to_companion().markov(3)
        array([0. , 0. , 0.4])
    """

    poles: Any
    B: Any = None
    C: Any = None
    D: Any = 0.0

    def __post_init__(self):
        P, tp = _to_np("poles", self.poles)
        if P.ndim not in (1, 2):
            raise _shape_err("poles", "(n,) or (H, n)", P.shape)
        batched = P.ndim == 2
        H, n = (P.shape[0] if batched else 1), P.shape[-1]
        P = P if batched else P[None]
        Hs = H if batched else None
        Bn, tb = _to_np("B", np.ones(n) if self.B is None else self.B)
        Bn = _io_matrix("B", Bn, n, H, batched, vec_axis=-1)
        Cn, tc = _to_np("C", np.ones(n) if self.C is None else self.C)
        Cn = _io_matrix("C", Cn, n, H, batched, vec_axis=-2)
        q, p = Cn.shape[-2], Bn.shape[-1]
        Dn, td = _to_np("D", 0.0 if self.D is None else self.D)
        if Dn.ndim == 0:
            Dn = np.full((H, q, p), Dn.item(), dtype=Dn.dtype)
        elif q == p == 1 and Dn.shape == (H,) and batched:
            Dn = Dn[:, None, None]
        else:
            Dn = _expand("D", Dn, (q, p), Hs, "(a scalar, or outputs × inputs)")
        A = np.zeros((H, n, n), dtype=P.dtype)
        A[:, np.arange(n), np.arange(n)] = P
        object.__setattr__(self, "_poles", P)
        self._init_common(A, Bn, Cn, Dn, batched, tp or tb or tc or td)
        siso = q == p == 1
        object.__setattr__(self, "poles", self._out(P))
        object.__setattr__(self, "B", self._out(Bn[..., 0] if siso else Bn))
        object.__setattr__(self, "C", self._out(Cn[..., 0, :] if siso else Cn))
        object.__setattr__(self, "D", self._out(Dn[..., 0, 0] if siso else Dn))

    @classmethod
    def _make(cls, P, B, C, D, batched, is_torch, siso=True) -> Diagonal:
        def wrap(m):
            m = m if batched else m[0]
            return torch.from_numpy(np.ascontiguousarray(m)) if is_torch else m

        if siso and B.shape[-1] == 1 and C.shape[-2] == 1:
            B, C, D = B[..., 0], C[..., 0, :], D[..., 0, 0]
        if not batched and D.ndim == 0:
            return cls(wrap(P), wrap(B), wrap(C), D.item())
        return cls(wrap(P), wrap(B), wrap(C), wrap(D))

    def _poles_np(self) -> np.ndarray:
        return self._poles

    def _run(self, U, X0):
        if self._complex:
            return super()._run(U, X0)
        from .scan import diag_scan

        cdt = U.dtype
        nb, H, L, p = U.shape
        n = self.order
        a = _t(self._poles, cdt)[None, :, :, None].expand(nb, H, n, L)
        b = torch.einsum("hnp,bhlp->bhnl", _t(self._B, cdt), U)
        h, last = diag_scan(a, b, initial_state=X0, return_last_state=True)
        states = h.permute(0, 1, 3, 2)
        return _readout(states, X0, _t(self._C, cdt), _t(self._D, cdt), U), last

    def to_lti(self) -> LTI:
        """Dense form. Real poles give ``A = diag(poles)``; conjugate-closed complex poles give
        a real block-diagonal (modal) form with 2×2 blocks [[Re λ, -Im λ], [Im λ, Re λ]]
        (same input–output map, state coordinates (Re z, Im z) of one pole of each pair);
        other complex systems give a complex LTI."""
        if not self._complex or not self._real_io:
            return super().to_lti()
        blocks = [self._real_modal(h) for h in range(self._B.shape[0])]
        if any(b is None for b in blocks):
            return super().to_lti()
        A, B, C, D = (np.stack(x) for x in zip(*blocks, strict=True))
        return LTI._make(A, B, C, D, self._batched, self._torch)

    def _real_modal(self, h):
        P, B, C, D = self._poles[h], self._B[h], self._C[h], self._D[h]
        n = P.shape[0]
        scale = max(1.0, float(np.abs(P).max(initial=0.0)))
        used = np.zeros(n, bool)
        blocks_A, rows_B, cols_C = [], [], []
        for i in range(n):
            if used[i]:
                continue
            used[i] = True
            lam = P[i]
            if abs(lam.imag) <= _REAL_TOL * scale:
                blocks_A.append(np.array([[lam.real]]))
                if np.abs(B[i].imag).max(initial=0) > 0 or np.abs(C[:, i].imag).max(initial=0) > 0:
                    # a real pole with complex B_i, C_i: residue must be real; rescale
                    r = np.outer(C[:, i], B[i])
                    if np.abs(r.imag).max(initial=0) > _REAL_TOL * (1 + np.abs(r).max()):
                        return None
                    k = int(np.argmax(np.abs(B[i]))) if np.abs(B[i]).max() > 0 else None
                    s = B[i][k] / abs(B[i][k]) if k is not None else 1.0
                    rows_B.append((B[i] / s).real[None])
                    cols_C.append((C[:, i] * s).real[:, None])
                else:
                    rows_B.append(B[i].real[None])
                    cols_C.append(C[:, i].real[:, None])
                continue
            cand = [j for j in range(n) if not used[j]]
            if not cand:
                return None
            j = min(cand, key=lambda j: abs(P[j] - np.conj(lam)))
            if abs(P[j] - np.conj(lam)) > 1e-9 * scale:
                return None
            used[j] = True
            # rescale state j so that B_j = conj(B_i) and C_j = conj(C_i)
            bi, bj, ci, cj = B[i], B[j], C[:, i], C[:, j]
            if np.abs(bi).max(initial=0) > 0:
                a = np.vdot(np.conj(bi), bj) / np.vdot(bi, bi)
            elif np.abs(ci).max(initial=0) > 0:
                a = np.vdot(cj, np.conj(ci)) / np.vdot(cj, cj) if np.abs(cj).max() > 0 else 1.0
                a = 1.0 / a if a != 0 else 1.0
            else:
                a = 1.0
            if (
                a == 0
                or not np.allclose(bj / a, np.conj(bi), rtol=1e-8, atol=1e-12)
                or not (np.allclose(cj * a, np.conj(ci), rtol=1e-8, atol=1e-12))
            ):
                return None
            blocks_A.append(np.array([[lam.real, -lam.imag], [lam.imag, lam.real]]))
            rows_B.append(np.stack([bi.real, bi.imag]))
            cols_C.append(np.stack([2 * ci.real, -2 * ci.imag], axis=1))
        size = sum(blk.shape[0] for blk in blocks_A)
        A = np.zeros((size, size))
        at = 0
        for blk in blocks_A:  # block diagonal of 1×1 (real) and 2×2 (complex pair) blocks
            k = blk.shape[0]
            A[at : at + k, at : at + k] = blk
            at += k
        Bm = np.concatenate(rows_B, axis=0) if rows_B else np.zeros((0, B.shape[1]))
        Cm = np.concatenate(cols_C, axis=1) if cols_C else np.zeros((C.shape[0], 0))
        return A, Bm, Cm, D.real

    def to_companion(self) -> Companion:
        """The controllable companion form with the same poles and Markov parameters (SISO),
        via the characteristic polynomial and the Vandermonde similarity T = V diag(s)
        (V's columns (λ^{n-1}, ..., 1) are the companion's eigenvectors, s scales B to e_1).
        Raises for repeated/too-close poles, cond(V) > MAX_COND, a zero B_i
        (uncontrollable mode) and complex systems that are not conjugate-closed."""
        if not self.is_siso:
            raise BmojoValueError(
                f"to_companion: needs a single-input single-output system, got "
                f"{self.inputs} inputs and {self.outputs} outputs"
            )
        if self._complex and not self._real_io:
            raise BmojoValueError(
                "to_companion: the system is not conjugate-closed (its input-output map is "
                "complex); Companion is real"
            )
        n = self.order
        alphas, cs = [], []
        for h in range(self._B.shape[0]):
            P, B, C = self._poles[h], self._B[h, :, 0], self._C[h, 0]
            _check_separation("poles", P)
            if np.any(np.abs(B) <= RANK_TOL * max(1.0, float(np.abs(B).max(initial=0.0)))):
                raise BmojoValueError(
                    "B: has a zero entry, so a mode is not controllable and no companion "
                    "(controllable) form is similar to this system"
                )
            V = _vandermonde(P)
            _check_cond("poles", V, "the Vandermonde matrix of the poles")
            w = np.linalg.solve(V, np.eye(n, 1)[:, 0].astype(V.dtype))  # V^-1 e1
            s = w / B
            c = np.linalg.solve(V.T, C / s)  # c = C diag(1/s) V^-1
            # the map is real (checked above) and the controllable form is unique, so any
            # imaginary part is rounding
            alphas.append(np.real(-np.poly(P)[1:]))
            cs.append(np.real(c))
        return Companion._make(
            np.stack(alphas), np.ones(len(alphas)), np.stack(cs), self._D[:, 0, 0].real,
            self._batched, self._torch,
        )  # fmt: skip

    def to_diagonal(self) -> Diagonal:
        """Itself."""
        return self


# ------------------------------------------------------------------------------- Companion


@dataclass(frozen=True, eq=False)
class Companion(_Realization):
    """Companion (controllable canonical) form, SISO.

    ``alpha (n,)`` or ``(H, n)``: A's first row (ones on the sub-diagonal); ``beta``
    scalar or ``(H,)`` (default 1): ``B = beta e_1``; ``c (n,)`` (default ``e_1``): ``C``;
    ``D`` scalar or ``(H,)`` (default 0). Transfer function
    ``D + beta (c_0 z^{n-1} + ... + c_{n-1}) / (z^n - alpha_1 z^{n-1} - ... - alpha_n)``,
    i.e. ``lfilter(D a + beta [0, c], a)`` with ``a = [1, -alpha]``.
    ``simulate`` runs ``companion_scan``; ``x0 = (s_{-1}, ..., s_{-n})``.

    Example::

        >>> from bmojo_core.realization import Companion
        >>> sys = Companion([1.5, -0.56], beta=1.0, c=[1.0, 0.0])   # poles 0.8, 0.7
        >>> sys.markov(4)
        array([0.  , 1.  , 1.5 , 1.69])
    """

    alpha: Any
    beta: Any = 1.0
    c: Any = None
    D: Any = 0.0

    def __post_init__(self):
        al, ta = _to_np("alpha", self.alpha, allow_complex=False)
        if al.ndim not in (1, 2):
            raise _shape_err("alpha", "(n,) or (H, n)", al.shape)
        batched = al.ndim == 2
        H, n = (al.shape[0] if batched else 1), al.shape[-1]
        if n < 1:
            raise _shape_err("alpha", "(n,) or (H, n) with n >= 1", al.shape)
        Hs = H if batched else None
        al = al if batched else al[None]
        be, tb = _to_np("beta", 1.0 if self.beta is None else self.beta, allow_complex=False)
        be = np.full(H, be.item()) if be.ndim == 0 else _expand("beta", be, (), Hs, "(H,)")
        if be.ndim == 2:
            be = be[:, 0]
        cc, tc = _to_np("c", np.eye(1, n)[0] if self.c is None else self.c, allow_complex=False)
        cc = _expand("c", cc, (n,), Hs, "(n,) or (H, n)")
        dd, td = _to_np("D", 0.0 if self.D is None else self.D, allow_complex=False)
        dd = np.full(H, dd.item()) if dd.ndim == 0 else _expand("D", dd, (), Hs, "(H,)")
        if dd.ndim == 2:
            dd = dd[:, 0]
        A = np.zeros((H, n, n))
        A[:, 0, :] = al
        A[:, np.arange(1, n), np.arange(n - 1)] = 1.0
        B = np.zeros((H, n, 1))
        if n:
            B[:, 0, 0] = be
        object.__setattr__(self, "_alpha", al)
        object.__setattr__(self, "_beta", be)
        object.__setattr__(self, "_c", cc)
        object.__setattr__(self, "_d", dd)
        self._init_common(A, B, cc[:, None, :], dd[:, None, None], batched, ta or tb or tc or td)
        for name, m in (("alpha", al), ("beta", be), ("c", cc), ("D", dd)):
            object.__setattr__(self, name, self._out(m))

    @classmethod
    def _make(cls, alpha, beta, c, D, batched, is_torch) -> Companion:
        def wrap(m):
            m = m if batched else m[0]
            return torch.from_numpy(np.ascontiguousarray(m)) if is_torch else m

        return cls(wrap(alpha), wrap(beta), wrap(c), wrap(D))

    def _charpoly(self) -> np.ndarray:
        return np.concatenate([np.ones((self._alpha.shape[0], 1)), -self._alpha], axis=1)

    def _poles_np(self) -> np.ndarray:
        ev = np.stack([np.roots(np.r_[1.0, -a]) for a in self._alpha])
        return _real_if_close(ev, 0.0) if np.iscomplexobj(ev) else ev

    def _run(self, U, X0):
        from .companion import companion_scan

        cdt = U.dtype
        nb, H, L, _ = U.shape
        n = self.order
        u = U[..., 0].contiguous()
        if X0 is None:
            X0 = torch.zeros(nb, H, n, dtype=cdt)
        ys, fin = companion_scan(
            u,
            _t(self._alpha, cdt),
            beta=_t(self._beta, cdt),
            c=_t(self._c, cdt),
            initial_state=X0,
            return_final_state=True,
        )
        # the scan reads the state after u_t; this convention reads it before u_t
        first = (X0 * _t(self._c, cdt)).sum(-1, keepdim=True)
        y = torch.cat([first, ys[..., :-1]], dim=-1) + _t(self._d, cdt)[:, None] * u
        return y[..., None], fin

    def to_diagonal(self) -> Diagonal:
        """Modal form: poles = roots of z^n - alpha_1 z^{n-1} - ... - alpha_n, and the
        Vandermonde similarity x = V z (V's columns (λ^{n-1}, ..., 1)). Raises for
        repeated/too-close poles and cond(V) > MAX_COND."""
        Ps, Bs, Cs = [], [], []
        P_all = self._poles_np()
        for h in range(self._B.shape[0]):
            P = P_all[h]
            _check_separation("alpha", P)
            V = _vandermonde(P)
            _check_cond("alpha", V, "the Vandermonde matrix of the poles")
            Bs.append(np.linalg.solve(V, self._B[h].astype(V.dtype)))
            Cs.append(self._C[h] @ V)
            Ps.append(P)
        return Diagonal._make(
            np.stack(Ps), np.stack(Bs), np.stack(Cs), self._D, self._batched, self._torch
        )

    def to_companion(self) -> Companion:
        """Itself."""
        return self


# ------------------------------------------------------------------------------- Shift


@dataclass(frozen=True, eq=False)
class Shift(_Realization):
    """Nilpotent shift-register system (finite impulse response), SISO.

    ``c (K,)`` or ``(H, K)``: ``y_t = sum_{i=1}^K c_{i-1} u_{t-i} + D u_t``; ``A`` the K×K
    down-shift (S^K = 0), ``B = e_1``, ``C = c``; the state is ``(u_{t-1}, ..., u_{t-K})``.
    ``simulate`` runs ``causal_conv1d_fn`` with the K+1 taps ``(c_{K-1}, ..., c_0, D)``.

    Example::

        >>> from bmojo_core.realization import Shift
        >>> Shift([1.0, 2.0], D=0.5).simulate([1.0, 0.0, 0.0, 0.0])
        array([0.5, 1. , 2. , 0. ])
    """

    c: Any
    D: Any = 0.0

    def __post_init__(self):
        cc, tc = _to_np("c", self.c, allow_complex=False)
        if cc.ndim not in (1, 2) or cc.shape[-1] < 1:
            raise _shape_err("c", "(K,) or (H, K) with K >= 1", cc.shape)
        batched = cc.ndim == 2
        H, K = (cc.shape[0] if batched else 1), cc.shape[-1]
        cc = cc if batched else cc[None]
        dd, td = _to_np("D", 0.0 if self.D is None else self.D, allow_complex=False)
        dd = (
            np.full(H, dd.item())
            if dd.ndim == 0
            else _expand("D", dd, (), H if batched else None, "(H,)")
        )
        if dd.ndim == 2:
            dd = dd[:, 0]
        B = np.zeros((H, K, 1))
        B[:, 0, 0] = 1.0
        object.__setattr__(self, "_c", cc)
        object.__setattr__(self, "_d", dd)
        # the dense K×K shift is built only when an analysis method needs it
        self._init_common(None, B, cc[:, None, :], dd[:, None, None], batched, tc or td)
        object.__setattr__(self, "c", self._out(cc))
        object.__setattr__(self, "D", self._out(dd))

    @property
    def window(self) -> int:
        """K, the length of the input history kept in the state."""
        return self.order

    def _poles_np(self) -> np.ndarray:
        return np.zeros(self._B.shape[:2])

    def _build_A(self) -> np.ndarray:
        H, K = self._c.shape
        A = np.zeros((H, K, K))
        A[:, np.arange(1, K), np.arange(K - 1)] = 1.0
        return A

    def _charpoly(self) -> np.ndarray:
        return np.eye(1, self.order + 1)[[0] * self._c.shape[0]]

    def _markov_np(self, k: int) -> np.ndarray:
        H, K = self._c.shape
        h = np.zeros((H, k, 1, 1))
        if k:
            h[:, 0, 0, 0] = self._d
        m = min(K, k - 1)
        if m > 0:
            h[:, 1 : m + 1, 0, 0] = self._c[:, :m]
        return h

    def _run(self, U, X0):
        from .conv import causal_conv1d_fn

        cdt = U.dtype
        x = U[..., 0].contiguous()
        weight = torch.cat([_t(self._c, cdt).flip(-1), _t(self._d, cdt)[:, None]], dim=1)
        init = None if X0 is None else X0.flip(-1).contiguous()  # kernel wants oldest first
        y, fin = causal_conv1d_fn(
            x, weight.contiguous(), initial_states=init, return_final_states=True
        )
        return y[..., None], fin.flip(-1)

    def to_companion(self) -> Companion:
        """The ``Companion`` with alpha = 0 (the same system: both are the shift register)."""
        H, K = self._c.shape
        return Companion._make(
            np.zeros((H, K)), np.ones(H), self._c, self._d, self._batched, self._torch
        )


# ------------------------------------------------------------------------------- Bilinear


@dataclass(frozen=True, eq=False)
class Bilinear:
    """Bilinear system ``x_{t+1} = (A0 + sum_j v_{t,j} N_j) x_t + B u_t``,
    ``y_t = C x_t + D u_t`` (no channel axis).

    ``A0 (n, n)``, ``N (m, n, n)`` (or ``(n, n)``: m = 1), ``B (n, p)`` or ``(n,)``,
    ``C (q, n)`` or ``(n,)``, ``D (q, p)`` or scalar (default 0). ``simulate(u, v=None, x0)``
    runs ``bilinear_scan``; the modulating input ``v (..., L, m)`` (or ``(..., L)`` when
    m = 1) defaults to ``u`` (then m must equal p).

    Example::

        >>> import numpy as np
        >>> from bmojo_core.realization import Bilinear
        >>> sys = Bilinear(0.5 * np.eye(2), 0.1 * np.eye(2), [1.0, 0.0], [1.0, 1.0])
        >>> float(sys.volterra2(1, 1))          # C N_0 B
        0.1
    """

    A0: Any
    N: Any
    B: Any
    C: Any
    D: Any = 0.0

    def __post_init__(self):
        Nn, tn = _to_np("N", self.N, allow_complex=False)
        lin = LTI(_to_np("A0", self.A0, allow_complex=False)[0], self.B, self.C, self.D)
        if lin._batched:
            raise _shape_err("A0", "(n, n)", np.shape(lin._A))
        n = lin.order
        if Nn.ndim == 2:
            Nn = Nn[None]
        if Nn.ndim != 3 or Nn.shape[1:] != (n, n):
            raise _shape_err("N", f"(m, n, n) or (n, n) with n = {n}", Nn.shape)
        if lin._complex:
            raise BmojoTypeError("B, C, D: expected real arrays for a Bilinear system")
        is_torch = lin._torch or tn or isinstance(self.A0, torch.Tensor)
        object.__setattr__(self, "_lin", lin)
        object.__setattr__(self, "_N", Nn)
        object.__setattr__(self, "_torch", is_torch)
        for name, m in (
            ("A0", lin._A[0]),
            ("N", Nn),
            ("B", lin._B[0]),
            ("C", lin._C[0]),
            ("D", lin._D[0]),
        ):
            object.__setattr__(self, name, torch.from_numpy(m.copy()) if is_torch else m)

    @property
    def order(self) -> int:
        return self._lin.order

    @property
    def modulators(self) -> int:
        """m, the number of bilinear terms."""
        return self._N.shape[0]

    def to_lti(self) -> LTI:
        """The linear part (N dropped)."""
        return LTI._make(self._lin._A, self._lin._B, self._lin._C, self._lin._D, False, self._torch)

    def poles(self):
        """Eigenvalues of A0."""
        return self.to_lti().poles()

    def spectral_radius(self) -> float:
        """Spectral radius of A0."""
        return self.to_lti().spectral_radius()

    def is_stable(self) -> bool:
        """A0's spectral radius is below 1 (stability for small enough v)."""
        return self.to_lti().is_stable()

    def volterra2(self, g1: int, g2: int, j: int = 0):
        """Second-order Volterra kernel ``C A0^{g2-1} N_j A0^{g1-1} B`` (g1, g2 >= 1): the
        coefficient of a1·a2 in y_T when u = a1 δ_{T-g1-g2} + a2 δ_{T-g2} and v = u.
        A float for SISO systems, else ``(q, p)``."""
        g1, g2 = _count("g1", g1), _count("g2", g2)
        if g1 < 1 or g2 < 1:
            raise BmojoValueError(f"g1, g2: expected lags >= 1, got {g1}, {g2}")
        if not 0 <= int(j) < self.modulators:
            raise BmojoValueError(f"j: expected 0 <= j < m = {self.modulators}, got {j}")
        A, B, C = self._lin._A[0], self._lin._B[0], self._lin._C[0]
        mp = np.linalg.matrix_power
        k = C @ mp(A, g2 - 1) @ self._N[int(j)] @ mp(A, g1 - 1) @ B
        if self._lin.is_siso:
            return float(k[0, 0])
        return torch.from_numpy(k) if self._torch else k

    def simulate(self, u, v=None, x0=None, return_final_state: bool = False):
        """Runs the system (shapes as ``LTI.simulate``; ``v (..., L, m)``, or ``(..., L)``
        for m = 1, defaults to ``u``). Returns ``y`` or ``(y, x_L)``."""
        lin = self._lin
        ut, was_torch, out_dtype = _seq_to_torch("u", u)
        m = self.modulators
        siso = lin.is_siso
        core = 1 if siso else 2
        if ut.dim() < core or (not siso and ut.shape[-1] != lin.inputs):
            want = "(..., L)" if siso else f"(..., L, {lin.inputs})"
            raise _shape_err("u", want, ut.shape)
        lead = tuple(ut.shape[: ut.dim() - core])
        L = ut.shape[len(lead)]
        nb = math.prod(lead)
        U = ut.reshape(nb, 1, L, lin.inputs)
        cdt = U.dtype
        if v is None:
            if m != lin.inputs:
                raise BmojoValueError(
                    f"v: required when the number of modulators m = {m} differs from the "
                    f"number of inputs p = {lin.inputs}"
                )
            Vt = U[:, 0]
        else:
            vt, _, _ = _seq_to_torch("v", v)
            vt = vt.to(cdt)
            if tuple(vt.shape) == lead + (L,) and m == 1:
                vt = vt[..., None]
            if tuple(vt.shape) != lead + (L, m):
                raise _shape_err("v", f"{lead + (L, m)} (u's batch and length, m)", vt.shape)
            Vt = vt.reshape(nb, L, m)
        X0 = None
        n = self.order
        if x0 is not None:
            X0 = _state_to_torch("x0", x0, lead, (), n, cdt, False)
            X0 = X0.reshape(-1, 1, n).expand(nb, 1, n).contiguous()
        if L == 0:
            Y, XL = lin._trivial(U, X0, L)
        else:
            Y, XL = _dense_run(
                lin._A, lin._B, lin._C, lin._D, U, X0, False, N=self._N, V=Vt.contiguous()
            )
        Y = Y.reshape(lead + (L,) + (() if siso else (lin.outputs,))).to(out_dtype)
        XL = XL.reshape(lead + (n,))
        if not was_torch:
            Y, XL = Y.detach().numpy(), XL.detach().numpy()
        return (Y, XL) if return_final_state else Y
