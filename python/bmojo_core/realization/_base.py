"""The base shared by the LTI realization classes (``LTI``, ``Diagonal``, ``Companion``,
``Shift``): Markov parameters, transfer function, poles, controllability and observability,
Gramians, similarity, minimal realization and the common part of ``simulate``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._validate import int_arg
from ..errors import BmojoValueError
from ._arrays import (
    _REAL_TOL,
    RANK_TOL,
    _check_cond,
    _expand,
    _krylov,
    _psd_factor,
    _reachable_basis,
    _real_if_close,
    _shape_err,
    _to_np,
)
from ._simulate import _common, _complex_of, _dense_run, _seq_to_torch, _state_to_torch, _t

#: The realization forms that conversions return, by name: ``"lti"``, ``"diagonal"``,
#: ``"companion"``. Each form module registers its class here when it is imported
#: (``FORMS["lti"] = LTI`` in lti.py). The modules of the package import only lower ones
#: (_arrays ← _simulate ← _base ← lti ← diagonal ← companion ← shift; bilinear ← lti), so a
#: conversion whose target is defined in a higher module (this base's ``to_lti``, ``similar``
#: and ``minimal``; ``LTI.to_diagonal``, ``LTI.to_companion``; ``Diagonal.to_companion``)
#: looks the target class up here instead of importing it: no import cycle, not even a lazy
#: one. The package ``__init__`` imports every form module, so the table is complete before
#: any realization exists.
FORMS: dict[str, Any] = {}


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
        k = int_arg("k", k, 0)
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
        L = int_arg("L", L, 0)
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
    def to_lti(self) -> _Realization:
        """The same system as a dense ``LTI``."""
        return FORMS["lti"]._make(self._A, self._B, self._C, self._D, self._batched, self._torch)

    def similar(self, T) -> _Realization:
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
        return FORMS["lti"]._make(
            np.stack(A), np.stack(B), np.stack(C), self._D.copy(), self._batched, self._torch or tt
        )

    def minimal(self, tol: float = RANK_TOL) -> _Realization:
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
        return FORMS["lti"]._make(A, B, C, D, self._batched, self._torch)

    # ------------------------------------------------------------------ simulation
    def simulate(self, u, x0=None, return_final_state: bool = False):
        """Runs the system on ``u`` (shapes: the package docstring) from ``x0`` (default 0).
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
