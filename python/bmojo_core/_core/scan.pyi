"""``bmojo_core._core.scan``: the diagonal scan and the selective scan (forward, backward)."""

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_I = npt.NDArray[np.int64]

CHECKPOINT_CHUNK: int

def diag_scan(a: _F, b: _F, h0: _F | None, out: _F, last: _F, reverse: bool) -> None: ...
def selective_scan_fwd(
    u: _F,
    delta: _F,
    a: _F,
    b: _F,
    c: _F,
    d: _F | None,
    z: _F | None,
    delta_bias: _F | None,
    h0: _F | None,
    seq_idx: _I | None,
    softplus: bool,
    out: _F,
    last: _F,
    ckpt: _F,
) -> None: ...
def selective_scan_bwd(
    u: _F,
    delta: _F,
    a: _F,
    b: _F,
    c: _F,
    d: _F | None,
    z: _F | None,
    delta_bias: _F | None,
    h0: _F | None,
    seq_idx: _I | None,
    softplus: bool,
    ckpt: _F,
    dout: _F,
    dlast: _F | None,
    du: _F,
    ddelta: _F,
    da: _F,
    db: _F,
    dc: _F,
    dd: _F | None,
    dz: _F | None,
    ddelta_bias: _F | None,
    dh0: _F,
) -> None: ...
