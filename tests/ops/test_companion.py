"""companion_scan (design §4) against the fp64 loop reference, SciPy's lfilter, the diagonal
scan, a causal convolution, finite differences and itself (chunked, threads, levels)."""

from __future__ import annotations

import re

import bmojo_core as bm
import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from bmojo_core import _core, reference
from bmojo_core.errors import BmojoTypeError, BmojoValueError
from conftest import FLOAT_DTYPES, assert_close, stable_seed
from hypothesis import given
from hypothesis import strategies as st

NAMES = ("u", "alpha", "beta", "c", "D", "initial_state")


def make(
    B=2,
    Dm=3,
    L=20,
    n=3,
    *,
    alpha="var",
    beta=None,
    c=None,
    D=False,
    init=False,
    dtype=torch.float64,
    seed=0,
):
    """Inputs of companion_scan; ``alpha``/``beta``/``c`` are "var", "const" or None.
    Σ|α_i| <= 0.9, so the filter is stable and magnitudes stay O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def ru(*shape, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    amp = 0.9 / n
    kw = dict(
        u=rn(B, Dm, L),
        alpha=ru(B, Dm, L, n, lo=-amp, hi=amp) if alpha == "var" else ru(Dm, n, lo=-amp, hi=amp),
        beta={
            "var": lambda: ru(B, Dm, L, lo=0.5, hi=1.5),
            "const": lambda: ru(Dm, lo=0.5, hi=1.5),
            None: lambda: None,
        }[beta](),  # fmt: skip
        c={"var": lambda: rn(B, Dm, L, n), "const": lambda: rn(Dm, n), None: lambda: None}[c](),
        D=rn(Dm) if D else None,
        initial_state=rn(B, Dm, n) if init else None,
    )
    return {k: (v.to(dtype) if v is not None else None) for k, v in kw.items()}


def to64(kw):
    return {k: (v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}  # fmt: skip


CONFIGS = [
    dict(alpha="var"),
    dict(alpha="const"),
    dict(alpha="var", beta="var", c="var", D=True, init=True),
    dict(alpha="const", beta="const", c="const", D=True, init=True),
    dict(alpha="var", beta="const", c="const", init=True),
    dict(alpha="const", beta="var", c="var", D=True),
]


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 64])
@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_parity(dtype, n, ci):
    L = {3: 300, 64: 70}.get(n, 9)  # crosses the kernel's time chunks (256 / 32 steps)
    kw = make(2, 3, L, n, **CONFIGS[ci], dtype=dtype, seed=stable_seed(n, ci))
    y, last = bm.companion_scan(**kw, return_final_state=True)
    y_ref, last_ref = reference.companion_scan(**to64(kw), return_final_state=True)
    assert y.dtype == dtype and y.shape == kw["u"].shape
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert last.dtype == cdt and last.shape == (2, 3, n)
    assert_close(y, y_ref, dtype, "y")
    assert_close(last, last_ref, dtype, "final_state")
    assert torch.equal(bm.companion_scan(**kw), y)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("L", [0, 1])
def test_short(ci, L):
    kw = make(2, 3, L, 4, **CONFIGS[ci], seed=ci)
    y, last = bm.companion_scan(**kw, return_final_state=True)
    y_ref, last_ref = reference.companion_scan(**kw, return_final_state=True)
    assert y.shape == (2, 3, L)
    assert_close(y, y_ref, torch.float64, "y")
    assert_close(last, last_ref, torch.float64, "final_state")
    if L == 0:
        want = kw["initial_state"] if kw["initial_state"] is not None else torch.zeros(2, 3, 4)
        assert torch.equal(last, want.to(last.dtype))


def test_known_values():
    # s_t = 0.5 s_{t-1} + 0.25 s_{t-2} + u_t from s_0 = 4, s_{-1} = 8
    u = torch.tensor([[[1.0, 0.0, 2.0]]], dtype=torch.float64)
    alpha = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    h0 = torch.tensor([[[4.0, 8.0]]], dtype=torch.float64)
    y, last = bm.companion_scan(u, alpha, initial_state=h0, return_final_state=True)
    assert y.tolist() == [[[5.0, 3.5, 5.0]]] and last.tolist() == [[[5.0, 3.5]]]


# ------------------------------------------------------------------------------ oracles


@pytest.mark.parametrize("n", [1, 2, 4, 7])
@pytest.mark.parametrize("with_c", [False, True])
def test_lfilter(n, with_c):
    kw = make(2, 4, 300, n, alpha="const", beta="const", c="const" if with_c else None,
              D=with_c, seed=stable_seed("lf", n, with_c))  # fmt: skip
    y = bm.companion_scan(**kw)
    u, a, b = kw["u"].numpy(), kw["alpha"].numpy(), kw["beta"].numpy()
    want = np.empty_like(u)
    for d in range(4):
        den = np.concatenate([[1.0], -a[d]])
        num = b[d] * kw["c"][d].numpy() if with_c else [b[d]]
        want[:, d] = scipy.signal.lfilter(num, den, u[:, d], axis=-1)
        if with_c:
            want[:, d] += kw["D"][d].item() * u[:, d]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_order_one_is_diag_scan(dtype):
    kw = make(3, 5, 90, 1, alpha="var", beta="var", init=True, dtype=dtype, seed=3)
    y, last = bm.companion_scan(**kw, return_final_state=True)
    h, hl = bm.diag_scan(kw["alpha"][..., 0], kw["beta"] * kw["u"], kw["initial_state"][..., 0],
                         return_last_state=True)  # fmt: skip
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, h, **tol)
    torch.testing.assert_close(last[..., 0], hl, **tol)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_zero_alpha_is_causal_conv(n, dtype):
    kw = make(2, 6, 50, n, alpha="const", c="const", D=True, dtype=dtype, seed=n)
    kw["alpha"] = torch.zeros_like(kw["alpha"])
    y = bm.companion_scan(**kw)
    u, c = kw["u"], kw["c"]
    want = F.conv1d(F.pad(u, (n - 1, 0)), c.flip(-1)[:, None, :], groups=6) + kw["D"][:, None] * u
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, want, **tol)
    # Per-step zero α with per-step c: the same FIR.
    kw2 = dict(
        kw, alpha=torch.zeros(2, 6, 50, n, dtype=dtype), c=c[:, None, :].expand(2, 6, 50, n).clone()
    )
    torch.testing.assert_close(bm.companion_scan(**kw2), want, **tol)


# ------------------------------------------------------------------------------ chunking


def _loss(y, last, wy, wl):
    return (y * wy).sum() + (last * wl).sum()


@given(
    cuts=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    ci=st.integers(0, len(CONFIGS) - 1),
    n=st.sampled_from([1, 2, 5]),
)
def test_chunked_equals_whole(cuts, ci, n):
    L = 40
    kw = make(2, 3, L, n, **{**CONFIGS[ci], "init": True}, seed=ci + 10 * n)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(2, 3, L, generator=gen, dtype=torch.float64)
    wl = torch.randn(2, 3, n, generator=gen, dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items() if v is not None}
    y, last = bm.companion_scan(**leaves, return_final_state=True)
    _loss(y, last, wy, wl).backward()
    whole = {k: v.grad for k, v in leaves.items()}

    leaves2 = {k: v.clone().requires_grad_(True) for k, v in kw.items() if v is not None}
    bounds = [0, *sorted(cuts), L]
    state, ys = leaves2["initial_state"], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        part = {k: (v[:, :, a:b] if v.dim() >= 3 and k != "initial_state" else v)
                for k, v in leaves2.items()}  # fmt: skip
        part["initial_state"] = state
        yp, state = bm.companion_scan(**part, return_final_state=True)
        ys.append(yp)
    y2 = torch.cat(ys, dim=-1)
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-12, atol=1e-12)
    _loss(y2, state, wy, wl).backward()
    for k, v in leaves2.items():
        torch.testing.assert_close(v.grad, whole[k], rtol=1e-10, atol=1e-10, msg=k)


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("target", ["both", "final_state"])
def test_gradcheck(ci, n, target):
    cfg = {**CONFIGS[ci], "init": True}
    kw = make(2, 2, 6, n, **cfg, seed=stable_seed("gc", ci, n))
    names = [k for k in NAMES if kw[k] is not None]
    leaves = [kw[k].clone().requires_grad_(True) for k in names]

    def f(*xs):
        y, last = bm.companion_scan(**dict(zip(names, xs, strict=True)), return_final_state=True)
        return last if target == "final_state" else (y, last)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_gradients_match_reference(ci):
    kw = make(2, 3, 45, 4, **{**CONFIGS[ci], "init": True}, seed=ci)
    gen = torch.Generator().manual_seed(ci)
    wy, wl = torch.randn(2, 3, 45, generator=gen), torch.randn(2, 3, 4, generator=gen)
    grads = []
    for fn in (bm.companion_scan, reference.companion_scan):
        leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items() if v is not None}
        y, last = fn(**leaves, return_final_state=True)
        _loss(y, last, wy.double(), wl.double()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-10, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_gradients(dtype):
    kw = make(2, 3, 60, 3, **CONFIGS[2], dtype=dtype, seed=5)
    leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items() if v is not None}
    y, last = bm.companion_scan(**leaves, return_final_state=True)
    (y.float().sum() + last.sum()).backward()
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    yr, lr = reference.companion_scan(**ref_leaves, return_final_state=True)
    (yr.sum() + lr.sum()).backward()
    for k, v in leaves.items():
        assert v.grad.dtype == dtype
        # Sums over time: compare relative to the gradient's scale.
        scale = ref_leaves[k].grad.abs().max().item() + 1.0
        err = (v.grad.double() - ref_leaves[k].grad).abs().max().item()
        assert err <= scale * (1e-4 if dtype == torch.float32 else 5e-2), k


# ------------------------------------------------------------------------------ ops


def _op_args(ci):
    kw = make(2, 3, 11, 3, **{**CONFIGS[ci], "init": True}, dtype=torch.float32, seed=ci)
    return [kw[k] for k in NAMES]


@pytest.mark.parametrize("ci", [0, 2, 3])
def test_opcheck(ci):
    args = _op_args(ci)
    torch.library.opcheck(torch.ops.bmojo.companion_scan_fwd.default, args)
    leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
    torch.library.opcheck(torch.ops.bmojo.companion_scan_fwd.default, leaves)
    y, _, s = torch.ops.bmojo.companion_scan_fwd(*args)
    if args[3] is None and args[4] is None:  # s is not written: it equals y
        assert s.numel() == 0
        s = y
    dy, dl = torch.randn_like(args[0]), torch.randn(2, 3, 3)
    torch.library.opcheck(torch.ops.bmojo.companion_scan_bwd.default, [*args, s, dy, dl])
    torch.library.opcheck(torch.ops.bmojo.companion_scan_bwd.default, [*args, s, dy, None])


def test_torch_compile():
    kw = make(2, 3, 30, 3, **CONFIGS[3], dtype=torch.float32, seed=9)
    names = [k for k in NAMES if kw[k] is not None]

    def f(*xs):
        y, last = bm.companion_scan(**dict(zip(names, xs, strict=True)), return_final_state=True)
        return y.sum() + last.pow(2).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [kw[k].clone().requires_grad_(True) for k in names]
    ys = [kw[k].clone().requires_grad_(True) for k in names]
    cf(*xs).backward()
    f(*ys).backward()
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)


def _run_all(kw):
    """Outputs and every gradient, for bitwise comparisons."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items() if v is not None}
    y, last = bm.companion_scan(**leaves, return_final_state=True)
    gen = torch.Generator().manual_seed(0)
    (y * torch.randn(y.shape, generator=gen)).sum().add(last.sum()).backward()
    return [y, last] + [leaves[k].grad for k in NAMES if k in leaves]


