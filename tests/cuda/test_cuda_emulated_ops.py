"""The CUDA kernels of the conv, companion, bilinear, eidetic and SSD ops, run without a GPU.

The shared harness (``tests/cuda_emu/harness.py``, also used by test_cuda_emulated.py)
compiles ``cuda/*.cu`` as host C++ behind an emulation prelude and replaces
``bmojo_core.cuda.Kernel.launch`` by an emulated launch that runs every thread of the grid
on the CPU. The ops' registered CUDA implementations are then called with CPU tensors and
compared with the CPU ops (already verified against fp64 oracles). Each launch also checks
its ``fmt`` and every pointer's dtype against the entry point's C signature (the runtime
packs arguments by ``fmt``: a mismatch would be silent on a GPU) and the grid, block and
shared-memory limits. Skipped without a C++20 g++. What this cannot check: real GPU
concurrency and memory ordering (threads of a block run truly concurrently here only for
the kernels that cooperate), performance.
"""

from __future__ import annotations

import bmojo_core
import pytest
import torch
from bmojo_core import cuda as _cuda
from bmojo_core.errors import BmojoTypeError, BmojoValueError
from bmojo_core.ops import bilinear, companion, conv, eidetic, ssd
from conftest import needs, stable_seed
from cuda_emu import harness as H

pytestmark = needs(
    H.compiler() is not None and H.CUDA_DIR.is_dir(),
    "g++ with C++20 <barrier> and _Float16, and the cuda/ sources",
)
cuda_impl = H.cuda_impl


@pytest.fixture(scope="module")
def emu():
    """Replaces Kernel.launch by the emulated launch for the module's tests."""
    with H.emulate() as emulator:
        yield emulator.launches


def same(got, ref, dtype, what=""):
    if dtype == torch.float64:
        tol = dict(rtol=1e-11, atol=1e-11)
    else:
        tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"{what}: {m}")


def gen(*parts):
    return torch.Generator().manual_seed(stable_seed(*parts))


