"""Type stubs of the Rust extension. Arrays are C-contiguous NumPy views of torch CPU
tensors, all float32 or all float64 (seq_idx and slots int64); outputs are written in
place. The public, validated API is in the Python package."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_I = npt.NDArray[np.int64]
_D = npt.NDArray[np.float64]

CHECKPOINT_CHUNK: int

def simd_level() -> str: ...
def simd_levels() -> list[str]: ...
def set_simd_level(name: str) -> None: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
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

# --- companion (SPEC §4)

COMPANION_MAX_ORDER: int

def companion_scan_fwd(
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
def companion_scan_bwd(
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

# --- causal conv (SPEC §3)
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

# --- bilinear (SPEC §5)

BILINEAR_MAX_STATE: int
BILINEAR_PAR_CHUNK: int

def bilinear_scan_fwd(
    b: _F, a0: _F, nmat: _F, v: _F, h0: _F | None, parallel: bool, xs: _F, last: _F
) -> None: ...
def bilinear_tv_scan_fwd(b: _F, a: _F, h0: _F | None, parallel: bool, xs: _F, last: _F) -> None: ...
def bilinear_scan_bwd(
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
def bilinear_tv_scan_bwd(
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

# --- eidetic (SPEC §6)

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
def eidetic_push(
    positions: _I, scores: _D, count: _I, new_scores: _D, policy: str, threshold: float
) -> None: ...
def eidetic_check(positions: _I, scores: _D, count: _I, policy: str, threshold: float) -> None: ...
def eidetic_select(
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

# --- fused decode step (bmojo_core.decode)

class DecodePlan:
    """A BMojoLM's parameters copied for the fused decode step (built by bmojo_core.decode)."""

    def __init__(
        self, vocab: int, d_model: int, top: dict, layers: list[dict], f64: bool
    ) -> None: ...
    @staticmethod
    def state_names() -> list[str]: ...
    def step(self, tokens: _I, state: list[npt.NDArray]) -> None: ...

# --- CUDA runtime (issue 5): private; bmojo_core.cuda wraps these and maps their errors
def cuda_sources() -> list[tuple[str, str]]: ...
def cuda_loaded() -> tuple[bool, bool]: ...
def cuda_nvrtc_version(path: str | None) -> tuple[int, int, str]: ...
def cuda_nvrtc_compile(
    path: str | None,
    source: str,
    name: str,
    headers: list[tuple[str, str]],
    options: list[str],
) -> tuple[bytes | None, str]: ...
def cuda_driver_version(path: str | None) -> int: ...
def cuda_device_count() -> int: ...
def cuda_device(ordinal: int) -> tuple[str, int, int, int, int]: ...
def cuda_module_load(ordinal: int, image: bytes) -> int: ...
def cuda_module_function(module: int, name: str) -> int: ...
def cuda_check_args(fmt: str, args: Sequence[object]) -> None: ...
def cuda_launch(
    func: int,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared_mem: int,
    stream: int,
    fmt: str,
    args: Sequence[object],
) -> None: ...
