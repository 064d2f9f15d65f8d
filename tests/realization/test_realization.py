"""bmojo_core.realization against independent oracles (scipy.signal, python-control,
scipy.linalg) and its error paths. Properties drawn with hypothesis are in
test_realization_properties.py."""

from __future__ import annotations

import re

import bmojo_core as bm
import control
import numpy as np
import pytest
import scipy.linalg
import scipy.signal as ss
import torch
from bmojo_core.realization import LTI, MAX_COND, Bilinear, Companion, Diagonal, Shift
from conftest import stable_seed

# ------------------------------------------------------------------------------- helpers


def rng_for(*parts):
    return np.random.default_rng(stable_seed(*parts))


def np64(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def abcd(sys):
    lti = sys.to_lti()
    return tuple(np64(m) for m in (lti.A, lti.B, lti.C, lti.D))


def dlsim(A, B, C, D, u, x0=None):
    """scipy's dlsim for one sequence u (L,) or (L, p): returns (y (L, q), x_L)."""
    u2 = u[:, None] if u.ndim == 1 else u
    L = u2.shape[0]
    n = A.shape[0]
    if L == 0:
        return np.zeros((0, C.shape[0])), (np.zeros(n) if x0 is None else x0)
    # one extra step gives the state after the last input
    u_ext = np.concatenate([u2, np.zeros((1, u2.shape[1]))])
    _, y, x = ss.dlsim((A, B, C, D, 1), u_ext, x0=x0)
    return y[:L], x[L]


def random_lti(rng, n, p, q, radius=0.9):
    A = rng.normal(size=(n, n))
    A *= radius / max(np.abs(np.linalg.eigvals(A)).max(), 1e-3)
    return A, rng.normal(size=(n, p)), rng.normal(size=(q, n)), rng.normal(size=(q, p))


def realify(A, B, C, D):
    """Complex (A, B, C, D) → real system on (Re x, Im x) with outputs (Re y, Im y)."""
    Ar = np.block([[A.real, -A.imag], [A.imag, A.real]])
    Br = np.concatenate([B.real, B.imag])
    Cr = np.block([[C.real, -C.imag], [C.imag, C.real]])
    Dr = np.concatenate([D.real, D.imag])
    return Ar, Br, Cr, Dr


TOL64 = dict(rtol=1e-9, atol=1e-9)
TOL32 = dict(rtol=6e-4, atol=2e-3)


# ------------------------------------------------------------------------------- simulate


@pytest.mark.parametrize("p,q", [(1, 1), (2, 3)])
@pytest.mark.parametrize("kind", ["numpy64", "torch32"])
def test_lti_simulate_matches_dlsim(p, q, kind):
    rng = rng_for("lti-sim", p, q, kind)
    n, L, batch = 4, 13, 2
    A, B, C, D = random_lti(rng, n, p, q)
    shape = (batch, L) if p == 1 else (batch, L, p)
    u = rng.normal(size=shape)
    x0 = rng.normal(size=(batch, n))
    sys = LTI(A, B[:, 0] if p == 1 else B, C[0] if q == 1 else C, D[0, 0] if p == q == 1 else D)
    if kind == "torch32":
        y, xl = sys.simulate(torch.tensor(u, dtype=torch.float32), torch.tensor(x0), True)
        assert y.dtype == torch.float32 and isinstance(y, torch.Tensor)
        y, xl, tol = y.double().numpy(), xl.double().numpy(), TOL32
    else:
        y, xl = sys.simulate(u, x0, return_final_state=True)
        tol = TOL64
    for b in range(batch):
        ref, ref_x = dlsim(A, B, C, D, u[b], x0[b])
        np.testing.assert_allclose(y[b].reshape(L, q), ref, **tol)
        np.testing.assert_allclose(xl[b], ref_x, **tol)


@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("p,q", [(1, 1), (2, 2)])
def test_real_diagonal_simulate_matches_dlsim(channels, p, q):
    rng = rng_for("diag-sim", channels, p, q)
    n, L, batch = 3, 11, 2
    H = channels or 1
    poles = rng.uniform(-0.95, 0.95, size=(H, n))
    B, C, D = rng.normal(size=(H, n, p)), rng.normal(size=(H, q, n)), rng.normal(size=(H, q, p))
    u = rng.normal(size=(batch, H, L, p))
    x0 = rng.normal(size=(batch, H, n))
    siso = p == q == 1

    def sel(x):  # drop the channel axis when there is none
        return x if channels else x[0]

    if siso:
        sys = Diagonal(sel(poles), sel(B[..., 0]), sel(C[:, 0]), sel(D[:, 0, 0]))
    else:
        sys = Diagonal(sel(poles), sel(B), sel(C), sel(D))
    uu = u[..., 0] if siso else u  # (batch, H, L[, p])
    y, xl = sys.simulate(
        uu if channels else uu[:, 0], x0 if channels else x0[:, 0], return_final_state=True
    )
    for b in range(batch):
        for h in range(H):
            ref, ref_x = dlsim(np.diag(poles[h]), B[h], C[h], D[h], u[b, h], x0[b, h])
            yb = y[b, h] if channels else y[b]
            np.testing.assert_allclose(yb.reshape(L, q), ref, **TOL64)
            np.testing.assert_allclose(xl[b, h] if channels else xl[b], ref_x, **TOL64)


@pytest.mark.parametrize("conjugate_closed", [True, False])
def test_complex_diagonal_simulate_matches_dlsim(conjugate_closed):
    rng = rng_for("cdiag-sim", conjugate_closed)
    L = 12
    lam = np.array([0.6 + 0.5j, -0.3 + 0.2j])
    b = rng.normal(size=2) + 1j * rng.normal(size=2)
    c = rng.normal(size=2) + 1j * rng.normal(size=2)
    if conjugate_closed:
        poles = np.r_[lam, lam.conj(), 0.4]
        B, C = np.r_[b, b.conj(), 1.0], np.r_[c, c.conj(), -2.0]
    else:
        poles, B, C = np.r_[lam, 0.4], np.r_[b, 1.0], np.r_[c, -2.0]
    sys = Diagonal(poles, B, C, 0.5)
    assert sys.real_io == conjugate_closed
    u = rng.normal(size=L)
    n = poles.size
    x0 = rng.normal(size=n) + 1j * rng.normal(size=n)
    if conjugate_closed:
        x0[2:4] = x0[0:2].conj()
        x0[4] = x0[4].real
    y, xl = sys.simulate(u, x0, return_final_state=True)
    Ar, Br, Cr, Dr = realify(np.diag(poles), B[:, None], C[None], np.array([[0.5]]))
    ref, ref_x = dlsim(Ar, Br, Cr, Dr, u, np.r_[x0.real, x0.imag])
    if conjugate_closed:
        assert np.isrealobj(y)
        np.testing.assert_allclose(y, ref[:, 0], **TOL64)
        np.testing.assert_allclose(ref[:, 1], 0, atol=1e-12)
    else:
        assert np.iscomplexobj(y)
        np.testing.assert_allclose(y, ref[:, 0] + 1j * ref[:, 1], **TOL64)
    np.testing.assert_allclose(xl, ref_x[:n] + 1j * ref_x[n:], **TOL64)


@pytest.mark.parametrize("channels", [None, 2])
def test_companion_simulate_matches_dlsim_and_lfilter(channels):
    rng = rng_for("comp-sim", channels)
    n, L, batch = 3, 15, 2
    H = channels or 1
    poles = [rng.uniform(-0.9, 0.9, size=n) for _ in range(H)]
    alpha = np.stack([-np.poly(pl)[1:] for pl in poles])
    beta, c, D = rng.uniform(0.5, 2, size=H), rng.normal(size=(H, n)), rng.normal(size=H)

    def sel(x):
        return x if channels else x[0]

    sys = Companion(sel(alpha), sel(beta), sel(c), sel(D))
    u = rng.normal(size=(batch, H, L))
    x0 = rng.normal(size=(batch, H, n))
    y, xl = sys.simulate(
        u if channels else u[:, 0], x0 if channels else x0[:, 0], return_final_state=True
    )
    y, xl = (y, xl) if channels else (y[:, None], xl[:, None])
    for h in range(H):
        A = np.zeros((n, n))
        A[0], A[np.arange(1, n), np.arange(n - 1)] = alpha[h], 1.0
        B = beta[h] * np.eye(n, 1)
        a = np.r_[1.0, -alpha[h]]
        bnum = D[h] * a + beta[h] * np.r_[0.0, c[h]]
        for b in range(batch):
            ref, ref_x = dlsim(A, B, c[h][None], [[D[h]]], u[b, h], x0[b, h])
            np.testing.assert_allclose(y[b, h], ref[:, 0], **TOL64)
            np.testing.assert_allclose(xl[b, h], ref_x, **TOL64)
        # zero initial state: the recurrence is lfilter's (ascending powers of z^-1)
        y0 = np.asarray(sys.simulate(u if channels else u[:, 0]))
        y0 = y0 if channels else y0[:, None]
        np.testing.assert_allclose(y0[:, h], ss.lfilter(bnum, a, u[:, h], axis=-1), **TOL64)


@pytest.mark.parametrize("K", [1, 4])
def test_shift_simulate_matches_dlsim_and_convolution(K):
    rng = rng_for("shift-sim", K)
    L = 10
    c, D = rng.normal(size=K), 0.7
    sys = Shift(c, D)
    u = rng.normal(size=(2, L))
    x0 = rng.normal(size=(2, K))
    y, xl = sys.simulate(u, x0, return_final_state=True)
    A, B, C, Dm = abcd(sys)
    for b in range(2):
        ref, ref_x = dlsim(A, B, C, Dm, u[b], x0[b])
        np.testing.assert_allclose(y[b], ref[:, 0], **TOL64)
        np.testing.assert_allclose(xl[b], ref_x, **TOL64)
        np.testing.assert_allclose(xl[b], np.r_[u[b, ::-1], x0[b]][:K], **TOL64)
    taps = np.r_[D, c]  # lag 0, 1, ..., K
    np.testing.assert_allclose(
        sys.simulate(u[0]), np.convolve(u[0], taps)[:L], **TOL64
    )  # zero initial state


def test_bilinear_simulate_matches_loop_and_linear_part():
    rng = rng_for("bil-sim")
    n, m, L, batch = 3, 2, 9, 2
    A0, B, C, D = random_lti(rng, n, 2, 1, radius=0.7)
    N = 0.2 * rng.normal(size=(m, n, n))
    sys = Bilinear(A0, N, B, C, D)
    u = rng.normal(size=(batch, L, 2))
    v = rng.normal(size=(batch, L, m))
    x0 = rng.normal(size=(batch, n))
    for vv in (None, v):
        y, xl = sys.simulate(u, vv, x0, return_final_state=True)
        vv = u if vv is None else vv
        for b in range(batch):
            x, ys = x0[b].copy(), []
            for t in range(L):  # the defining recurrence, state before u_t
                ys.append(C @ x + D @ u[b, t])
                x = (A0 + np.einsum("j,jkl->kl", vv[b, t], N)) @ x + B @ u[b, t]
            np.testing.assert_allclose(y[b], np.stack(ys), **TOL64)
            np.testing.assert_allclose(xl[b], x, **TOL64)
    lin = Bilinear(A0, np.zeros((m, n, n)), B, C, D).simulate(u, v, x0)
    for b in range(batch):
        np.testing.assert_allclose(lin[b], dlsim(A0, B, C, D, u[b], x0[b])[0], **TOL64)


def test_shift_with_channels_matches_convolution():
    rng = rng_for("shift-ch")
    H, K, L = 3, 3, 12
    c, D = rng.normal(size=(H, K)), rng.normal(size=H)
    u = rng.normal(size=(2, H, L))
    x0 = rng.normal(size=(2, H, K))
    y, xl = Shift(c, D).simulate(u, x0, return_final_state=True)
    for b in range(2):
        for h in range(H):
            # the state is the past inputs, most recent first: prepend them reversed
            full = np.r_[x0[b, h, ::-1], u[b, h]]
            ref = np.convolve(full, np.r_[D[h], c[h]])[K : K + L]
            np.testing.assert_allclose(y[b, h], ref, **TOL64)
            np.testing.assert_allclose(xl[b, h], full[::-1][:K], **TOL64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_return_their_dtype(dtype):
    rng = rng_for("lowp", str(dtype))
    sys = Diagonal(rng.uniform(-0.9, 0.9, size=4), rng.normal(size=4), rng.normal(size=4), 0.5)
    u = torch.tensor(rng.normal(size=(2, 20)), dtype=dtype)
    y = sys.simulate(u)
    assert y.dtype == dtype
    ref = np.stack([dlsim(*abcd(sys), u[b].double().numpy())[0][:, 0] for b in range(2)])
    tol = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}.get(dtype, (6e-4, 2e-3))
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=tol[0], atol=tol[1])
    y16 = sys.simulate(u.double().numpy().astype(np.float16))
    assert isinstance(y16, np.ndarray) and y16.dtype == np.float16


