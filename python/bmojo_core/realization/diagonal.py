"""``Diagonal``: the modal form ``A = diag(poles)`` (real or complex poles)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BmojoValueError
from ..ops.scan import diag_scan
from ._arrays import (
    _REAL_TOL,
    RANK_TOL,
    _check_cond,
    _check_separation,
    _expand,
    _shape_err,
    _to_np,
    _vandermonde,
)
from ._base import FORMS, _Realization
from ._simulate import _readout, _t
from .lti import LTI


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

    def to_companion(self) -> _Realization:
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
        return FORMS["companion"]._make(
            np.stack(alphas), np.ones(len(alphas)), np.stack(cs), self._D[:, 0, 0].real,
            self._batched, self._torch,
        )  # fmt: skip

    def to_diagonal(self) -> Diagonal:
        """Itself."""
        return self


# conversions defined in lower modules reach Diagonal through this table (see _base.FORMS)
FORMS["diagonal"] = Diagonal
