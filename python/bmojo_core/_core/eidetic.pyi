"""``bmojo_core._core.eidetic``: innovation scores and the bounded eidetic store (design §6)."""

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_I = npt.NDArray[np.int64]
_D = npt.NDArray[np.float64]

def innovation_scores(
    y: _F,
    weights: _F,
    history: _F,
    count: _I,
    ema: _F,
    chi2: bool,
    rate: float,
    floor: float,
    scores: _F,
    history_out: _F,
    count_out: _I,
    ema_out: _F,
) -> None: ...
def push(
    positions: _I, scores: _D, count: _I, new_scores: _D, policy: str, threshold: float
) -> None: ...
def check(positions: _I, scores: _D, count: _I, policy: str, threshold: float) -> None: ...
def select(
    scores: _D,
    positions: _I,
    store_scores: _D,
    start: _I,
    chunk: int,
    policy: str,
    threshold: float,
    held: _I,
    positions_out: _I,
    scores_out: _D,
    count_out: _I,
) -> None: ...
