"""Property-based tests (hypothesis): algebraic identities of the scans and determinism.

Shapes, options and a seed are drawn; arrays are built from a torch.Generator seeded with
the drawn seed (so failures are reproducible from the printed example).
"""

from __future__ import annotations

import contextlib

import bmojo_core as bm
import pytest
import torch
from conftest import (
    assert_close,
    make_scan_inputs,
    make_seq_idx,
    make_step_inputs,
    with_grad,
)
from hypothesis import given
from hypothesis import strategies as st

GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@contextlib.contextmanager
def runtime(level: str | None = None, threads: int | None = None):
    """Temporarily set the SIMD level and/or the thread count."""
    old_level, old_threads = bm.simd_level(), bm.get_num_threads()
    try:
        if level is not None:
            bm.set_simd_level(level)
        if threads is not None:
            bm.set_num_threads(threads)
        yield
    finally:
        bm.set_simd_level(old_level)
        bm.set_num_threads(old_threads)


@st.composite
def scan_config(draw, max_dim=6, max_N=8, max_L=40, min_L=0):
    batch = draw(st.integers(1, 3))
    dim = draw(st.integers(1, max_dim))
    N = draw(st.integers(1, max_N))
    L = draw(st.integers(min_L, max_L))
    bc_b = draw(st.sampled_from(["const", "var", "group"]))
    bc_c = draw(st.sampled_from(["const", "var", "group"]))
    divisors = [g for g in range(1, dim + 1) if dim % g == 0]
    G = draw(st.sampled_from(divisors))
    flags = draw(st.tuples(*[st.booleans()] * 5))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        batch=batch,
        dim=dim,
        N=N,
        L=L,
        bc=f"{bc_b}/{bc_c}",
        G=G,
        D=flags[0],
        z=flags[1],
        delta_bias=flags[2],
        delta_softplus=flags[3],
        initial_state=flags[4],
        seed=seed,
    )


def build(cfg: dict, dtype=torch.float64, **over) -> dict:
    c = {**cfg, **over}
    batch, dim, N, L = c.pop("batch"), c.pop("dim"), c.pop("N"), c.pop("L")
    return make_scan_inputs(batch, dim, N, L, dtype=dtype, return_last_state=True, **c)


def slice_time(kw: dict, s: int, e: int) -> dict:
    part = dict(kw)
    for n in ("u", "delta", "z"):
        if kw.get(n) is not None:
            part[n] = kw[n][..., s:e]
    for n in ("B", "C"):
        if kw[n].dim() > 2:
            part[n] = kw[n][..., s:e]
    if kw.get("seq_idx") is not None:
        part["seq_idx"] = kw["seq_idx"][:, s:e]
    return part


def forward_backward(kw: dict, gy: torch.Tensor, gl: torch.Tensor):
    names = [n for n in GRAD_NAMES if kw.get(n) is not None]
    kw = with_grad(kw, names)
    out, last = bm.selective_scan_fn(**kw)
    loss = (out * gy).sum() + (last * gl).sum()
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, [kw[n] for n in names], allow_unused=True)
    else:  # L = 0 without an initial state: nothing depends on the inputs
        grads = [None] * len(names)
    grads = [torch.zeros_like(kw[n]) if g is None else g for n, g in zip(names, grads, strict=True)]
    return out.detach(), last.detach(), dict(zip(names, grads, strict=True))


def upstream(kw: dict, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    b, d, L = kw["u"].shape
    N = kw["A"].shape[1]
    cdt = torch.float64 if kw["u"].dtype == torch.float64 else torch.float32
    return (
        torch.randn(b, d, L, generator=gen, dtype=torch.float64).to(kw["u"].dtype),
        torch.randn(b, d, N, generator=gen, dtype=torch.float64).to(cdt),
    )


# ---------------------------------------------------------------------------------------
# algebraic identities (fp64, tight)
# ---------------------------------------------------------------------------------------


@given(cfg=scan_config(min_L=1), data=st.data())
def test_split_and_carry_state(cfg, data):
    """scan(x[:k]) then scan(x[k:], initial_state=last) == scan(x): outputs, final state,
    and gradients w.r.t. every input (including the initial state)."""
    kw = build(cfg)
    L = kw["u"].shape[-1]
    k = data.draw(st.integers(0, L), label="split")
    gy, gl = upstream(kw, cfg["seed"])
    out, last, grads = forward_backward(kw, gy, gl)

    names = [n for n in GRAD_NAMES if kw.get(n) is not None]
    leaves = with_grad(kw, names)
    p1 = slice_time(leaves, 0, k)
    o1, h1 = bm.selective_scan_fn(**p1)
    p2 = slice_time(leaves, k, L)
    p2["initial_state"] = h1
    o2, h2 = bm.selective_scan_fn(**p2)
    out_split = torch.cat([o1, o2], dim=-1)
    loss = (out_split * gy).sum() + (h2 * gl).sum()
    grads_split = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)

    assert_close(out_split, out, torch.float64, "out")
    assert_close(h2, last, torch.float64, "last")
    for n, g in zip(names, grads_split, strict=True):
        want = grads[n]
        g = torch.zeros_like(leaves[n]) if g is None else g
        want = torch.zeros_like(leaves[n]) if want is None else want
        assert_close(g, want, torch.float64, f"grad {n}")


