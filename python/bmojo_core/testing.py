"""Hypothesis strategies and assertions for testing code built on ``bmojo_core.realization``.

Import it in your own test suite (it needs ``hypothesis``, a test-only dependency, so
``import bmojo_core`` does not import it)::

    from hypothesis import given
    from bmojo_core.testing import diagonal_realizations, assert_same_markov

    @given(diagonal_realizations(n=(1, 5), complex_poles=True))
    def test_round_trip(sys):
        assert_same_markov(sys, sys.to_companion())

How the strategies draw (docs/design.md §10): hypothesis draws the
*structure* — sizes, how many poles are complex pairs, a seed — and the arrays are built
from ``numpy.random.default_rng(seed)``: poles from radius and angle (conjugate pairs
where real systems need them), entries that matter for rank kept away from 0. Shrinking
therefore shrinks sizes, and examples stay reproducible from the printed seed.

Sizes (``n``, ``window``, ``length``, ``batch``...) accept an int, a ``(min, max)`` pair
(inclusive) or a hypothesis strategy of ints. ``dtype`` picks the kind of the arrays
given to the constructors: a NumPy dtype (``np.float64``) gives NumPy arrays, a torch
dtype (``torch.float64``) gives tensors (the realizations then return tensors).

Stability control ``stable``: ``True`` → every pole has modulus at most ``max_radius``
(< 1); ``False`` → at least one pole outside the unit circle (modulus in [1.05, 1.5]);
``None`` → moduli anywhere in [0.05, 1.5].
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from .realization import LTI, Bilinear, Companion, Diagonal, Shift

__all__ = [
    "assert_equivalent",
    "assert_same_markov",
    "bilinear_realizations",
    "chunkings",
    "companion_realizations",
    "diagonal_realizations",
    "input_sequences",
    "lti_realizations",
    "shift_realizations",
]

Size = int | tuple[int, int] | SearchStrategy


def _size(name: str, x: Size, lo: int = 0) -> SearchStrategy:
    if isinstance(x, SearchStrategy):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        if x < lo:
            raise ValueError(f"{name}: expected >= {lo}, got {x}")
        return st.just(int(x))
    if isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, int) for v in x):
        if not lo <= x[0] <= x[1]:
            raise ValueError(f"{name}: expected {lo} <= min <= max, got {x}")
        return st.integers(x[0], x[1])
    raise TypeError(f"{name}: expected an int, a (min, max) pair or a strategy, got {x!r}")


_seeds = st.integers(0, 2**32 - 1)


def _kind(dtype) -> Any:
    """A converter from float64/complex128 NumPy arrays to the requested kind."""
    if isinstance(dtype, torch.dtype):

        def conv(a):
            a = np.asarray(a)
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t if t.is_complex() else t.to(dtype)

        return conv
    np_dtype = np.dtype(dtype)

    def conv(a):
        a = np.asarray(a)
        return a if np.iscomplexobj(a) else a.astype(np_dtype)

    return conv


def _away_from_zero(rng, size, lo=0.5, hi=1.5):
    return rng.choice([-1.0, 1.0], size=size) * rng.uniform(lo, hi, size=size)


def _radius_range(stable, max_radius):
    if stable is True:
        if not 0.05 < max_radius < 1:
            raise ValueError(f"max_radius: expected in (0.05, 1) when stable, got {max_radius}")
        return 0.05, max_radius
    return 0.05, 1.5


def _draw_poles(rng, n, n_pairs, stable, max_radius, min_sep, conjugate=True):
    """n poles: n_pairs conjugate pairs (or, conjugate=False, unpaired complex poles) and
    real poles of random sign, pairwise at least min_sep apart; None if no luck."""
    lo, hi = _radius_range(stable, max_radius)
    for _ in range(50):
        n_cplx = n_pairs if conjugate else n
        r = rng.uniform(lo, hi, size=n - n_pairs if conjugate else n)
        if stable is False:
            r[rng.integers(len(r))] = rng.uniform(1.05, 1.5)
        if conjugate:
            theta = rng.uniform(0.15, math.pi - 0.15, size=n_cplx)
            z = r[:n_cplx] * np.exp(1j * theta)
            real = r[n_cplx:] * rng.choice([-1.0, 1.0], size=n - 2 * n_cplx)
            poles = np.concatenate([z, np.conj(z), real.astype(complex)])
        else:
            poles = r * np.exp(1j * rng.uniform(-math.pi, math.pi, size=n))
        if n > 1:
            d = np.abs(poles[:, None] - poles[None, :])
            np.fill_diagonal(d, np.inf)
            if d.min() < min_sep:
                continue
        return poles if (not conjugate or n_pairs) else poles.real
    return None


@st.composite
def lti_realizations(
    draw,
    n: Size = (1, 4),
    inputs: Size = 1,
    outputs: Size = 1,
    stable: bool | None = True,
    max_cond: float = 1e3,
    max_radius: float = 0.95,
    dtype=np.float64,
) -> LTI:
    """Dense real ``LTI`` systems ``A = T M T^-1`` with M real block-diagonal (real poles
    and 2×2 blocks of conjugate pairs, pairwise ≥ 0.05 apart) and a random T whose
    condition number is at most ``max_cond`` (so conversions stay well posed: the
    eigenvector matrix with unit columns has condition number at most ``max_cond·√n``).

    Example::

        @given(lti_realizations(n=(2, 5), inputs=2, outputs=(1, 3)))
        def test_markov_under_similarity(sys): ...
    """
    nn = draw(_size("n", n, 1))
    p = draw(_size("inputs", inputs, 1))
    q = draw(_size("outputs", outputs, 1))
    pairs = draw(st.integers(0, nn // 2))
    rng = np.random.default_rng(draw(_seeds))
    poles = _draw_poles(rng, nn, pairs, stable, max_radius, 0.05)
    assume(poles is not None)
    M = np.zeros((nn, nn))
    for i in range(pairs):
        a, b = poles[i].real, poles[i].imag
        M[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[a, -b], [b, a]]
    for k in range(2 * pairs, nn):
        M[k, k] = poles[k].real
    q1, _ = np.linalg.qr(rng.normal(size=(nn, nn)))
    q2, _ = np.linalg.qr(rng.normal(size=(nn, nn)))
    cond = math.exp(rng.uniform(0, math.log(max(max_cond, 1.0))))
    s = np.exp(np.linspace(0, math.log(cond), nn)) if nn > 1 else np.ones(1)
    T = q1 @ np.diag(s) @ q2.T
    A = T @ M @ np.linalg.inv(T)
    conv = _kind(dtype)
    B, C, D = rng.normal(size=(nn, p)), rng.normal(size=(q, nn)), rng.normal(size=(q, p))
    return LTI(conv(A), conv(B), conv(C), conv(D))


@st.composite
def diagonal_realizations(
    draw,
    n: Size = (1, 4),
    complex_poles: bool | str = False,
    stable: bool | None = True,
    min_separation: float = 0.05,
    max_radius: float = 0.95,
    inputs: Size = 1,
    outputs: Size = 1,
    dtype=np.float64,
) -> Diagonal:
    """``Diagonal`` systems. ``complex_poles``: False → real poles; True → conjugate-closed
    (some conjugate pairs with conjugate B rows and C columns, so the output is real);
    ``"any"`` → unpaired complex poles and complex B, C (complex outputs). Poles are at
    least ``min_separation`` apart; B and C entries have modulus in [0.5, 1.5].

    Example::

        @given(diagonal_realizations(n=(1, 6), complex_poles=True, min_separation=0.1))
        def test_to_companion(sys):
            assert_same_markov(sys, sys.to_companion())
    """
    nn = draw(_size("n", n, 1))
    p = draw(_size("inputs", inputs, 1))
    q = draw(_size("outputs", outputs, 1))
    conj = complex_poles is True
    pairs = draw(st.integers(1 if nn >= 2 else 0, nn // 2)) if conj else 0
    rng = np.random.default_rng(draw(_seeds))
    if complex_poles not in (True, False, "any"):
        raise ValueError(f"complex_poles: expected True, False or 'any', got {complex_poles!r}")
    poles = _draw_poles(
        rng, nn, pairs, stable, max_radius, min_separation, conjugate=complex_poles != "any"
    )
    assume(poles is not None)
    if complex_poles == "any":
        B = _away_from_zero(rng, (nn, p)) * np.exp(1j * rng.uniform(0, 6.3, (nn, p)))
        C = _away_from_zero(rng, (q, nn)) * np.exp(1j * rng.uniform(0, 6.3, (q, nn)))
    else:
        B, C = _away_from_zero(rng, (nn, p)), _away_from_zero(rng, (q, nn))
        if pairs:
            B = B.astype(complex)
            C = C.astype(complex)
            B[:pairs] = B[:pairs] * np.exp(1j * rng.uniform(0, 6.3, (pairs, p)))
            C[:, :pairs] = C[:, :pairs] * np.exp(1j * rng.uniform(0, 6.3, (q, pairs)))
            B[pairs : 2 * pairs] = np.conj(B[:pairs])
            C[:, pairs : 2 * pairs] = np.conj(C[:, :pairs])
    D = rng.normal(size=(q, p))
    conv = _kind(dtype)
    if p == q == 1:
        return Diagonal(conv(poles), conv(B[:, 0]), conv(C[0]), float(D[0, 0]))
    return Diagonal(conv(poles), conv(B), conv(C), conv(D))


@st.composite
def companion_realizations(
    draw,
    n: Size = (1, 4),
    stable: bool | None = True,
    complex_poles: bool = True,
    min_separation: float = 0.05,
    max_radius: float = 0.95,
    dtype=np.float64,
) -> Companion:
    """``Companion`` systems whose poles (real, or with ``complex_poles`` also conjugate
    pairs) are drawn as for ``diagonal_realizations``: ``alpha = -poly(poles)[1:]``; beta
    has modulus in [0.5, 2]; c and D are standard normal.

    Example::

        @given(companion_realizations(n=(1, 5)), input_sequences(length=(0, 20)))
        def test_against_lfilter(sys, u): ...
    """
    nn = draw(_size("n", n, 1))
    pairs = draw(st.integers(0, nn // 2)) if complex_poles else 0
    rng = np.random.default_rng(draw(_seeds))
    poles = _draw_poles(rng, nn, pairs, stable, max_radius, min_separation)
    assume(poles is not None)
    alpha = -np.real(np.poly(poles))[1:]
    conv = _kind(dtype)
    beta = float(_away_from_zero(rng, 1, 0.5, 2.0)[0])
    return Companion(conv(alpha), beta, conv(rng.normal(size=nn)), float(rng.normal()))


@st.composite
def shift_realizations(draw, window: Size = (1, 6), dtype=np.float64) -> Shift:
    """``Shift`` (FIR) systems of window K (c and D standard normal).

    Example::

        @given(shift_realizations(window=(1, 8)))
        def test_nilpotent(sys):
            assert sys.spectral_radius() == 0
    """
    K = draw(_size("window", window, 1))
    rng = np.random.default_rng(draw(_seeds))
    conv = _kind(dtype)
    return Shift(conv(rng.normal(size=K)), float(rng.normal()))


@st.composite
def bilinear_realizations(
    draw,
    n: Size = (1, 4),
    m: Size = 1,
    inputs: Size | None = None,
    outputs: Size = 1,
    stable: bool | None = True,
    max_radius: float = 0.8,
    n_scale: float = 0.2,
    dtype=np.float64,
) -> Bilinear:
    """``Bilinear`` systems: A0 as in ``lti_realizations`` (spectral radius at most
    ``max_radius`` when stable), ``N_j`` normal with spectral norm about ``n_scale``
    (so moderate inputs keep the state bounded); ``inputs`` defaults to m (so v = u works).

    Example::

        @given(bilinear_realizations(n=(1, 3)))
        def test_linear_part(sys):
            assert_same_markov(sys.to_lti(), sys.to_lti().to_diagonal())
    """
    mm = draw(_size("m", m, 1))
    lin = draw(
        lti_realizations(
            n=n,
            inputs=mm if inputs is None else inputs,
            outputs=outputs,
            stable=stable,
            max_cond=10.0,
            max_radius=max_radius,
        )
    )
    rng = np.random.default_rng(draw(_seeds))
    nn = lin.order
    N = rng.normal(size=(mm, nn, nn)) * (n_scale / (2 * math.sqrt(nn)))
    conv = _kind(dtype)
    return Bilinear(conv(lin.A), conv(N), conv(lin.B), conv(lin.C), conv(lin.D))


@st.composite
def input_sequences(
    draw,
    length: Size = (0, 24),
    batch: Size | None = None,
    inputs: int = 1,
    channels: int | None = None,
    dtype=np.float64,
    scale: float = 1.0,
):
    """Standard-normal input sequences ``([batch,] [channels,] L)`` (SISO, ``inputs == 1``)
    or ``([batch,] [channels,] L, inputs)``, in the kind and dtype of ``dtype``.

    Example::

        @given(lti_realizations(inputs=2), input_sequences(length=(0, 30), batch=(1, 3), inputs=2))
        def test_shapes(sys, u):
            assert sys.simulate(u).shape[:-1] == u.shape[:-1]
    """
    L = draw(_size("length", length, 0))
    lead = () if batch is None else (draw(_size("batch", batch, 0)),)
    shape = lead + (() if channels is None else (channels,)) + (L,)
    shape += () if inputs == 1 else (inputs,)
    rng = np.random.default_rng(draw(_seeds))
    return _kind(dtype)(scale * rng.normal(size=shape))


def chunkings(length: int) -> SearchStrategy:
    """Lists of chunk lengths summing to ``length`` (0-length and 1-length chunks included),
    for checking that a chunked run carrying the state equals one run.

    Example::

        @given(st.data())
        def test_chunks(data):
            sizes = data.draw(chunkings(10))
            assert sum(sizes) == 10
    """
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length: expected an int >= 0, got {length!r}")
    cuts = st.lists(st.integers(0, length), max_size=8)
    return cuts.map(lambda c: np.diff([0, *sorted(c), length]).astype(int).tolist())


# ------------------------------------------------------------------------------- assertions


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().resolve_conj().numpy()
    return np.asarray(x)


def assert_same_markov(r1, r2, k: int | None = None, rtol: float = 1e-7, atol: float = 1e-9):
    """Asserts that two realizations have the same first ``k`` Markov parameters
    (default ``2 max(n1, n2) + 1``, which determines the input–output map).

    Example::

        sys = Diagonal([0.5, 0.2], [1.0, 1.0], [1.0, 2.0])
        assert_same_markov(sys, sys.similar(np.array([[1.0, 2.0], [0.0, 1.0]])))
    """
    if k is None:
        k = 2 * max(r1.order, r2.order) + 1
    h1, h2 = _np(r1.markov(k)), _np(r2.markov(k))
    assert h1.shape == h2.shape, f"Markov parameter shapes differ: {h1.shape} != {h2.shape}"
    np.testing.assert_allclose(h1, h2, rtol=rtol, atol=atol, err_msg="Markov parameters")


def assert_equivalent(r1, r2, rtol: float = 1e-7, atol: float = 1e-9):
    """Asserts the same input–output map: Markov parameters up to ``2n + 1`` and equal
    transfer functions (num1·den2 == num2·den1, so different orders are fine).

    Example::

        assert_equivalent(sys, sys.minimal())
    """
    assert_same_markov(r1, r2, rtol=rtol, atol=atol)
    n1, d1 = (_np(x) for x in r1.transfer_function())
    n2, d2 = (_np(x) for x in r2.transfer_function())
    lhs = _polymul_last(n1, d2)
    rhs = _polymul_last(n2, d1)
    scale = max(np.abs(lhs).max(initial=0.0), np.abs(rhs).max(initial=0.0), 1.0)
    np.testing.assert_allclose(
        lhs, rhs, rtol=rtol, atol=atol * scale, err_msg="transfer functions (cross-multiplied)"
    )


def _polymul_last(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num (..., a) times den (..., b) along the last axis (leading axes broadcast: den has
    the channel axis only, num may add output and input axes)."""
    extra = num.ndim - den.ndim
    den = den.reshape(den.shape[:-1] + (1,) * extra + den.shape[-1:])
    shape = np.broadcast_shapes(num.shape[:-1], den.shape[:-1])
    num = np.broadcast_to(num, shape + num.shape[-1:]).reshape(-1, num.shape[-1])
    den = np.broadcast_to(den, shape + den.shape[-1:]).reshape(-1, den.shape[-1])
    out = np.stack([np.convolve(a, b) for a, b in zip(num, den, strict=True)])
    return out.reshape(shape + out.shape[-1:])
