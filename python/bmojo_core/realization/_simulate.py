"""Torch glue of ``simulate``: converts sequences and states to tensors in the compute dtype,
runs a dense system through ``bilinear_scan`` and reads the outputs from the kernels' states
(the kernels read the state *after* u_t, the realizations the state *before* it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import BmojoTypeError, BmojoValueError
from ..ops.bilinear import bilinear_scan
from ._arrays import MAX_DENSE_ORDER, _to_np


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
