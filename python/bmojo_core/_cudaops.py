"""Helpers of the CUDA implementations of the conv, companion, bilinear and eidetic ops
(issue 5): launch shapes, dtype suffixes and the device checks of the public wrappers.

Nothing here touches CUDA at import time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validate as V

BLOCK = 256
"""Threads per block of the element-wise kernels (grid-stride loops)."""
_MAX_BLOCKS = 1 << 20

_SUFFIX = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}


def suffix(t: torch.Tensor) -> str:
    """Entry-point suffix of a tensor's dtype."""
    return _SUFFIX[t.dtype]


def grid1(total: int, block: int = BLOCK) -> tuple[int, int, int]:
    """1-D grid covering `total` elements (kernels loop when it is capped)."""
    return (max(1, min(-(-total // block), _MAX_BLOCKS)), 1, 1)


def grid_exact(total: int, block: int = BLOCK) -> tuple[int, int, int]:
    """1-D grid of one thread per item, for kernels without a grid-stride loop."""
    return (max(1, -(-total // block)), 1, 1)


def ptr(t: torch.Tensor | None):
    """A launch argument for an optional tensor (null pointer for None)."""
    return 0 if t is None else t


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (no host syncs)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype] = V.FLOATS) -> torch.Tensor:
    """Like `_validate.tensor`, but CPU and CUDA tensors are both accepted (the op has a
    CUDA kernel); `same_device` then checks that all inputs share one device."""
    if not isinstance(t, torch.Tensor):
        raise V.BmojoTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(V.dtype_name(d) for d in dtypes)
        raise V.BmojoTypeError(f"{name}: expected dtype {allowed}, got {V.dtype_name(t.dtype)}")
    if t.device.type not in ("cpu", "cuda"):
        raise V.BmojoValueError(f"{name}: expected a CPU or CUDA tensor, got device {t.device}")
    return t


def same_device(named: dict[str, torch.Tensor | None], anchor: str) -> torch.device:
    """The anchor's device; every other given tensor must be on it."""
    dev = named[anchor].device  # type: ignore[union-attr]
    for name, t in named.items():
        if t is not None and t.device != dev:
            raise V.BmojoValueError(
                f"{name}: expected a tensor on {dev} (the device of {anchor}), got device "
                f"{t.device}; move all inputs to one device"
            )
    return dev
