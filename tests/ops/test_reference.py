"""The pure-torch reference (bmojo_core.reference) against independent NumPy/SciPy oracles.

Every other test trusts the reference, so here it is checked against code that shares
nothing with it: explicit NumPy loops, ``scipy.signal.lfilter`` and ``scipy.signal.dlsim``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
from bmojo_core import reference as ref
from conftest import make_scan_inputs, make_seq_idx, make_step_inputs, stable_seed

RTOL = 1e-10
ATOL = 1e-10


def np_close(got, want, rtol=RTOL, atol=ATOL):
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# softplus
# ---------------------------------------------------------------------------------------


def test_softplus_thresholded_values_and_grad():
    x = torch.tensor(
        [-30.0, -1.0, 0.0, 1.0, 19.5, 20.0, 20.5, 50.0, 800.0],
        dtype=torch.float64,
        requires_grad=True,
    )
    y = ref.softplus_thresholded(x)
    xn = x.detach().numpy()
    want = np.where(xn > 20, xn, np.log1p(np.exp(np.minimum(xn, 20))))
    np_close(y, want, rtol=1e-14, atol=1e-300)
    (g,) = torch.autograd.grad(y.sum(), x)
    want_g = np.where(xn > 20, 1.0, 1.0 / (1.0 + np.exp(-np.minimum(xn, 20))))
    np_close(g, want_g, rtol=1e-14, atol=1e-300)
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------------------
# diag_scan
# ---------------------------------------------------------------------------------------


def np_diag_scan(a, b, h0, reverse):
    a, b = np.asarray(a), np.asarray(b)
    L = a.shape[-1]
    h = np.array(h0, dtype=np.float64, copy=True)
    out = np.zeros_like(b)
    order = range(L - 1, -1, -1) if reverse else range(L)
    for t in order:
        h = a[..., t] * h + b[..., t]
        out[..., t] = h
    return out, h


@pytest.mark.parametrize("lanes", [(), (3,), (2, 3)])
@pytest.mark.parametrize("L", [0, 1, 2, 17])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("init", [False, True])
def test_diag_scan_vs_numpy_loop(lanes, L, reverse, init):
    rng = np.random.default_rng(stable_seed(lanes, L, reverse, init))
    a = rng.uniform(-1.1, 1.1, size=lanes + (L,))
    b = rng.normal(size=lanes + (L,))
    h0 = rng.normal(size=lanes) if init else np.zeros(lanes)
    h, last = ref.diag_scan(
        torch.from_numpy(a),
        torch.from_numpy(b),
        initial_state=torch.from_numpy(h0) if init else None,
        reverse=reverse,
        return_last_state=True,
    )
    want, want_last = np_diag_scan(a, b, h0, reverse)
    assert h.shape == lanes + (L,)
    assert last.shape == lanes
    np_close(h, want)
    np_close(last, want_last)
    if L > 0:
        np_close(last, want[..., 0] if reverse else want[..., -1])


@pytest.mark.parametrize("a_const", [-0.9, 0.3, 0.999, 1.0])
@pytest.mark.parametrize("init", [False, True])
def test_diag_scan_constant_a_vs_lfilter(a_const, init):
    rng = np.random.default_rng(7)
    L = 300
    b = rng.normal(size=L)
    h0 = 0.7 if init else 0.0
    a = np.full(L, a_const)
    h = ref.diag_scan(
        torch.from_numpy(a),
        torch.from_numpy(b),
        initial_state=torch.tensor(h0, dtype=torch.float64) if init else None,
    )
    # y[n] = a y[n-1] + b[n]: lfilter([1], [1, -a]); the filter's delay state is a * h0.
    want = scipy.signal.lfilter([1.0], [1.0, -a_const], b, zi=[a_const * h0])[0]
    np_close(h, want, rtol=1e-9, atol=1e-9)
    # reverse = forward of the time-reversed sequence
    hr = ref.diag_scan(torch.from_numpy(a), torch.from_numpy(b), reverse=True)
    want_r = scipy.signal.lfilter([1.0], [1.0, -a_const], b[::-1])[::-1]
    np_close(hr, want_r, rtol=1e-9, atol=1e-9)


def test_diag_scan_dtypes_and_grad():
    a = torch.rand(2, 5, dtype=torch.float32)
    b = torch.randn(2, 5, dtype=torch.float32)
    h, last = ref.diag_scan(a, b, return_last_state=True)
    assert h.dtype == torch.float32 and last.dtype == torch.float32
    a64 = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    for rev in (False, True):
        assert torch.autograd.gradcheck(
            lambda a_, b_, h_, r=rev: ref.diag_scan(a_, b_, h_, r, True), (a64, b64, h0)
        )


# ---------------------------------------------------------------------------------------
# selective_scan
# ---------------------------------------------------------------------------------------


def np_softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def np_selective_scan(kw):
    """Explicit scalar loops over (b, d, n, t), NumPy float64."""
    n = {
        k: (v.detach().numpy().astype(np.float64) if isinstance(v, torch.Tensor) else v)
        for k, v in kw.items()
    }
    u, delta, A, B, C = n["u"], n["delta"], n["A"], n["B"], n["C"]
    batch, dim, L = u.shape
    N = A.shape[1]
    dt = delta.copy()
    if n.get("delta_bias") is not None:
        dt = dt + n["delta_bias"][:, None]
    if n.get("delta_softplus"):
        dt = np_softplus(dt)

    def coef(X, b, d, nn, t):
        if X.ndim == 2:
            return X[d, nn]
        if X.ndim == 3:
            return X[b, nn, t]
        G = X.shape[1]
        return X[b, d // (dim // G), nn, t]

    out = np.zeros((batch, dim, L))
    last = np.zeros((batch, dim, N))
    seq = n.get("seq_idx")
    for b in range(batch):
        for d in range(dim):
            for nn in range(N):
                h = 0.0 if n.get("initial_state") is None else n["initial_state"][b, d, nn]
                for t in range(L):
                    if seq is not None and t > 0 and seq[b, t] != seq[b, t - 1]:
                        h = 0.0
                    h = (
                        np.exp(dt[b, d, t] * A[d, nn]) * h
                        + dt[b, d, t] * coef(B, b, d, nn, t) * u[b, d, t]
                    )
                    out[b, d, t] += coef(C, b, d, nn, t) * h
                last[b, d, nn] = h
    if n.get("D") is not None:
        out += n["D"][None, :, None] * u
    if n.get("z") is not None:
        zz = n["z"]
        out *= zz / (1.0 + np.exp(-zz))
    return out, last


@pytest.mark.parametrize("bc", ["const", "var", "group", "const/var", "group/const"])
@pytest.mark.parametrize("opts", ["none", "all", "softplus_only", "init_seq"])
def test_selective_scan_vs_numpy_loop(bc, opts):
    on = opts == "all"
    kw = make_scan_inputs(
        batch=2,
        dim=4,
        N=3,
        L=9,
        bc=bc,
        G=2,
        seed=11,
        D=on,
        z=on,
        delta_bias=on,
        delta_softplus=opts in ("all", "softplus_only"),
        initial_state=opts in ("all", "init_seq"),
        seq_idx=3 if opts == "init_seq" else 0,
        return_last_state=True,
    )
    out, last = ref.selective_scan(**kw)
    want, want_last = np_selective_scan(kw)
    assert out.shape == kw["u"].shape and last.shape == (2, 4, 3)
    np_close(out, want)
    np_close(last, want_last)


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("with_dz", [False, True])
def test_selective_scan_lti_vs_lfilter(init, with_dz):
    """Δ constant over time, constant A/B/C: y = Σ_n lfilter([ΔBC], [1, -e^{ΔA}], u) + D u."""
    rng = np.random.default_rng(3)
    batch, dim, N, L = 2, 3, 5, 200
    u = rng.normal(size=(batch, dim, L))
    dval = rng.uniform(0.05, 1.0, size=(batch, dim))
    delta = np.repeat(dval[:, :, None], L, axis=2)
    A = -rng.uniform(0.1, 2.0, size=(dim, N))
    B = rng.normal(size=(dim, N))
    C = rng.normal(size=(dim, N))
    D = rng.normal(size=dim)
    z = rng.normal(size=(batch, dim, L))
    h0 = rng.normal(size=(batch, dim, N)) if init else np.zeros((batch, dim, N))
    t = torch.from_numpy
    out = ref.selective_scan(
        t(u),
        t(delta),
        t(A),
        t(B),
        t(C),
        D=t(D) if with_dz else None,
        z=t(z) if with_dz else None,
        initial_state=t(h0) if init else None,
    )
    want = np.zeros((batch, dim, L))
    for b in range(batch):
        for d in range(dim):
            for n in range(N):
                lam = np.exp(dval[b, d] * A[d, n])
                beta = dval[b, d] * B[d, n]
                want[b, d] += scipy.signal.lfilter(
                    [beta * C[d, n]], [1.0, -lam], u[b, d], zi=[C[d, n] * lam * h0[b, d, n]]
                )[0]
    if with_dz:
        want = (want + D[None, :, None] * u) * (z / (1 + np.exp(-z)))
    np_close(out, want, rtol=1e-9, atol=1e-9)


def test_selective_scan_lti_vs_dlsim():
    """Per channel, the LTI scan is the state-space system (diag(λ), β, C·λ, C·β + D)."""
    rng = np.random.default_rng(5)
    batch, dim, N, L = 1, 4, 6, 150
    u = rng.normal(size=(batch, dim, L))
    dval = rng.uniform(0.05, 1.0, size=dim)
    delta = np.broadcast_to(dval[None, :, None], (batch, dim, L)).copy()
    A = -rng.uniform(0.1, 2.0, size=(dim, N))
    B = rng.normal(size=(dim, N))
    C = rng.normal(size=(dim, N))
    D = rng.normal(size=dim)
    h0 = rng.normal(size=(batch, dim, N))
    t = torch.from_numpy
    out, last = ref.selective_scan(
        t(u), t(delta), t(A), t(B), t(C), D=t(D), initial_state=t(h0), return_last_state=True
    )
    for d in range(dim):
        lam = np.exp(dval[d] * A[d])
        beta = dval[d] * B[d]
        # dlsim: x[k+1] = Ad x[k] + Bd u[k], y[k] = Cd x[k] + Dd u[k]; here x[k] = h_{k-1}.
        Ad = np.diag(lam)
        Bd = beta[:, None]
        Cd = (C[d] * lam)[None, :]
        Dd = np.array([[C[d] @ beta + D[d]]])
        _, y, x = scipy.signal.dlsim((Ad, Bd, Cd, Dd, 1), u[0, d], x0=h0[0, d])
        np_close(out[0, d], y[:, 0], rtol=1e-9, atol=1e-9)
        # final state h_L = λ x[L-1] + β u[L-1]
        np_close(last[0, d], lam * x[-1] + beta * u[0, d, -1], rtol=1e-9, atol=1e-9)


def test_selective_scan_seq_idx_equals_per_sequence_loop():
    kw = make_scan_inputs(batch=2, dim=3, N=4, L=20, bc="var", seed=2, initial_state=True)
    gen = torch.Generator().manual_seed(9)
    seq = make_seq_idx(2, 20, 4, gen)
    kw2 = dict(kw)
    kw2["seq_idx"] = seq
    out, last = ref.selective_scan(**{**kw2, "return_last_state": True})
    for b in range(2):
        ids = seq[b].tolist()
        starts = [0] + [t for t in range(1, 20) if ids[t] != ids[t - 1]] + [20]
        for k in range(len(starts) - 1):
            s, e = starts[k], starts[k + 1]
            part = dict(
                u=kw["u"][b : b + 1, :, s:e],
                delta=kw["delta"][b : b + 1, :, s:e],
                A=kw["A"],
                B=kw["B"][b : b + 1, :, s:e],
                C=kw["C"][b : b + 1, :, s:e],
                D=kw["D"],
                z=kw["z"][b : b + 1, :, s:e],
                delta_bias=kw["delta_bias"],
                delta_softplus=kw["delta_softplus"],
                initial_state=kw["initial_state"][b : b + 1] if k == 0 else None,
            )
            o, hl = ref.selective_scan(**part, return_last_state=True)
            np_close(out[b : b + 1, :, s:e], o.numpy())
            if e == 20:
                np_close(last[b : b + 1], hl.numpy())


def test_selective_scan_empty_and_dtypes():
    kw = make_scan_inputs(batch=2, dim=3, N=4, L=0, initial_state=True, return_last_state=True)
    out, last = ref.selective_scan(**kw)
    assert out.shape == (2, 3, 0)
    assert torch.equal(last, kw["initial_state"])
    kw = make_scan_inputs(batch=2, dim=3, N=4, L=0, return_last_state=True)
    out, last = ref.selective_scan(**kw)
    assert torch.equal(last, torch.zeros(2, 3, 4, dtype=torch.float64))
    kw = make_scan_inputs(dtype=torch.bfloat16, weight_dtype=torch.float32, return_last_state=True)
    out, last = ref.selective_scan(**kw)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32


def test_selective_scan_softplus_threshold_branch():
    """Δ above 20 uses the identity (forward and gradient)."""
    u = torch.ones(1, 1, 2, dtype=torch.float64)
    delta = torch.tensor([[[19.0, 25.0]]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[-0.01]], dtype=torch.float64)
    B = torch.ones(1, 1, dtype=torch.float64)
    C = torch.ones(1, 1, dtype=torch.float64)
    out = ref.selective_scan(u, delta, A, B, C, delta_softplus=True)
    d1 = np.log1p(np.exp(19.0))
    h1 = d1
    h2 = np.exp(25.0 * -0.01) * h1 + 25.0
    np_close(out[0, 0], [h1, h2], rtol=1e-13, atol=0)


def test_selective_scan_reference_gradcheck():
    kw = make_scan_inputs(
        batch=1,
        dim=2,
        N=2,
        L=4,
        bc="group",
        G=2,
        initial_state=True,
        seq_idx=2,
        return_last_state=True,
    )
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    args = [kw[n].detach().clone().requires_grad_(True) for n in names]

    def f(*xs):
        k = dict(kw)
        k.update(zip(names, xs, strict=True))
        out, last = ref.selective_scan(**k)
        return out, last

    assert torch.autograd.gradcheck(f, args)


# ---------------------------------------------------------------------------------------
# selective_state_update
# ---------------------------------------------------------------------------------------


def np_state_update(kw, sbi=None):
    """NumPy per-row, per-token, per-element loops; returns (out, new_state, inter)."""
    n = {
        k: (v.detach().numpy().astype(np.float64).copy() if isinstance(v, torch.Tensor) else v)
        for k, v in kw.items()
    }
    state = n["state"]
    heads = state.ndim == 4
    multi = n["x"].ndim == state.ndim
    st = state.reshape(state.shape[0], -1, state.shape[-1])  # (S, channels, N)
    nch = st.shape[1]
    Hh = state.shape[1]
    P = state.shape[2] if heads else 1
    x = n["x"].reshape(n["x"].shape[0], -1, nch) if multi else n["x"].reshape(-1, 1, nch)
    batch, T = x.shape[0], x.shape[1]

    def tok(v):
        return None if v is None else v.reshape(batch, T, nch)

    dt, z = tok(n["dt"]), tok(n.get("z"))
    Bm, Cm = n["B"], n["C"]
    if not multi:
        Bm, Cm = Bm[:, None], Cm[:, None]
    if Bm.ndim == 3:
        Bm, Cm = Bm[:, :, None], Cm[:, :, None]
    G = Bm.shape[2]
    A = n["A"].reshape(nch, -1)
    D = None if n.get("D") is None else n["D"].reshape(nch)
    bias = None if n.get("dt_bias") is None else n["dt_bias"].reshape(nch)
    out = np.zeros((batch, T, nch))
    inter = np.full((batch, T, nch, A.shape[1]), np.nan)
    for i in range(batch):
        slot = i if sbi is None else sbi[i]
        if slot < 0:
            continue
        for c in range(nch):
            head = c // P
            g = head // (Hh // G)
            h = st[slot, c].copy()
            for t in range(T):
                d = dt[i, t, c] + (0.0 if bias is None else bias[c])
                if n.get("dt_softplus"):
                    d = np_softplus(d)
                for k in range(A.shape[1]):
                    h[k] = np.exp(d * A[c, k]) * h[k] + d * Bm[i, t, g, k] * x[i, t, c]
                y = float(np.dot(Cm[i, t, g], h))
                if D is not None:
                    y += D[c] * x[i, t, c]
                if z is not None:
                    y *= z[i, t, c] / (1 + np.exp(-z[i, t, c]))
                out[i, t, c] = y
                inter[i, t, c] = h
            st[slot, c] = h
    return out.reshape(n["x"].shape), st.reshape(state.shape), inter


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("T", [None, 1, 3])
@pytest.mark.parametrize("G", [None, 1, 2])
@pytest.mark.parametrize("opts", [False, True])
def test_state_update_vs_numpy(heads, T, G, opts):
    kw = make_step_inputs(
        batch=3,
        heads=heads,
        dim=4,
        H=2,
        P=3,
        N=3,
        T=T,
        G=G,
        seed=4,
        D=opts,
        z=opts,
        dt_bias=opts,
        dt_softplus=opts,
    )
    want, want_state, _ = np_state_update(kw)
    state = kw["state"].clone()
    out = ref.selective_state_update(**{**kw, "state": state})
    assert out.shape == kw["x"].shape
    np_close(out, want)
    np_close(state, want_state)


def test_state_update_pool_padding_intermediate():
    kw = make_step_inputs(batch=4, heads=True, H=2, P=2, N=3, T=3, G=2, slots=7, seed=8)
    sbi = torch.tensor([5, -1, 0, 3])
    want, want_state, want_inter = np_state_update(kw, sbi.tolist())
    state = kw["state"].clone()
    inter = torch.full((4, 3, 2, 2, 3), 123.0, dtype=torch.float64)
    out = ref.selective_state_update(
        **{**kw, "state": state}, state_batch_indices=sbi, intermediate_states=inter
    )
    np_close(out, want)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    np_close(state, want_state)
    # untouched slots stay bitwise equal
    for s in (1, 2, 4, 6):
        assert torch.equal(state[s], kw["state"][s])
    for i in (0, 2, 3):
        np_close(inter[i], want_inter[i].reshape(3, 2, 2, 3))
    assert (inter[1] == 123.0).all()


@pytest.mark.parametrize("bc", ["var", "group"])
def test_state_update_steps_equal_scan(bc):
    batch, dim, N, L, G = 2, 4, 3, 12, 2
    kw = make_scan_inputs(
        batch=batch,
        dim=dim,
        N=N,
        L=L,
        bc=bc,
        G=G,
        seed=21,
        initial_state=True,
        return_last_state=True,
    )
    out_scan, last = ref.selective_scan(**kw)
    state = kw["initial_state"].clone()

    def bc_at(X, t):
        return X[..., t]  # (batch, N) or (batch, G, N)

    outs = []
    for t in range(L):
        outs.append(
            ref.selective_state_update(
                state,
                kw["u"][:, :, t],
                kw["delta"][:, :, t],
                kw["A"],
                bc_at(kw["B"], t),
                bc_at(kw["C"], t),
                D=kw["D"],
                z=kw["z"][:, :, t],
                dt_bias=kw["delta_bias"],
                dt_softplus=kw["delta_softplus"],
            )
        )
    np_close(torch.stack(outs, -1), out_scan.numpy())
    np_close(state, last.numpy())
    # multi-token form in one call
    state2 = kw["initial_state"].clone()
    out_multi = ref.selective_state_update(
        state2,
        kw["u"].transpose(1, 2),
        kw["delta"].transpose(1, 2),
        kw["A"],
        kw["B"].movedim(-1, 1),
        kw["C"].movedim(-1, 1),
        D=kw["D"],
        z=kw["z"].transpose(1, 2),
        dt_bias=kw["delta_bias"],
        dt_softplus=kw["delta_softplus"],
    )
    np_close(out_multi.transpose(1, 2), out_scan.numpy())
    np_close(state2, last.numpy())
