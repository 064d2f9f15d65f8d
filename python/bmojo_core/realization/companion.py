"""``Companion``: the controllable canonical (companion) form, SISO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..ops.companion import companion_scan
from ._arrays import (
    _check_cond,
    _check_separation,
    _expand,
    _real_if_close,
    _shape_err,
    _to_np,
    _vandermonde,
)
from ._base import FORMS, _Realization
from ._simulate import _t
from .diagonal import Diagonal


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


# conversions defined in lower modules reach Companion through this table (see _base.FORMS)
FORMS["companion"] = Companion