def test_docstring_examples_run():
    import doctest

    import bmojo_core.realization as R

    res = doctest.testmod(R, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 8 and res.failed == 0


def test_complex_conjugate_closed_diagonal_to_real_lti():
    dg = Diagonal(
        [0.6 + 0.5j, 0.6 - 0.5j, -0.4, 0.1 + 0.2j, 0.1 - 0.2j],
        [1 + 2j, 1 - 2j, 0.5, 0.3j, -0.3j],
        [2 - 1j, 2 + 1j, 1.5, 1 + 1j, 1 - 1j],
        0.25,
    )
    lti = dg.to_lti()
    A, B, C, D = abcd(lti)
    assert all(np.isrealobj(m) for m in (A, B, C, D)) and A.shape == (5, 5)
    np.testing.assert_allclose(
        np.sort_complex(np.linalg.eigvals(A)), np.sort_complex(np.asarray(dg.poles)), **TOL64
    )
    # Markov parameters from the definition, in complex arithmetic
    h = [0.25] + [
        np.sum(np.asarray(dg.C) * np.asarray(dg.poles) ** (k - 1) * np.asarray(dg.B))
        for k in range(1, 12)
    ]
    np.testing.assert_allclose(np.asarray(h).imag, 0, atol=1e-12)
    np.testing.assert_allclose(lti.markov(12), np.asarray(h).real, **TOL64)
    np.testing.assert_allclose(dg.markov(12), np.asarray(h).real, **TOL64)
    # not conjugate-closed: a complex LTI
    assert np.iscomplexobj(abcd(Diagonal([0.5j, 0.2]).to_lti())[0])


def test_simulate_is_differentiable_in_u_and_x0():
    sys = Diagonal([0.5, -0.3, 0.8], [1.0, 2.0, -1.0], [0.5, 1.0, 1.5], 0.2)
    u = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, x: sys.simulate(u, x), (u, x0))
    assert torch.autograd.gradcheck(
        lambda u, x: sys.simulate(u, x, return_final_state=True)[1], (u, x0)
    )


