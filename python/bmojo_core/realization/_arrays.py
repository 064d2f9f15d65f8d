"""Input normalisation and numerical guards of the realization classes: array conversion
and shape checks, the condition-number and pole-separation guards, rank helpers (Krylov
matrices, reachable subspaces) and the constants that tune them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import BmojoTypeError, BmojoValueError

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
