"""``bmojo_core._core.companion``: the companion (canonical) recurrence (design §4)."""

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]

MAX_ORDER: int

def scan_fwd(
    u: _F,
    alpha: _F,
    beta: _F | None,
    c: _F | None,
    d: _F | None,
    h0: _F | None,
    y: _F,
    s: _F | None,
    last: _F,
) -> None: ...
def scan_bwd(
    u: _F,
    alpha: _F,
    beta: _F | None,
    c: _F | None,
    d: _F | None,
    h0: _F | None,
    s: _F,
    dy: _F,
    dlast: _F | None,
    du: _F,
    dalpha: _F,
    dbeta: _F | None,
    dc: _F | None,
    dd: _F | None,
    dh0: _F,
) -> None: ...
