"""bilinear_scan (design §5) against the pure-torch reference loop, scipy's dlsim, the
second-order Volterra kernel, and itself (chunking, threads, SIMD levels)."""

from __future__ import annotations

import bmojo_core as bm
import numpy as np
import pytest
import scipy.signal
import torch
from bmojo_core import reference as ref
from bmojo_core.ops.bilinear import PAR_CHUNK
from conftest import FLOAT_DTYPES, assert_close, stable_seed, to64

FORMS = ("lti", "bilinear", "bilinear_v", "per_step")
METHODS = ("sequential", "parallel")
# Long enough for the parallel path to have a middle chunk (three or more chunks).
L_PAR = 3 * PAR_CHUNK + 5


def make(form, batch=2, L=9, n=5, p=3, q=2, m=2, dtype=torch.float64, seed=0, C=True,
         D=True, init=True):  # fmt: skip
    """Keyword arguments of bilinear_scan; matrices scaled so that A_t stays contractive."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    s = 0.6 / n**0.5
    kw = dict(u=rn(batch, L, p), B=rn(n, p, scale=0.5))
    if form == "per_step":
        kw["A"] = rn(batch, L, n, n, scale=s)
    else:
        kw["A"] = rn(n, n, scale=s)
    if form == "bilinear":  # v defaults to u: m = p
        kw["N"] = rn(p, n, n, scale=0.3 * s)
    if form == "bilinear_v":
        kw["N"] = rn(m, n, n, scale=0.3 * s)
        kw["v"] = rn(batch, L, m)
    if C:
        kw["C"] = rn(q, n)
        if D:
            kw["D"] = rn(q, p)
    if init:
        kw["initial_state"] = rn(batch, n)
    return kw


def k64(kw):
    return {k: to64(v) for k, v in kw.items()}


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", METHODS)
def test_parity(dtype, form, method):
    kw = make(form, L=L_PAR, dtype=dtype, seed=stable_seed(form, str(dtype)))
    y, last = bm.bilinear_scan(**kw, return_final_state=True, method=method)
    y_ref, last_ref = ref.bilinear_scan(**k64(kw), return_final_state=True)
    assert y.dtype == dtype and y.shape == (2, L_PAR, 2)
    assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(y, y_ref, dtype, "y")
    assert_close(last, last_ref, dtype, "last")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("L", [0, 1, 2, 130])
def test_states_and_short(form, L):
    kw = make(form, L=L, C=False, seed=L)
    x, last = bm.bilinear_scan(**kw, return_final_state=True)
    x_ref, last_ref = ref.bilinear_scan(**kw, return_final_state=True)
    assert x.shape == (2, L, 5)
    assert_close(x, x_ref, torch.float64, "states")
    assert_close(last, last_ref, torch.float64, "last")
    if L == 0:
        assert torch.equal(last, kw["initial_state"])
    else:
        assert torch.equal(last, x[:, -1])


@pytest.mark.parametrize("form", ["bilinear_v", "per_step", "lti"])
def test_parallel_equals_sequential_long(restore_runtime, form):
    """Lane groups of W chunks (W = 16/8/4/1 by level and dtype): 37 full chunks give
    several full groups and a partial one at every level, plus a partial last chunk."""
    n = 3 if form == "per_step" else 6
    kw = make(form, batch=2, L=37 * PAR_CHUNK + 11, n=n, seed=stable_seed("long", form))
    for level in bm.simd_levels():
        bm.set_simd_level(level)
        ys, ls = bm.bilinear_scan(**kw, return_final_state=True, method="sequential")
        yp, lp = bm.bilinear_scan(**kw, return_final_state=True, method="parallel")
        torch.testing.assert_close(yp, ys, rtol=1e-12, atol=1e-12, msg=level)
        torch.testing.assert_close(lp, ls, rtol=1e-12, atol=1e-12, msg=level)
        # f32: the lane path accumulates in a different order; compare loosely.
        k32 = {k: v.float() for k, v in kw.items()}
        ys, ls = bm.bilinear_scan(**k32, return_final_state=True, method="sequential")
        yp, lp = bm.bilinear_scan(**k32, return_final_state=True, method="parallel")
        torch.testing.assert_close(yp, ys, rtol=1e-4, atol=1e-4, msg=level)
        torch.testing.assert_close(lp, ls, rtol=1e-4, atol=1e-4, msg=level)


# ------------------------------------------------------------------------------ oracles


@pytest.mark.parametrize("init", [False, True])
def test_lti_equals_dlsim(init):
    """dlsim: x[k+1] = A x[k] + B u[k], y[k] = C x[k] + D u[k] (state *before* u[k]).
    Ours: x_t = A x_{t-1} + B u_t, y_t = C x_t + D u_t (state *after* u_t), so our x_t is
    dlsim's x[t+1] and our y equals dlsim's output of the system (A, B, C A, C B + D)."""
    kw = make("lti", batch=1, L=40, n=4, p=2, q=3, init=init, seed=11)
    A, B, C, D = (kw[k].numpy() for k in "ABCD")
    u = kw["u"][0].numpy()
    x0 = kw["initial_state"][0].numpy() if init else None
    y = bm.bilinear_scan(**kw)
    states = bm.bilinear_scan(**{k: v for k, v in kw.items() if k not in ("C", "D")})
    _, y_d, x_d = scipy.signal.dlsim((A, B, C @ A, C @ B + D, 1), u, x0=x0)
    np.testing.assert_allclose(y[0].numpy(), y_d, rtol=1e-10, atol=1e-10)
    _, _, x_d = scipy.signal.dlsim((A, B, C, D, 1), u, x0=x0)
    np.testing.assert_allclose(states[0, :-1].numpy(), x_d[1:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_second_order_volterra_kernel(method):
    """Scalar input, v = u, impulses a1 at t1 and a2 at t2 > t1 (1-based steps). The
    state is 0 before t1, B a1 at t1, A^{t-t1} B a1 until t2, then
    x_{t2} = (A + a2 N) A^{g1-1} B a1 + B a2 with g1 = t2 - t1, propagated by A. The
    a1·a2 part of y_t, (y(a1,a2) - y(a1,-a2) - y(-a1,a2) + y(-a1,-a2)) / 4, is therefore
    a1 a2 C A^{g2} N A^{g1-1} B for t >= t2 (g2 = t - t2) and 0 before t2. In the dlsim
    convention y_t = C x_{t-1} this is C A^{g2'-1} N A^{g1-1} B with g2' = g2 + 1: our
    output at t reads the state the dlsim convention reads at t + 1."""
    n, L, t1, t2 = 4, 3 * PAR_CHUNK + 7, 5, 12  # 1-based impulse steps
    kw = make("bilinear", batch=1, L=L, n=n, p=1, q=1, D=False, init=False, seed=5)
    A, B, C, N = kw["A"], kw["B"], kw["C"], kw["N"]
    a1, a2 = 0.7, -1.3

    def y(s1, s2):
        u = torch.zeros(1, L, 1, dtype=torch.float64)
        u[0, t1 - 1, 0], u[0, t2 - 1, 0] = s1 * a1, s2 * a2
        return bm.bilinear_scan(u, A, B, C, N=N, method=method)[0, :, 0]

    cross = (y(1, 1) - y(1, -1) - y(-1, 1) + y(-1, -1)) / 4
    g1 = t2 - t1
    want = torch.zeros(L, dtype=torch.float64)
    inner = N[0] @ torch.linalg.matrix_power(A, g1 - 1) @ B[:, 0]
    for t in range(t2, L + 1):
        want[t - 1] = a1 * a2 * (C[0] @ torch.linalg.matrix_power(A, t - t2) @ inner)
    torch.testing.assert_close(cross, want, rtol=1e-9, atol=1e-12)
    assert want[t2 - 1].abs() > 1e-3  # the kernel is not trivially zero


# ------------------------------------------------------------------------------ chunking


GRAD_NAMES = ("u", "A", "B", "C", "D", "N", "v", "initial_state")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", METHODS)
def test_chunked_equals_whole(form, method):
    L, cut = L_PAR + 20, PAR_CHUNK + 41
    kw = make(form, L=L, seed=stable_seed("chunk", form))
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(2, L, 2, generator=gen, dtype=torch.float64)
    gl = torch.randn(2, 5, generator=gen, dtype=torch.float64)

    def leaves():
        return {k: (v.clone().requires_grad_(True) if k in GRAD_NAMES else v)
                for k, v in kw.items()}  # fmt: skip

    whole = leaves()
    y, last = bm.bilinear_scan(**whole, return_final_state=True, method=method)
    ((y * gy).sum() + (last * gl).sum()).backward()

    parts = leaves()
    kw1, kw2 = dict(parts), dict(parts)
    for k in ("u", "v") + (("A",) if form == "per_step" else ()):
        if k in parts:
            kw1[k], kw2[k] = parts[k][:, :cut], parts[k][:, cut:]
    y1, mid = bm.bilinear_scan(**kw1, return_final_state=True, method=method)
    kw2["initial_state"] = mid
    y2, last2 = bm.bilinear_scan(**kw2, return_final_state=True, method=method)
    yc = torch.cat([y1, y2], 1)
    ((yc * gy).sum() + (last2 * gl).sum()).backward()

    torch.testing.assert_close(yc, y, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(last2, last, rtol=1e-11, atol=1e-11)
    for k in GRAD_NAMES:
        if k in whole:
            torch.testing.assert_close(parts[k].grad, whole[k].grad, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck(form, method):
    kw = make(form, batch=2, L=4, n=3, p=2, q=2, m=2, seed=stable_seed("gc", form))
    names = [k for k in GRAD_NAMES if k in kw]
    for k in names:
        kw[k] = kw[k].clone().requires_grad_(True)

    def f(*xs):
        args = dict(kw, **dict(zip(names, xs, strict=True)))
        return bm.bilinear_scan(**args, return_final_state=True, method=method)

    inputs = [kw[k] for k in names]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(lambda *xs: f(*xs)[1], inputs)  # final state only


@pytest.mark.parametrize("form", ["bilinear_v", "per_step"])
def test_gradcheck_states_only(form):
    """C None: the states themselves are the output."""
    kw = make(form, batch=1, L=3, n=2, p=2, C=False, seed=2)
    names = [k for k in GRAD_NAMES if k in kw]

    def f(*xs):
        return bm.bilinear_scan(**dict(kw, **dict(zip(names, xs, strict=True))))

    inputs = [kw[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("form", FORMS)
def test_grad_fp32_vs_reference(form):
    kw = make(form, L=200, dtype=torch.float32, seed=stable_seed("g32", form))
    names = [k for k in GRAD_NAMES if k in kw]
    a = {k: (v.clone().requires_grad_(True) if k in names else v) for k, v in kw.items()}
    b = {k: (to64(v).requires_grad_(True) if k in names else v) for k, v in kw.items()}
    gen = torch.Generator().manual_seed(0)
    gy = torch.randn(2, 200, 2, generator=gen, dtype=torch.float64)
    y, last = bm.bilinear_scan(**a, return_final_state=True)
    ((y * gy.float()).sum() + last.sum()).backward()
    yr, lr = ref.bilinear_scan(**b, return_final_state=True)
    ((yr * gy).sum() + lr.sum()).backward()
    for k in names:
        scale = b[k].grad.abs().max().item() + 1.0
        torch.testing.assert_close(
            a[k].grad.double() / scale, b[k].grad / scale, rtol=6e-4, atol=2e-4, msg=k
        )


# ------------------------------------------------------------------------------ ops


_CAPTURED: dict | None = None


def _captured() -> dict:
    global _CAPTURED
    if _CAPTURED is None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_map

        def snap(x):
            return x.detach().clone() if isinstance(x, torch.Tensor) else x

        calls: dict = {}

        class Capture(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if getattr(func, "namespace", None) == "bmojo":
                    lst = calls.setdefault(func.overloadpacket.__name__, [])
                    if len(lst) < 4:
                        lst.append((func, tree_map(snap, args), tree_map(snap, kwargs)))
                return func(*args, **kwargs)

        with Capture():
            for form in FORMS:
                for init, method in ((True, "sequential"), (False, "parallel")):
                    kw = make(form, L=L_PAR if method == "parallel" else 6, init=init)
                    names = [k for k in GRAD_NAMES if k in kw]
                    kw = {k: (v.requires_grad_(True) if k in names else v) for k, v in kw.items()}
                    y, last = bm.bilinear_scan(**kw, return_final_state=True, method=method)
                    (y.sum() + last.sum()).backward()
        _CAPTURED = calls
    return _CAPTURED


OPS = ("bilinear_scan_fwd", "bilinear_scan_bwd", "bilinear_tv_scan_fwd", "bilinear_tv_scan_bwd")


@pytest.mark.parametrize("op_name", OPS)
def test_opcheck(op_name):
    calls = _captured().get(op_name)
    assert calls, f"torch.ops.bmojo.{op_name} is not reached by bilinear_scan"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)


def test_torch_compile():
    kw = make("bilinear_v", L=12, dtype=torch.float32, seed=9)
    names = [k for k in GRAD_NAMES if k in kw]

    def f(kw):
        y, last = bm.bilinear_scan(**kw, return_final_state=True)
        return y.pow(2).sum() + last.sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = {k: (v.clone().requires_grad_(True) if k in names else v) for k, v in kw.items()}
    ys = {k: (v.clone().requires_grad_(True) if k in names else v) for k, v in kw.items()}
    cf(xs).backward()
    f(ys).backward()
    for k in names:
        torch.testing.assert_close(xs[k].grad, ys[k].grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ runtime


def _run_all(form, method, dtype=torch.float32):
    kw = make(form, batch=5, L=L_PAR, dtype=dtype, seed=stable_seed("rt", form))
    names = [k for k in GRAD_NAMES if k in kw]
    kw = {k: (v.clone().requires_grad_(True) if k in names else v) for k, v in kw.items()}
    y, last = bm.bilinear_scan(**kw, return_final_state=True, method=method)
    (y.pow(2).sum() + last.sum()).backward()
    return [y.detach(), last.detach()] + [kw[k].grad for k in names]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", METHODS)
def test_threads_bitwise(restore_runtime, form, method):
    bm.set_num_threads(1)
    a = _run_all(form, method)
    bm.set_num_threads(2)
    b = _run_all(form, method)
    for x, z in zip(a, b, strict=True):
        assert torch.equal(x, z)


@pytest.mark.parametrize("form", ["bilinear_v", "per_step"])
def test_every_simd_level(restore_runtime, form):
    bm.set_simd_level("scalar")
    base = _run_all(form, "parallel")
    base64 = _run_all(form, "sequential", torch.float64)
    for level in bm.simd_levels():
        bm.set_simd_level(level)
        got = _run_all(form, "parallel")
        for x, z in zip(got, base, strict=True):
            scale = z.abs().max().item() + 1.0
            torch.testing.assert_close(x / scale, z / scale, rtol=1e-5, atol=1e-5)
        got = _run_all(form, "sequential", torch.float64)
        for x, z in zip(got, base64, strict=True):
            torch.testing.assert_close(x, z, rtol=1e-11, atol=1e-11)


# ------------------------------------------------------------------------------ errors


def _bad_cases():
    kw = make("bilinear_v", L=4)
    u, A, B, N, v = kw["u"], kw["A"], kw["B"], kw["N"], kw["v"]
    At = make("per_step", L=4)["A"]
    big = torch.zeros(65, 65, dtype=torch.float64)
    return [
        ("A", dict(u=u, A=big, B=torch.zeros(65, 3, dtype=torch.float64)), ValueError),
        ("A", dict(u=u, A=A[:, :4], B=B), ValueError),
        ("A", dict(u=u, A=A[None], B=B), ValueError),
        ("u", dict(u=u[0], A=A, B=B), ValueError),
        ("B", dict(u=u, A=A, B=B[:, :2]), ValueError),
        ("C", dict(u=u, A=A, B=B, C=torch.zeros(2, 4, dtype=torch.float64)), ValueError),
        ("D", dict(u=u, A=A, B=B, D=torch.zeros(2, 3, dtype=torch.float64)), ValueError),
        (
            "D",
            dict(u=u, A=A, B=B, C=kw["C"], D=torch.zeros(2, 2, dtype=torch.float64)),
            ValueError,
        ),  # fmt: skip
        ("v", dict(u=u, A=A, B=B, v=v), ValueError),
        ("v", dict(u=u, A=A, B=B, N=N), ValueError),  # m = 2 != p = 3 needs v
        ("v", dict(u=u, A=A, B=B, N=N, v=v[:, :3]), ValueError),
        ("N", dict(u=u, A=At, B=B, N=N, v=v), ValueError),
        ("N", dict(u=u, A=A, B=B, N=N[:, :4], v=v), ValueError),
        (
            "initial_state",
            dict(u=u, A=A, B=B, initial_state=torch.zeros(2, 4).double()),
            ValueError,
        ),  # fmt: skip
        ("method", dict(u=u, A=A, B=B, method="fast"), ValueError),
        ("method", dict(u=u, A=A, B=B, method=None), ValueError),
        ("A", dict(u=u, A=A.float(), B=B), TypeError),
        ("u", dict(u=u.int(), A=A, B=B), TypeError),
        ("B", dict(u=u, A=A, B=[[1.0]]), TypeError),
        ("N", dict(u=u, A=A, B=B, N=N.float(), v=v), TypeError),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    name, kwargs, kind = _bad_cases()[case]
    err = bm.BmojoValueError if kind is ValueError else bm.BmojoTypeError
    with pytest.raises(err, match=rf"^{name}\b"):
        bm.bilinear_scan(**kwargs)


def test_auto_rule():
    from bmojo_core.ops.bilinear import use_parallel

    long = 4096
    assert use_parallel(1, long, 4, 1)  # lanes win on one thread at small n
    assert use_parallel(4, long, 4, 1) and use_parallel(4, long, 2, 2)
    assert not use_parallel(4, long, 4, 1, per_step=True)  # 1.4 < 1.5
    assert use_parallel(1, long, 4, 2, per_step=True)  # two threads for one row
    assert not use_parallel(1, 16 * PAR_CHUNK - 1, 2, 16)  # too short
    assert not use_parallel(1, long, 8, 1) and use_parallel(1, long, 8, 2)
    assert not use_parallel(2, long, 8, 2, per_step=True)
    assert not use_parallel(1, 100 * long, 16, 64)  # large n: never
    # One lane group (L <= 512) is one task: extra threads do not help.
    assert not use_parallel(1, 512, 8, 16)
