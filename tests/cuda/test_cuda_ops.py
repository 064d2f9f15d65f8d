"""CUDA kernels of the causal conv, companion, bilinear, eidetic and SSD ops on a GPU.

Skipped without CUDA. Each test compares the CUDA result with the CPU op (already verified
against fp64 oracles) in every dtype and option; gradcheck in fp64 on small sizes;
streaming / piecewise == whole; CUDA-graph capture + replay; opcheck on CUDA tensors.
(Without a GPU, tests/test_cuda_emulated.py runs the same kernel sources on the CPU.)
"""

from __future__ import annotations

import pytest
import torch
from bmojo_core import (
    EideticStore,
    bilinear_scan,
    causal_conv1d_fn,
    causal_conv1d_update,
    companion_scan,
    eidetic_select,
    innovation_scores,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
)
from bmojo_core import cuda as _cuda
from bmojo_core.errors import BmojoValueError
from bmojo_core.ops import ssd
from conftest import TOL, stable_seed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Compiles every declared kernel up front (graph capture never compiles)."""
    prepare = getattr(_cuda, "prepare", None)
    if prepare is not None:
        prepare(torch.device(DEV), _cuda.DTYPES)


def gen(*parts):
    return torch.Generator().manual_seed(stable_seed(*parts))


def cu(t):
    """The CUDA copy of an optional tensor / pass-through of anything else."""
    return t.to(DEV) if isinstance(t, torch.Tensor) else t


def close(got, ref, dtype, what=""):
    torch.testing.assert_close(
        got.detach().cpu().to(torch.float64),
        ref.detach().to(torch.float64),
        **TOL[dtype],
        msg=lambda m: f"{what}: {m}",
    )


def both(fn, kw):
    """fn on CPU tensors and on their CUDA copies."""
    return fn(**kw), fn(**{k: cu(v) for k, v in kw.items()})


def flat(x):
    return x if isinstance(x, tuple) else (x,)


# ------------------------------------------------------------------------------------ conv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("mode", ["plain", "init", "seq"])
@pytest.mark.parametrize("act", [None, "silu"])
def test_conv_parity(dtype, k, mode, act):
    g = gen("conv", dtype, k, mode, act)
    b, d, length = 2, 8, 67
    kw = dict(
        x=torch.randn(b, d, length, generator=g).to(dtype),
        weight=torch.randn(d, k, generator=g).to(dtype),
        bias=torch.randn(d, generator=g).to(dtype),
        activation=act,
        return_final_states=mode != "seq",
    )
    if mode == "init":
        kw["initial_states"] = torch.randn(b, d, k - 1, generator=g).to(dtype)
    if mode == "seq":
        kw["seq_idx"] = torch.tensor([[0] * 30 + [1] * 37, [0] * 5 + [2] * 62], dtype=torch.int32)
    ref, got = both(causal_conv1d_fn, kw)
    for r, o in zip(flat(ref), flat(got), strict=True):
        assert o.device.type == "cuda" and o.dtype == r.dtype
        close(o, r, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("mode", ["plain", "init", "seq"])
def test_conv_backward_parity(dtype, mode):
    g = gen("convb", dtype, mode)
    b, d, length, k = 3, 5, 3000, 4  # three weight-gradient chunks of 4096 (batch, time)
    x = torch.randn(b, d, length, generator=g, dtype=dtype)
    w = torch.randn(d, k, generator=g, dtype=dtype)
    bias = torch.randn(d, generator=g, dtype=dtype)
    init = torch.randn(b, d, k - 1, generator=g, dtype=dtype) if mode == "init" else None
    seq = torch.randint(0, 3, (b, length), generator=g).sort(1).values if mode == "seq" else None
    go = torch.randn(b, d, length, generator=g, dtype=dtype)
    gf = torch.randn(b, d, k - 1, generator=g, dtype=dtype)
    grads = []
    for dev in ("cpu", DEV, DEV):
        leaves = [t.to(dev).requires_grad_() for t in (x, w, bias)]
        h0 = None if init is None else init.to(dev).requires_grad_()
        out, fin = causal_conv1d_fn(
            *leaves, seq_idx=cu(seq) if dev == DEV else seq, initial_states=h0,
            return_final_states=True, activation="silu",
        )  # fmt: skip
        loss = (out * go.to(dev)).sum() + (fin * gf.to(dev)).sum()
        ins = leaves + ([h0] if h0 is not None else [])
        grads.append(torch.autograd.grad(loss, ins))
    for r, o in zip(grads[0], grads[1], strict=True):
        close(o, r, dtype)
    # Deterministic (no float atomics): the second CUDA run is bitwise the same.
    assert all(torch.equal(a, b) for a, b in zip(grads[1], grads[2], strict=True))


def test_conv_gradcheck():
    g = gen("convgc")
    x = torch.randn(2, 3, 9, generator=g, dtype=torch.float64, device="cpu").to(DEV)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64).to(DEV)
    bias = torch.randn(3, generator=g, dtype=torch.float64).to(DEV)
    h0 = torch.randn(2, 3, 2, generator=g, dtype=torch.float64).to(DEV)
    ins = [t.requires_grad_() for t in (x, w, bias, h0)]

    def f(x, w, bias, h0):
        return causal_conv1d_fn(
            x, w, bias, initial_states=h0, return_final_states=True, activation="silu"
        )

    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradcheck(lambda *a: f(*a)[1], ins)  # through the final state only


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["shift", "ring", "pool"])
@pytest.mark.parametrize("ntok", [1, 3])
def test_conv_update_parity(dtype, form, ntok):
    g = gen("upd", dtype, form, ntok)
    b, d, k, s = 3, 16, 4, 6
    slots = b + 2 if form == "pool" else b
    x = torch.randn(b, d, ntok, generator=g).to(dtype)
    w = torch.randn(d, k, generator=g).to(dtype)
    bias = torch.randn(d, generator=g).to(dtype)
    state = torch.randn(slots, d, s, generator=g).to(dtype)
    cache = torch.tensor([5, -3, 11]) if form == "ring" else None
    idx = torch.tensor([4, -1, 0], dtype=torch.int32) if form == "pool" else None
    st_c = state.to(DEV)
    ref = causal_conv1d_update(x, state, w, bias, "silu", cache, idx)
    got = causal_conv1d_update(cu(x), st_c, cu(w), cu(bias), "silu", cu(cache), cu(idx))
    close(got, ref, dtype, "out")
    close(st_c, state, dtype, "state")


def test_conv_streaming_equals_whole():
    g = gen("stream")
    b, d, k, length = 2, 8, 4, 23
    x = torch.randn(b, d, length, generator=g, device="cpu").to(DEV)
    w = torch.randn(d, k, generator=g).to(DEV)
    bias = torch.randn(d, generator=g).to(DEV)
    whole, fin = causal_conv1d_fn(x, w, bias, return_final_states=True, activation="silu")
    state = torch.zeros(b, d, k - 1, device=DEV)
    outs = [causal_conv1d_update(x[:, :, :1], state, w, bias, "silu")]
    outs += [causal_conv1d_update(x[:, :, t : t + 5], state, w, bias, "silu")
             for t in range(1, length, 5)]  # fmt: skip
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, fin)


def test_conv_update_graph_replay():
    g = gen("graph")
    b, d, k = 4, 32, 4
    w = torch.randn(d, k, generator=g).to(DEV)
    bias = torch.randn(d, generator=g).to(DEV)
    x = torch.randn(b, d, device=DEV)
    state = torch.zeros(b, d, k - 1, device=DEV)
    ref_state = state.clone()
    causal_conv1d_update(x, state.clone(), w, bias, "silu")  # warm-up (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = causal_conv1d_update(x, state, w, bias, "silu")
    for step in range(5):
        xt = torch.randn(b, d, generator=gen("graph", step)).to(DEV)
        x.copy_(xt)
        graph.replay()
        ref = causal_conv1d_update(xt, ref_state, w, bias, "silu")
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(state, ref_state)


def test_conv_mixed_devices_error():
    x = torch.randn(1, 2, 5, device=DEV)
    with pytest.raises(BmojoValueError, match="weight"):
        causal_conv1d_fn(x, torch.randn(2, 3))


# ------------------------------------------------------------------------------- companion


def _companion_kw(g, dtype, form, n, b=2, d=4, length=50):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    kw = dict(u=r(b, d, length), initial_state=r(b, d, n), return_final_state=True)
    if form == "var":
        kw.update(alpha=r(b, d, length, n, scale=0.5 / n), beta=r(b, d, length),
                  c=r(b, d, length, n), D=r(d))  # fmt: skip
    elif form == "const":
        kw.update(alpha=r(d, n, scale=0.5 / n), beta=r(d), c=r(d, n), D=r(d))
    else:
        kw.update(alpha=r(d, n, scale=0.5 / n))
    return kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["var", "const", "bare"])
@pytest.mark.parametrize("n", [1, 4, 64])
def test_companion_parity(dtype, form, n):
    kw = _companion_kw(gen("comp", dtype, form, n), dtype, form, n, length=80)
    ref, got = both(companion_scan, kw)
    for r, o in zip(ref, got, strict=True):
        close(o, r, dtype)


@pytest.mark.parametrize("form", ["var", "const", "bare"])
def test_companion_backward_parity_and_gradcheck(form):
    kw = _companion_kw(gen("compb", form), torch.float64, form, 3, b=2, d=3, length=12)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    grads = []
    for dev in ("cpu", DEV):
        leaves = {k: kw[k].to(dev).requires_grad_() for k in names}
        y, last = companion_scan(**{**kw, **leaves})
        loss = (y * y).sum() + (last * 1.7).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for r, o in zip(*grads, strict=True):
        close(o, r, torch.float64)
    leaves = [kw[k].to(DEV).requires_grad_() for k in names]

    def f(*ts):
        return companion_scan(**{**kw, **dict(zip(names, ts, strict=True))})

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradcheck(lambda *ts: f(*ts)[1], leaves)


def test_companion_pieces_equal_whole():
    kw = _companion_kw(gen("comppc"), torch.float32, "const", 5, length=40)
    kw = {k: cu(v) for k, v in kw.items()}
    y, last = companion_scan(**kw)
    y1, s1 = companion_scan(**{**kw, "u": kw["u"][:, :, :17]})
    y2, s2 = companion_scan(**{**kw, "u": kw["u"][:, :, 17:], "initial_state": s1})
    torch.testing.assert_close(torch.cat([y1, y2], 2), y)
    torch.testing.assert_close(s2, last)


# -------------------------------------------------------------------------------- bilinear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "form"), [(3, "mod"), (16, "mod"), (64, "mod"), (5, "lti"),
                                         (4, "step"), (33, "step")])  # fmt: skip
def test_bilinear_parity(dtype, n, form):
    g = gen("bil", dtype, n, form)
    b, length, p, q = 2, 40, 3, 2
    scale = 0.5 / n**0.5
    kw = dict(
        u=torch.randn(b, length, p, generator=g).to(dtype),
        B=torch.randn(n, p, generator=g).to(dtype),
        C=torch.randn(q, n, generator=g).to(dtype),
        D=torch.randn(q, p, generator=g).to(dtype),
        initial_state=torch.randn(b, n, generator=g).to(dtype),
        return_final_state=True,
    )
    if form == "step":
        kw["A"] = (torch.randn(b, length, n, n, generator=g) * scale).to(dtype)
    else:
        kw["A"] = (torch.randn(n, n, generator=g) * scale).to(dtype)
    if form == "mod":
        kw["N"] = (torch.randn(p, n, n, generator=g) * scale * 0.3).to(dtype)
    ref, got = both(bilinear_scan, kw)
    for r, o in zip(ref, got, strict=True):
        close(o, r, dtype)


@pytest.mark.parametrize("form", ["mod", "step"])
def test_bilinear_backward_parity_and_gradcheck(form):
    g = gen("bilb", form)
    b, length, p, n = 2, 6, 2, 3
    kw = dict(
        u=torch.randn(b, length, p, generator=g, dtype=torch.float64),
        B=torch.randn(n, p, generator=g, dtype=torch.float64),
        initial_state=torch.randn(b, n, generator=g, dtype=torch.float64),
    )
    if form == "mod":
        kw["A"] = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.4
        kw["N"] = torch.randn(p, n, n, generator=g, dtype=torch.float64) * 0.2
    else:
        kw["A"] = torch.randn(b, length, n, n, generator=g, dtype=torch.float64) * 0.4
    names = list(kw)
    grads = []
    for dev in ("cpu", DEV):
        leaves = {k: kw[k].to(dev).requires_grad_() for k in names}
        y, last = bilinear_scan(**leaves, return_final_state=True)
        loss = (y * y).sum() + last.sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for r, o in zip(*grads, strict=True):
        close(o, r, torch.float64)
    leaves = [kw[k].to(DEV).requires_grad_() for k in names]

    def f(*ts):
        return bilinear_scan(**dict(zip(names, ts, strict=True)), return_final_state=True)

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradcheck(lambda *ts: f(*ts)[1], leaves)


# --------------------------------------------------------------------------------- eidetic


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["mse", "chi2"])
def test_innovation_parity_and_pieces(dtype, metric):
    g = gen("innov", dtype, metric)
    y = torch.randn(3, 40, 16, generator=g).to(dtype)
    ref, st_ref = innovation_scores(y, metric=metric, return_state=True)
    got, st = innovation_scores(cu(y), metric=metric, return_state=True)
    close(got, ref, dtype)
    for k in st_ref:
        close(st[k], st_ref[k], dtype if k != "count" else torch.float64, k)
    a, s1 = innovation_scores(cu(y[:, :13]), metric=metric, return_state=True)
    b = innovation_scores(cu(y[:, 13:]), metric=metric, state=s1)
    torch.testing.assert_close(torch.cat([a, b], 1), got, rtol=0, atol=0)


def test_innovation_bitwise_scalar_level(restore_runtime):
    restore_runtime.set_simd_level("scalar")
    y = torch.randn(2, 30, 7, generator=gen("innovbw"))
    for metric in ("mse", "chi2"):
        ref = innovation_scores(y, metric=metric)
        got = innovation_scores(cu(y), metric=metric).cpu()
        assert torch.equal(got, ref)


@pytest.mark.parametrize("policy", ["topk", "threshold", "fifo"])
def test_store_bitwise_and_streaming(policy):
    g = gen("store", policy)
    scores = (torch.rand(3, 57, generator=g, dtype=torch.float64) * 5).floor()  # ties
    ref, st_ref = eidetic_select(scores, 6, 8, policy, 2.0, return_store=True)
    got, st = eidetic_select(cu(scores), 6, 8, policy, 2.0, return_store=True)
    assert torch.equal(got.cpu(), ref)
    for k in st_ref:
        assert torch.equal(st[k].cpu(), st_ref[k])
    store = EideticStore(3, 6, policy, 2.0, device=DEV)
    for a, b in ((0, 10), (10, 11), (11, 57)):
        store.push(cu(scores[:, a:b]))
    assert torch.equal(store.positions.cpu(), st_ref["positions"])
    assert torch.equal(store.count.cpu(), st_ref["count"])


def test_store_error_writes_nothing():
    store = EideticStore(2, 4, device=DEV)
    store.push(torch.rand(2, 5, dtype=torch.float64, device=DEV))
    before = store.state_dict()
    bad = torch.zeros(2, 3, dtype=torch.float64, device=DEV)
    bad[1, 2] = float("nan")
    with pytest.raises(BmojoValueError, match="NaN"):
        store.push(bad)
    for k, v in store.state_dict().items():
        assert torch.equal(v, before[k])


# --------------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    g = gen("opcheck")

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV)

    i64 = dict(dtype=torch.int64, device=DEV)
    x, w, bias, h0 = r(2, 3, 9), r(3, 4), r(3), r(2, 3, 3)
    seq = torch.tensor([[0] * 4 + [1] * 5] * 2, **i64)
    ops = torch.ops.bmojo
    yield ops.causal_conv1d_fwd, (x, w, bias, None, h0, True)
    yield ops.causal_conv1d_fwd, (x, w, None, seq, None, False)
    yield ops.causal_conv1d_bwd, (x, w, bias, None, h0, r(2, 3, 9), r(2, 3, 3), True)
    cache, slots = torch.tensor([3, 7], **i64), torch.tensor([2, -1], **i64)
    yield ops.causal_conv1d_update, (r(2, 3, 2), r(3, 3, 5), w, bias, True, cache, slots)
    u, a = r(2, 3, 8), r(2, 3, 8, 2) * 0.3
    yield ops.companion_scan_fwd, (u, a, r(3), r(3, 2), r(3), r(2, 3, 2))
    yield ops.companion_scan_fwd, (u, r(3, 2) * 0.3, None, None, None, None)
    yield ops.bilinear_scan_fwd, (r(2, 6, 3), r(3, 3) * 0.3, r(2, 3, 3) * 0.2, r(2, 6, 2),
                                  r(2, 3), False)  # fmt: skip
    yield ops.bilinear_tv_scan_fwd, (r(2, 6, 3), r(2, 6, 3, 3) * 0.3, None, False)
    yield ops.innovation_scores, (r(2, 7, 4), torch.full((3,), 1 / 3, dtype=torch.float64,
                                  device=DEV), r(2, 3, 4), torch.tensor([0, 5], **i64),
                                  torch.zeros(2, 2, dtype=torch.float64, device=DEV), True,
                                  1 / 16, 1e-6)  # fmt: skip
    empty = (torch.full((2, 3), -1, **i64), torch.zeros(2, 3, dtype=torch.float64, device=DEV))
    sc = torch.rand(2, 10, dtype=torch.float64, device=DEV)
    yield ops.eidetic_select, (sc, *empty, torch.zeros(2, **i64), 4, "topk", 0.0)
    yield ops.eidetic_push, (*(t.clone() for t in empty), torch.zeros(2, **i64), sc, "fifo", 0.1)


def test_opcheck_cuda():
    cases = list(_opcheck_cases())
    assert len(cases) == 11
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_graph_replay_companion_innovation_store():
    """A decode-like block captured once and replayed: companion scan, innovation scores
    with carried state, store push; replays equal eager calls."""
    kw = _companion_kw(gen("graph2"), torch.float32, "const", 3, b=2, d=8, length=4)
    kw = {k: cu(v) for k, v in kw.items()}
    u = kw.pop("u").clone()
    y0 = torch.randn(2, 4, 8, device=DEV)
    state = {
        "history": torch.zeros(2, 4, 8, device=DEV),
        "count": torch.zeros(2, dtype=torch.int64, device=DEV),
        "ema": torch.zeros(2, 2, device=DEV),
    }
    store = EideticStore(2, 3, device=DEV)
    ref_store = EideticStore(2, 3, device=DEV)

    def block():
        y, last = companion_scan(u, **kw)
        scores, st = innovation_scores(y0, state=state, return_state=True)
        for k in state:
            state[k].copy_(st[k])
        store.push(scores)
        return y, last, scores

    block()  # warm-up: compiles every kernel used
    torch.cuda.synchronize()
    for k in state:
        state[k].zero_()
    store.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = block()
    ref_state = {k: v.clone() for k, v in state.items()}
    for step in range(3):
        u.copy_(torch.randn(u.shape, generator=gen("g2u", step)).to(DEV))
        y0.copy_(torch.randn(y0.shape, generator=gen("g2y", step)).to(DEV))
        graph.replay()
        y, last = companion_scan(u, **kw)
        scores, ref_state = innovation_scores(y0, state=ref_state, return_state=True)
        ref_store.push(scores)
        torch.testing.assert_close(outs[0], y)
        torch.testing.assert_close(outs[1], last)
        assert torch.equal(outs[2], scores)
        assert torch.equal(store.positions, ref_store.positions)
        assert torch.equal(store.count, ref_store.count)


# ------------------------------------------------------------------------------------- ssd


def _ssd_kw(g, b, length, h, p, grp, n, dtype, *, opts=True, d_hp=False):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    kw = dict(x=r(b, length, h, p), dt=r(b, length, h, scale=0.5),
              A=(-torch.rand(h, generator=g, dtype=torch.float64) - 0.2).to(dtype),
              B=r(b, length, grp, n), C=r(b, length, grp, n))  # fmt: skip
    if opts:
        kw.update(D=r(h, p) if d_hp else r(h), z=r(b, length, h, p), dt_bias=r(h, scale=0.1),
                  initial_states=r(b, h, p, n), dt_softplus=True)  # fmt: skip
    return kw


def _ssd_run(kw, dev, fn=mamba_chunk_scan_combined, seed=1, **extra):
    """Output, final state and the gradient of every float input of one call on `dev`."""
    leaves = {k: v.to(dev).requires_grad_() for k, v in kw.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}  # fmt: skip
    rest = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
            for k, v in {**kw, **extra}.items() if k not in leaves}  # fmt: skip
    out, last = fn(**leaves, **rest, return_final_states=True)
    g = gen("ssd-weights", seed)
    w1 = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dev)
    w2 = torch.randn(last.shape, generator=g, dtype=torch.float64).to(dev)
    loss = (out.double() * w1).sum() + (last.double() * w2).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out.detach(), last.detach(), dict(zip(leaves, grads, strict=True))


def _rel_close(got, ref, dtype, what):
    """Relative to the reference's scale (gradients are sums over batch and time)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    assert got.device.type == "cuda", what
    scale = ref.abs().max().item() + 1.0 if ref.numel() else 1.0
    close(got.double() / scale, ref.double() / scale, dtype, what)


