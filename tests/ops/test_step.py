"""selective_state_update (streaming step) against the reference and the scan."""

from __future__ import annotations

import bmojo_core as bm
import pytest
import torch
from bmojo_core import reference as ref
from conftest import assert_close, kwargs64, make_scan_inputs, make_step_inputs


def run_both(kw: dict, dtype: torch.dtype, msg: str = "", **extra):
    """Run library and reference on copies of the state; compare outputs and states."""
    state = kw["state"].clone()
    out = bm.selective_state_update(**{**kw, "state": state}, **extra)
    kw64 = kwargs64(kw)
    state_ref = kw64["state"].clone()
    extra64 = {
        k: (
            v.detach().to(torch.float64).clone()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
        )
        for k, v in extra.items()
    }
    out_ref = ref.selective_state_update(**{**kw64, "state": state_ref}, **extra64)
    assert out.shape == kw["x"].shape and out.dtype == kw["x"].dtype, msg
    assert_close(out, out_ref, dtype, msg + " out")
    assert_close(state, state_ref, dtype, msg + " state")
    return out, state, extra, extra64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("G", [None, 1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("opts", [False, True], ids=["plain", "opts"])
@pytest.mark.parametrize("dim,N", [(1, 1), (4, 3), (17, 16), (6, 128)])
def test_single_token_channels(dim, N, opts, G, dtype):
    if G == 2 and dim % 2:
        G = 1
    kw = make_step_inputs(
        3,
        dim=dim,
        N=N,
        G=G,
        dtype=dtype,
        seed=dim * 31 + N,
        D=opts,
        z=opts,
        dt_bias=opts,
        dt_softplus=opts,
    )
    run_both(kw, dtype, f"dim{dim} N{N}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("G", [None, 1, 2, 4], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("opts", [False, True], ids=["plain", "opts"])
@pytest.mark.parametrize("H,P,N", [(1, 1, 1), (4, 3, 8), (4, 16, 16), (8, 5, 64)])
def test_single_token_heads(H, P, N, opts, G, dtype):
    kw = make_step_inputs(
        2,
        heads=True,
        H=H,
        P=P,
        N=N,
        G=G if (G or 1) <= H else H,
        dtype=dtype,
        seed=H * 100 + P * 10 + N,
        D=opts,
        z=opts,
        dt_bias=opts,
        dt_softplus=opts,
    )
    run_both(kw, dtype, f"H{H} P{P} N{N}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("G", [None, 2], ids=lambda g: f"G{g}")
def test_multi_token(T, heads, G, dtype):
    kw = make_step_inputs(
        3, heads=heads, dim=6, H=4, P=3, N=5, T=T, G=G, dtype=dtype, seed=T * 7 + heads
    )
    run_both(kw, dtype, f"T{T}")


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("T", [None, 3])
def test_state_batch_indices_pool_and_padding(heads, T):
    kw = make_step_inputs(5, heads=heads, dim=6, H=2, P=3, N=4, T=T, G=2, slots=9, seed=3)
    sbi = torch.tensor([7, -1, 0, 4, -1], dtype=torch.int32)
    out, state, _, _ = run_both(kw, torch.float64, "pool", state_batch_indices=sbi)
    for i in (1, 4):  # padding rows: zero output
        assert torch.equal(out[i], torch.zeros_like(out[i]))
    for s in (1, 2, 3, 5, 6, 8):  # slots not referenced: bitwise untouched
        assert torch.equal(state[s], kw["state"][s])


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_state_batch_indices_permutation(idx_dtype):
    """Rows mapped to a permutation of the slots equal the direct, permuted update."""
    kw = make_step_inputs(4, dim=5, N=3, seed=4)
    perm = torch.tensor([2, 0, 3, 1], dtype=idx_dtype)
    state = kw["state"].clone()
    out = bm.selective_state_update(**{**kw, "state": state}, state_batch_indices=perm)
    direct_state = kw["state"][perm.long()].clone()
    out_direct = bm.selective_state_update(**{**kw, "state": direct_state})
    assert torch.equal(out, out_direct)
    assert torch.equal(state[perm.long()], direct_state)


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_intermediate_states(heads, padding):
    T = 4
    kw = make_step_inputs(3, heads=heads, dim=6, H=2, P=3, N=4, T=T, G=2, slots=5, seed=5)
    sbi = torch.tensor([3, -1 if padding else 1, 0])
    fill = 77.0
    inter = torch.full((3, T, *kw["state"].shape[1:]), fill, dtype=torch.float64)
    out, state, extra, extra64 = run_both(
        kw, torch.float64, "inter", state_batch_indices=sbi, intermediate_states=inter
    )
    inter_lib, inter_ref = extra["intermediate_states"], extra64["intermediate_states"]
    rows = [0, 2] if padding else [0, 1, 2]
    for i in rows:
        assert_close(inter_lib[i], inter_ref[i], torch.float64, f"inter row {i}")
        # the last snapshot is the final state of the slot
        assert torch.equal(inter_lib[i, -1], state[sbi[i]])
    if padding:
        assert (inter_lib[1] == fill).all()


def test_intermediate_states_fp32():
    kw = make_step_inputs(2, heads=True, H=4, P=4, N=8, T=3, dtype=torch.float32, seed=6)
    inter = torch.zeros(2, 3, 4, 4, 8)
    _, _, extra, extra64 = run_both(kw, torch.float32, "inter32", intermediate_states=inter)
    assert_close(extra["intermediate_states"], extra64["intermediate_states"], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bc", ["var", "group"])
@pytest.mark.parametrize("opts", [False, True])
def test_steps_equal_selective_scan(bc, opts, dtype):
    """L single-token calls reproduce selective_scan_fn (outputs and final state)."""
    batch, dim, N, L = 2, 6, 4, 24
    kw = make_scan_inputs(
        batch,
        dim,
        N,
        L,
        bc=bc,
        G=3,
        dtype=dtype,
        seed=17,
        D=opts,
        z=opts,
        delta_bias=opts,
        delta_softplus=opts,
        initial_state=True,
        return_last_state=True,
    )
    out_scan, last = bm.selective_scan_fn(**kw)
    state = kw["initial_state"].clone().to(dtype)
    outs = []
    for t in range(L):
        outs.append(
            bm.selective_state_update(
                state,
                kw["u"][:, :, t],
                kw["delta"][:, :, t],
                kw["A"],
                kw["B"][..., t],
                kw["C"][..., t],
                D=kw["D"],
                z=None if kw["z"] is None else kw["z"][:, :, t],
                dt_bias=kw["delta_bias"],
                dt_softplus=kw["delta_softplus"],
            )
        )
    out_steps = torch.stack(outs, dim=-1)
    tol_dtype = dtype
    assert_close(out_steps, out_scan.to(torch.float64), tol_dtype, "outputs")
    assert_close(state, last.to(torch.float64), tol_dtype, "state")
    # and one multi-token call
    state2 = kw["initial_state"].clone().to(dtype)
    out_multi = bm.selective_state_update(
        state2,
        kw["u"].transpose(1, 2),
        kw["delta"].transpose(1, 2),
        kw["A"],
        kw["B"].movedim(-1, 1),
        kw["C"].movedim(-1, 1),
        D=kw["D"],
        z=None if kw["z"] is None else kw["z"].transpose(1, 2),
        dt_bias=kw["delta_bias"],
        dt_softplus=kw["delta_softplus"],
    )
    assert_close(out_multi.transpose(1, 2), out_scan.to(torch.float64), tol_dtype, "multi")
    assert_close(state2, last.to(torch.float64), tol_dtype, "multi state")


def test_heads_layout_equals_channel_layout():
    """(S, H, P, N) with per-(h, p) parameters is the channel layout with dim = H * P and
    B/C groups repeated per head."""
    H, P, N, batch = 3, 2, 4, 2
    kw = make_step_inputs(batch, heads=True, H=H, P=P, N=N, G=None, seed=9)
    s1 = kw["state"].clone()
    out_h = bm.selective_state_update(**{**kw, "state": s1})
    flat = {k: v for k, v in kw.items()}
    flat["state"] = kw["state"].reshape(batch, H * P, N).clone()
    for n in ("x", "dt", "z"):
        flat[n] = kw[n].reshape(batch, H * P)
    for n in ("A",):
        flat[n] = kw[n].reshape(H * P, N)
    for n in ("D", "dt_bias"):
        flat[n] = kw[n].reshape(H * P)
    out_c = bm.selective_state_update(**flat)
    torch.testing.assert_close(out_h.reshape(batch, H * P), out_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1.reshape(batch, H * P, N), flat["state"], rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_fp32_state():
    kw = make_step_inputs(2, heads=True, H=2, P=4, N=8, seed=10, dtype=torch.float32)
    for n in ("x", "dt", "B", "C", "z"):
        kw[n] = kw[n].to(torch.bfloat16)
    state = kw["state"].clone()
    out = bm.selective_state_update(**{**kw, "state": state})
    assert out.dtype == torch.bfloat16
    kw64 = kwargs64(kw)
    out_ref = ref.selective_state_update(**kw64)
    assert_close(out, out_ref, torch.bfloat16)
    assert_close(state, kw64["state"], torch.float32)


def test_no_grad_needed_and_returns_new_tensor():
    kw = make_step_inputs(2, dim=3, N=2, seed=11)
    state = kw["state"].clone()
    ptr = state.data_ptr()
    out = bm.selective_state_update(**{**kw, "state": state})
    assert state.data_ptr() == ptr  # updated in place
    assert out.data_ptr() != kw["x"].data_ptr()
    assert not torch.equal(state, kw["state"])


def test_torch_compile_in_place():
    """Under torch.compile the step goes through the registered op; same results."""
    kw = make_step_inputs(
        3, heads=True, H=2, P=3, N=4, T=2, G=2, slots=5, seed=12, dtype=torch.float32
    )
    sbi = torch.tensor([4, -1, 0])
    s_eager, s_comp = kw["state"].clone(), kw["state"].clone()
    out_eager = bm.selective_state_update(**{**kw, "state": s_eager}, state_batch_indices=sbi)

    def f(state, x, dt, B, C):
        return bm.selective_state_update(
            state, x, dt, kw["A"], B, C, kw["D"], kw["z"], kw["dt_bias"], True, sbi
        )

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_comp = cf(s_comp, kw["x"], kw["dt"], kw["B"], kw["C"])
    torch.testing.assert_close(out_comp, out_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_comp, s_eager, rtol=1e-6, atol=1e-6)
