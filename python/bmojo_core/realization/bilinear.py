"""``Bilinear``: ``x_{t+1} = (A0 + sum_j v_{t,j} N_j) x_t + B u_t`` (no channel axis)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validate import int_arg
from ..errors import BmojoTypeError, BmojoValueError
from ._arrays import _shape_err, _to_np
from ._simulate import _dense_run, _seq_to_torch, _state_to_torch
from .lti import LTI


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
        g1, g2 = int_arg("g1", g1, 0), int_arg("g2", g2, 0)
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