def test_long_shift_window_stays_cheap():
    K = 4096  # the dense K×K shift (134 MB) is never built for these
    c = np.arange(1.0, K + 1)
    sys = Shift(c, 0.5)
    h = sys.markov(K + 3)
    np.testing.assert_array_equal(h, np.r_[0.5, c, 0.0, 0.0])
    num, den = sys.transfer_function()
    np.testing.assert_array_equal(den, np.eye(1, K + 1)[0])
    np.testing.assert_array_equal(num, np.r_[0.5, c])
    assert sys.spectral_radius() == 0.0 and sys.is_stable()
    assert sys._A_dense is None
    u = np.random.default_rng(0).normal(size=K + 10)
    np.testing.assert_allclose(sys.simulate(u), np.convolve(u, np.r_[0.5, c])[: K + 10], rtol=1e-9)


# ------------------------------------------------------------------------------- analysis


def test_markov_impulse_step_match_control():
    rng = rng_for("markov")
    A, B, C, D = random_lti(rng, 4, 2, 3)
    sys = LTI(A, B, C, D)
    k = 9
    ref = control.impulse_response(control.ss(A, B, C, D, True), T=k - 1).outputs
    h = sys.markov(k)
    assert h.shape == (k, 3, 2)
    np.testing.assert_allclose(h.transpose(1, 2, 0), ref, **TOL64)
    np.testing.assert_allclose(sys.impulse(k), h, **TOL64)
    step = control.step_response(control.ss(A, B, C, D, True), T=k - 1).outputs
    np.testing.assert_allclose(sys.step(k).transpose(1, 2, 0), step, **TOL64)
    siso = LTI(A, B[:, 0], C[0], D[0, 0])
    ref1 = control.impulse_response(control.ss(A, B[:, :1], C[:1], D[:1, :1], True), T=k - 1)
    np.testing.assert_allclose(siso.markov(k), ref1.outputs, **TOL64)
    assert siso.markov(0).shape == (0,)


