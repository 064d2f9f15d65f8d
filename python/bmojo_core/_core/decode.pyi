"""``bmojo_core._core.decode``: the fused decode step (used by ``bmojo_core.ops.decode``)."""

import numpy as np
import numpy.typing as npt

_I = npt.NDArray[np.int64]
_Piece = tuple[str, str, tuple[int, ...]]

class DecodePlan:
    """A BMojoLM's parameters copied for the fused decode step (bmojo_core.ops.decode)."""

    def __init__(
        self, vocab: int, d_model: int, top: dict, layers: list[dict], f64: bool
    ) -> None: ...
    def step(self, tokens: _I, state: DecodeState) -> None: ...

class DecodeState:
    """A stream's state buffers owned natively, shared with Python as arrays."""

    def __init__(self, stream: list[_Piece], layers: list[list[_Piece]]) -> None: ...
    def array(self, layer: int | None, name: str) -> npt.NDArray: ...