@given(cfg=scan_config(max_L=16))
def test_steps_equal_scan(cfg):
    """L calls of selective_state_update reproduce the scan (outputs and final state)."""
    # the step takes B and C of the same form, (batch, N) or (batch, G, N)
    form = "group" if "group" in cfg["bc"] else "var"
    cfg = {**cfg, "bc": f"{form}/{form}"}
    kw = build(cfg)
    out, last = bm.selective_scan_fn(**kw)
    batch, dim, L = kw["u"].shape
    N = kw["A"].shape[1]
    state = (
        kw["initial_state"].clone()
        if kw["initial_state"] is not None
        else torch.zeros(batch, dim, N, dtype=torch.float64)
    )
    outs = []
    for t in range(L):
        outs.append(
            bm.selective_state_update(
                state,
                kw["u"][..., t],
                kw["delta"][..., t],
                kw["A"],
                kw["B"][..., t],
                kw["C"][..., t],
                D=kw["D"],
                z=None if kw["z"] is None else kw["z"][..., t],
                dt_bias=kw["delta_bias"],
                dt_softplus=kw["delta_softplus"],
            )
        )
    steps = torch.stack(outs, -1) if outs else torch.zeros(batch, dim, 0, dtype=torch.float64)
    assert_close(steps, out, torch.float64, "outputs")
    assert_close(state, last, torch.float64, "state")


@given(cfg=scan_config(max_L=30, min_L=1), n_seqs=st.integers(1, 5))
def test_packed_equals_per_sequence(cfg, n_seqs):
    kw = build(cfg)
    batch, _, L = kw["u"].shape
    kw["seq_idx"] = make_seq_idx(batch, L, n_seqs, torch.Generator().manual_seed(cfg["seed"]))
    out, last = bm.selective_scan_fn(**kw)
    for b in range(batch):
        ids = kw["seq_idx"][b].tolist()
        starts = [0] + [t for t in range(1, L) if ids[t] != ids[t - 1]] + [L]
        for j in range(len(starts) - 1):
            s, e = starts[j], starts[j + 1]
            part = slice_time(kw, s, e)
            for n in ("u", "delta", "z", "B", "C", "initial_state"):
                if part.get(n) is not None and (n != "B" and n != "C" or part[n].dim() > 2):
                    part[n] = part[n][b : b + 1]
            part["seq_idx"] = None
            if j > 0:
                part["initial_state"] = None
            o, h = bm.selective_scan_fn(**part)
            assert_close(out[b : b + 1, :, s:e], o, torch.float64, f"seq {b}/{j}")
            if e == L:
                assert_close(last[b : b + 1], h, torch.float64, "last")


# ---------------------------------------------------------------------------------------
# determinism across thread counts, agreement across SIMD levels
# ---------------------------------------------------------------------------------------


def _all_outputs(kw: dict, seed: int, T: int = 3, P: int | None = None):
    """Scan forward + backward, diag scan forward + backward (reverse too), and a
    multi-token state update with a state pool and padding rows, all on inputs derived from
    ``kw``. The diag scan and the step get N times more lanes than the scan has channels,
    so that their work is large enough for the thread pool to split it."""
    gy, gl = upstream(kw, seed)
    out, last, grads = forward_backward(kw, gy, gl)
    res = {"out": out, "last": last, **{f"d{n}": g for n, g in grads.items()}}
    gen = torch.Generator().manual_seed(seed)
    dt = kw["u"].dtype
    batch, dim, L = kw["u"].shape
    N = kw["A"].shape[1]
    lanes = (batch, dim, N)
    for rev in (False, True):
        a = torch.rand((*lanes, L), generator=gen, dtype=torch.float64).to(dt).requires_grad_()
        b = torch.randn((*lanes, L), generator=gen, dtype=torch.float64).to(dt).requires_grad_()
        h0 = torch.randn(lanes, generator=gen, dtype=torch.float64).to(dt).requires_grad_()
        h, hl = bm.diag_scan(a, b, h0, reverse=rev, return_last_state=True)
        ga, gb, gh0 = torch.autograd.grad(h.sum() + (hl * hl).sum(), [a, b, h0], allow_unused=True)
        ga = torch.zeros_like(a) if ga is None else ga
        gb = torch.zeros_like(b) if gb is None else gb
        res.update(
            {
                f"diag{rev}_h": h.detach(),
                f"diag{rev}_last": hl.detach(),
                f"diag{rev}_da": ga,
                f"diag{rev}_db": gb,
                f"diag{rev}_dh0": gh0,
            }
        )
    rows = 2 * batch + 1
    P = min(N, 4) if P is None else P
    step = make_step_inputs(
        rows, heads=True, H=dim, P=P, N=N, T=T, G=1, slots=rows + 2, seed=seed, dtype=dt
    )
    sbi = torch.randperm(rows + 2, generator=gen)[:rows]
    sbi[::3] = -1  # padding rows
    state = step["state"].clone()
    inter = torch.zeros(rows, T, dim, P, N, dtype=dt)
    res["step_out"] = bm.selective_state_update(
        **{**step, "state": state}, state_batch_indices=sbi, intermediate_states=inter
    )
    res["step_state"] = state
    res["step_inter"] = inter
    return res