@pytest.mark.parametrize("form", ["lti", "diagonal", "companion", "shift"])
def test_transfer_function_matches_scipy_and_control(form):
    rng = rng_for("tf", form)
    if form == "lti":
        sys = LTI(*random_lti(rng, 4, 2, 3))
    elif form == "diagonal":
        sys = Diagonal(
            [0.5 + 0.3j, 0.5 - 0.3j, -0.2], [1 + 1j, 1 - 1j, 2.0], [0.5j, -0.5j, 1.0], 0.3
        )
    elif form == "companion":
        sys = Companion([0.3, 0.2, -0.1], 1.5, [1.0, -2.0, 0.5], 0.4)
    else:
        sys = Shift([1.0, 2.0, -3.0], 0.5)
    A, B, C, D = abcd(sys)
    num, den = (np64(x) for x in sys.transfer_function())
    n = A.shape[0]
    assert den.shape == (n + 1,)
    for j in range(B.shape[1]):
        rnum, rden = ss.ss2tf(A, B, C, D, input=j)
        np.testing.assert_allclose(den, rden, **TOL64)
        got = num[None] if sys.is_siso else num[:, j]
        np.testing.assert_allclose(got, rnum, **TOL64)
    ctf = control.ss2tf(control.ss(A, B, C, D, True))
    for i in range(C.shape[0]):
        for j in range(B.shape[1]):
            got = num if sys.is_siso else num[i, j]
            cnum, cden = np.asarray(ctf.num[i][j]), np.asarray(ctf.den[i][j])
            # control strips leading zeros and normalises the denominator: compare
            # num/den as rational functions by cross-multiplication
            np.testing.assert_allclose(
                np.polymul(got, cden), np.polymul(cnum, den)[-(n + cden.size) :], **TOL64
            )


