"""Pure-PyTorch reference implementations (the oracles) of bmojo_core's ops, one file per op
family, mirroring :mod:`bmojo_core.ops`.

These functions *define* the documented semantics of the fast kernels (docs/design.md).
They are written for clarity, not speed: they loop over time in Python, one step at a time,
using ordinary differentiable torch operations, so that

* they run in float64 (and are the ground truth of the parity and gradient tests);
* ``torch.autograd`` differentiates them (reference gradients);
* they depend on nothing but ``torch`` and ``math`` (never on the extension).

Conventions (design §1): the state after consuming ``u_t`` is ``h_t``; the output ``y_t``
reads ``h_t``; ``h_0`` (the initial state, default zero) is the state before the first
input. Computation happens in float64 as soon as any input is float64, else in float32;
outputs are returned in the dtype of the main input, states in the compute dtype.
"""

from ._common import softplus_thresholded
from .bilinear import bilinear_scan
from .companion import companion_scan
from .conv import causal_conv1d, causal_conv1d_update
from .eidetic import eidetic_held_ref, eidetic_select_ref, innovation_scores_ref
from .scan import diag_scan, selective_scan
from .ssd import ssd_scan
from .step import selective_state_update

__all__ = [
    "bilinear_scan",
    "causal_conv1d",
    "causal_conv1d_update",
    "companion_scan",
    "diag_scan",
    "eidetic_held_ref",
    "eidetic_select_ref",
    "innovation_scores_ref",
    "selective_scan",
    "selective_state_update",
    "softplus_thresholded",
    "ssd_scan",
]
