"""Eidetic token retention (design §6.1, §6.2): innovation scores over SSM outputs and the
bounded store of the most innovative past tokens.

**Innovation.** ``ŷ_t = Σ_{j=1..k} c_j y_{t-j}`` (default ``k = 4``, ``c_j = 1/k``) and
``ε_t = ‖y_t − ŷ_t‖² / d``. A position with only ``a < k`` predecessors (the carried
history counts) uses the first ``a`` taps rescaled by ``S_k / S_a`` with
``S_a = Σ_{j≤a} c_j`` (no rescaling when ``S_a = 0``): the default predictor becomes the
mean of the available history, and ``ŷ = 0`` at the very first position. Metric
``"chi2"`` divides ``ε_t`` by ``max(v_{t-1}, chi2_floor)``, where ``v`` is the
bias-corrected exponential moving average of the past innovations
(``m ← (1−ρ) m + ρ ε``, ``z ← (1−ρ) z + ρ``, ``v = m / z``, ``ρ = chi2_rate``); with no
past innovation (``z = 0``) ``v = ε_t`` (the first score is ``ε_t / max(ε_t, chi2_floor)``:
1 unless ``ε_t`` is below the floor).
Scores are not differentiable (they drive a discrete selection): the outputs never
require grad.

**Store.** Capacity ``m``. A token is a candidate under ``"topk"`` always, under
``"threshold"`` and ``"fifo"`` when its score is ``> threshold``. A candidate enters if
the store is not full; when full, ``"topk"``/``"threshold"`` let it in only if its score
is strictly larger than the smallest held, which it evicts (among equal smallest scores
the newest is evicted: the older token stays), and ``"fifo"`` evicts the oldest. So
``"topk"`` holds the top-``m`` past scores ranked by (score desc, position asc). The
streaming form (:class:`EideticStore`) and the chunked builder (:func:`eidetic_select`)
select the same tokens. Each row's store is a binary heap kept in plain tensors
(``positions`` int64 with -1 for empty slots, ``scores`` float64, ``count`` int64), so a
store is saved with ``state_dict()``.

Ops: ``bmojo::innovation_scores``, ``bmojo::eidetic_select``, ``bmojo::eidetic_push``
(mutates the store's tensors). Rows of the batch are independent tasks: results do not
depend on the thread count. CUDA kernels (``cuda/eidetic.cu``): the store is bitwise the
CPU's (same heap); the scores are bitwise those of the CPU's scalar SIMD level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .. import _validate as V
from ..runtime import cuda as _cuda
from ..runtime import launch as CU
from ._library import custom_op
from ._native import array, core, inout, view

__all__ = [
    "CHI2_FLOOR",
    "CHI2_RATE",
    "EideticStore",
    "eidetic_select",
    "gather_positions",
    "innovation_scores",
]

CHI2_RATE: float = 1.0 / 16.0
"""Default rate ρ of the χ² moving average of past innovations."""
CHI2_FLOOR: float = 1e-6
"""Default floor of the χ² denominator."""

POLICIES = ("topk", "threshold", "fifo")
MAX_CAPACITY = 2**20
"""The most tokens a store may hold per row (a store is allocated in full)."""
MAX_TAPS = 2**16
"""The most taps of the innovation predictor (its history is allocated in full)."""

# CUDA kernels (cuda/eidetic.cu). Scores: one thread per (row, position) in the CPU scalar
# level's operation order, then a sequential χ² pass per row. Store: one thread per row
# running the CPU's heap (bitwise equal), after a check kernel; nothing is written unless
# every row is valid, and the host raises from the per-row status (outside graph capture).
_K_EPS = _cuda.declare("eidetic.cu", "innovation_eps")
_K_FINISH = _cuda.declare("eidetic.cu", "innovation_finish")
_K_HISTORY = _cuda.declare("eidetic.cu", "innovation_history")
_K_CHECK = _cuda.declare("eidetic.cu", "eidetic_check", dtypes=("f64",))
_K_PUSH = _cuda.declare("eidetic.cu", "eidetic_push", dtypes=("f64",))
_K_SELECT = _cuda.declare("eidetic.cu", "eidetic_select", dtypes=("f64",))
_STATUS = {
    1: "positions: empty slots (-1) must all come after the held entries",
    2: "count: expected values >= 0",
    3: "positions: a held position is not before the row's count",
    4: "scores: held scores must be finite",
    5: "positions: the heap order of the store is broken (corrupted state)",
    6: "positions: a position is held twice",
}


def _policy_code(policy: str, threshold: float) -> int:
    """The kernels' policy code, with the CPU kernel's checks (ValueError, as there)."""
    if not (math.isfinite(threshold) and threshold >= 0.0):
        raise V.BmojoValueError(f"threshold: expected a finite value >= 0, got {threshold}")
    if policy not in POLICIES:
        raise V.BmojoValueError(f"policy: expected 'topk', 'threshold' or 'fifo', got {policy!r}")
    return POLICIES.index(policy)


def _cuda_store_check(pos, sc, count, news, policy: int) -> torch.Tensor:
    """Launches the row checks; returns the per-row status (int32)."""
    b, m = pos.shape
    status = torch.empty(b, dtype=torch.int32, device=pos.device)
    if b:
        _K_CHECK.launch(
            "f64", grid=CU.grid_exact(b), block=(CU.BLOCK, 1, 1),
            args=(pos, sc, count, news, status, b, m, news.shape[1], policy),
            fmt="ppppp" "ii" "l" "i", device=pos.device,
        )  # fmt: skip
    return status


def _cuda_raise(status: torch.Tensor, length: int) -> None:
    """Raises the CPU kernel's error for a failed check (a host sync; skipped while a CUDA
    graph is captured, where a failed call just writes nothing)."""
    if status.numel() == 0 or CU.capturing():
        return
    codes = status.cpu()
    bad = ((codes >= 1) & (codes <= 6)).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        raise V.BmojoValueError(f"row {r}: {_STATUS[int(codes[r])]}")
    if bool((codes == 7).any()):
        raise V.BmojoValueError("scores: NaN is not a valid score")
    if bool((codes == 8).any()):
        raise V.BmojoValueError(f"count: count + {length} overflows")


def _innovation_outputs(y: Tensor, weights: Tensor, count: Tensor):
    """Uninitialised (scores, history, count, ema) of an innovation_scores call."""
    b, length, d = y.shape
    k = weights.shape[0]
    return y.new_empty(b, length), y.new_empty(b, k, d), count.new_empty(b), y.new_empty(b, 2)


# ----------------------------------------------------------------------------- ops


@custom_op("bmojo::innovation_scores", mutates_args=(), device_types="cpu")
def innovation_scores_op(
    y: Tensor,
    weights: Tensor,
    history: Tensor,
    count: Tensor,
    ema: Tensor,
    chi2: bool,
    rate: float,
    floor: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalised form: y (B, L, d), weights (k,), history (B, k, d), ema (B, 2) in one
    float dtype (float32/float64); count (B,) int64. Returns (scores (B, L), history,
    count, ema) after y."""
    return _innovation_cpu(y, weights, history, count, ema, chi2, rate, floor)


