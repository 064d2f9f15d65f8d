"""``LTI``: the dense form (MIMO, real or complex, optional channel axis)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BmojoValueError
from ._arrays import (
    RANK_TOL,
    _check_cond,
    _check_separation,
    _companion_matrix,
    _expand,
    _krylov,
    _reachable_basis,
    _real_if_close,
    _shape_err,
    _to_np,
)
from ._base import FORMS, _Realization


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
        comp = FORMS["companion"]._make(
            np.stack(alphas), np.ones(len(alphas)), np.stack(cs), self._D[:, 0, 0],
            self._batched, self._torch,
        )  # fmt: skip
        return (comp, self._out(np.stack(Ts))) if return_transform else comp

    def to_diagonal(self) -> _Realization:
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
        return FORMS["diagonal"]._make(
            P, np.stack(Bs), np.stack(Cs), self._D, self._batched, self._torch, siso=False
        )


# conversions defined in lower modules reach LTI through this table (see _base.FORMS)
FORMS["lti"] = LTI
