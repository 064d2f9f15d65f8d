"""Reference bilinear recurrence (design §5), sequential."""

from __future__ import annotations

import torch

from ._common import compute_dtype

__all__ = ["bilinear_scan"]


def bilinear_scan(
    u: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    N: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Bilinear / time-varying dense scan, one step at a time (design §5).

    ``x_t = A_t x_{t-1} + B u_t``, ``y_t = C x_t + D u_t`` with ``A_t = A + Σ_j v_{t,j}
    N_j`` (``A (n, n)``, ``N (m, n, n)``, ``v (batch, L, m)`` defaulting to ``u``) or
    ``A_t = A[:, t]`` for ``A (batch, L, n, n)``. ``u (batch, L, p)``, ``B (n, p)``,
    ``C (q, n)``, ``D (q, p)``, ``initial_state (batch, n)``. Returns ``y`` (the states
    when ``C`` is None) in ``u``'s dtype, and the final state in the compute dtype when
    ``return_final_state``.
    """
    cdt = compute_dtype(u, A, B, C, D, N, v, initial_state)
    batch, L, _ = u.shape
    uc, Ac, Bc = u.to(cdt), A.to(cdt), B.to(cdt)
    n = Bc.shape[0]
    if N is not None and v is None:
        v = u
    x = (
        torch.zeros(batch, n, dtype=cdt, device=u.device)
        if initial_state is None
        else initial_state.to(cdt)
    )
    xs = []
    for t in range(L):
        if Ac.dim() == 4:
            At = Ac[:, t]
        else:
            At = Ac.expand(batch, n, n)
            if N is not None:
                At = At + torch.einsum("bm,mij->bij", v[:, t].to(cdt), N.to(cdt))
        x = torch.einsum("bij,bj->bi", At, x) + uc[:, t] @ Bc.T
        xs.append(x)
    states = torch.stack(xs, 1) if L > 0 else torch.zeros(batch, 0, n, dtype=cdt)
    if C is None:
        y = states
    else:
        y = states @ C.to(cdt).T
        if D is not None:
            y = y + uc @ D.to(cdt).T
    y = y.to(u.dtype)
    if return_final_state:
        return y, (x.clone() if L == 0 else x)
    return y
