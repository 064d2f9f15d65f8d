"""CUDA runtime of bmojo_core (issue 5): NVRTC compilation of the kernel sources in
``cuda/`` (embedded in the extension), an on-disk CUBIN cache, a per-device module cache
and launches on torch's current stream.

Op modules declare the kernels they use at import time (nothing is compiled or loaded, CUDA
is never initialised by ``import bmojo_core``)::

    K = declare("scan.cu", "selective_scan_fwd")             # entry points <name>_<dtype>
    K.launch("f32", grid=(gx, gy, gz), block=(bx, by, bz), args=(x, y, n, 1.0), fmt="ppif",
             shared_mem=0, device=x.device)

``fmt`` has one code per argument: ``p`` device pointer (a tensor or an int), ``i`` int32,
``l`` int64, ``f`` float32, ``d`` float64.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BmojoCudaError

__all__ = ["DTYPES", "Kernel", "declare", "declared"]

DTYPES = ("f32", "f64", "f16", "bf16")
"""Suffixes of a kernel's entry points: ``<name>_<suffix>``."""

_REGISTRY: dict[tuple[str, str], Kernel] = {}


@dataclass(frozen=True)
class Kernel:
    """A declared kernel family: ``source`` (a file of ``cuda/``), ``name`` and the dtype
    suffixes it is instantiated for."""

    source: str
    name: str
    dtypes: tuple[str, ...] = DTYPES

    def symbol(self, suffix: str) -> str:
        return f"{self.name}_{suffix}"

    def launch(self, suffix, grid, block, args, fmt, shared_mem=0, device=None) -> None:
        raise BmojoCudaError("the CUDA runtime is not built yet")


def declare(source: str, name: str, dtypes: tuple[str, ...] = DTYPES) -> Kernel:
    """Registers (once) and returns the kernel family ``name`` of ``cuda/<source>``."""
    key = (source, name)
    k = _REGISTRY.get(key)
    if k is None:
        k = _REGISTRY[key] = Kernel(source, name, tuple(dtypes))
    elif k.dtypes != tuple(dtypes):
        raise ValueError(f"kernel {name} of {source} declared twice with different dtypes")
    return k


def declared() -> list[Kernel]:
    """Every declared kernel family (the compile test walks this list)."""
    return list(_REGISTRY.values())