@pytest.mark.parametrize("ci", [2, 3])
def test_threads_bitwise(restore_runtime, ci):
    kw = make(2, 100, 500, 4, **CONFIGS[ci], dtype=torch.float32, seed=ci)
    bm.set_num_threads(1)
    one = _run_all(kw)
    bm.set_num_threads(2)
    two = _run_all(kw)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("ci", [2, 3, 4])
def test_simd_levels_match_scalar(restore_runtime, dtype, ci):
    kw = make(3, 11, 80, 5, **CONFIGS[ci], dtype=dtype, seed=ci)
    bm.set_simd_level("scalar")
    want = _run_all(kw)
    for level in bm.simd_levels():
        bm.set_simd_level(level)
        got = _run_all(kw)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{level} output {i}")


def test_noncontiguous_inputs():
    kw = make(2, 3, 16, 3, **CONFIGS[2], seed=4)
    want = bm.companion_scan(**kw, return_final_state=True)

    def nc(t):
        out = torch.empty(*t.shape, 2, dtype=t.dtype)[..., 0]
        out.copy_(t)
        assert not out.is_contiguous() or t.numel() <= 1
        return out

    got = bm.companion_scan(**{k: nc(v) for k, v in kw.items()}, return_final_state=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------ errors


def _bad_cases():
    B, Dm, L, n = 2, 3, 5, 2
    base = make(B, Dm, L, n, **CONFIGS[2], dtype=torch.float32)
    f64 = torch.float64
    yield "u rank", dict(u=base["u"][0]), BmojoValueError, "u"
    yield "u dtype", dict(u=base["u"].to(torch.int32)), BmojoTypeError, "u"
    yield "u list", dict(u=base["u"].tolist()), BmojoTypeError, "u"
    yield "alpha shape", dict(alpha=base["alpha"][:, :, :4]), BmojoValueError, "alpha"
    yield "alpha batch", dict(alpha=base["alpha"][:1]), BmojoValueError, "alpha"
    yield "alpha rank", dict(alpha=base["alpha"][0]), BmojoValueError, "alpha"
    yield "alpha n=0", dict(alpha=torch.zeros(B, Dm, L, 0), c=None, initial_state=None), \
        BmojoValueError, "alpha"  # fmt: skip
    yield "alpha n=65", dict(alpha=torch.zeros(Dm, 65), c=None, initial_state=None), \
        BmojoValueError, "alpha"  # fmt: skip
    yield "alpha const dim", dict(alpha=torch.zeros(Dm + 1, n)), BmojoValueError, "alpha"
    yield "beta shape", dict(beta=base["beta"][:, :, 1:]), BmojoValueError, "beta"
    yield "beta batch", dict(beta=base["beta"][:1]), BmojoValueError, "beta"
    yield "beta const", dict(beta=torch.ones(Dm + 1)), BmojoValueError, "beta"
    yield "c order", dict(c=torch.zeros(Dm, n + 1)), BmojoValueError, "c"
    yield "c batch", dict(c=base["c"][:1]), BmojoValueError, "c"
    yield "D shape", dict(D=torch.zeros(Dm, 1)), BmojoValueError, "D"
    yield "init shape", dict(initial_state=torch.zeros(B, Dm, n + 1)), BmojoValueError, \
        "initial_state"  # fmt: skip
    yield "init batch", dict(initial_state=torch.zeros(B + 1, Dm, n)), BmojoValueError, \
        "initial_state"  # fmt: skip
    yield "mixed fp64 alpha", dict(alpha=base["alpha"].to(f64)), BmojoTypeError, "alpha"
    yield "mixed fp64 u", dict(u=base["u"].to(f64)), BmojoTypeError, "alpha"
    yield "device", dict(D=torch.zeros(Dm, device="meta")), BmojoValueError, "D"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, over, exc, name = case
    kw = {**make(2, 3, 5, 2, **CONFIGS[2], dtype=torch.float32), **over}
    with pytest.raises(exc, match=rf"^{re.escape(name)}\b"):
        bm.companion_scan(**kw)


def test_core_rejects_bad_arrays():
    """The extension itself raises the package's classes (no Python wrapper involved)."""
    kw = make(1, 2, 4, 2, dtype=torch.float32)
    u, a = kw["u"].numpy(), kw["alpha"].numpy()
    y, s, last = np.empty_like(u), np.empty_like(u), np.empty((1, 2, 2), np.float32)
    with pytest.raises(BmojoTypeError, match="alpha"):
        _core.companion.scan_fwd(u, a[..., ::-1], None, None, None, None, y, s, last)
    with pytest.raises(BmojoTypeError, match="alpha"):
        _core.companion.scan_fwd(u, a.astype(np.float64), None, None, None, None, y, s, last)
    with pytest.raises(BmojoValueError, match="last_state"):
        _core.companion.scan_fwd(u, a, None, None, None, None, y, s, last[:, :, :1].copy())
    with pytest.raises(BmojoValueError, match="alpha"):
        _core.companion.scan_fwd(u, a[:, :, :3].copy(), None, None, None, None, y, s, last)
