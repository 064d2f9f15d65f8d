"""Launch helpers of the ops' CUDA implementations: dtype suffixes of the entry points,
launch shapes, null pointers, graph-capture detection. The device checks of the public
wrappers are `_validate.device_tensor` / `_validate.same_device`.

Nothing here touches CUDA at import time."""

from __future__ import annotations

import torch

BLOCK = 256
"""Threads per block of the element-wise kernels (grid-stride loops)."""
_MAX_BLOCKS = 1 << 20
MAX_GRID_Y = 65535
"""Most blocks along a grid's y (and z) axis."""

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
    return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