DT = (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------ conv


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("mode", ["plain", "init", "seq"])
@pytest.mark.parametrize("silu", [False, True])
def test_conv_fwd_bwd(emu, dtype, k, mode, silu):
    g = gen("conv", dtype, k, mode, silu)
    b, d, length = 2, 3, 13
    x = torch.randn(b, d, length, generator=g, dtype=dtype)
    w = torch.randn(d, k, generator=g, dtype=dtype)
    bias = torch.randn(d, generator=g, dtype=dtype) if k != 2 else None
    init = torch.randn(b, d, k - 1, generator=g, dtype=dtype) if mode == "init" else None
    seq = None
    if mode == "seq":
        seq = torch.tensor([[0] * 4 + [1] * 1 + [2] * 8, [0] * 13], dtype=torch.int64)
    args = (x, w, bias, seq, init, silu)
    ref = torch.ops.bmojo.causal_conv1d_fwd(*args)
    got = cuda_impl(conv.causal_conv1d_fwd)(*args)
    for r, o, what in zip(ref, got, ("out", "final"), strict=True):
        same(o, r, dtype, what)
    dout = torch.randn(b, d, length, generator=g, dtype=dtype)
    # The final-state gradient given (K > 1: it reaches dx / dinit) or not (K = 1).
    for dfin in (None,) if k == 1 else (torch.randn(b, d, k - 1, generator=g, dtype=dtype),):
        bargs = (x, w, bias, seq, init, dout, dfin, silu)
        ref = torch.ops.bmojo.causal_conv1d_bwd(*bargs)
        got = cuda_impl(conv.causal_conv1d_bwd)(*bargs)
        for r, o, what in zip(ref, got, ("dx", "dw", "db", "dinit"), strict=True):
            same(o, r, dtype, what)


def test_conv_bwd_many_chunks(emu, monkeypatch):
    """Weight gradients summed over several (batch, time) chunks, in chunk order."""
    monkeypatch.setattr(conv, "_DW_CHUNK", 7)
    g = gen("conv-chunks")
    x = torch.randn(3, 2, 11, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    dout = torch.randn_like(x)
    bargs = (x, w, bias, None, None, dout, None, True)
    ref = torch.ops.bmojo.causal_conv1d_bwd(*bargs)
    got = cuda_impl(conv.causal_conv1d_bwd)(*bargs)
    for r, o in zip(ref, got, strict=True):
        same(o, r, torch.float64)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize(("k", "s"), [(4, 3), (4, 6), (1, 0), (3, 5)])
@pytest.mark.parametrize("ntok", [1, 3, 8])
@pytest.mark.parametrize("form", ["shift", "ring", "pool"])
def test_conv_update(emu, dtype, k, s, ntok, form):
    g = gen("upd", dtype, k, s, ntok, form)
    b, d = 3, 4
    x = torch.randn(b, d, ntok, generator=g, dtype=dtype)
    w = torch.randn(d, k, generator=g, dtype=dtype)
    bias = torch.randn(d, generator=g, dtype=dtype)
    slots = b + 2 if form == "pool" else b
    state = torch.randn(slots, d, s, generator=g, dtype=dtype)
    cache = torch.tensor([5, -3, 11], dtype=torch.int64) if form == "ring" else None
    idx = torch.tensor([4, -1, 0], dtype=torch.int64) if form == "pool" else None
    st_ref, st_got = state.clone(), state.clone()
    for silu in (False, True):
        ref = torch.ops.bmojo.causal_conv1d_update(x, st_ref, w, bias, silu, cache, idx)
        got = cuda_impl(conv.causal_conv1d_update_op)(x, st_got, w, bias, silu, cache, idx)
        same(got, ref, dtype, "out")
        same(st_got, st_ref, dtype, "state")


# ------------------------------------------------------------------------------- companion


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("n", [1, 3, 12, 64])
@pytest.mark.parametrize("form", ["var", "const", "mixed", "bare"])
def test_companion(emu, dtype, n, form):
    g = gen("comp", dtype, n, form)
    b, d, length = 2, 3, {64: 70, 12: 5}.get(n, 9)  # 12: L < n (the final state reaches h0)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    sc = 0.5 / n
    if form == "var":
        alpha, beta, c = r(b, d, length, n, scale=sc), r(b, d, length), r(b, d, length, n)
    elif form == "const":
        alpha, beta, c = r(d, n, scale=sc), r(d), r(d, n)
    elif form == "mixed":
        alpha, beta, c = r(b, d, length, n, scale=sc), r(d), None
    else:
        alpha, beta, c = r(d, n, scale=sc), None, None
    D = r(d) if form != "bare" else None
    h0 = r(b, d, n) if form != "const" else None
    u = r(b, d, length)
    args = (u, alpha, beta, c, D, h0)
    ref = torch.ops.bmojo.companion_scan_fwd(*args)
    got = cuda_impl(companion.companion_scan_fwd)(*args)
    for rr, o, what in zip(ref, got, ("y", "last", "s"), strict=True):
        same(o, rr, dtype, what)
    s = ref[0] if c is None and D is None else ref[2]
    dy = r(b, d, length)
    for dlast in (None, r(b, d, n)):
        bargs = (u, alpha, beta, c, D, h0, s, dy, dlast)
        ref_g = torch.ops.bmojo.companion_scan_bwd(*bargs)
        got_g = cuda_impl(companion.companion_scan_bwd)(*bargs)
        names = ("du", "dalpha", "dbeta", "dc", "dD", "dh0")
        for rr, o, what in zip(ref_g, got_g, names, strict=True):
            same(o, rr, dtype, what)


@pytest.mark.parametrize("form", ["var", "const"])
def test_companion_blocks_and_tiles(emu, form):
    """39 lanes (two blocks of 32, the second partial) × 45 steps (two time tiles)."""
    g = gen("comp-tiles", form)
    b, d, length, n = 3, 13, 45, 3
    f64 = dict(dtype=torch.float64)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, **f64) * scale

    if form == "var":
        alpha, beta, c = r(b, d, length, n, scale=0.3), r(b, d, length), r(b, d, length, n)
    else:
        alpha, beta, c = r(d, n, scale=0.3), r(d), None
    args = (r(b, d, length), alpha, beta, c, r(d), r(b, d, n))
    ref = torch.ops.bmojo.companion_scan_fwd(*args)
    got = cuda_impl(companion.companion_scan_fwd)(*args)
    for rr, o in zip(ref, got, strict=True):
        same(o, rr, torch.float64)
    bargs = (*args, ref[2], r(b, d, length), r(b, d, n))
    ref_g = torch.ops.bmojo.companion_scan_bwd(*bargs)
    got_g = cuda_impl(companion.companion_scan_bwd)(*bargs)
    for rr, o in zip(ref_g, got_g, strict=True):
        same(o, rr, torch.float64)


# -------------------------------------------------------------------------------- bilinear


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize(("n", "m"), [(1, 1), (5, 0), (5, 2), (64, 1)])
def test_bilinear_modulated(emu, dtype, n, m):
    g = gen("bil", dtype, n, m)
    b, length = 2, 6 if n == 64 else 11
    scale = 0.5 / n**0.5
    bb = torch.randn(b, length, n, generator=g, dtype=dtype)
    A0 = torch.randn(n, n, generator=g, dtype=dtype) * scale
    N = torch.randn(m, n, n, generator=g, dtype=dtype) * scale
    v = torch.randn(b, length, m, generator=g, dtype=dtype)
    h0 = torch.randn(b, n, generator=g, dtype=dtype)
    args = (bb, A0, N, v, h0, False)
    ref = torch.ops.bmojo.bilinear_scan_fwd(*args)
    got = cuda_impl(bilinear.bilinear_scan_fwd)(*args)
    for rr, o, what in zip(ref, got, ("xs", "last"), strict=True):
        same(o, rr, dtype, what)
    dxs = torch.randn(b, length, n, generator=g, dtype=dtype)
    dlast = torch.randn(b, n, generator=g, dtype=dtype)
    bargs = (bb, A0, N, v, h0, ref[0], dxs, dlast)
    ref_g = torch.ops.bmojo.bilinear_scan_bwd(*bargs)
    got_g = cuda_impl(bilinear.bilinear_scan_bwd)(*bargs)
    for rr, o, what in zip(ref_g, got_g, ("db", "dA0", "dN", "dv", "dh0"), strict=True):
        same(o, rr, dtype, what)


def test_bilinear_many_chunks(emu, monkeypatch):
    """dA0 / dN summed over several (batch, time) chunks, in chunk order."""
    monkeypatch.setattr(bilinear, "_DMAT_CHUNK", 5)
    g = gen("bil-chunks")
    b, length, n, m = 3, 7, 4, 2
    f64 = dict(dtype=torch.float64)
    bb, h0 = torch.randn(b, length, n, generator=g, **f64), None
    A0 = torch.randn(n, n, generator=g, **f64) * 0.3
    N = torch.randn(m, n, n, generator=g, **f64) * 0.3
    v = torch.randn(b, length, m, generator=g, **f64)
    xs, _ = torch.ops.bmojo.bilinear_scan_fwd(bb, A0, N, v, h0, False)
    bargs = (bb, A0, N, v, h0, xs, torch.randn_like(xs), None)
    ref = torch.ops.bmojo.bilinear_scan_bwd(*bargs)
    got = cuda_impl(bilinear.bilinear_scan_bwd)(*bargs)
    for rr, o, what in zip(ref, got, ("db", "dA0", "dN", "dv", "dh0"), strict=True):
        same(o, rr, torch.float64, what)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("n", [1, 4, 33])
def test_bilinear_per_step(emu, dtype, n):
    g = gen("biltv", dtype, n)
    b, length = 2, 7
    bb = torch.randn(b, length, n, generator=g, dtype=dtype)
    A = torch.randn(b, length, n, n, generator=g, dtype=dtype) * (0.5 / n**0.5)
    for h0 in (None, torch.randn(b, n, generator=g, dtype=dtype)):
        ref = torch.ops.bmojo.bilinear_tv_scan_fwd(bb, A, h0, False)
        got = cuda_impl(bilinear.bilinear_tv_scan_fwd)(bb, A, h0, False)
        for rr, o, what in zip(ref, got, ("xs", "last"), strict=True):
            same(o, rr, dtype, what)
        dxs = torch.randn(b, length, n, generator=g, dtype=dtype)
        bargs = (bb, A, h0, ref[0], dxs, None)
        ref_g = torch.ops.bmojo.bilinear_tv_scan_bwd(*bargs)
        got_g = cuda_impl(bilinear.bilinear_tv_scan_bwd)(*bargs)
        for rr, o, what in zip(ref_g, got_g, ("db", "dA", "dh0"), strict=True):
            same(o, rr, dtype, what)


# --------------------------------------------------------------------------------- eidetic


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("chi2", [False, True])
def test_innovation_bitwise_scalar_level(emu, restore_runtime, dtype, k, chi2):
    """Bitwise equal to the CPU's scalar level (the rule of cuda/eidetic.cu)."""
    restore_runtime.set_simd_level("scalar")
    g = gen("innov", dtype, k, chi2)
    b, length, d = 3, 9, 5
    y = torch.randn(b, length, d, generator=g, dtype=dtype)
    w = torch.rand(k, generator=g, dtype=dtype)
    w[0] = 0.0  # a zero partial sum of the warm-up taps
    hist = torch.randn(b, k, d, generator=g, dtype=dtype)
    count = torch.tensor([0, 2, 7], dtype=torch.int64)
    ema = torch.tensor([[0.0, 0.0], [0.5, 0.3], [1.5, 0.9]], dtype=dtype)
    args = (y, w, hist, count, ema, chi2, 1.0 / 16.0, 1e-6)
    ref = torch.ops.bmojo.innovation_scores(*args)
    got = cuda_impl(eidetic.innovation_scores_op)(*args)
    for rr, o in zip(ref, got, strict=True):
        assert torch.equal(o, rr)


def _scores(g, b, length, ties):
    s = torch.rand(b, length, generator=g, dtype=torch.float64)
    if ties:
        s = (s * 4).floor()  # many equal scores: the position breaks ties
    return s


@pytest.mark.parametrize("policy", eidetic.POLICIES)
@pytest.mark.parametrize("ties", [False, True])
def test_store_bitwise(emu, policy, ties):
    g = gen("store", policy, ties)
    b, m, length, chunk, tau = 3, 4, 23, 5, 1.0 if ties else 0.4
    scores = _scores(g, b, length, ties)
    pos0 = torch.full((b, m), -1, dtype=torch.int64)
    sc0 = torch.zeros(b, m, dtype=torch.float64)
    start = torch.zeros(b, dtype=torch.int64)
    args = (scores, pos0, sc0, start, chunk, policy, tau)
    ref = torch.ops.bmojo.eidetic_select(*args)
    got = cuda_impl(eidetic.eidetic_select_op)(*args)
    for rr, o in zip(ref, got, strict=True):
        assert torch.equal(o, rr)
    # Continue from the built store in pieces with the streaming push: same store.
    pos, sc, cnt = (t.clone() for t in ref[1:])
    pos_c, sc_c, cnt_c = pos.clone(), sc.clone(), cnt.clone()
    more = _scores(g, b, 9, ties)
    for piece in (more[:, :4], more[:, 4:]):
        torch.ops.bmojo.eidetic_push(pos, sc, cnt, piece.contiguous(), policy, tau)
        cuda_impl(eidetic.eidetic_push_op)(pos_c, sc_c, cnt_c, piece.contiguous(), policy, tau)
        assert torch.equal(pos_c, pos) and torch.equal(sc_c, sc) and torch.equal(cnt_c, cnt)


def test_store_errors_write_nothing(emu):
    b = 2
    pos = torch.tensor([[0, 1, -1], [2, 0, 1]], dtype=torch.int64)
    sc = torch.tensor([[0.1, 0.5, 0.0], [0.2, 0.3, 0.4]], dtype=torch.float64)
    cnt = torch.tensor([2, 3], dtype=torch.int64)
    push = cuda_impl(eidetic.eidetic_push_op)
    before = (pos.clone(), sc.clone(), cnt.clone())
    bad = torch.tensor([[0.3], [float("nan")]], dtype=torch.float64)
    with pytest.raises(BmojoValueError, match="NaN"):
        push(pos, sc, cnt, bad, "topk", 0.0)
    broken = pos.clone()
    broken[1] = torch.tensor([2, 2, 1])
    with pytest.raises(BmojoValueError, match="row 1"):
        push(broken, sc, cnt, torch.zeros(b, 1, dtype=torch.float64), "topk", 0.0)
    assert all(torch.equal(x, y) for x, y in zip((pos, sc, cnt), before, strict=True))
    with pytest.raises(BmojoValueError, match="row 1"):
        cuda_impl(eidetic.eidetic_select_op)(
            torch.zeros(b, 4, dtype=torch.float64), broken, sc, cnt, 2, "fifo", 0.0
        )


def test_empty_sequences(emu):
    """L = 0 (and K = 1 / empty batch) edge cases: the same outputs as the CPU ops."""
    f64 = dict(dtype=torch.float64)
    x, w, bias = torch.zeros(2, 3, 0, **f64), torch.ones(3, 3, **f64), None
    h0 = torch.randn(2, 3, 2, **f64)
    for args, op in (
        ((x, w, bias, None, h0, True), conv.causal_conv1d_fwd),
        ((x, w, bias, None, h0, x, torch.randn(2, 3, 2, **f64), True), conv.causal_conv1d_bwd),
        ((torch.zeros(0, 3, 5, **f64), w, torch.ones(3, **f64), None, None, False),
         conv.causal_conv1d_fwd),
        ((torch.zeros(2, 3, 0, **f64), torch.rand(3, 2, **f64), None, None, None,
          torch.randn(2, 3, 2, **f64)), companion.companion_scan_fwd),
        ((torch.zeros(0, 3, 4, **f64), torch.rand(3, 2, **f64), torch.rand(3, **f64), None,
          torch.rand(3, **f64), None), companion.companion_scan_fwd),
        ((torch.zeros(2, 0, 3, **f64), torch.rand(3, 3, **f64), torch.zeros(0, 3, 3, **f64),
          torch.zeros(2, 0, 0, **f64), torch.randn(2, 3, **f64), False),
         bilinear.bilinear_scan_fwd),
        ((torch.zeros(2, 0, 4, **f64), torch.full((2,), 0.5, **f64), torch.randn(2, 2, 4, **f64),
          torch.tensor([0, 3]), torch.rand(2, 2, **f64), True, 0.0625, 1e-6),
         eidetic.innovation_scores_op),
        ((torch.zeros(2, 0, **f64), torch.full((2, 3), -1), torch.zeros(2, 3, **f64),
          torch.tensor([4, 0]), 3, "topk", 0.0), eidetic.eidetic_select_op),
    ):  # fmt: skip
        ref = getattr(torch.ops.bmojo, op._name.split("::")[-1])(*args)
        got = cuda_impl(op)(*args)
        for r, o in zip(ref, got, strict=True):
            assert o.shape == r.shape and torch.equal(o, r), op._name
    # Companion backward with L = 0: the final state's gradient is the initial state's.
    u, a = torch.zeros(2, 3, 0, **f64), torch.rand(3, 2, **f64)
    dl = torch.randn(2, 3, 2, **f64)
    bargs = (u, a, None, None, torch.rand(3, **f64), torch.randn(2, 3, 2, **f64), u, u, dl)
    ref = torch.ops.bmojo.companion_scan_bwd(*bargs)
    got = cuda_impl(companion.companion_scan_bwd)(*bargs)
    for r, o in zip(ref, got, strict=True):
        assert o.shape == r.shape and torch.equal(o, r)


def test_size_limits_of_the_kernels(emu):
    """Orders / state sizes the kernels cannot hold raise before any launch."""
    u = torch.zeros(1, 2, 3, dtype=torch.float64)
    with pytest.raises(BmojoValueError, match="order"):
        cuda_impl(companion.companion_scan_fwd)(u, torch.zeros(2, 65, dtype=torch.float64),
                                                None, None, None, None)  # fmt: skip
    b = torch.zeros(1, 3, 65, dtype=torch.float64)
    with pytest.raises(BmojoValueError, match="state size"):
        cuda_impl(bilinear.bilinear_tv_scan_fwd)(b, torch.zeros(1, 3, 65, 65), None, False)


def test_every_declared_kernel_has_its_entry_points(emu):
    """Each kernel the op modules declare exists in its source for every declared dtype
    (the emulated build's entry points; the GPU build is the NVRTC compile test)."""
    emulator = H.Emulator()
    kernels = _cuda.declared()
    assert len(kernels) >= 23
    for src in {k.source for k in kernels}:
        sigs = emulator.signatures(src)
        for k in (k for k in kernels if k.source == src):
            for sfx in k.dtypes:
                assert k.symbol(sfx) in sigs, f"{src}: no {k.symbol(sfx)}"


def test_simd_levels_known():
    assert "scalar" in bmojo_core.simd_levels()


# ------------------------------------------------------------------------------------- ssd


def _ssd_seq(b, length, cuts):
    """seq_idx (b, L) changing at the positions `cuts` (row r shifted by r)."""
    seq = torch.zeros(b, length, dtype=torch.int64)
    for r in range(b):
        for c in cuts:
            if 0 < c + r < length:
                seq[r, c + r :] += 1
    return seq


def _ssd_args(g, b, length, h, p, grp, n, dtype, *, opts, d_hp=False, cuts=None):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x, dt = r(b, length, h, p), r(b, length, h, scale=0.5)
    A = (-torch.rand(h, generator=g, dtype=torch.float64) - 0.2).to(dtype)
    B, C = r(b, length, grp, n), r(b, length, grp, n)
    D = (r(h, p) if d_hp else r(h)) if opts else None
    z = r(b, length, h, p) if opts else None
    bias = r(h, scale=0.1) if opts else None
    h0 = r(b, h, p, n) if opts else None
    seq = None if cuts is None else _ssd_seq(b, length, cuts)
    return x, dt, A, B, C, D, z, bias, h0, seq


SSD_GRADS = ("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinitial_states")


def _ssd_check(g, args, dtype, softplus, limit, dlast):
    """The CUDA implementations against the CPU ops: forward outputs, final state,
    checkpoints and every gradient (relative to the reference's scale)."""
    lim = (True, *limit) if limit else (False, 0.0, float("inf"))
    fargs = (*args, softplus, *lim)
    want = torch.ops.bmojo.ssd_fwd(*fargs)
    got = cuda_impl(ssd.ssd_fwd)(*fargs)
    for w, o, what in zip(want, got, ("out", "last_state", "checkpoints"), strict=True):
        _ssd_close(o, w, dtype, what)
    x, dt, A, B, C, D, z, bias, _, seq = args
    dout = torch.randn(want[0].shape, generator=g, dtype=dtype)
    dl = torch.randn(want[1].shape, generator=g, dtype=dtype) if dlast else None
    bargs = (x, dt, A, B, C, D, z, bias, seq, softplus, *lim, want[2], dout, dl)
    want = torch.ops.bmojo.ssd_bwd(*bargs)
    got = cuda_impl(ssd.ssd_bwd)(*bargs)
    for w, o, what in zip(want, got, SSD_GRADS, strict=True):
        _ssd_close(o, w, dtype, what)


def _ssd_close(got, want, dtype, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if want.numel() == 0:
        return
    scale = want.abs().max().item() + 1.0
    err = (got - want).abs().max().item() / scale
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert err <= tol, f"{what}: max error {err:.3g} (relative to {scale:.3g})"


SSD_CASES = [
    # batch, L, heads, P, groups, N, dtype, optional inputs, D (h, p), resets, softplus,
    # dt_limit, dlast
    (1, 0, 2, 3, 1, 4, torch.float64, True, False, None, True, None, True),
    (2, 1, 2, 3, 2, 100, torch.float64, True, True, None, True, (0.05, 0.8), False),
    (1, 7, 3, 2, 1, 33, torch.float32, False, False, None, False, None, False),
    (2, 150, 4, 3, 2, 7, torch.float64, True, True, (1, 64, 100), True, (0.05, 0.8), True),
    (1, 150, 2, 5, 1, 40, torch.float32, True, False, (37,), True, None, True),
    (1, 65, 2, 2, 2, 130, torch.float64, True, False, (64,), False, (0.3, 2.0), True),
    (1, 9, 1, 1, 1, 256, torch.float64, True, True, None, True, None, True),
    (1, 20, 2, 9, 1, 64, torch.float32, True, False, (3,), True, None, True),  # 2 row blocks
]


@pytest.mark.parametrize("case", SSD_CASES, ids=str)
def test_ssd_fwd_bwd(emu, case):
    b, length, h, p, grp, n, dtype, opts, d_hp, cuts, softplus, limit, dlast = case
    g = gen("ssd", case)
    args = _ssd_args(g, b, length, h, p, grp, n, dtype, opts=opts, d_hp=d_hp, cuts=cuts)
    _ssd_check(g, args, dtype, softplus, limit, dlast)


@pytest.mark.parametrize("dtype", DT)
def test_ssd_row_blocks_and_windows(emu, monkeypatch, dtype):
    """Several row blocks per head (2 rows each, the last one partial) and the backward in
    three launches of 64 steps: the partials summed in the same fixed order."""
    monkeypatch.setattr(ssd, "_CUDA_MAXW", 2)
    monkeypatch.setattr(ssd, "_CUDA_PART_ELEMS", 1)
    g = gen("ssd-blocks", dtype)
    args = _ssd_args(g, 2, 150, 2, 5, 1, 6, dtype, opts=True, cuts=(20, 64, 130))
    _ssd_check(g, args, dtype, True, (0.05, 0.9), True)


def test_ssd_kernel_constants_match_the_op():
    """The chunk and block sizes ssd.cu is compiled with are the ones the wrapper assumes."""
    text = (H.CUDA_DIR / "ssd.cu").read_text()

    def define(name):
        return int(text.split(f"#define {name} ", 1)[1].split()[0])

    assert define("BM_SSD_CHUNK") == ssd.CHECKPOINT_CHUNK == 64
    assert define("BM_SSD_MAXW") == ssd._CUDA_MAXW
    assert define("BM_SSD_CHUNK") // define("BM_SSD_SB") == ssd._CUDA_NSUB


def test_ssd_bad_input_raises_before_launch(emu):
    f64 = dict(dtype=torch.float64)
    x, dt, A = torch.zeros(1, 3, 2, 2, **f64), torch.zeros(1, 3, 2, **f64), torch.zeros(2, **f64)
    B = torch.zeros(1, 3, 1, 257, **f64)
    fwd = cuda_impl(ssd.ssd_fwd)
    rest = (None, None, None, None, None, False, False, 0.0, 0.0)
    before = len(emu)
    with pytest.raises(BmojoValueError, match="N = 257"):
        fwd(x, dt, A, B, B, *rest)
    B = torch.zeros(1, 3, 1, 4, **f64)
    with pytest.raises(BmojoTypeError, match="dt"):
        fwd(x, dt.float(), A, B, B, *rest)
    with pytest.raises(BmojoValueError, match="groups"):
        fwd(x, dt, A, torch.zeros(1, 3, 3, 4, **f64), torch.zeros(1, 3, 3, 4, **f64), *rest)
    with pytest.raises(BmojoValueError, match="dt_limit"):
        fwd(x, dt, A, B, B, *rest[:6], True, 1.0, 0.5)
    assert len(emu) == before