def _ssd_same(kw, dtype, **extra):
    """The CUDA path against the CPU op (verified against the fp64 oracle)."""
    ref = _ssd_run(kw, "cpu", chunk_size=64, **extra)
    got = _ssd_run(kw, DEV, chunk_size=64, **extra)
    _rel_close(got[0], ref[0], dtype, "out")
    _rel_close(got[1], ref[1], dtype, "final_states")
    for k, r in ref[2].items():
        _rel_close(got[2][k], r, dtype, f"d{k}")
    return got


SSD_SHAPES = [
    # batch, L, heads, P, groups, N, optional inputs, D (h, p), packed, dt_limit
    (2, 150, 4, 5, 2, 40, True, True, True, (0.05, 0.8)),
    (1, 67, 2, 64, 1, 128, False, False, False, None),  # Mamba-2's head dim and N
    (2, 1, 3, 3, 3, 256, True, False, False, None),
    (1, 200, 2, 17, 1, 33, True, False, True, (0.0, 1.5)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SSD_SHAPES, ids=str)
def test_ssd_parity(dtype, shape):
    b, length, h, p, grp, n, opts, d_hp, packed, limit = shape
    g = gen("ssd", dtype, shape)
    kw = _ssd_kw(g, b, length, h, p, grp, n, dtype, opts=opts, d_hp=d_hp)
    extra = {}
    if packed:
        extra["seq_idx"] = torch.randint(0, 4, (b, length), generator=g).sort(1).values.int()
    if limit is not None:
        extra["dt_limit"] = limit
    out, last, _ = _ssd_same(kw, dtype, **extra)
    assert out.dtype == dtype
    assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_ssd_varlen_and_empty(dtype):
    g = gen("ssd-varlen", dtype)
    kw = _ssd_kw(g, 1, 70, 2, 3, 1, 6, dtype)
    cu_seq = torch.tensor([0, 5, 5, 66, 70])
    for extra in (dict(cu_seqlens=cu_seq, return_varlen_states=True), dict(cu_seqlens=cu_seq)):
        ref = mamba_chunk_scan_combined(**kw, chunk_size=64, return_final_states=True, **extra)
        got = mamba_chunk_scan_combined(**{k: cu(v) for k, v in {**kw, **extra}.items()},
                                        chunk_size=64, return_final_states=True)  # fmt: skip
        for r, o in zip(ref, got, strict=True):
            assert o.device.type == "cuda"
            close(o, r, dtype)
    empty = _ssd_kw(g, 2, 0, 2, 3, 1, 6, dtype)
    _ssd_same(empty, dtype)


def test_ssd_deterministic_and_windows(monkeypatch):
    """The backward is bitwise reproducible, and the same (to rounding) when it runs in
    windows of one chunk."""
    g = gen("ssd-det")
    kw = _ssd_kw(g, 2, 300, 4, 64, 2, 128, torch.float32)
    first = _ssd_run(kw, DEV, chunk_size=64)
    second = _ssd_run(kw, DEV, chunk_size=64)
    for k in first[2]:
        assert torch.equal(first[2][k], second[2][k]), k
    monkeypatch.setattr(ssd, "_CUDA_PART_ELEMS", 1)
    windows = _ssd_run(kw, DEV, chunk_size=64)
    for k in first[2]:
        _rel_close(windows[2][k], first[2][k], torch.float32, k)


def test_ssd_gradcheck_cuda():
    g = gen("ssd-gradcheck")
    kw = _ssd_kw(g, 1, 70, 2, 2, 1, 3, torch.float64, d_hp=True)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    ts = [kw[k].to(DEV).requires_grad_() for k in names]
    seq = torch.tensor([[0] * 30 + [1] * 34 + [2] * 6], device=DEV)

    def f(*args):
        return mamba_chunk_scan_combined(
            **dict(zip(names, args, strict=True)), chunk_size=64, dt_softplus=True,
            seq_idx=seq, dt_limit=(0.05, 1.5), return_final_states=True,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, ts, atol=1e-7, rtol=1e-5)


def test_ssd_no_grad_fast_path_equals_the_op():
    g = gen("ssd-fast")
    kw = {k: cu(v) for k, v in _ssd_kw(g, 2, 90, 3, 8, 1, 64, torch.float32).items()}
    with torch.no_grad():
        fast = mamba_chunk_scan_combined(**kw, chunk_size=64, return_final_states=True)
    x = kw["x"].clone().requires_grad_()
    slow = mamba_chunk_scan_combined(**{**kw, "x": x}, chunk_size=64, return_final_states=True)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b.detach())


