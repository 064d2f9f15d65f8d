"""bmojo_core: fast, differentiable state-space scans for modern sequence models.

The CPU kernels live in the Rust extension ``bmojo_core._core``; :mod:`bmojo_core.ops` wraps
them as torch custom ops (namespace ``bmojo``) with autograd. Importing the package never
touches CUDA and needs no optional dependency. This module only re-exports; the layers of
the package, lowest first: :mod:`~bmojo_core.runtime` (threads, SIMD level, CUDA runtime),
:mod:`~bmojo_core.ops` (the ops and their references), :mod:`~bmojo_core.inference`
(streaming) and :mod:`~bmojo_core.layers` (nn modules), :mod:`~bmojo_core.realization`,
then the applications (:mod:`~bmojo_core.train`, :mod:`~bmojo_core.mqar`,
:mod:`~bmojo_core.testing`, :mod:`~bmojo_core.bench`, the ``bmojo`` command line).

Environment variables read at import (:mod:`bmojo_core.runtime.settings`):
``BMOJO_NUM_THREADS`` (threads of the kernels' pool, default ``torch.get_num_threads()``)
and ``BMOJO_SIMD`` (force a lower instruction-set level, one of ``simd_levels()``).
"""

from . import layers, realization
from .errors import (
    BmojoCompileError,
    BmojoCudaError,
    BmojoError,
    BmojoTypeError,
    BmojoValueError,
)
from .inference import Stream, stream
from .layers import BMojoConfig, BMojoLayer, BMojoLM, SelectiveSSM, SlidingWindowAttention
from .ops import (
    EideticStore,
    bilinear_scan,
    causal_conv1d_fn,
    causal_conv1d_update,
    companion_scan,
    diag_scan,
    eidetic_select,
    gather_positions,
    innovation_scores,
    mamba_chunk_scan_combined,
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    reference,
    selective_scan_fn,
    selective_state_update,
    ssd_state_update,
)
from .runtime import (
    cuda,
    get_num_threads,
    set_num_threads,
    set_simd_level,
    simd_level,
    simd_levels,
)
from .runtime.info import package_version

__version__ = package_version()

__all__ = [
    "BMojoConfig",
    "BMojoLM",
    "BMojoLayer",
    "BmojoCompileError",
    "BmojoCudaError",
    "BmojoError",
    "BmojoTypeError",
    "BmojoValueError",
    "EideticStore",
    "SelectiveSSM",
    "SlidingWindowAttention",
    "Stream",
    "__version__",
    "bilinear_scan",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "companion_scan",
    "cuda",
    "diag_scan",
    "eidetic_select",
    "gather_positions",
    "get_num_threads",
    "innovation_scores",
    "layers",
    "mamba_chunk_scan_combined",
    "mamba_inner_fn",
    "mamba_split_conv1d_scan_combined",
    "realization",
    "reference",
    "selective_scan_fn",
    "selective_state_update",
    "ssd_state_update",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "simd_levels",
    "stream",
]
