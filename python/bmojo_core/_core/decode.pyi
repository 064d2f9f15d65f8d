"""``bmojo_core._core.decode``: the fused decode step (used by ``bmojo_core.decode``)."""

import numpy as np
import numpy.typing as npt

_I = npt.NDArray[np.int64]

class DecodePlan:
    """A BMojoLM's parameters copied for the fused decode step (built by bmojo_core.decode)."""

    def __init__(
        self, vocab: int, d_model: int, top: dict, layers: list[dict], f64: bool
    ) -> None: ...
    @staticmethod
    def state_names() -> list[str]: ...
    def step(self, tokens: _I, state: list[npt.NDArray]) -> None: ...
