"""``bmojo_core._core.bilinear``: the bilinear / time-varying dense recurrence (design §5)."""

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]

MAX_STATE: int
PAR_CHUNK: int

def scan_fwd(
    b: _F, a0: _F, nmat: _F, v: _F, h0: _F | None, parallel: bool, xs: _F, last: _F
) -> None: ...
def tv_scan_fwd(b: _F, a: _F, h0: _F | None, parallel: bool, xs: _F, last: _F) -> None: ...
def scan_bwd(
    b: _F,
    a0: _F,
    nmat: _F,
    v: _F,
    h0: _F | None,
    xs: _F,
    dxs: _F,
    dlast: _F | None,
    db: _F,
    da0: _F,
    dn: _F,
    dv: _F,
    dh0: _F,
) -> None: ...
def tv_scan_bwd(
    b: _F,
    a: _F,
    h0: _F | None,
    xs: _F,
    dxs: _F,
    dlast: _F | None,
    db: _F,
    da: _F,
    dh0: _F,
) -> None: ...