def test_ssd_mamba2_block_parity():
    """Mamba-2's fused block (conv + SSD + gated RMSNorm) on CUDA against the CPU."""
    g = gen("ssd-block")
    b, length, h, p, grp, n, k = 2, 80, 4, 8, 2, 16, 4
    dim = h * p
    kw = dict(
        zxbcdt=torch.randn(b, length, 2 * dim + 2 * grp * n + h, generator=g),
        conv1d_weight=torch.randn(dim + 2 * grp * n, k, generator=g) * 0.5,
        conv1d_bias=torch.randn(dim + 2 * grp * n, generator=g) * 0.1,
        dt_bias=torch.randn(h, generator=g) * 0.1, A=-torch.rand(h, generator=g) - 0.2,
        D=torch.randn(h, generator=g), rmsnorm_weight=torch.rand(dim, generator=g) + 0.5,
        outproj_weight=torch.randn(24, dim, generator=g) * 0.1,
    )  # fmt: skip
    common = dict(chunk_size=64, headdim=p, ngroups=grp, norm_before_gate=False)
    ref = _ssd_run(kw, "cpu", fn=mamba_split_conv1d_scan_combined, **common)
    got = _ssd_run(kw, DEV, fn=mamba_split_conv1d_scan_combined, **common)
    for r, o, what in ((ref[0], got[0], "out"), (ref[1], got[1], "final_states")):
        _rel_close(o, r, torch.float32, what)
    for name, r in ref[2].items():
        _rel_close(got[2][name], r, torch.float32, f"d{name}")


