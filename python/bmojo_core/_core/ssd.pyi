"""``bmojo_core._core.ssd``: Mamba-2's multi-head SSD scan (forward, backward) and its
decoding step. ``dims`` is ``(batch, L, heads, head_dim, groups, N)``; ``x``, ``dt``,
``B``, ``C``, ``z`` are flat spans of their (batch, time) rows, ``rows`` their row
strides."""

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_I = npt.NDArray[np.int64]

CHECKPOINT_CHUNK: int

def ssd_fwd(
    x: _F,
    dt: _F,
    a: _F,
    b: _F,
    c: _F,
    d: _F | None,
    z: _F | None,
    dt_bias: _F | None,
    h0: _F | None,
    seq_idx: _I | None,
    softplus: bool,
    limit: tuple[float, float] | None,
    dims: tuple[int, int, int, int, int, int],
    rows: tuple[int, int, int, int, int],
    out: _F,
    last: _F,
    ckpt: _F,
    token_major: bool = False,
) -> None: ...
def ssd_bwd(
    x: _F,
    dt: _F,
    a: _F,
    b: _F,
    c: _F,
    d: _F | None,
    z: _F | None,
    dt_bias: _F | None,
    seq_idx: _I | None,
    softplus: bool,
    limit: tuple[float, float] | None,
    dims: tuple[int, int, int, int, int, int],
    rows: tuple[int, int, int, int, int],
    ckpt: _F,
    dout: _F,
    dlast: _F | None,
    dx: _F,
    ddt: _F,
    da: _F,
    db: _F,
    dc: _F,
    dd: _F | None,
    dz: _F | None,
    ddt_bias: _F | None,
    dh0: _F,
) -> None: ...
def ssd_state_update(
    state: _F,
    x: _F,
    dt: _F,
    a: _F,
    b: _F,
    c: _F,
    d: _F | None,
    z: _F | None,
    dt_bias: _F | None,
    softplus: bool,
) -> _F: ...
