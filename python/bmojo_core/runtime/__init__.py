"""The runtime layer: the kernels' thread pool and SIMD level, machine information and the
CUDA runtime (NVRTC compilation, kernel cache, launches).

Importing it applies ``BMOJO_NUM_THREADS`` and ``BMOJO_SIMD`` (see :mod:`.settings`); it never
touches CUDA.
"""

from . import cuda
from .settings import (
    configure_from_env,
    get_num_threads,
    set_num_threads,
    set_simd_level,
    simd_level,
    simd_levels,
)

__all__ = [
    "cuda",
    "get_num_threads",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "simd_levels",
]

configure_from_env()
