"""``bmojo_core._core.conv``: causal depthwise convolution and its update (design §3)."""

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_I = npt.NDArray[np.int64]

def causal_conv1d_fwd(
    x: _F,
    weight: _F,
    bias: _F | None,
    seq_idx: _I | npt.NDArray[np.int32] | None,
    initial_states: _F | None,
    silu: bool,
    out: _F,
    final_states: _F | None,
) -> None: ...
def causal_conv1d_bwd(
    x: _F,
    weight: _F,
    bias: _F | None,
    seq_idx: _I | npt.NDArray[np.int32] | None,
    initial_states: _F | None,
    dout: _F,
    dfinal_states: _F | None,
    silu: bool,
    dx: _F,
    dweight: _F,
    dbias: _F,
    dinitial_states: _F | None,
) -> None: ...
def causal_conv1d_update(
    x: _F,
    conv_state: _F,
    weight: _F,
    bias: _F | None,
    silu: bool,
    cache_seqlens: _I | npt.NDArray[np.int32] | None,
    conv_state_indices: _I | npt.NDArray[np.int32] | None,
    out: _F | None,
) -> _F | None: ...
