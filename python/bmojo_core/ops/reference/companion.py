"""Reference companion-form recurrence (design §4)."""

from __future__ import annotations

import torch

from ._common import compute_dtype

__all__ = ["companion_scan"]


def companion_scan(
    u: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Companion (canonical-form) scan, design §4, one step at a time::

        s_t = sum_{i=1..n} alpha[..., t, i-1] s_{t-i} + beta_t u_t
        y_t = sum_{i=0..n-1} c[..., t, i] s_{t-i} + D u_t      (y_t = s_t + D u_t without c)

    ``u`` (B, D, L); ``alpha``/``c`` (B, D, L, n) or (D, n); ``beta`` (B, D, L) or (D,);
    ``D`` (D,); ``initial_state`` (B, D, n) = (s_0, s_{-1}, ..., s_{1-n}). Returns ``y``
    (dtype of ``u``) and, if asked, the final state (s_L, ..., s_{L-n+1}) in the compute
    dtype.
    """
    cdt = compute_dtype(u, alpha, beta, c, D, initial_state)
    batch, dim, length = u.shape
    n = alpha.shape[-1]
    uc = u.to(cdt)

    def at(x, t):
        """Coefficients of step t, broadcast to (B, D[, n])."""
        if x is None:
            return None
        x = x.to(cdt)
        if x.dim() in (3, 4):  # per step
            return x[:, :, t]
        return x.expand(batch, *x.shape)

    # hist[k] = s_{t-k} before step t (k = 1..n); kept as a list, newest first.
    if initial_state is None:
        hist = [uc.new_zeros(batch, dim) for _ in range(n)]
    else:
        h0 = initial_state.to(cdt)
        hist = [h0[:, :, j] for j in range(n)]
    ys = []
    for t in range(length):
        a = at(alpha, t)
        b = at(beta, t)
        drive = uc[:, :, t] if b is None else b * uc[:, :, t]
        s = drive + sum(a[:, :, i] * hist[i] for i in range(n))
        hist = [s] + hist[:-1]
        if c is None:
            y = s
        else:
            ct = at(c, t)
            y = sum(ct[:, :, i] * hist[i] for i in range(n))
        if D is not None:
            y = y + D.to(cdt) * uc[:, :, t]
        ys.append(y)
    y = torch.stack(ys, dim=-1) if ys else uc.new_zeros(batch, dim, 0)
    y = y.to(u.dtype)
    if return_final_state:
        return y, torch.stack(hist, dim=-1)
    return y
