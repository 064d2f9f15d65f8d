"""``Shift``: the nilpotent shift-register (finite impulse response) form, SISO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..ops.conv import causal_conv1d_fn
from ._arrays import _expand, _shape_err, _to_np
from ._base import _Realization
from ._simulate import _t
from .companion import Companion


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