def _innovation_cpu(y, weights, history, count, ema, chi2, rate, floor):
    scores, hist, cnt, em = _innovation_outputs(y, weights, count)
    core.eidetic.innovation_scores(
        view(y), view(weights), view(history), view(count), view(ema),
        chi2, rate, floor, array(scores), array(hist), array(cnt), array(em),
    )  # fmt: skip
    return scores, hist, cnt, em


@innovation_scores_op.register_kernel("cuda")
def _(y, weights, history, count, ema, chi2, rate, floor):
    b, length, d = y.shape
    k = weights.shape[0]
    scores, hist, cnt, em = _innovation_outputs(y, weights, count)
    sfx, dev, blk = CU.suffix(y), y.device, (CU.BLOCK, 1, 1)
    real = "d" if y.dtype == torch.float64 else "f"
    if b * length:
        _K_EPS.launch(
            sfx, grid=CU.grid1(b * length), block=blk,
            args=(y, weights, history, count, scores, b, length, d, k), fmt="ppppp" "iiii",
            device=dev,
        )  # fmt: skip
    if b:
        _K_FINISH.launch(
            sfx, grid=CU.grid_exact(b), block=blk,
            args=(scores, count, ema, cnt, em, b, length, int(chi2), rate, floor),
            fmt="ppppp" "iii" + real + real, device=dev,
        )  # fmt: skip
    if hist.numel():
        _K_HISTORY.launch(
            sfx, grid=CU.grid1(hist.numel()), block=blk,
            args=(y, history, hist, b, length, d, k), fmt="ppp" "iiii", device=dev,
        )  # fmt: skip
    return scores, hist, cnt, em