def test_ssd_opcheck_cuda():
    g = gen("ssd-opcheck")
    kw = {k: cu(v) for k, v in _ssd_kw(g, 2, 70, 2, 3, 1, 5, torch.float64, d_hp=True).items()}
    seq = torch.tensor([[0] * 40 + [1] * 30, [0] * 70], device=DEV)
    args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["dt_bias"],
            kw["initial_states"], seq, True, True, 0.1, 2.0)  # fmt: skip
    leaves = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and
                   a.is_floating_point() else a for a in args)  # fmt: skip
    torch.library.opcheck(torch.ops.bmojo.ssd_fwd.default, args)
    torch.library.opcheck(torch.ops.bmojo.ssd_fwd.default, leaves)
    out, last, ck = torch.ops.bmojo.ssd_fwd(*args)
    bwd = (*args[:8], seq, True, True, 0.1, 2.0, ck, torch.randn_like(out),
           torch.randn_like(last))  # fmt: skip
    torch.library.opcheck(torch.ops.bmojo.ssd_bwd.default, bwd)


def test_ssd_graph_replay():
    """The no-grad scan captured once and replayed on new inputs equals eager calls."""
    g = gen("ssd-graph")
    kw = {k: cu(v) for k, v in _ssd_kw(g, 2, 40, 2, 4, 1, 8, torch.float32).items()}
    kw.pop("initial_states")

    def run():
        with torch.no_grad():
            return mamba_chunk_scan_combined(**kw, chunk_size=64, return_final_states=True)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for step in range(2):
        kw["x"].copy_(torch.randn(kw["x"].shape, generator=gen("ssd-graph", step)).to(DEV))
        graph.replay()
        want = run()
        for o, w in zip(outs, want, strict=True):
            assert torch.equal(o, w)


def test_ssd_cuda_errors():
    g = gen("ssd-errors")
    kw = {k: cu(v) for k, v in _ssd_kw(g, 1, 5, 2, 2, 1, 257, torch.float32).items()}
    with pytest.raises(BmojoValueError, match="N = 257"):
        mamba_chunk_scan_combined(**kw, chunk_size=64)
    kw = {k: cu(v) for k, v in _ssd_kw(g, 1, 5, 2, 2, 1, 4, torch.float32).items()}
    with pytest.raises(BmojoValueError, match="^A: expected a tensor on cuda"):
        mamba_chunk_scan_combined(**{**kw, "A": kw["A"].cpu()}, chunk_size=64)
