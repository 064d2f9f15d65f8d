"""causal_conv1d_fn / causal_conv1d_update (design §3) against torch's conv1d, the pure-torch
references and each other (streaming == whole, chunked == whole)."""

from __future__ import annotations

import bmojo_core as bm
import pytest
import torch
import torch.nn.functional as F
from bmojo_core import reference as ref
from bmojo_core.errors import BmojoTypeError, BmojoValueError
from conftest import FLOAT_DTYPES, TOL, assert_close, make_seq_idx, stable_seed
from hypothesis import given
from hypothesis import strategies as st

WIDTHS = (1, 2, 3, 4, 5, 8, 17)


def rnd(*shape, gen, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def conv_oracle(x, w, bias=None, init=None, silu=False):
    """torch.nn.functional.conv1d on the left-padded input, in float64."""
    x, w = x.detach().double(), w.detach().double()
    k = w.shape[1]
    if x.shape[-1] == 0:
        return x.clone()
    if init is None:
        xp = F.pad(x, (k - 1, 0))
    else:
        xp = torch.cat([init.detach().double(), x], dim=-1)
    b = None if bias is None else bias.detach().double()
    y = F.conv1d(xp, w[:, None, :], b, groups=x.shape[1])
    return F.silu(y) if silu else y


def inputs(b, d, length, k, dtype=torch.float64, seed=0, bias=True, init=False):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=rnd(b, d, length, gen=gen, dtype=dtype),
        weight=rnd(d, k, gen=gen, dtype=dtype) / k**0.5,
        bias=rnd(d, gen=gen, dtype=dtype) if bias else None,
        initial_states=rnd(b, d, k - 1, gen=gen, dtype=dtype) if init else None,
    )


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("k", WIDTHS)
@pytest.mark.parametrize("length", [0, 1, 41])
@pytest.mark.parametrize("silu", [False, True])
def test_fn_equals_conv1d(dtype, k, length, silu):
    kw = inputs(2, 5, length, k, dtype, seed=stable_seed(k, length), bias=silu)
    act = "silu" if silu else None
    out = bm.causal_conv1d_fn(**kw, activation=act)
    assert out.dtype == dtype and out.shape == kw["x"].shape
    want = conv_oracle(kw["x"], kw["weight"], kw["bias"], silu=silu)
    assert_close(out, want, dtype, f"k{k} L{length}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 4, 5, 17])
@pytest.mark.parametrize("length", [0, 1, 2, 30])
def test_initial_and_final_states(dtype, k, length):
    kw = inputs(2, 3, length, k, dtype, seed=stable_seed("init", k, length), init=True)
    out, fin = bm.causal_conv1d_fn(**kw, return_final_states=True, activation="swish")
    want = conv_oracle(kw["x"], kw["weight"], kw["bias"], kw["initial_states"], silu=True)
    assert_close(out, want, dtype, "out")
    ext = torch.cat([kw["initial_states"], kw["x"]], dim=-1)
    assert fin.dtype == dtype
    assert torch.equal(fin, ext[..., ext.shape[-1] - (k - 1) :])
    # final_states_out receives the same values and is returned
    buf = torch.empty(2, 3, k - 1, dtype=dtype)
    _, fin2 = bm.causal_conv1d_fn(**kw, return_final_states=True, final_states_out=buf)
    assert fin2 is buf and torch.equal(buf, fin)
    # without initial states the start is zero-padded
    kw0 = dict(kw, initial_states=None)
    _, fin0 = bm.causal_conv1d_fn(**kw0, return_final_states=True)
    ext0 = F.pad(kw["x"], (k - 1, 0))
    assert torch.equal(fin0, ext0[..., ext0.shape[-1] - (k - 1) :])


def per_sequence(x, w, bias, seq_idx, silu):
    """Each packed sequence convolved on its own (zero-padded), float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for i in range(x.shape[0]):
        ids = seq_idx[i]
        start = 0
        for t in range(1, x.shape[2] + 1):
            if t == x.shape[2] or ids[t] != ids[t - 1]:
                out[i : i + 1, :, start:t] = conv_oracle(
                    x[i : i + 1, :, start:t], w, bias, silu=silu
                )
                start = t
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_seq_idx_vs_per_sequence(dtype, k, idx_dtype):
    gen = torch.Generator().manual_seed(stable_seed("seq", k))
    kw = inputs(3, 4, 60, k, dtype, seed=k)
    seq = make_seq_idx(3, 60, 6, gen).to(idx_dtype)
    out, fin = bm.causal_conv1d_fn(**kw, seq_idx=seq, activation="silu", return_final_states=True)
    want = per_sequence(kw["x"], kw["weight"], kw["bias"], seq, True)
    assert_close(out, want, dtype, "seq_idx")
    assert torch.equal(fin, kw["x"][..., 60 - (k - 1) :])  # the raw last inputs
    r, _ = ref.causal_conv1d(**{**kw, "x": kw["x"].double()}, seq_idx=seq, activation="silu")
    assert_close(r, want, torch.float64, "reference")


# ------------------------------------------------------------------------------ update


def update_case(k, extra, ntok, circular, pad, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    b, d = 3, 6
    s = k - 1 + extra
    slots = 5 if pad else b
    x = rnd(b, d, *(() if ntok is None else (ntok,)), gen=gen, dtype=dtype)
    state = rnd(slots, d, s, gen=gen, dtype=dtype)
    kw = dict(
        weight=rnd(d, k, gen=gen, dtype=dtype),
        bias=rnd(d, gen=gen, dtype=dtype),
        cache_seqlens=torch.tensor([7, 0, 3], dtype=torch.int32) if circular else None,
        conv_state_indices=torch.tensor([4, -1, 1]) if pad else None,
    )
    return x, state, kw


UPDATE_CASES = [
    (dtype, k, extra, ntok, mode)
    for dtype in (torch.float64, torch.float32)
    for k in (1, 2, 4, 5)
    for extra in (0, 3)
    for ntok in (None, 1, 5)
    for mode in ("shift", "circular", "shift-pad", "circular-pad")
] + [
    (dtype, 4, extra, ntok, mode)  # half precision: the converting path
    for dtype in (torch.float16, torch.bfloat16)
    for extra, ntok in ((0, None), (2, 3))
    for mode in ("shift", "circular-pad")
]


@pytest.mark.parametrize("dtype,k,extra,ntok,mode", UPDATE_CASES)
def test_update_vs_reference(dtype, k, extra, ntok, mode):
    circ, pad = mode.startswith("circular"), mode.endswith("pad")
    x, state, kw = update_case(k, extra, ntok, circ, pad, dtype, stable_seed(k, extra, ntok, mode))
    act = "silu" if extra else None
    st_ref = state.double().clone()
    want = ref.causal_conv1d_update(
        x.double(), st_ref, kw["weight"].double(), kw["bias"].double(), act,
        kw["cache_seqlens"], kw["conv_state_indices"],
    )  # fmt: skip
    out = bm.causal_conv1d_update(x, state, **kw, activation=act)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, want, dtype, "out")
    assert_close(state, st_ref, dtype, "state")
    if pad:
        assert torch.all(out[1] == 0)


def test_update_reference_is_the_peer_shift_definition():
    """The reference update (shift mode) equals conv1d over cat(state, x) — the peer's
    definition — and leaves the last S inputs in the state."""
    x, state, kw = update_case(4, 2, 5, False, False, torch.float64, 3)
    full = torch.cat([state, x], dim=-1)
    want = F.conv1d(full, kw["weight"][:, None], kw["bias"], groups=6)[..., -5:]
    st = state.clone()
    got = ref.causal_conv1d_update(x, st, kw["weight"], kw["bias"])
    torch.testing.assert_close(got, want)
    assert torch.equal(st, full[..., -5:])


@pytest.mark.parametrize("k", [1, 3, 4, 6])
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streaming_equals_whole(k, chunk, dtype):
    kw = inputs(2, 5, 20, k, dtype, seed=stable_seed("stream", k), init=True)
    whole, fin = bm.causal_conv1d_fn(**kw, activation="silu", return_final_states=True)
    for extra in (0, 2):
        state = torch.cat([torch.zeros(2, 5, extra, dtype=dtype), kw["initial_states"]], -1)
        state = state.contiguous()
        outs = []
        for t0 in range(0, 20, chunk):
            xt = kw["x"][:, :, t0 : t0 + chunk].contiguous()
            if chunk == 1:
                xt = xt[..., 0]
            o = bm.causal_conv1d_update(xt, state, kw["weight"], kw["bias"], "silu")
            outs.append(o if chunk > 1 else o[..., None])
        assert_close(torch.cat(outs, -1), whole.double(), dtype, "stream")
        assert torch.equal(state[..., extra:], fin)


# ------------------------------------------------------------------------------ properties


@given(
    k=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 24), max_size=3),
    silu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_whole(k, cuts, silu, seed):
    kw = inputs(2, 3, 24, k, torch.float64, seed=seed, init=True)
    act = "silu" if silu else None
    gen = torch.Generator().manual_seed(seed + 1)
    g_out, g_fin = rnd(2, 3, 24, gen=gen), rnd(2, 3, k - 1, gen=gen)

    def leaves():
        return {n: v.clone().requires_grad_(True) for n, v in kw.items()}

    a = leaves()
    out, fin = bm.causal_conv1d_fn(**a, activation=act, return_final_states=True)
    ((out * g_out).sum() + (fin * g_fin).sum()).backward()

    c = leaves()
    bounds = sorted({0, 24, *cuts})
    state, outs = c["initial_states"], []
    for t0, t1 in zip(bounds[:-1], bounds[1:], strict=True):
        o, state = bm.causal_conv1d_fn(
            c["x"][:, :, t0:t1], c["weight"], c["bias"], initial_states=state,
            activation=act, return_final_states=True,
        )  # fmt: skip
        outs.append(o)
    out_c = torch.cat(outs, -1)
    ((out_c * g_out).sum() + (state * g_fin).sum()).backward()
    tol = TOL[torch.float64]
    torch.testing.assert_close(out_c, out, **tol)
    torch.testing.assert_close(state, fin, rtol=0, atol=0)  # both: the raw last inputs
    for n in kw:
        torch.testing.assert_close(c[n].grad, a[n].grad, **tol, msg=n)


@given(
    k=st.integers(1, 8),
    pos=st.integers(0, 29),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_nilpotent_window(k, pos, seed, dtype):
    """An input older than K-1 steps has no effect: the state is the last K inputs."""
    kw = inputs(1, 4, 30, k, dtype, seed=seed)
    out = bm.causal_conv1d_fn(**kw, activation="silu")
    x2 = kw["x"].clone()
    x2[:, :, pos] += 10.0
    out2 = bm.causal_conv1d_fn(**{**kw, "x": x2}, activation="silu")
    assert torch.equal(out[..., pos + k :], out2[..., pos + k :])
    assert torch.equal(out[..., :pos], out2[..., :pos])
    if pos + k - 1 < 30:
        # ... while the oldest input of the window still counts
        assert not torch.equal(out[..., pos + k - 1], out2[..., pos + k - 1])


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("k", [1, 2, 4, 5])
@pytest.mark.parametrize("length", [1, 3, 11])
@pytest.mark.parametrize("opt", ["plain", "silu-init", "seq"])
def test_gradcheck(k, length, opt):
    kw = inputs(2, 3, length, k, seed=stable_seed("gc", k, length, opt), init=opt == "silu-init")
    seq = None
    if opt == "seq":
        seq = make_seq_idx(2, length, 3, torch.Generator().manual_seed(1))
    act = "silu" if opt == "silu-init" else None
    names = [n for n, v in kw.items() if v is not None]

    def f(*args):
        a = dict(zip(names, args, strict=True))
        return bm.causal_conv1d_fn(**a, seq_idx=seq, activation=act, return_final_states=True)

    args = [kw[n].clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, args)
    if k > 1:
        # through the final states alone
        assert torch.autograd.gradcheck(lambda *a: f(*a)[1], args)


@pytest.mark.parametrize("k", [4, 12])
def test_grads_vs_reference_autograd(k):
    """Analytic gradients against autograd through the pure-torch reference (K > 8 takes
    the run-time-width kernel path)."""
    kw = inputs(2, 4, 33, k, seed=5, init=True)
    gen = torch.Generator().manual_seed(9)
    go, gf = rnd(2, 4, 33, gen=gen), rnd(2, 4, k - 1, gen=gen)
    a = {n: v.clone().requires_grad_(True) for n, v in kw.items()}
    r = {n: v.clone().requires_grad_(True) for n, v in kw.items()}
    out, fin = bm.causal_conv1d_fn(**a, activation="silu", return_final_states=True)
    ((out * go).sum() + (fin * gf).sum()).backward()
    out_r, fin_r = ref.causal_conv1d(**r, activation="silu")
    ((out_r * go).sum() + (fin_r * gf).sum()).backward()
    for n in kw:
        torch.testing.assert_close(a[n].grad, r[n].grad, **TOL[torch.float64], msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_grads(dtype):
    kw = inputs(2, 4, 40, 4, dtype, seed=2, init=True)
    a = {n: v.clone().requires_grad_(True) for n, v in kw.items()}
    r = {n: v.double().requires_grad_(True) for n, v in kw.items()}
    bm.causal_conv1d_fn(**a, activation="silu").sum().backward()
    ref.causal_conv1d(**r, activation="silu")[0].sum().backward()
    for n in kw:
        assert a[n].grad.dtype == dtype
        assert_close(a[n].grad, r[n].grad, dtype, n)


# ------------------------------------------------------------------------------ ops


def test_opcheck():
    kw = inputs(2, 3, 9, 4, torch.float32, seed=1, init=True)
    x, w, b, h0 = kw["x"], kw["weight"], kw["bias"], kw["initial_states"]
    seq = torch.tensor([[0] * 4 + [1] * 5, [0] * 9], dtype=torch.int64)
    torch.library.opcheck(torch.ops.bmojo.causal_conv1d_fwd, (x, w, b, None, h0, True))
    torch.library.opcheck(torch.ops.bmojo.causal_conv1d_fwd, (x, w, None, seq, None, False))
    dout, dfin = torch.randn(2, 3, 9), torch.randn(2, 3, 3)
    torch.library.opcheck(torch.ops.bmojo.causal_conv1d_bwd, (x, w, b, None, h0, dout, dfin, True))
    torch.library.opcheck(
        torch.ops.bmojo.causal_conv1d_bwd, (x, w, None, seq, None, dout, None, False)
    )
    state = torch.randn(4, 3, 5)
    xs = torch.randn(2, 3, 2)
    torch.library.opcheck(
        torch.ops.bmojo.causal_conv1d_update,
        (xs, state, w, b, True, torch.tensor([3, 8]), torch.tensor([2, -1])),
    )
    torch.library.opcheck(
        torch.ops.bmojo.causal_conv1d_update, (xs, state[:2].clone(), w, None, False, None, None)
    )


def test_torch_compile_forward_backward():
    kw = inputs(2, 3, 17, 4, torch.float32, seed=4, init=True)

    def f(x, weight, bias, initial_states):
        out, fin = bm.causal_conv1d_fn(
            x, weight, bias, initial_states=initial_states, return_final_states=True,
            activation="silu",
        )  # fmt: skip
        return out.square().sum() + fin.sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [v.clone().requires_grad_(True) for v in kw.values()]
    c = [v.clone().requires_grad_(True) for v in kw.values()]
    f(*a).backward()
    cf(*c).backward()
    for p, q in zip(a, c, strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_torch_compile_update():
    x, state, kw = update_case(4, 1, 2, True, True, torch.float32, 8)
    st_eager, st_comp = state.clone(), state.clone()
    want = bm.causal_conv1d_update(x, st_eager, **kw, activation="silu")
    cf = torch.compile(bm.causal_conv1d_update, fullgraph=True, backend="aot_eager")
    got = cf(x, st_comp, **kw, activation="silu")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(st_comp, st_eager)


# ------------------------------------------------------------------------------ runtime


def _everything():
    kw = inputs(3, 70, 300, 4, torch.float32, seed=11, init=True)
    a = {n: v.clone().requires_grad_(True) for n, v in kw.items()}
    out, fin = bm.causal_conv1d_fn(**a, activation="silu", return_final_states=True)
    (out.square().sum() + fin.sum()).backward()
    x, state, ukw = update_case(4, 2, 3, True, True, torch.float32, 1)
    uo = bm.causal_conv1d_update(x, state, **ukw, activation="silu")
    return [out, fin, *(a[n].grad for n in kw), uo, state]


def test_threads_bitwise(restore_runtime):
    bm.set_num_threads(1)
    one = _everything()
    bm.set_num_threads(2)
    two = _everything()
    for p, q in zip(one, two, strict=True):
        assert torch.equal(p, q)


def test_every_simd_level_vs_scalar(restore_runtime):
    bm.set_simd_level("scalar")
    want = _everything()
    for level in bm.simd_levels():
        bm.set_simd_level(level)
        got = _everything()
        for p, q in zip(got, want, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-4, msg=level)


# ------------------------------------------------------------------------------ errors


def test_fn_bad_input():
    kw = inputs(2, 3, 5, 4, torch.float32, init=True)
    x, w, b, h0 = kw["x"], kw["weight"], kw["bias"], kw["initial_states"]
    cases = [
        (BmojoValueError, "x", dict(x=x[0])),
        (BmojoTypeError, "x", dict(x=x.int())),
        (BmojoTypeError, "x", dict(x=[1.0])),
        (BmojoValueError, "weight", dict(weight=w[:2])),
        (BmojoValueError, "weight", dict(weight=w[:, :0], initial_states=None)),
        (BmojoValueError, "bias", dict(bias=b[:2])),
        (BmojoValueError, "initial_states", dict(initial_states=h0[..., :2])),
        (BmojoTypeError, "initial_states", dict(initial_states=h0.double())),
        (BmojoValueError, "seq_idx", dict(seq_idx=torch.zeros(2, 5, dtype=torch.int32))),
        (BmojoTypeError, "seq_idx", dict(seq_idx=torch.zeros(2, 5), initial_states=None)),
        (
            BmojoValueError,
            "seq_idx",
            dict(seq_idx=torch.zeros(2, 4, dtype=torch.int64), initial_states=None),
        ),  # fmt: skip
        (BmojoValueError, "activation", dict(activation="relu")),
        (BmojoValueError, "activation", dict(activation=True)),
        (BmojoValueError, "final_states_out", dict(final_states_out=torch.empty(2, 3, 3))),
        (
            BmojoValueError,
            "final_states_out",
            dict(return_final_states=True, final_states_out=torch.empty(2, 3, 2)),
        ),  # fmt: skip
    ]
    for exc, name, over in cases:
        args = {**kw, **over}
        with pytest.raises(exc, match=name):
            bm.causal_conv1d_fn(**args)


def test_update_bad_input_leaves_state_unchanged():
    x, state, kw = update_case(4, 0, None, False, True, torch.float32, 2)
    before = state.clone()
    w = kw["weight"]
    idx = kw["conv_state_indices"]
    cases = [
        (BmojoValueError, "conv_state_indices", dict(conv_state_indices=torch.tensor([4, 1, 1]))),
        (BmojoValueError, "conv_state_indices", dict(conv_state_indices=torch.tensor([4, 5, 1]))),
        (BmojoValueError, "conv_state_indices", dict(conv_state_indices=idx[:2])),
        (BmojoTypeError, "conv_state_indices", dict(conv_state_indices=idx.float())),
        (BmojoValueError, "cache_seqlens", dict(cache_seqlens=torch.tensor([1, 2]))),
        (BmojoValueError, "weight", dict(weight=w[:, :0])),
        (BmojoValueError, "weight", dict(weight=w[:5])),
        (BmojoValueError, "conv_state", dict(weight=torch.randn(6, 6))),  # S < K-1
        (BmojoValueError, "bias", dict(bias=kw["bias"][:2])),
        (BmojoValueError, "activation", dict(activation="gelu")),
        (BmojoTypeError, "weight", dict(weight=w.double())),
        (BmojoValueError, "x", dict(x=x[0])),
    ]
    for exc, name, over in cases:
        args = {"x": x, "conv_state": state, **kw, **over}
        with pytest.raises(exc, match=name):
            bm.causal_conv1d_update(**args)
        assert torch.equal(state, before), name
    with pytest.raises(BmojoValueError, match="conv_state"):
        bm.causal_conv1d_update(x, state[:2], **{**kw, "conv_state_indices": None})
    with pytest.raises(BmojoValueError, match="conv_state"):
        nc = torch.randn(5, 3, 6).transpose(1, 2)  # (5, 6, 3) non-contiguous
        bm.causal_conv1d_update(x, nc, **kw)
    assert torch.equal(state, before)


def test_update_extreme_cache_seqlens():
    """Any int64 position works (taken modulo S, non-negative, like torch.remainder)."""
    x, state, kw = update_case(4, 1, 2, True, False, torch.float64, 6)
    kw["cache_seqlens"] = torch.tensor([-(2**63), 2**63 - 1, -5])
    st_ref = state.clone()
    want = ref.causal_conv1d_update(x, st_ref, kw["weight"], kw["bias"], None, kw["cache_seqlens"])
    out = bm.causal_conv1d_update(x, state, **kw)
    assert_close(out, want, torch.float64, "out")
    assert torch.equal(state, st_ref)