@innovation_scores_op.register_fake
def _(y, weights, history, count, ema, chi2, rate, floor):
    b, length, d = y.shape
    k = weights.shape[0]
    return y.new_empty(b, length), y.new_empty(b, k, d), count.new_empty(b), y.new_empty(b, 2)


@custom_op("bmojo::eidetic_select", mutates_args=(), device_types="cpu")
def eidetic_select_op(
    scores: Tensor,
    positions: Tensor,
    store_scores: Tensor,
    start: Tensor,
    chunk: int,
    policy: str,
    threshold: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalised form: scores (B, L) float64; the store before the first position
    positions (B, m) int64, store_scores (B, m) float64, start (B,) int64 (absolute
    position of scores[:, 0]). Returns (held (B, ceil(L/chunk), m), positions, scores,
    count) — the store after the last position."""
    b, length = scores.shape
    m = positions.shape[1]
    held = positions.new_empty(b, -(-length // chunk) if chunk > 0 else 0, m)
    pos = positions.new_empty(b, m)
    sc = store_scores.new_empty(b, m)
    cnt = start.new_empty(b)
    core.eidetic.select(
        view(scores), view(positions), view(store_scores), view(start),
        chunk, policy, threshold, array(held), array(pos), array(sc), array(cnt),
    )  # fmt: skip
    return held, pos, sc, cnt


@eidetic_select_op.register_kernel("cuda")
def _(scores, positions, store_scores, start, chunk, policy, threshold):
    if chunk < 1:
        raise V.BmojoValueError("chunk: expected >= 1")
    code = _policy_code(policy, threshold)
    b, length = scores.shape
    m = positions.shape[1]
    nch = -(-length // chunk)
    held = positions.new_empty(b, nch, m)
    pos = positions.new_empty(b, m)
    sc = store_scores.new_empty(b, m)
    cnt = start.new_empty(b)
    status = _cuda_store_check(positions, store_scores, start, scores, code)
    if b:
        _K_SELECT.launch(
            "f64", grid=CU.grid_exact(b), block=(CU.BLOCK, 1, 1),
            args=(scores, positions, store_scores, start, status, held, pos, sc, cnt, b, m,
                  length, chunk, code, threshold),
            fmt="ppppppppp" "ii" "ll" "i" "d", device=scores.device,
        )  # fmt: skip
    _cuda_raise(status, length)
    return held, pos, sc, cnt


@eidetic_select_op.register_fake
def _(scores, positions, store_scores, start, chunk, policy, threshold):
    b, length = scores.shape
    m = positions.shape[1]
    n = (length + chunk - 1) // chunk
    return (
        positions.new_empty(b, n, m),
        positions.new_empty(b, m),
        store_scores.new_empty(b, m),
        start.new_empty(b),
    )


@custom_op("bmojo::eidetic_push", mutates_args=("positions", "scores", "count"), device_types="cpu")
def eidetic_push_op(
    positions: Tensor,
    scores: Tensor,
    count: Tensor,
    new_scores: Tensor,
    policy: str,
    threshold: float,
) -> None:
    """Consumes new_scores (B, T) float64 into the store positions (B, m) int64 /
    scores (B, m) float64 / count (B,) int64, in place (all contiguous). Nothing is written
    when a check fails."""
    _push_cpu(positions, scores, count, new_scores, policy, threshold)


def _push_cpu(positions, scores, count, new_scores, policy, threshold) -> None:
    core.eidetic.push(
        inout(positions), inout(scores), inout(count), view(new_scores),
        policy, threshold,
    )  # fmt: skip


@eidetic_push_op.register_kernel("cuda")
def _(positions, scores, count, new_scores, policy, threshold):
    code = _policy_code(policy, threshold)
    b, m = positions.shape
    if new_scores.dim() != 2 or new_scores.shape[0] != b:
        raise V.BmojoValueError(f"scores: expected shape ({b}, T), got {tuple(new_scores.shape)}")
    status = _cuda_store_check(positions, scores, count, new_scores, code)
    if b:
        _K_PUSH.launch(
            "f64", grid=CU.grid_exact(b), block=(CU.BLOCK, 1, 1),
            args=(positions, scores, count, new_scores, status, b, m, new_scores.shape[1], code,
                  threshold),
            fmt="ppppp" "ii" "l" "i" "d", device=positions.device,
        )  # fmt: skip
    _cuda_raise(status, new_scores.shape[1])


@eidetic_push_op.register_fake
def _(positions, scores, count, new_scores, policy, threshold):
    return None


# ----------------------------------------------------------------------------- streaming


def push_scores(
    positions: Tensor, scores: Tensor, count: Tensor, new_scores: Tensor, policy: str,
    threshold: float,
) -> None:  # fmt: skip
    """Pushes ``new_scores (B, T)`` float64 into a store held in plain tensors, in place
    (the normalised arguments of ``bmojo::eidetic_push``; a failed call writes nothing).
    The streaming step of :class:`EideticStore` and of the layers: eager CPU calls go
    straight to the kernel, because the dispatcher costs more than a one-token push."""
    if torch.compiler.is_compiling() or positions.is_cuda:
        torch.ops.bmojo.eidetic_push(positions, scores, count, new_scores, policy, threshold)
    else:
        _push_cpu(positions, scores, count, new_scores, policy, threshold)


def innovation_step(
    y: Tensor, weights: Tensor, history: Tensor, count: Tensor, ema: Tensor, chi2: bool,
    rate: float = CHI2_RATE, floor: float = CHI2_FLOOR,
) -> Tensor:  # fmt: skip
    """Scores ``y (B, T, d)`` continuing the innovation state ``history (B, k, d)``,
    ``count (B,)``, ``ema (B, 2)`` and advances that state in place (the normalised
    arguments of ``bmojo::innovation_scores``, all in one float dtype but ``count``).
    Returns the scores ``(B, T)``. The streaming step of the layers."""
    if torch.compiler.is_compiling() or y.is_cuda:
        scores, h, c, e = torch.ops.bmojo.innovation_scores(
            y, weights, history, count, ema, chi2, rate, floor
        )
    else:
        scores, h, c, e = _innovation_cpu(y, weights, history, count, ema, chi2, rate, floor)
    history.copy_(h)
    count.copy_(c)
    ema.copy_(e)
    return scores


def check_store(
    positions: Tensor, scores: Tensor, count: Tensor, policy: str, threshold: float
) -> None:
    """Raises ``BmojoValueError`` unless ``positions (B, m)`` int64, ``scores (B, m)``
    float64 and ``count (B,)`` int64 form a valid store under ``policy`` (held prefix then
    -1, distinct positions before ``count``, finite scores, heap order). Checked on the CPU:
    restoring a store is not a hot path."""
    core.eidetic.check(
        view(positions.cpu()), view(scores.cpu()), view(count.cpu()),
        policy, threshold,
    )  # fmt: skip


# ----------------------------------------------------------------------------- checks


def _policy(policy: object, threshold: object) -> tuple[str, float]:
    if not isinstance(policy, str):
        raise V.BmojoTypeError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if policy not in POLICIES:
        raise V.BmojoValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise V.BmojoTypeError(f"threshold: expected a float >= 0, got {threshold!r}")
    t = float(threshold)
    if not (math.isfinite(t) and t >= 0.0):
        # Innovation scores are >= 0: a negative threshold would admit every token.
        raise V.BmojoValueError(f"threshold: expected a finite float >= 0, got {threshold!r}")
    return policy, t


def _scores_f64(name: str, t: object, batch: int | None) -> Tensor:
    V.device_tensor(name, t)
    V.shape(name, t, (batch, None), "(batch, T)")
    # NaN is rejected by the kernel (before anything is written).
    return t.detach().to(torch.float64).contiguous()


def _store_tensors(name: str, store: object, batch: int, capacity: int):
    """(positions, scores, count or None) of a store dict / EideticStore, checked."""
    if isinstance(store, EideticStore):
        store = store.state_dict()
    if not isinstance(store, Mapping):
        raise V.BmojoTypeError(
            f"{name}: expected a dict with 'positions', 'scores' (and 'count') or an "
            f"EideticStore, got {type(store).__name__}"
        )
    for key in ("positions", "scores"):
        if key not in store:
            raise V.BmojoValueError(f"{name}: missing key {key!r}")
    unknown = set(store) - {"positions", "scores", "count"}
    if unknown:
        raise V.BmojoValueError(f"{name}: unexpected keys {sorted(unknown)}")
    pos, sc, cnt = store["positions"], store["scores"], store.get("count")
    V.device_tensor(f"{name}['positions']", pos, dtypes=(torch.int64,))
    V.shape(f"{name}['positions']", pos, (batch, capacity), "(batch, capacity)")
    V.device_tensor(f"{name}['scores']", sc)
    V.shape(f"{name}['scores']", sc, (batch, capacity), "(batch, capacity)")
    if cnt is not None:
        V.device_tensor(f"{name}['count']", cnt, dtypes=(torch.int64,))
        V.shape(f"{name}['count']", cnt, (batch,), "(batch,)")
    return pos, sc, cnt


# ----------------------------------------------------------------------------- innovation


def innovation_scores(
    y: Tensor,
    taps: int | None = None,
    weights: Tensor | None = None,
    metric: str = "mse",
    history: Tensor | None = None,
    state: Mapping[str, Tensor] | None = None,
    return_state: bool = False,
    chi2_rate: float = CHI2_RATE,
    chi2_floor: float = CHI2_FLOOR,
):
    """Innovation scores ``ε (batch, L)`` of SSM outputs ``y (batch, L, d)`` (design §6.1;
    definitions in the module doc). Fused in Rust: one pass over ``y``, vectorised over
    ``d``, parallel over batch rows.

    ``taps`` k (default 4, or ``len(weights)``); ``weights (k,)`` the predictor taps
    ``c_1..c_k`` (``c_j`` multiplies ``y_{t-j}``; default ``1/k``); ``metric`` ``"mse"`` or
    ``"chi2"``. To continue a previous piece pass either ``history (batch, h ≤ k, d)``
    (the outputs just before ``y``, oldest first; the χ² average restarts) or ``state``
    (the dict returned with ``return_state=True``: ``history (batch, k, d)``,
    ``count (batch,)`` int64 positions seen, ``ema (batch, 2)`` the χ² average); scoring a
    sequence in pieces carrying ``state`` equals scoring it whole (bitwise).

    Returns ``scores`` in y's dtype (float16/bfloat16 are computed in float32), or
    ``(scores, state)``; ``state`` tensors are in the compute dtype. Not differentiable.
    """
    V.device_tensor("y", y)
    V.shape("y", y, (None, None, None), "(batch, L, d)")
    b, length, d = y.shape
    if weights is not None:
        V.device_tensor("weights", weights)
        V.shape("weights", weights, (None,), "(taps,)")
        k = weights.shape[0]
        if k < 1:
            raise V.BmojoValueError("weights: expected at least one tap, got shape (0,)")
        if taps is not None and V.int_arg("taps", taps, 1, MAX_TAPS) != k:
            raise V.BmojoValueError(f"taps: {taps} does not match weights of length {k}")
    else:
        k = 4 if taps is None else V.int_arg("taps", taps, 1, MAX_TAPS)
    if not isinstance(metric, str) or metric not in ("mse", "chi2"):
        raise V.BmojoValueError(f"metric: expected 'mse' or 'chi2', got {metric!r}")
    for name, v, ok in (
        ("chi2_rate", chi2_rate, lambda x: 0.0 < x <= 1.0),
        ("chi2_floor", chi2_floor, lambda x: 0.0 < x < math.inf),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(float(v)):
            want = "in (0, 1]" if name == "chi2_rate" else "a finite float > 0"
            raise V.BmojoValueError(f"{name}: expected {want}, got {v!r}")
    if history is not None and state is not None:
        raise V.BmojoValueError("history: pass either history or state, not both")
    named = {"y": y, "weights": weights}
    if history is not None:
        V.device_tensor("history", history)
        V.shape("history", history, (b, None, d), "(batch, h, d)")
        if history.shape[1] > k:
            raise V.BmojoValueError(
                f"history: expected at most taps={k} previous outputs, got {history.shape[1]}"
            )
        named["history"] = history
    if state is not None:
        if not isinstance(state, Mapping):
            raise V.BmojoTypeError(f"state: expected a dict, got {type(state).__name__}")
        for key in ("history", "count", "ema"):
            if key not in state:
                raise V.BmojoValueError(f"state: missing key {key!r}")
        V.device_tensor("state['history']", state["history"])
        V.shape("state['history']", state["history"], (b, k, d), "(batch, taps, d)")
        V.device_tensor("state['count']", state["count"], dtypes=(torch.int64,))
        V.shape("state['count']", state["count"], (b,), "(batch,)")
        V.device_tensor("state['ema']", state["ema"])
        V.shape("state['ema']", state["ema"], (b, 2), "(batch, 2)")
        named["state['history']"] = state["history"]
        named["state['ema']"] = state["ema"]
    dev = V.same_device({**named, "state['count']": None if state is None else state["count"]}, "y")
    cdt = V.compute_dtype(named, "y")
    with torch.no_grad():
        c = (
            torch.full((k,), 1.0 / k, dtype=cdt, device=dev)
            if weights is None
            else weights.detach().to(cdt).contiguous()
        )
        if state is not None:
            hist = state["history"].detach().to(cdt).contiguous()
            count = state["count"].detach().contiguous()
            ema = state["ema"].detach().to(cdt).contiguous()
        else:
            hist = torch.zeros(b, k, d, dtype=cdt, device=dev)
            h = 0 if history is None else history.shape[1]
            if h:
                hist[:, k - h :] = history.detach().to(cdt)
            count = torch.full((b,), h, dtype=torch.int64, device=dev)
            ema = torch.zeros(b, 2, dtype=cdt, device=dev)
        scores, hist, count, ema = torch.ops.bmojo.innovation_scores(
            y.detach().to(cdt).contiguous(), c, hist, count, ema,
            metric == "chi2", float(chi2_rate), float(chi2_floor),
        )  # fmt: skip
    scores = scores.to(y.dtype)
    if return_state:
        return scores, {"history": hist, "count": count, "ema": ema}
    return scores


# ----------------------------------------------------------------------------- store


def eidetic_select(
    scores: Tensor,
    capacity: int,
    chunk: int,
    policy: str = "topk",
    threshold: float = 0.0,
    store: Mapping[str, Tensor] | EideticStore | None = None,
    start: int | None = None,
    return_store: bool = False,
):
    """Chunked store builder (design §6.2/§6.3): for each chunk of ``chunk`` positions of
    ``scores (batch, L)`` (the last chunk may be shorter), the positions held by the store
    at the chunk's start (built from the positions before it), sorted ascending, padded
    with -1: ``positions (batch, ceil(L / chunk), capacity)`` int64.

    ``policy`` ``"topk"`` (``threshold`` ignored), ``"threshold"`` or ``"fifo"`` (see the
    module doc); ``threshold`` ≥ 0. Positions are absolute: ``scores[:, t]`` is position
    ``start + t``. To continue a previous piece pass ``store`` (a dict
    ``positions (batch, capacity)`` int64, ``scores (batch, capacity)``, optional
    ``count (batch,)`` int64 — as returned with ``return_store=True`` or by
    ``EideticStore.state_dict()`` — or an :class:`EideticStore`); ``start`` defaults to the
    store's ``count`` (else 0). Chunks are counted from the start of this piece. With
    ``return_store=True`` returns ``(positions, store)``, ``store`` the dict after the last
    position. Not differentiable (gather payloads with :func:`gather_positions`).
    """
    V.device_tensor("scores", scores)
    V.shape("scores", scores, (None, None), "(batch, L)")
    b = scores.shape[0]
    capacity = V.int_arg("capacity", capacity, 1, MAX_CAPACITY)
    chunk = V.int_arg("chunk", chunk, 1)
    policy, tau = _policy(policy, threshold)
    sc = _scores_f64("scores", scores, b)
    dev = scores.device
    if store is not None:
        pos0, sc0, cnt0 = _store_tensors("store", store, b, capacity)
        V.same_device(
            {"scores": scores, "store['positions']": pos0, "store['scores']": sc0,
             "store['count']": cnt0}, "scores",
        )  # fmt: skip
        pos0 = pos0.detach().contiguous()
        sc0 = sc0.detach().to(torch.float64).contiguous()
    else:
        pos0 = torch.full((b, capacity), -1, dtype=torch.int64, device=dev)
        sc0 = torch.zeros(b, capacity, dtype=torch.float64, device=dev)
        cnt0 = None
    if start is not None:
        start = V.int_arg("start", start, 0)
        st = torch.full((b,), start, dtype=torch.int64, device=dev)
        if cnt0 is not None and not torch.equal(cnt0, st):
            raise V.BmojoValueError(
                f"start: {start} does not match the store's count {cnt0.tolist()}"
            )
    elif cnt0 is not None:
        st = cnt0.detach().contiguous()
    else:
        st = torch.zeros(b, dtype=torch.int64, device=dev)
    held, pos, scs, cnt = torch.ops.bmojo.eidetic_select(sc, pos0, sc0, st, chunk, policy, tau)
    if return_store:
        return held, {"positions": pos, "scores": scs, "count": cnt}
    return held


class EideticStore:
    """Streaming bounded eidetic store (design §6.2): per batch row, the ``capacity`` most
    innovative past positions under ``policy`` (``"topk"``, ``"threshold"``, ``"fifo"``;
    see the module doc), updated in O(log capacity) per token by a heap kept in place in
    plain tensors: ``positions (batch, capacity)`` int64 (-1 = empty; heap order, not
    sorted), ``scores (batch, capacity)`` float64 and ``count (batch,)`` int64 (positions
    consumed per row). Pushing the scores of a sequence in any pieces holds, after each
    piece, exactly what :func:`eidetic_select` reports at that position. ``device``
    (default CPU) places the tensors; a CUDA store is updated by the CUDA kernel (same
    heap, bitwise the same store) and takes scores on its device.

    Example::

        store = EideticStore(batch=2, capacity=8)
        store.push(innovation_scores(y))      # y (2, L, d)
        store.held()                          # (2, 8) sorted positions, -1 padded
    """

    def __init__(
        self,
        batch: int,
        capacity: int,
        policy: str = "topk",
        threshold: float = 0.0,
        device: torch.device | str | None = None,
    ):
        self.batch = V.int_arg("batch", batch, 0)
        self.capacity = V.int_arg("capacity", capacity, 1, MAX_CAPACITY)
        self.policy, self.threshold = _policy(policy, threshold)
        try:
            dev = torch.device("cpu") if device is None else torch.device(device)
        except (RuntimeError, TypeError):
            msg = f"device: expected a CPU or CUDA device, got {device!r}"
            raise V.BmojoValueError(msg) from None
        if dev.type not in ("cpu", "cuda"):
            raise V.BmojoValueError(f"device: expected a CPU or CUDA device, got {dev}")
        with V.allocating("batch"):
            shape = (self.batch, self.capacity)
            self.positions = torch.full(shape, -1, dtype=torch.int64, device=dev)
            self.scores = torch.zeros(shape, dtype=torch.float64, device=dev)
            self.count = torch.zeros(self.batch, dtype=torch.int64, device=dev)

    def __repr__(self) -> str:
        return (
            f"EideticStore(batch={self.batch}, capacity={self.capacity}, "
            f"policy={self.policy!r}, threshold={self.threshold})"
        )

    def push(self, scores: Tensor) -> None:
        """Consumes ``scores (batch, T)`` (any float dtype; positions ``count ..
        count+T-1`` of each row). A failed call changes nothing."""
        new = _scores_f64("scores", scores, self.batch)
        if new.device != self.positions.device:
            V.same_device({"store": self.positions, "scores": new}, "store")  # raises
        for name in ("positions", "scores", "count"):
            V.writable(f"store.{name}", getattr(self, name), {"scores": scores})
        push_scores(self.positions, self.scores, self.count, new, self.policy, self.threshold)

    def size(self) -> Tensor:
        """Number of held tokens per row ``(batch,)`` int64 (never above capacity)."""
        return (self.positions >= 0).sum(1)

    def held(self) -> Tensor:
        """Held positions ``(batch, capacity)`` sorted ascending, padded with -1."""
        big = torch.iinfo(torch.int64).max
        p = torch.where(self.positions >= 0, self.positions, big).sort(1).values
        return torch.where(p == big, -1, p)

    def held_scores(self) -> Tensor:
        """Scores of :meth:`held`'s positions (0 for empty slots), float64."""
        big = torch.iinfo(torch.int64).max
        p = torch.where(self.positions >= 0, self.positions, big)
        order = p.argsort(dim=1, stable=True)
        return torch.where(p.gather(1, order) == big, 0.0, self.scores.gather(1, order))

    def reset(self, rows=None) -> None:
        """Empties the chosen rows (all by default): an int, a sequence of ints, an int
        tensor of row indices or a bool mask ``(batch,)``. Other rows are untouched."""
        idx = V.indices("rows", rows, self.batch, "row")
        self.positions[idx] = -1
        self.scores[idx] = 0.0
        self.count[idx] = 0

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of ``positions``, ``scores`` and ``count`` (plain tensors)."""
        return {
            "positions": self.positions.clone(),
            "scores": self.scores.clone(),
            "count": self.count.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restores a :meth:`state_dict` (or the store returned by :func:`eidetic_select`)
        of the same batch, capacity and policy. Checks every invariant (shapes, dtypes,
        held prefix then -1, distinct positions before ``count``, finite scores, heap
        order); on failure raises and changes nothing."""
        pos, sc, cnt = _store_tensors("state", state, self.batch, self.capacity)
        if cnt is None:
            raise V.BmojoValueError("state: missing key 'count'")
        pos = pos.detach().contiguous().clone()
        sc = sc.detach().to(torch.float64).contiguous().clone()
        cnt = cnt.detach().contiguous().clone()
        try:
            check_store(pos, sc, cnt, self.policy, self.threshold)
        except V.BmojoValueError as e:
            raise V.BmojoValueError(f"state: {e}") from None
        self.positions.copy_(pos)
        self.scores.copy_(sc)
        self.count.copy_(cnt)


# ----------------------------------------------------------------------------- payloads


def gather_positions(x: Tensor, positions: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Payloads of selected positions: ``x (batch, L, d)`` and ``positions (batch, ...)``
    int (e.g. ``(batch, n_chunks, m)`` from :func:`eidetic_select`; -1 = empty) give
    ``(out (batch, ..., d), mask (batch, ...) bool)`` with ``out = x[b, p - offset]`` where
    ``mask`` and zeros elsewhere. Differentiable w.r.t. ``x`` (plain torch indexing)."""
    V.device_tensor("x", x)
    V.shape("x", x, (None, None, None), "(batch, L, d)")
    b, length, d = x.shape
    V.device_tensor("positions", positions, dtypes=V.INTS)
    V.same_device({"x": x, "positions": positions}, "x")
    if positions.dim() < 1 or positions.shape[0] != b:
        raise V.BmojoValueError(
            f"positions: expected shape (batch={b}, ...), got {tuple(positions.shape)}"
        )
    offset = V.int_arg("offset", offset, 0)
    pos = positions.to(torch.int64)
    mask = pos >= 0
    idx = torch.where(mask, pos - offset, 0)
    if not torch.compiler.is_compiling():
        bad = mask & ((idx < 0) | (idx >= length))
        if bad.any():
            p = int(pos[bad][0])
            raise V.BmojoValueError(
                f"positions: {p} is outside x's positions [{offset}, {offset + length})"
            )
    flat = idx.reshape(b, -1)
    if length == 0:
        out = x.new_zeros(b, flat.shape[1], d)
    else:
        out = torch.gather(x, 1, flat[..., None].expand(b, flat.shape[1], d))
    out = torch.where(mask.reshape(b, -1, 1), out, out.new_zeros(()))
    return out.reshape(*pos.shape, d), mask