def test_poles_and_stability():
    rng = rng_for("poles")
    A, B, C, D = random_lti(rng, 5, 1, 1, radius=0.95)
    sys = LTI(A, B, C, D)
    ref = control.poles(control.ss(A, B, C, D, True))
    np.testing.assert_allclose(np.sort_complex(sys.poles()), np.sort_complex(ref), **TOL64)
    assert sys.spectral_radius() == pytest.approx(0.95, rel=1e-9)
    assert sys.is_stable()
    assert not LTI(A / 0.9, B, C, D).is_stable()
    comp = Companion([0.3, 0.2, -0.1])
    np.testing.assert_allclose(
        np.sort_complex(comp.poles()), np.sort_complex(np.roots([1, -0.3, -0.2, 0.1])), **TOL64
    )
    assert Shift([1.0, 2.0, 3.0]).spectral_radius() == 0.0
    ch = Diagonal([[0.5, 0.2], [1.5, 0.1]])
    np.testing.assert_allclose(ch.spectral_radius(), [0.5, 1.5])
    assert not ch.is_stable()


def test_controllability_observability_match_control():
    rng = rng_for("ctrb")
    A, B, C, D = random_lti(rng, 4, 2, 2)
    sys = LTI(A, B, C, D)
    np.testing.assert_allclose(sys.controllability(), control.ctrb(A, B), **TOL64)
    np.testing.assert_allclose(sys.observability(), control.obsv(A, C), **TOL64)
    assert sys.controllability_rank() == 4 and sys.observability_rank() == 4
    # an uncontrollable and unobservable block
    Ab = scipy.linalg.block_diag(A, 0.3)
    Bb, Cb = np.r_[B, np.zeros((1, 2))], np.c_[C, np.zeros((2, 1))]
    big = LTI(Ab, Bb, Cb, D)
    assert big.controllability_rank() == np.linalg.matrix_rank(control.ctrb(Ab, Bb)) == 4
    assert big.observability_rank() == np.linalg.matrix_rank(control.obsv(Ab, Cb)) == 4
    # complex diagonal: numpy Krylov (control drops imaginary parts, design §7)
    dg = Diagonal([0.5j, -0.5j, 0.2], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    Ad = np.diag([0.5j, -0.5j, 0.2])
    K = np.stack([np.linalg.matrix_power(Ad, k) @ [1.0, 1.0, 0.0] for k in range(3)], 1)
    np.testing.assert_allclose(dg.controllability(), K, **TOL64)
    assert dg.controllability_rank() == 2 and dg.observability_rank() == 3


def test_gramians_and_hankel_singular_values():
    rng = rng_for("gram")
    A, B, C, D = random_lti(rng, 4, 2, 3, radius=0.8)
    sys = LTI(A, B, C, D)
    wc, wo = sys.gramians()
    np.testing.assert_allclose(wc, scipy.linalg.solve_discrete_lyapunov(A, B @ B.T), **TOL64)
    np.testing.assert_allclose(wo, scipy.linalg.solve_discrete_lyapunov(A.T, C.T @ C), **TOL64)
    # Gramians as the sums of the series (independent of the Lyapunov solver)
    wc_sum = sum(
        np.linalg.matrix_power(A, k) @ B @ B.T @ np.linalg.matrix_power(A, k).T for k in range(400)
    )
    np.testing.assert_allclose(wc, wc_sum, rtol=1e-8, atol=1e-10)
    hsv = sys.hankel_singular_values()
    # Hankel singular values are the singular values of the (long) Hankel matrix
    h = sys.markov(120)
    Hk = np.block([[h[i + j + 1] for j in range(59)] for i in range(59)])
    np.testing.assert_allclose(hsv, np.linalg.svd(Hk, compute_uv=False)[:4], rtol=1e-7)
    assert np.all(np.diff(hsv) <= 0)


def test_to_companion_matches_control_canonical_form():
    rng = rng_for("canon")
    A, B, C, D = random_lti(rng, 4, 1, 1)
    sys = LTI(A, B, C, D)
    comp, T = sys.to_companion(return_transform=True)
    ref, Tref = control.canonical_form(control.ss(A, B, C, D, True), "reachable")
    Ac, Bc, Cc, Dc = abcd(comp)
    np.testing.assert_allclose(Ac, ref.A, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(Bc, ref.B, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(Cc, ref.C, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(Dc, ref.D, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(T, Tref, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(comp.markov(10), sys.markov(10), rtol=1e-8, atol=1e-9)


def test_conversions_match_scipy():
    """Diagonal → Companion gives scipy's tf2ss of the transfer function (same layout)."""
    dg = Diagonal([0.9, -0.5, 0.3 + 0.4j, 0.3 - 0.4j], [1.0, 2.0, 1 + 1j, 1 - 1j],
                  [1.0, 1.0, 2j, -2j], 0.25)  # fmt: skip
    comp = dg.to_companion()
    num, den = (np64(x) for x in dg.transfer_function())
    A, B, C, D = ss.tf2ss(num, den)
    Ac, Bc, Cc, Dc = abcd(comp)
    np.testing.assert_allclose(Ac, A, **TOL64)
    np.testing.assert_allclose(Bc, B, **TOL64)
    np.testing.assert_allclose(Cc, C, **TOL64)
    np.testing.assert_allclose(Dc, D, **TOL64)
    back = comp.to_diagonal()
    np.testing.assert_allclose(np.sort_complex(back.poles), np.sort_complex(np.roots(den)), **TOL64)
    np.testing.assert_allclose(back.markov(12), dg.markov(12), **TOL64)
    # LTI → Diagonal: poles are control's, Markov parameters unchanged
    rng = rng_for("to-diag")
    A, B, C, D = random_lti(rng, 4, 2, 2)
    sys = LTI(A, B, C, D)
    md = sys.to_diagonal()
    np.testing.assert_allclose(
        np.sort_complex(md.poles), np.sort_complex(control.poles(control.ss(A, B, C, D, True))),
        **TOL64,
    )  # fmt: skip
    np.testing.assert_allclose(md.markov(10), sys.markov(10), **TOL64)


def test_minimal_matches_control_minreal():
    rng = rng_for("minreal")
    n_min = 3
    A1, B1, C1, D1 = random_lti(rng, n_min, 1, 1, radius=0.8)
    # add an uncontrollable mode and an unobservable one, then mix the coordinates
    A = scipy.linalg.block_diag(A1, 0.5, -0.4)
    A[0, n_min] = 0.3  # the uncontrollable mode drives the minimal part
    A[n_min + 1, 0] = 0.3  # the minimal part drives the unobservable mode
    B = np.r_[B1, [[0.0]], [[1.0]]]
    C = np.c_[C1, [[2.0]], [[0.0]]]
    T = rng.normal(size=(5, 5)) + 3 * np.eye(5)
    big = LTI(A, B, C, D1).similar(T)
    red = big.minimal()
    assert red.order == n_min
    tf = control.ss2tf(control.ss(*abcd(big), True))
    ref = control.minreal(tf, tol=1e-7, verbose=False)
    rnum, rden = np.asarray(ref.num[0][0]), np.asarray(ref.den[0][0])
    assert rden.size - 1 == n_min
    num, den = (np64(x) for x in red.transfer_function())
    np.testing.assert_allclose(den, rden / rden[0], rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(num[-rnum.size :], rnum / rden[0], rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(red.markov(15), big.markov(15), rtol=1e-8, atol=1e-9)
    # MIMO: order is the rank of the Hankel matrix
    A, B, C, D = random_lti(rng, 3, 2, 2)
    mimo = LTI(scipy.linalg.block_diag(A, A), np.r_[B, B], np.c_[C, C], D)
    assert mimo.minimal().order == 3
    np.testing.assert_allclose(mimo.minimal().markov(10), mimo.markov(10), rtol=1e-8, atol=1e-9)


def test_similar_uses_controls_convention():
    rng = rng_for("similar")
    A, B, C, D = random_lti(rng, 3, 1, 2)
    T = rng.normal(size=(3, 3)) + 2 * np.eye(3)
    got = LTI(A, B, C, D).similar(T)
    ref = control.similarity_transform(control.ss(A, B, C, D, True), T)
    for m, r in zip(abcd(got), (ref.A, ref.B, ref.C, ref.D), strict=True):
        np.testing.assert_allclose(m, r, **TOL64)


def test_kinds_follow_the_inputs():
    sys = Diagonal(torch.tensor([0.5, 0.2]), C=torch.tensor([1.0, 2.0]))
    assert isinstance(sys.poles, torch.Tensor) and isinstance(sys.markov(3), torch.Tensor)
    assert isinstance(sys.transfer_function()[0], torch.Tensor)
    nsys = Diagonal(np.array([0.5, 0.2]), C=[1.0, 2.0])
    assert isinstance(nsys.markov(3), np.ndarray)
    np.testing.assert_allclose(sys.markov(5).numpy(), nsys.markov(5))
    y = nsys.simulate(np.ones(4, dtype=np.float32))
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    yt = nsys.simulate(torch.ones(2, 4, dtype=torch.float64))
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float64
    np.testing.assert_allclose(yt[0].numpy(), y, rtol=1e-6)


def test_simulate_every_simd_level(restore_runtime):
    rng = rng_for("levels")
    systems = [
        Diagonal(rng.uniform(-0.9, 0.9, size=5), rng.normal(size=5)),
        Companion(-np.poly(rng.uniform(-0.9, 0.9, size=3))[1:], 1.5, rng.normal(size=3), 0.3),
        Shift(rng.normal(size=4), 0.5),
        LTI(*random_lti(rng, 3, 1, 1)),
    ]
    u = rng.normal(size=(3, 37))
    x0s = [rng.normal(size=(3, s.order)) for s in systems]
    for sys, x0 in zip(systems, x0s, strict=True):
        ref = np.stack([dlsim(*abcd(sys), u[b], x0[b])[0][:, 0] for b in range(3)])
        for level in bm.simd_levels():
            bm.set_simd_level(level)
            msg = f"{type(sys).__name__} at {level}"
            np.testing.assert_allclose(sys.simulate(u, x0), ref, **TOL64, err_msg=msg)
            y32 = sys.simulate(torch.tensor(u, dtype=torch.float32), torch.tensor(x0))
            np.testing.assert_allclose(y32.double().numpy(), ref, **TOL32, err_msg=msg)


# ------------------------------------------------------------------------------- errors


def raises_naming(exc, names, fn, *args, **kw):
    names = (names,) if isinstance(names, str) else names
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), msg
    return msg


E, T_ = bm.BmojoValueError, bm.BmojoTypeError


def test_constructor_errors():
    I2 = np.eye(2)
    raises_naming(E, "A", LTI, np.ones((2, 3)), [1.0, 1.0], [1.0, 1.0])
    raises_naming(E, "B", LTI, I2, np.ones(3), [1.0, 1.0])
    raises_naming(E, "C", LTI, I2, np.ones(2), np.ones((1, 3)))
    raises_naming(E, "D", LTI, I2, np.ones((2, 2)), np.ones((3, 2)), np.ones((2, 2)))
    raises_naming(E, "A", LTI, np.array([[np.nan, 0], [0, 1]]), [1.0, 1.0], [1.0, 1.0])
    raises_naming(T_, "A", LTI, "eye", [1.0], [1.0])
    raises_naming(T_, "B", LTI, I2, np.array(["a", "b"]), [1.0, 1.0])
    raises_naming(E, "B", Diagonal, [0.5, 0.2], [1.0, 2.0, 3.0])
    raises_naming(E, "C", Diagonal, [0.5, 0.2], None, np.ones((2, 3)))
    raises_naming(E, "poles", Diagonal, [0.5, np.inf])
    raises_naming(T_, "alpha", Companion, [0.5 + 1j])
    raises_naming(E, "c", Companion, [0.5, 0.1], 1.0, [1.0, 2.0, 3.0])
    raises_naming(E, "c", Shift, np.zeros(0))
    raises_naming(T_, "c", Shift, [1j])
    raises_naming(E, "N", Bilinear, I2, np.ones((1, 3, 3)), [1.0, 0.0], [1.0, 0.0])
    raises_naming(T_, "A0", Bilinear, I2 * 1j, np.ones((1, 2, 2)), [1.0, 0.0], [1.0, 0.0])


def test_conversion_errors():
    # repeated poles
    raises_naming(E, "poles", Diagonal([0.5, 0.5], [1.0, 1.0]).to_companion)
    raises_naming(E, "alpha", Companion(-np.poly([0.5, 0.5])[1:]).to_diagonal)
    msg = raises_naming(
        E, "to_diagonal", LTI([[0.5, 1.0], [0.0, 0.5]], [0.0, 1.0], [1.0, 0.0]).to_diagonal
    )
    assert "repeated" in msg
    # too close (relative separation below MIN_POLE_SEPARATION)
    raises_naming(E, "poles", Diagonal([0.5, 0.5 + 1e-9], [1.0, 1.0]).to_companion)
    # ill-conditioned Vandermonde: many clustered poles
    many = np.linspace(0.9, 0.99, 16)
    msg = raises_naming(E, "poles", Diagonal(many).to_companion)
    assert "MAX_COND" in msg
    raises_naming(E, "alpha", Companion(-np.poly(many)[1:]).to_diagonal)
    # uncontrollable
    raises_naming(E, "B", Diagonal([0.5, 0.2], [1.0, 0.0]).to_companion)
    msg = raises_naming(
        E, "to_companion", LTI(np.diag([0.5, 0.2]), [1.0, 0.0], [1.0, 1.0]).to_companion
    )
    assert "not controllable" in msg
    # ill-conditioned controllability matrix (controllable in exact arithmetic)
    raises_naming(
        E, "to_companion", LTI(np.diag([0.5, 0.5 + 1e-10]), [1.0, 1.0], [1.0, 1.0]).to_companion
    )
    # MIMO / complex-valued systems have no (real, SISO) companion form
    raises_naming(E, "to_companion", LTI(np.eye(2) * 0.5, np.eye(2), np.eye(2)).to_companion)
    raises_naming(E, "to_companion", Diagonal([0.5j, 0.2], [1.0, 1.0], [1.0, 1.0]).to_companion)
    raises_naming(E, "to_companion", Diagonal([0.5, 0.2], np.ones((2, 2))).to_companion)
    # similarity
    sys = LTI(np.diag([0.5, 0.2]), [1.0, 1.0], [1.0, 1.0])
    raises_naming(E, "T", sys.similar, np.ones((2, 2)))
    raises_naming(E, "T", sys.similar, np.diag([1.0, 1e-9]))
    raises_naming(E, "T", sys.similar, np.eye(3))
    assert MAX_COND == 1e8
    # minimal with channels reducing to different orders
    ch = Diagonal([[0.5, 0.2], [0.5, 0.2]], [[1.0, 1.0], [1.0, 0.0]])
    raises_naming(E, "minimal", ch.minimal)


@pytest.mark.parametrize("method", ["gramians", "hankel_singular_values"])
def test_unstable_systems_rejected(method):
    sys = Diagonal([1.2, 0.5], [1.0, 1.0], [1.0, 1.0])
    msg = raises_naming(E, method, getattr(sys, method))
    assert "stable" in msg
    raises_naming(E, method, getattr(Diagonal([1.0, 0.5]), method))  # marginal


def test_simulate_errors():
    sys = Diagonal([0.5, 0.2])
    raises_naming(T_, "u", sys.simulate, "abc")
    raises_naming(T_, "u", sys.simulate, torch.ones(3, dtype=torch.complex64))
    raises_naming(T_, "u", sys.simulate, torch.ones(3, dtype=torch.int64))
    raises_naming(E, "u", sys.simulate, np.array([1.0, np.nan]))
    raises_naming(E, "x0", sys.simulate, np.ones(4), np.ones(3))
    raises_naming(E, "x0", sys.simulate, np.ones((2, 4)), np.ones((3, 2)))
    raises_naming(T_, "x0", sys.simulate, np.ones(4), np.ones(2) * 1j)
    mimo = Diagonal([0.5, 0.2], np.ones((2, 3)), np.ones((2, 2)))
    raises_naming(E, "u", mimo.simulate, np.ones((4, 2)))
    raises_naming(E, "u", mimo.simulate, np.ones(4))
    ch = Diagonal([[0.5, 0.2]] * 3)
    raises_naming(E, "u", ch.simulate, np.ones((2, 4)))
    bil = Bilinear(np.eye(2) * 0.5, np.ones((2, 2, 2)), [1.0, 0.0], [1.0, 1.0])
    raises_naming(E, "v", bil.simulate, np.ones(4))
    raises_naming(E, "v", bil.simulate, np.ones(4), np.ones((5, 2)))
    raises_naming(E, ("g1", "g2"), bil.volterra2, 0, 1)
    raises_naming(E, "j", bil.volterra2, 1, 1, 2)
    big = LTI(np.eye(65) * 0.5, np.ones(65), np.ones(65))
    raises_naming(E, "simulate", big.simulate, np.ones(3))
    raises_naming(E, "simulate", Diagonal(np.full(33, 0.5j)).simulate, np.ones(3))
    raises_naming(E, "k", sys.markov, -1)
    raises_naming(T_, "k", sys.markov, 1.5)
    raises_naming(E, "L", sys.step, -2)
