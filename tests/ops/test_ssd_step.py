"""Mamba-2's decoding step (ssd_state_update, design §2.4): one step == the SSD scan of one
token from the same state (fp64 oracle), steps == the parallel scan, the tied layout
transformers passes to selective_state_update (A expanded to (h, p, n), dt/D/dt_bias over
p, zero strides) takes the per-head kernel without copying and matches the general step,
threads bitwise, bad input named with the state left as it was."""

from __future__ import annotations

import bmojo_core as bm
import pytest
import torch
from bmojo_core.ops import ssd as ssd_mod
from bmojo_core.ops.reference import ssd_scan


def make(b=2, h=4, p=5, g=2, n=19, *, seed=0, dtype=torch.float64, d_hp=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    return dict(state=r(b, h, p, n), x=r(b, h, p), dt=r(b, h) * 0.5,
                A=(-torch.rand(h, generator=gen, dtype=torch.float64) - 0.2).to(dtype),
                B=r(b, g, n), C=r(b, g, n), D=r(h, p) if d_hp else r(h), z=r(b, h, p),
                dt_bias=r(h) * 0.1)  # fmt: skip


@pytest.mark.parametrize("d_hp", [False, True])
@pytest.mark.parametrize("opts", [True, False])
def test_one_step_matches_the_scan_of_one_token(d_hp, opts):
    kw = make(d_hp=d_hp)
    if not opts:
        kw.update(D=None, z=None, dt_bias=None)
    state0 = kw["state"].clone()
    out = bm.ops.ssd_state_update(**kw, dt_softplus=opts)
    want, want_state = ssd_scan(
        kw["x"][:, None], kw["dt"][:, None], kw["A"], kw["B"][:, None], kw["C"][:, None],
        D=kw["D"], z=None if kw["z"] is None else kw["z"][:, None], dt_bias=kw["dt_bias"],
        initial_states=state0, dt_softplus=opts, return_final_states=True,
    )  # fmt: skip
    torch.testing.assert_close(out, want[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kw["state"], want_state, rtol=1e-12, atol=1e-12)


def test_steps_equal_the_parallel_scan():
    gen = torch.Generator().manual_seed(3)
    b, L, h, p, g, n = 2, 9, 3, 4, 1, 33
    x, z = torch.randn(b, L, h, p, generator=gen), torch.randn(b, L, h, p, generator=gen)
    dt = torch.randn(b, L, h, generator=gen)
    B, C = torch.randn(b, L, g, n, generator=gen), torch.randn(b, L, g, n, generator=gen)
    A, D, bias = -torch.rand(h, generator=gen) - 0.1, torch.randn(h), torch.randn(h) * 0.1
    out, last = bm.mamba_chunk_scan_combined(
        x, dt, A, B, C, 4, D=D, z=z, dt_bias=bias, dt_softplus=True, return_final_states=True
    )
    state = torch.zeros(b, h, p, n)
    for t in range(L):
        y = bm.ops.ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t],
                                    bias, True)  # fmt: skip
        torch.testing.assert_close(y, out[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def _tied(kw):
    """The tensors as transformers' Mamba2Mixer passes them to selective_state_update."""
    b, h, p, n = kw["state"].shape
    return dict(
        x=kw["x"], dt=kw["dt"][:, :, None].expand(-1, -1, p),
        A=kw["A"][:, None, None].expand(-1, p, n), B=kw["B"], C=kw["C"],
        D=kw["D"][:, None].expand(-1, p), z=kw["z"],
        dt_bias=kw["dt_bias"][:, None].expand(-1, p), dt_softplus=True,
    )  # fmt: skip


def test_tied_layout_takes_the_per_head_kernel_without_copies(monkeypatch):
    kw = make(dtype=torch.float32)
    tied = _tied(kw)
    assert tied["A"].stride() == (1, 0, 0)
    general = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in tied.items()}
    s_general = kw["state"].clone()
    want = bm.selective_state_update(s_general, **general)  # the (h, p, n) general kernel
    seen = []
    real = ssd_mod._state_update_fast

    def spy(state, x, dt, A, *rest):
        seen.append(A.data_ptr() == tied["A"].data_ptr() and A.shape == (A.shape[0],))
        return real(state, x, dt, A, *rest)

    monkeypatch.setattr(ssd_mod, "_state_update_fast", spy)
    s_tied = kw["state"].clone()
    got = bm.selective_state_update(s_tied, **tied)
    assert seen == [True]  # one per-head call, on a view of A (no copy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_tied, s_general, rtol=1e-5, atol=1e-5)


def test_other_layouts_keep_the_general_step():
    kw = make(dtype=torch.float32)
    tied = _tied(kw)
    tied["A"] = tied["A"].contiguous()  # A that varies over (p, n) is not per head
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    assert ssd_mod.tied_head_update(kw["state"], *(tied[k] for k in names), True) is None


def test_threads_bitwise(restore_runtime):
    kw = make(b=3, h=8, p=64, g=2, n=128, dtype=torch.float32)
    outs = []
    for threads in (1, 2, 3):
        bm.set_num_threads(threads)
        k = {**kw, "state": kw["state"].clone()}
        outs.append((bm.ops.ssd_state_update(**k, dt_softplus=True), k["state"]))
    for o, s in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(s, outs[0][1])


def test_every_simd_level(restore_runtime):
    kw = make(b=2, h=3, p=21, g=1, n=37, dtype=torch.float32)
    bm.set_simd_level("scalar")
    k = {**kw, "state": kw["state"].clone()}
    want = bm.ops.ssd_state_update(**k, dt_softplus=True)
    for level in bm.simd_levels():
        bm.set_simd_level(level)
        k2 = {**kw, "state": kw["state"].clone()}
        got = bm.ops.ssd_state_update(**k2, dt_softplus=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=level)
        torch.testing.assert_close(k2["state"], k["state"], rtol=1e-5, atol=1e-5, msg=level)


BAD = [
    ("x", lambda k: k.update(x=k["x"][:, :, :-1]), "x"),
    ("dt", lambda k: k.update(dt=k["dt"][:, :-1]), "dt"),
    ("A", lambda k: k.update(A=k["A"][:-1]), "A"),
    ("B", lambda k: k.update(B=k["B"][..., :-1]), "B"),
    ("C", lambda k: k.update(C=k["C"][:, :1]), "C"),
    ("D", lambda k: k.update(D=torch.zeros(3, 3, dtype=torch.float64)), "D"),
    ("z", lambda k: k.update(z=k["z"][:1]), "z"),
    ("dt_bias", lambda k: k.update(dt_bias=k["dt_bias"][:2]), "dt_bias"),
    ("state", lambda k: k.update(state=k["state"][..., :-1].contiguous()), "state"),
    ("state dtype", lambda k: k.update(state=k["state"].half()), "state"),
    (
        "groups",
        lambda k: k.update(B=k["B"][:, :1].expand(-1, 3, -1), C=k["C"][:, :1].expand(-1, 3, -1)),
        "B",
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_input_names_the_argument_and_leaves_the_state(case):
    _, edit, name = case
    kw = make()
    edit(kw)
    before = kw["state"].clone()
    with pytest.raises(bm.BmojoError, match=name):
        bm.ops.ssd_state_update(**kw, dt_softplus=True)
    assert torch.equal(kw["state"], before)
