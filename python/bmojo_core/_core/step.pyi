"""``bmojo_core._core.step``: the streaming selective state update."""

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_I = npt.NDArray[np.int64]

def selective_state_update(
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
    slots: _I | None,
    out: _F | None,
    snaps: _F | None,
) -> _F | None: ...
