"""Properties of bmojo_core.realization drawn with the strategies of bmojo_core.testing
(which this file also tests: every strategy honours its controls)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal as ss
import torch
from bmojo_core.realization import LTI, Companion, Diagonal, Shift
from bmojo_core.testing import (
    assert_equivalent,
    assert_same_markov,
    bilinear_realizations,
    chunkings,
    companion_realizations,
    diagonal_realizations,
    input_sequences,
    lti_realizations,
    shift_realizations,
)
from hypothesis import assume, find, given, settings
from hypothesis import strategies as st

FEW = settings(max_examples=15, deadline=None)
SOME = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def np64(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def dlsim_y(sys, u, x0=None):
    """Output of scipy's dlsim for the dense form of sys on one SISO sequence u (L,)."""
    lti = sys.to_lti()
    A, B, C, D = (np64(m) for m in (lti.A, lti.B, lti.C, lti.D))
    if u.shape[0] == 0:
        return np.zeros(0)
    return ss.dlsim((A, B, C, D, 1), u[:, None], x0=x0)[1][:, 0]


def same_pole_sets(p1, p2, tol=1e-7):
    p1, p2 = np.sort_complex(np.asarray(p1, complex)), np.sort_complex(np.asarray(p2, complex))
    np.testing.assert_allclose(p1, p2, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------- invariants


@SOME
@given(lti_realizations(n=(1, 5), inputs=(1, 2), outputs=(1, 2)), seeds)
def test_markov_invariant_under_similarity(sys, seed):
    rng = np.random.default_rng(seed)
    n = sys.order
    q1, _ = np.linalg.qr(rng.normal(size=(n, n)))
    T = q1 @ np.diag(np.exp(rng.uniform(0, np.log(100.0), n)))
    other = sys.similar(T)
    assert_same_markov(sys, other, rtol=1e-7, atol=1e-9)
    same_pole_sets(sys.poles(), other.poles(), tol=1e-6)


@SOME
@given(lti_realizations(n=(1, 5), inputs=(1, 2), outputs=(1, 2), max_cond=10.0), seeds)
def test_hankel_singular_values_invariant_under_similarity(sys, seed):
    # well-conditioned systems and transforms only: the Lyapunov equations of strongly
    # non-normal A (cond(T) ~ 1e3) lose several digits (forward error, not residual)
    rng = np.random.default_rng(seed)
    n = sys.order
    q1, _ = np.linalg.qr(rng.normal(size=(n, n)))
    other = sys.similar(q1 @ np.diag(np.exp(rng.uniform(0, np.log(10.0), n))))
    h1, h2 = sys.hankel_singular_values(), other.hankel_singular_values()
    np.testing.assert_allclose(h1, h2, rtol=1e-6, atol=1e-8 * h1[0])
    wc, wo = sys.gramians()
    np.testing.assert_allclose(h1**2, np.sort(np.linalg.eigvals(wc @ wo).real)[::-1], rtol=1e-6,
                               atol=1e-8 * h1[0] ** 2)  # fmt: skip


@SOME
@given(
    st.one_of(
        diagonal_realizations(n=(1, 6), complex_poles=True),
        diagonal_realizations(n=(1, 6), complex_poles=False),
    )
)
def test_diagonal_companion_diagonal_round_trip(sys):
    n = sys.order
    V = np.vander(np.asarray(sys.poles), n).T
    assume(np.linalg.cond(V) < 1e6)  # design §7: Vandermonde conditioning
    comp = sys.to_companion()
    assert isinstance(comp, Companion) and comp.order == n
    back = comp.to_diagonal()
    assert_same_markov(sys, comp, rtol=1e-6, atol=1e-8)
    assert_same_markov(sys, back, rtol=1e-6, atol=1e-8)
    same_pole_sets(sys.poles, back.poles, tol=1e-6)
    same_pole_sets(sys.poles, comp.poles(), tol=1e-6)


@SOME
@given(diagonal_realizations(n=(1, 5), complex_poles=False, inputs=(1, 2), outputs=(1, 2)))
def test_real_diagonal_forms_are_equivalent(sys):
    assert_equivalent(sys, sys.to_lti())
    assert_equivalent(sys, sys.to_lti().to_diagonal())
    assert_equivalent(sys, sys.minimal())


@SOME
@given(lti_realizations(n=(1, 5)))
def test_lti_companion_form_equivalent_and_minimal(sys):
    comp = sys.to_companion()
    assert_equivalent(sys, comp, rtol=1e-6, atol=1e-8)
    red = sys.minimal()
    assert red.order == min(sys.controllability_rank(), sys.observability_rank())
    assert_equivalent(sys, red, rtol=1e-6, atol=1e-8)


@FEW
@given(st.floats(-0.99, 0.99), st.floats(0.5, 2.0), st.floats(-2, 2), st.floats(-1, 1), seeds)
def test_order_one_companion_is_the_diagonal(pole, beta, c, d, seed):
    comp = Companion([pole], beta, [c], d)
    dg = Diagonal([pole], [beta], [c], d)
    assert_same_markov(comp, dg, k=8, rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(seed)
    u, x0 = rng.normal(size=(2, 9)), rng.normal(size=(2, 1))
    np.testing.assert_allclose(comp.simulate(u, x0), dg.simulate(u, x0), rtol=1e-10, atol=1e-10)


@FEW
@given(shift_realizations(window=(1, 9)))
def test_shift_is_nilpotent_of_index_k(sys):
    A = np64(sys.to_lti().A)
    K = sys.window
    assert np.all(np.linalg.matrix_power(A, K) == 0)
    assert np.any(np.linalg.matrix_power(A, K - 1) != 0)
    assert sys.spectral_radius() == 0 and sys.is_stable()
    h = np64(sys.markov(K + 3))
    np.testing.assert_array_equal(h[1 : K + 1], np64(sys.c))  # the taps are the Markov params
    np.testing.assert_array_equal(h[K + 1 :], 0)


@FEW
@given(shift_realizations(window=(1, 6)), input_sequences(length=(8, 20)), st.data())
def test_shift_forgets_inputs_older_than_its_window(sys, u, data):
    K = sys.window
    L = u.shape[-1]
    t0 = data.draw(st.integers(0, L - 1))
    v = u.copy()
    v[t0] += 3.0
    y, yv = sys.simulate(u), sys.simulate(v)
    np.testing.assert_allclose(y[t0 + K + 1 :], yv[t0 + K + 1 :], rtol=1e-12, atol=1e-12)
    if t0 + K < L and np64(sys.c)[K - 1] != 0:  # the oldest tap still sees it
        assert abs(y[t0 + K] - yv[t0 + K]) > 0
    np.testing.assert_allclose(y, dlsim_y(sys, u), rtol=1e-9, atol=1e-9)


@FEW
@given(shift_realizations(window=(1, 6)), input_sequences(length=(0, 16), batch=(1, 2)), seeds)
def test_companion_with_zero_alpha_is_the_shift(sys, u, seed):
    comp = Companion(np.zeros(sys.window), 1.0, sys.c, sys.D)
    x0 = np.random.default_rng(seed).normal(size=(u.shape[0], sys.window))
    yc, xc = comp.simulate(u, x0, return_final_state=True)
    ys, xs = sys.simulate(u, x0, return_final_state=True)
    np.testing.assert_allclose(yc, ys, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(xc, xs, rtol=1e-10, atol=1e-10)
    assert_equivalent(comp, sys)
    assert_equivalent(sys.to_companion(), sys)


@FEW
@given(bilinear_realizations(n=(1, 4)), st.integers(1, 4), st.integers(1, 4), seeds)
def test_bilinear_two_impulse_response_is_volterra2(sys, g1, g2, seed):
    rng = np.random.default_rng(seed)
    a1, a2 = rng.uniform(0.5, 1.5, size=2)
    L = g1 + g2 + 1
    t1, t2, T = 0, g1, g1 + g2  # u = a1 δ_t1 + a2 δ_t2, read y_T

    def run(b1, b2):
        u = np.zeros(L)
        u[t1], u[t2] = b1, b2
        return sys.simulate(u)[T]

    cross = run(a1, a2) - run(a1, 0.0) - run(0.0, a2)
    assert cross == pytest.approx(a1 * a2 * sys.volterra2(g1, g2), rel=1e-8, abs=1e-11)
    # and the linear part alone is the LTI's impulse response
    assert run(a1, 0.0) == pytest.approx(a1 * float(np64(sys.to_lti().markov(T + 1))[T]))


# ------------------------------------------------------------------------------- chunking


def _chunked(sys, u, sizes, x0):
    ys, s, x = [], 0, x0
    for k in sizes:
        yk, x = sys.simulate(u[..., s : s + k], x, return_final_state=True)
        ys.append(yk)
        s += k
    return np.concatenate(ys, axis=-1), x


def _check_chunks(sys, u, data, complex_state=False):
    sizes = data.draw(chunkings(u.shape[-1]))
    rng = np.random.default_rng(data.draw(seeds))
    x0 = rng.normal(size=(u.shape[0], sys.order))
    if complex_state:
        x0 = x0 + 0j
    y, x = sys.simulate(u, x0, return_final_state=True)
    yc, xc = _chunked(sys, u, sizes, x0)
    np.testing.assert_allclose(yc, y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(xc, x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y[0], dlsim_y(sys, u[0], x0[0].real), rtol=1e-8, atol=1e-8)


@FEW
@given(diagonal_realizations(n=(1, 4)), input_sequences(length=(0, 20), batch=2), st.data())
def test_chunked_simulate_equals_whole_diagonal(sys, u, data):
    _check_chunks(sys, u, data)


@FEW
@given(companion_realizations(n=(1, 4)), input_sequences(length=(0, 20), batch=2), st.data())
def test_chunked_simulate_equals_whole_companion(sys, u, data):
    _check_chunks(sys, u, data)


@FEW
@given(shift_realizations(), input_sequences(length=(0, 20), batch=2), st.data())
def test_chunked_simulate_equals_whole_shift(sys, u, data):
    _check_chunks(sys, u, data)


@FEW
@given(lti_realizations(n=(1, 4)), input_sequences(length=(0, 20), batch=2), st.data())
def test_chunked_simulate_equals_whole_lti(sys, u, data):
    _check_chunks(sys, u, data)


@FEW
@given(bilinear_realizations(n=(1, 3)), input_sequences(length=(0, 16), batch=2), st.data())
def test_chunked_simulate_equals_whole_bilinear(sys, u, data):
    sizes = data.draw(chunkings(u.shape[-1]))
    x0 = np.random.default_rng(data.draw(seeds)).normal(size=(2, sys.order))
    y, x = sys.simulate(u, x0=x0, return_final_state=True)
    ys, s, xc = [], 0, x0
    for k in sizes:
        yk, xc = sys.simulate(u[..., s : s + k], x0=xc, return_final_state=True)
        ys.append(yk)
        s += k
    np.testing.assert_allclose(np.concatenate(ys, -1), y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(xc, x, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------- strategies


@SOME
@given(st.data())
def test_strategies_honour_stability(data):
    stable = data.draw(st.sampled_from([True, False]))
    sys = data.draw(
        st.one_of(
            lti_realizations(n=(1, 4), stable=stable),
            diagonal_realizations(n=(1, 4), stable=stable, complex_poles=True),
            companion_realizations(n=(1, 4), stable=stable),
        )
    )
    rho = sys.spectral_radius()
    if stable:
        assert rho < 1 and sys.is_stable()
        assert rho <= 0.95 + 1e-9
    else:
        assert rho > 1 and not sys.is_stable()
    b = data.draw(bilinear_realizations(n=(1, 3), m=(1, 2), outputs=2))
    assert b.spectral_radius() <= 0.8 + 1e-9
    assert 1 <= b.order <= 3 and b.modulators in (1, 2) and np64(b.B).shape[1] == b.modulators
    assert np64(b.C).shape[0] == 2 and np64(b.N).shape == (b.modulators, b.order, b.order)
    sh = data.draw(shift_realizations(window=st.integers(2, 5)))
    assert 2 <= sh.window <= 5 and np64(sh.c).shape == (sh.window,)


@SOME
@given(
    diagonal_realizations(
        n=(2, 6), complex_poles=True, min_separation=0.2, inputs=(1, 2), outputs=(1, 2)
    )
)
def test_diagonal_strategy_separation_and_conjugacy(sys):
    p = np.asarray(sys.poles)
    d = np.abs(p[:, None] - p[None, :]) + np.eye(p.size) * 10
    assert d.min() >= 0.2 - 1e-12
    assert np.iscomplexobj(p) and np.any(p.imag != 0)
    same_pole_sets(p, p.conj(), tol=1e-12)  # conjugate-closed
    assert sys.real_io
    np.testing.assert_array_equal(np.asarray(sys.markov(6)).imag, 0)
    lti = sys.to_lti()  # real modal form
    assert np.isrealobj(np64(lti.A)) and np.isrealobj(np64(lti.C))
    assert lti.order == sys.order
    assert_equivalent(sys, lti)


@FEW
@given(diagonal_realizations(n=(1, 4), complex_poles="any", inputs=2, outputs=3))
def test_diagonal_strategy_any_complex(sys):
    assert np.iscomplexobj(sys.poles) and (sys.inputs, sys.outputs) == (2, 3)
    assert not sys.real_io
    assert np.asarray(sys.markov(4)).shape == (4, 3, 2)


@FEW
@given(diagonal_realizations(n=(1, 4)), diagonal_realizations(n=3, dtype=torch.float64))
def test_strategy_sizes_and_kinds(a, b):
    assert 1 <= a.order <= 4 and np.isrealobj(a.poles) and isinstance(a.poles, np.ndarray)
    assert b.order == 3 and isinstance(b.poles, torch.Tensor)


@SOME
@given(lti_realizations(n=(1, 5), max_cond=50.0, inputs=(1, 3), outputs=2))
def test_lti_strategy_conditioning(sys):
    _, V = np.linalg.eig(np64(sys.A))
    V = V / np.linalg.norm(V, axis=0)
    # cond(T) <= 50 by construction; unit columns are within sqrt(n) of the best scaling
    assert np.linalg.cond(V) <= 50.0 * np.sqrt(sys.order) * (1 + 1e-9)
    assert 1 <= sys.inputs <= 3 and sys.outputs == 2
    assert np.isrealobj(np64(sys.A))


@SOME
@given(st.data())
def test_input_sequences_shapes(data):
    u = data.draw(input_sequences(length=(0, 9), batch=(1, 3), inputs=2, channels=4))
    assert u.ndim == 4 and 1 <= u.shape[0] <= 3 and u.shape[1] == 4 and u.shape[3] == 2
    assert 0 <= u.shape[2] <= 9
    t = data.draw(input_sequences(length=5, dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (5,)


@SOME
@given(st.integers(0, 30), st.data())
def test_chunkings_sum_to_length(L, data):
    sizes = data.draw(chunkings(L))
    assert sum(sizes) == L and all(s >= 0 for s in sizes)


def test_chunkings_include_empty_and_unit_chunks():
    quiet = settings(database=None, max_examples=500)
    find(chunkings(10), lambda s: 0 in s, settings=quiet)
    find(chunkings(10), lambda s: 1 in s, settings=quiet)
    find(chunkings(10), lambda s: s == [10], settings=quiet)


def test_testing_module_is_not_imported_by_the_package():
    import subprocess
    import sys

    code = "import sys, bmojo_core; assert 'bmojo_core.testing' not in sys.modules; "
    code += "assert 'hypothesis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_assertions_detect_differences():
    a = Diagonal([0.5, 0.2], [1.0, 1.0], [1.0, 1.0])
    assert_equivalent(a, a.to_companion())
    b = Diagonal([0.5, 0.2], [1.0, 1.0], [1.0, 1.0 + 1e-4])
    with pytest.raises(AssertionError):
        assert_same_markov(a, b)
    with pytest.raises(AssertionError):
        assert_equivalent(a, b)
    # same Markov parameters up to k = 2 but a different system
    c = Diagonal([0.5, 0.3], [1.0, 1.0], [1.0, 1.0])
    assert_same_markov(a, c, k=2)
    with pytest.raises(AssertionError):
        assert_equivalent(a, c)
    # different orders, same map: a minimal and a padded realization
    padded = LTI(np.diag([0.5, 0.2, 0.7]), [1.0, 1.0, 0.0], [1.0, 1.0, 5.0])
    assert_equivalent(a, padded)
    assert padded.minimal().order == 2
    assert Shift([1.0]).order == 1