@st.composite
def big_config(draw, max_dim=64, max_N=32, max_L=300):
    cfg = draw(scan_config(max_dim=max_dim, max_N=max_N, max_L=max_L))
    cfg["batch"] = draw(st.integers(1, 4))
    cfg["seq_idx"] = draw(st.integers(0, 4))
    return cfg


def _assert_bitwise(r1: dict, r2: dict, what: str):
    assert r1.keys() == r2.keys()
    for k in r1:
        assert torch.equal(r1[k], r2[k]), f"{k} differs between {what}"


LARGE = [
    # batch, dim, N, L, bc, G, seq_idx
    (3, 48, 16, 200, "var", 1, 0),
    (2, 33, 24, 257, "group", 3, 3),
    (4, 64, 8, 130, "const/var", 1, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_threads_bitwise_identical_large(shape, dtype):
    """Shapes whose work is well above the pool's parallel threshold."""
    batch, dim, N, L, bc, G, seq = shape
    kw = make_scan_inputs(
        batch,
        dim,
        N,
        L,
        bc=bc,
        G=G,
        dtype=dtype,
        seed=L,
        initial_state=True,
        seq_idx=seq,
        return_last_state=True,
    )
    with runtime(threads=1):
        r1 = _all_outputs(kw, L, T=4, P=N)
    with runtime(threads=2):
        r2 = _all_outputs(kw, L, T=4, P=N)
    _assert_bitwise(r1, r2, "1 and 2 threads")
    with runtime(threads=3):
        r3 = _all_outputs(kw, L, T=4, P=N)
    _assert_bitwise(r1, r3, "1 and 3 threads")


@pytest.mark.parametrize("shape", LARGE[:2], ids=str)
def test_simd_levels_agree_with_scalar_large(shape):
    batch, dim, N, L, bc, G, seq = shape
    kw = make_scan_inputs(
        batch,
        dim,
        N,
        L,
        bc=bc,
        G=G,
        dtype=torch.float32,
        seed=L,
        initial_state=True,
        seq_idx=seq,
        return_last_state=True,
    )
    with runtime(level="scalar"):
        want = _all_outputs(kw, L)
    for level in bm.simd_levels():
        with runtime(level=level, threads=2):
            got = _all_outputs(kw, L)
        _assert_close_scaled(got, want, level)


def _assert_close_scaled(got: dict, want: dict, level: str):
    for k in want:
        a, b = got[k], want[k]
        # gradients of A/D/delta_bias/const B,C are sums over batch and time: compare
        # relative to their scale
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        assert_close(a / scale, b / scale, torch.float32, f"{level} {k}")


@given(cfg=big_config(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_threads_bitwise_identical(cfg, dtype):
    kw = build(cfg, dtype=dtype)
    with runtime(threads=1):
        r1 = _all_outputs(kw, cfg["seed"])
    with runtime(threads=2):
        r2 = _all_outputs(kw, cfg["seed"])
    _assert_bitwise(r1, r2, "1 and 2 threads")


@given(cfg=big_config(max_dim=32, max_N=16, max_L=150))
def test_simd_levels_agree_with_scalar(cfg):
    kw = build(cfg, dtype=torch.float32)
    with runtime(level="scalar"):
        want = _all_outputs(kw, cfg["seed"])
    for level in bm.simd_levels():
        if level == "scalar":
            continue
        with runtime(level=level):
            assert bm.simd_level() == level
            got = _all_outputs(kw, cfg["seed"])
        _assert_close_scaled(got, want, level)
