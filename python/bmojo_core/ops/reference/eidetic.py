"""Reference innovation scores (design §6.1) and bounded eidetic store (design §6.2), by
brute force in float64."""

from __future__ import annotations

import torch

__all__ = ["eidetic_held_ref", "eidetic_select_ref", "innovation_scores_ref"]


def innovation_scores_ref(
    y: torch.Tensor,
    taps: int | None = None,
    weights: torch.Tensor | None = None,
    metric: str = "mse",
    history: torch.Tensor | None = None,
    chi2_rate: float = 1.0 / 16.0,
    chi2_floor: float = 1e-6,
) -> torch.Tensor:
    """Innovation scores (design §6.1) one position at a time in float64, returned in
    float64 ``(batch, L)``. ``history (batch, h, d)``: outputs before ``y`` (oldest first);
    a position with ``a < k`` predecessors uses the first ``a`` taps rescaled by
    ``S_k / S_a``; ``"chi2"`` divides by the bias-corrected EMA of past innovations
    (``v = ε_t`` when there is none), floored at ``chi2_floor``."""
    k = (len(weights) if weights is not None else 4) if taps is None else taps
    c = (
        torch.full((k,), 1.0 / k, dtype=torch.float64)
        if weights is None
        else weights.detach().to(torch.float64)
    )
    y64 = y.detach().to(torch.float64)
    batch, L, d = y64.shape
    prev = (
        history.detach().to(torch.float64)
        if history is not None
        else torch.zeros(batch, 0, d, dtype=torch.float64)
    )
    ext = torch.cat([prev, y64], dim=1)
    h = prev.shape[1]
    total = float(c.sum())
    out = torch.zeros(batch, L, dtype=torch.float64)
    m = torch.zeros(batch, dtype=torch.float64)
    z = 0.0
    for t in range(L):
        i = h + t
        a = min(i, k)
        part = float(c[:a].sum())
        f = 1.0 if (a == k or part == 0.0) else total / part
        pred = torch.zeros(batch, d, dtype=torch.float64)
        for j in range(1, a + 1):
            pred = pred + c[j - 1] * f * ext[:, i - j]
        eps = ((ext[:, i] - pred) ** 2).mean(-1) if d else torch.zeros(batch, dtype=torch.float64)
        if metric == "chi2":
            v = m / z if z > 0 else eps
            out[:, t] = eps / torch.clamp(v, min=chi2_floor)
        else:
            out[:, t] = eps
        m = (1 - chi2_rate) * m + chi2_rate * eps
        z = (1 - chi2_rate) * z + chi2_rate
    return out


def eidetic_held_ref(
    scores: torch.Tensor, upto: int, capacity: int, policy: str = "topk", threshold: float = 0.0
) -> torch.Tensor:
    """Positions held after consuming ``scores[:, :upto]`` (design §6.2), by brute force:
    ``"topk"`` ranks all past positions by (score desc, position asc) and keeps the first
    ``capacity``; ``"threshold"`` does so among scores > threshold; ``"fifo"`` keeps the
    last ``capacity`` positions with score > threshold. Returns ``(batch, capacity)``
    int64, sorted ascending, padded with -1."""
    rows = []
    for row in scores.detach().to(torch.float64).tolist():
        cand = [t for t in range(upto) if policy == "topk" or row[t] > threshold]
        if policy == "fifo":
            keep = cand[max(0, len(cand) - capacity) :]
        else:
            keep = sorted(cand, key=lambda t: (-row[t], t))[:capacity]
        keep = sorted(keep)
        rows.append(keep + [-1] * (capacity - len(keep)))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), capacity)


def eidetic_select_ref(
    scores: torch.Tensor, capacity: int, chunk: int, policy: str = "topk", threshold: float = 0.0
) -> torch.Tensor:
    """For each chunk start ``s = 0, chunk, 2 chunk, ... < L``: ``eidetic_held_ref`` of the
    positions ``< s``; ``(batch, n_chunks, capacity)`` int64."""
    batch, L = scores.shape
    starts = range(0, L, chunk)
    held = [eidetic_held_ref(scores, s, capacity, policy, threshold) for s in starts]
    if not held:
        return torch.zeros(batch, 0, capacity, dtype=torch.int64)
    return torch.stack(held, dim=1)
