"""Realization toolkit for linear time-invariant systems (design §7).

Convention (SciPy's and python-control's; docs/design.md §7)::

    x_{t+1} = A x_t + B u_t,     y_t = C x_t + D u_t,     x_0 given (default 0)

so the output y_t reads the state *before* u_t, and the Markov parameters are
``h_0 = D`` and ``h_k = C A^{k-1} B``. (The scans of design §1 read the state *after* u_t;
``simulate`` shifts their states by one step.)

Classes (small immutable objects; arrays may be NumPy arrays, torch tensors, lists or
scalars; every result comes back as a torch tensor if any defining array was a tensor,
else as a NumPy array; analysis results are float64/complex128):

* ``LTI(A, B, C, D)`` — dense, MIMO, real or complex.
* ``Diagonal(poles, B, C, D)`` — ``A = diag(poles)``, real or complex poles.
* ``Companion(alpha, beta, c, D)`` — first row ``alpha``, ones on the sub-diagonal,
  ``B = beta e_1``, ``C = c`` (scipy ``tf2ss`` / control ``'reachable'`` layout). With the
  companion signal ``s_t = sum_i alpha_i s_{t-i} + beta u_t`` the state is
  ``x_t = (s_{t-1}, ..., s_{t-n})``.
* ``Shift(c, D)`` — window ``K = len(c)``, ``A`` the K×K down-shift, ``B = e_1``, ``C = c``:
  ``y_t = sum_{i=1}^K c_{i-1} u_{t-i} + D u_t``; the state is ``(u_{t-1}, ..., u_{t-K})``.
* ``Bilinear(A0, N, B, C, D)`` — ``x_{t+1} = (A0 + sum_j v_{t,j} N_j) x_t + B u_t``.

Channel batches: ``LTI``, ``Diagonal``, ``Companion`` and ``Shift`` accept one optional
leading axis of H independent systems ("channels"), e.g. ``poles (H, n)``; every result
then has a leading H axis.

Sequence shapes for ``simulate`` (``...`` = any batch dimensions, possibly none):

* SISO systems (one input, one output): ``u (..., L)`` → ``y (..., L)``;
* MIMO systems: ``u (..., L, p)`` → ``y (..., L, q)``;
* with H channels the channel axis comes just before L: ``u (..., H, L[, p])``
  (channel-major, like the scans);
* ``x0`` and the final state: ``(..., [H,] n)``; ``x0`` may omit the batch dimensions.

``simulate`` runs the fast kernels: ``diag_scan`` (real ``Diagonal``), ``companion_scan``
(``Companion``), ``causal_conv1d_fn`` (``Shift``) and ``bilinear_scan`` (``LTI``,
``Bilinear``, complex ``Diagonal``: complex systems run as a real system of twice the
order, at most ``MAX_DENSE_ORDER``). It computes in float64 for float64 inputs and in
float32 otherwise, and returns the dtype and kind (NumPy or torch) of ``u``; complex
systems give complex outputs unless their input–output map is real (conjugate-closed
poles and residues), when the real part is returned. Torch inputs stay differentiable.

Numerical guards (each failure raises ``BmojoValueError`` naming the argument and why):
similarity transforms and conversions refuse matrices whose condition number exceeds
``MAX_COND``; diagonalisation refuses poles closer than ``MIN_POLE_SEPARATION`` (relative
to ``max(1, max|pole|)``); rank decisions use singular values relative to the system's norm.
"""

from ._arrays import MAX_COND, MAX_DENSE_ORDER, MIN_POLE_SEPARATION, RANK_TOL
from .bilinear import Bilinear
from .companion import Companion
from .diagonal import Diagonal
from .lti import LTI
from .shift import Shift

__all__ = [
    "LTI",
    "MAX_COND",
    "MAX_DENSE_ORDER",
    "MIN_POLE_SEPARATION",
    "RANK_TOL",
    "Bilinear",
    "Companion",
    "Diagonal",
    "Shift",
]


# The classes' docstring examples, which live in the form modules, are examples of this
# package: ``doctest.testmod(bmojo_core.realization)`` runs them.
__test__ = {cls.__name__: cls for cls in (LTI, Diagonal, Companion, Shift, Bilinear)}
