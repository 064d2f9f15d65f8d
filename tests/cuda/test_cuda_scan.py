"""CUDA kernels of the diagonal scan, the selective scan and the streaming step
(cuda/scan.cu, cuda/step.cu): parity with the CPU ops and the fp64 references in every
dtype and option, gradients, streaming == scan, chunked == whole, determinism, CUDA-graph
capture and replay, opcheck on CUDA tensors, device errors.

Skipped without a CUDA device. References run on the CPU (fp64), CUDA results are
compared at the tolerances of design §1 (gradients relative to their scale, as in
test_selective_scan.py).
"""

from __future__ import annotations

import bmojo_core as bm
import pytest
import torch
from bmojo_core import reference as ref
from conftest import (
    TOL,
    assert_close,
    kwargs64,
    make_scan_inputs,
    make_step_inputs,
    stable_seed,
    with_grad,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DEV = "cuda"
GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def cuda_kw(kw: dict) -> dict:
    return {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def cpu(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def grad_close(g: torch.Tensor, gr: torch.Tensor, dtype: torch.dtype, msg: str) -> None:
    """Gradients are sums over batch and time: compare relative to their scale."""
    assert g.shape == gr.shape, msg
    scale = gr.abs().max().item() + 1.0
    torch.testing.assert_close(
        cpu(g).double() / scale, gr.double() / scale, **TOL[dtype], msg=lambda m: f"{msg}: {m}"
    )


def run_scan(kw: dict, names, seed: int = 1):
    """Forward (out, last) and the gradients of a random projection of both."""
    kw_g = with_grad(kw, [n for n in names if kw.get(n) is not None])
    out, last = bm.selective_scan_fn(**{**kw_g, "return_last_state": True})
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    gl = torch.randn(last.shape, generator=gen, dtype=torch.float64)
    loss = (out.double() * gy.to(out.device)).sum() + (last.double() * gl.to(out.device)).sum()
    present = [n for n in names if kw_g.get(n) is not None]
    grads = torch.autograd.grad(loss, [kw_g[n] for n in present])
    return out, last, dict(zip(present, grads, strict=True))


def check_scan(kw_cpu: dict, dtype: torch.dtype, msg: str, grads: bool = True) -> None:
    """CUDA forward and backward vs the fp64 reference on the same values."""
    out, last, g = run_scan(cuda_kw(kw_cpu), GRAD_NAMES if grads else [])
    out_r, last_r, g_r = run_scan(kwargs64(kw_cpu), GRAD_NAMES if grads else [])
    assert out.dtype == kw_cpu["u"].dtype and out.device.type == "cuda", msg
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert last.dtype == cdt, msg
    assert_close(cpu(out), out_r, dtype, msg + " out")
    assert_close(cpu(last), last_r, dtype if dtype == torch.float64 else torch.float32, msg)
    for n, gr in g_r.items():
        assert g[n].dtype == kw_cpu[n].dtype, f"{msg} grad {n} dtype"
        grad_close(g[n], gr, dtype, f"{msg} grad {n}")


# ---------------------------------------------------------------------------------------
# diagonal scan
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 5, 1024, 1500, 2100])
@pytest.mark.parametrize("reverse", [False, True])
def test_diag_scan_parity(dtype, length, reverse):
    gen = torch.Generator().manual_seed(stable_seed("diag", dtype, length, reverse))
    a = (0.5 + 0.5 * torch.rand(3, 5, length, generator=gen, dtype=torch.float64)).to(dtype)
    b = torch.randn(3, 5, length, generator=gen, dtype=torch.float64).to(dtype)
    h0 = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(dtype)
    names = ("a", "b", "h0")
    vals = dict(a=a, b=b, h0=h0)

    def run(device, cast):
        leaves = {k: cast(v).to(device).requires_grad_(True) for k, v in vals.items()}
        h, last = bm.diag_scan(
            leaves["a"], leaves["b"], leaves["h0"], reverse=reverse, return_last_state=True
        )
        gy = torch.randn(h.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        loss = (h.double() * gy.to(device)).sum() + last.double().sum()
        return h, last, torch.autograd.grad(loss, [leaves[n] for n in names])

    h, last, g = run(DEV, lambda t: t)
    h_r, last_r, g_r = run("cpu", lambda t: t.double())
    assert h.dtype == dtype
    assert_close(cpu(h), h_r, dtype, "h")
    assert_close(cpu(last), last_r, dtype if dtype == torch.float64 else torch.float32, "last")
    for n, gg, gr in zip(names, g, g_r, strict=True):
        grad_close(gg, gr, dtype, f"grad {n}")


def test_diag_scan_empty_and_zero_lanes():
    a = torch.rand(4, 0, device=DEV)
    h, last = bm.diag_scan(a, a.clone(), torch.ones(4, device=DEV), return_last_state=True)
    assert h.shape == (4, 0)
    torch.testing.assert_close(last, torch.ones(4, device=DEV))
    e = torch.rand(0, 7, device=DEV)
    assert bm.diag_scan(e, e).shape == (0, 7)


# ---------------------------------------------------------------------------------------
# selective scan: every option and dtype
# ---------------------------------------------------------------------------------------

BC_FORMS = ["const", "var", "group", "const/var", "var/const", "group/const"]


@pytest.mark.parametrize("bc", BC_FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_scan_forms(bc, dtype):
    wdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    kw = make_scan_inputs(
        2, 8, 4, 70, bc=bc, G=2, dtype=dtype, weight_dtype=wdt,
        seed=stable_seed("forms", bc, dtype), initial_state=True, seq_idx=3,
    )  # fmt: skip
    check_scan(kw, dtype, f"{bc} {dtype}")


FLAGS = [
    # D, z, delta_bias, delta_softplus, initial_state, seq_idx
    (False, False, False, False, False, 0),
    (True, False, False, False, False, 0),
    (False, True, False, False, False, 0),
    (False, False, True, True, False, 0),
    (False, False, False, False, True, 0),
    (False, False, False, False, False, 4),
    (True, True, True, True, True, 4),
]


@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selective_scan_options(flags, dtype):
    d, z, bias, sp, init, seq = flags
    kw = make_scan_inputs(
        2, 6, 5, 45, bc="var", dtype=dtype, seed=stable_seed("opt", flags, dtype), D=d, z=z,
        delta_bias=bias, delta_softplus=sp, initial_state=init, seq_idx=seq,
    )  # fmt: skip
    check_scan(kw, dtype, str(flags))


# Lengths around the checkpoint chunk (64) and the forward (1024 / 512) and backward
# (512 / 256) tiles; N beyond one warp; dim not a multiple of anything.
SHAPES = [(1, 1, 1, 1), (2, 3, 16, 63), (1, 5, 3, 64), (2, 7, 17, 65), (1, 4, 8, 1100),
          (1, 3, 4, 2100), (3, 2, 40, 300)]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selective_scan_shapes(shape, dtype):
    batch, dim, n, length = shape
    kw = make_scan_inputs(
        batch, dim, n, length, bc="var", dtype=dtype, seed=stable_seed("shape", shape, dtype),
        initial_state=True, seq_idx=3,
    )  # fmt: skip
    check_scan(kw, dtype, str(shape))


def test_selective_scan_channel_blocks():
    """A variable B/C makes backward blocks of several channels (up to 16, never across a
    group): dim 48 with 3 groups (16 per block), dim 42 with 2 groups (7 per block)."""
    for dim, g in ((48, 3), (42, 2), (13, 1)):
        kw = make_scan_inputs(2, dim, 4, 130, bc="group", G=g, dtype=torch.float64, seed=dim)
        check_scan(kw, torch.float64, f"dim {dim} G {g}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selective_scan_half_same_dtype_weights(dtype):
    """float16/bfloat16 parameters are accepted too (cast to float32 like on the CPU)."""
    kw = make_scan_inputs(2, 8, 16, 100, bc="group", G=2, dtype=dtype, seed=5)
    check_scan(kw, dtype, str(dtype))


def test_selective_scan_empty_and_zero_batch():
    kw = cuda_kw(make_scan_inputs(2, 3, 4, 0, bc="var", dtype=torch.float32, initial_state=True))
    kw_g = with_grad(kw, ["u", "initial_state", "A"])
    out, last = bm.selective_scan_fn(**{**kw_g, "return_last_state": True})
    assert out.shape == (2, 3, 0)
    torch.testing.assert_close(last, kw["initial_state"])
    (gh0,) = torch.autograd.grad(last.sum(), [kw_g["initial_state"]])
    torch.testing.assert_close(gh0, torch.ones_like(gh0))
    kw0 = cuda_kw(make_scan_inputs(0, 3, 4, 5, bc="var", dtype=torch.float32))
    assert bm.selective_scan_fn(**kw0).shape == (0, 3, 5)


def test_selective_scan_matches_cpu_op_bitwise_shapes():
    """The CUDA op returns what the CPU op returns: dtypes, shapes and checkpoints."""
    kw = make_scan_inputs(2, 4, 6, 200, bc="var", dtype=torch.float64, seed=9, initial_state=True)
    args = (kw["u"], kw["delta"], kw["A"], kw["B"].unsqueeze(1), kw["C"].unsqueeze(1), kw["D"],
            kw["z"], kw["delta_bias"], kw["initial_state"], None, True)  # fmt: skip
    res_cpu = torch.ops.bmojo.selective_scan_fwd(*args)
    res_gpu = torch.ops.bmojo.selective_scan_fwd(*[cpu_to(a) for a in args])
    for name, c, g in zip(("out", "last", "checkpoints"), res_cpu, res_gpu, strict=True):
        assert c.dtype == g.dtype and c.shape == g.shape, name
        torch.testing.assert_close(cpu(g), c, rtol=1e-10, atol=1e-10, msg=name)


def cpu_to(a):
    return a.to(DEV) if isinstance(a, torch.Tensor) else a


def test_selective_scan_deterministic():
    """The backward's reductions run in a fixed order: bitwise equal reruns."""
    kw = cuda_kw(make_scan_inputs(2, 32, 16, 700, bc="group", G=2, dtype=torch.float32, seed=3,
                                  initial_state=True, seq_idx=3))  # fmt: skip
    runs = [run_scan(kw, GRAD_NAMES) for _ in range(2)]
    (o1, l1, g1), (o2, l2, g2) = runs
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


# ---------------------------------------------------------------------------------------
# gradcheck (fp64, small sizes) on CUDA
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bc", ["const", "var", "group/const"])
def test_gradcheck_cuda(bc):
    kw = cuda_kw(make_scan_inputs(1, 4, 3, 9, bc=bc, G=2, dtype=torch.float64, seed=11,
                                  initial_state=True, seq_idx=2))  # fmt: skip
    names = [n for n in GRAD_NAMES if kw.get(n) is not None]
    leaves = [kw[n].detach().clone().requires_grad_(True) for n in names]

    def f(*xs):
        out, last = bm.selective_scan_fn(**{**kw, **dict(zip(names, xs, strict=True)),
                                            "return_last_state": True})  # fmt: skip
        return out, last

    assert torch.autograd.gradcheck(f, leaves)


def test_gradcheck_cuda_last_state_only():
    kw = cuda_kw(make_scan_inputs(1, 3, 2, 6, bc="var", dtype=torch.float64, seed=12,
                                  initial_state=True))  # fmt: skip
    names = [n for n in GRAD_NAMES if kw.get(n) is not None]
    leaves = [kw[n].detach().clone().requires_grad_(True) for n in names]

    def f(*xs):
        return bm.selective_scan_fn(**{**kw, **dict(zip(names, xs, strict=True)),
                                       "return_last_state": True})[1]  # fmt: skip

    assert torch.autograd.gradcheck(f, leaves)


def test_gradcheck_cuda_diag():
    gen = torch.Generator().manual_seed(5)
    a = (0.5 + 0.5 * torch.rand(3, 7, generator=gen, dtype=torch.float64)).to(DEV)
    b = torch.randn(3, 7, generator=gen, dtype=torch.float64).to(DEV)
    h0 = torch.randn(3, generator=gen, dtype=torch.float64).to(DEV)
    for rev in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (a, b, h0)]
        assert torch.autograd.gradcheck(
            lambda x, y, h, rev=rev: bm.diag_scan(x, y, h, reverse=rev, return_last_state=True),
            leaves,
        )


# ---------------------------------------------------------------------------------------
# chunked == whole, streaming == scan
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_equals_whole(dtype):
    kw = cuda_kw(make_scan_inputs(2, 8, 16, 1300, bc="var", dtype=dtype, seed=13,
                                  initial_state=True))  # fmt: skip
    out, last = bm.selective_scan_fn(**{**kw, "return_last_state": True})
    h = kw["initial_state"]
    outs = []
    for s, e in ((0, 100), (100, 1100), (1100, 1300)):
        part = {
            k: (v[..., s:e] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kw.items()
        }
        o, h = bm.selective_scan_fn(**{**part, "initial_state": h, "return_last_state": True})
        outs.append(o)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(outs, -1), out, **tol)
    torch.testing.assert_close(h, last, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streaming_equals_scan(dtype):
    batch, dim, n, length = 2, 12, 8, 40
    kw = cuda_kw(make_scan_inputs(batch, dim, n, length, bc="var", dtype=dtype, seed=14,
                                  initial_state=True))  # fmt: skip
    out, last = bm.selective_scan_fn(**{**kw, "return_last_state": True})
    state = kw["initial_state"].clone()
    steps = []
    for t in range(length):
        steps.append(
            bm.selective_state_update(
                state,
                kw["u"][..., t].contiguous(),
                kw["delta"][..., t].contiguous(),
                kw["A"],
                kw["B"][..., t].contiguous(),
                kw["C"][..., t].contiguous(),
                kw["D"],
                kw["z"][..., t].contiguous(),
                kw["delta_bias"],
                kw["delta_softplus"],
            )  # fmt: skip
        )
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(torch.stack(steps, -1), out, **tol)
    torch.testing.assert_close(state, last, **tol)
    # The multi-token form with snapshots: the same outputs, the same final state.
    state2 = kw["initial_state"].clone()
    snaps = state2.new_empty(batch, length, dim, n)
    tok = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731 - (batch, L, ·)
    out2 = bm.selective_state_update(
        state2, tok(kw["u"]), tok(kw["delta"]), kw["A"], tok(kw["B"]), tok(kw["C"]), kw["D"],
        tok(kw["z"]), kw["delta_bias"], kw["delta_softplus"], intermediate_states=snaps,
    )  # fmt: skip
    torch.testing.assert_close(out2.transpose(1, 2), out, **tol)
    torch.testing.assert_close(state2, last, **tol)
    torch.testing.assert_close(snaps[:, -1], last, **tol)


# ---------------------------------------------------------------------------------------
# streaming step: parity with the CPU op in every layout and option
# ---------------------------------------------------------------------------------------

STEP_CASES = [
    dict(),
    dict(G=1),
    dict(heads=True, G=2),
    dict(T=3),
    dict(T=4, heads=True, G=2, slots=6, indices=True),
    dict(slots=5, indices=True),
    dict(D=False, z=False, dt_bias=False, dt_softplus=False),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_update_parity(case, dtype):
    case = dict(case)
    indices = case.pop("indices", False)
    kw = make_step_inputs(3, dtype=dtype, seed=stable_seed("step", case, dtype), **case)
    if indices:
        slots = kw["state"].shape[0]
        kw["state_batch_indices"] = torch.tensor([slots - 1, -1, 0])
    snaps = None
    if case.get("T"):
        snaps = torch.zeros(3, case["T"], *kw["state"].shape[1:], dtype=dtype)
        kw["intermediate_states"] = snaps
    kw_gpu = cuda_kw(kw)
    kw_ref = kwargs64(kw)
    kw_ref["state"] = kw_ref["state"].clone()
    if snaps is not None:
        kw_ref["intermediate_states"] = snaps.double().clone()
    out = bm.selective_state_update(**kw_gpu)
    out_r = bm.selective_state_update(**kw_ref)
    assert out.dtype == dtype and out.device.type == "cuda"
    assert_close(cpu(out), out_r, dtype, "out")
    assert_close(cpu(kw_gpu["state"]), kw_ref["state"], dtype, "state")
    if snaps is not None:
        assert_close(cpu(kw_gpu["intermediate_states"]), kw_ref["intermediate_states"], dtype)
    if indices:
        assert torch.all(out[1] == 0)


def test_state_update_fast_path_matches_validating_path():
    kw = cuda_kw(make_step_inputs(4, dim=64, N=16, dtype=torch.float32, seed=21))
    s1, s2 = kw["state"].clone(), kw["state"].clone()
    o1 = bm.selective_state_update(**{**kw, "state": s1})
    # A non-contiguous x forces the validating path (same kernel, normalised copies).
    x_nc = kw["x"].t().contiguous().t()
    o2 = bm.selective_state_update(**{**kw, "state": s2, "x": x_nc})
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)


def test_state_update_bad_slot_errors_before_writing():
    kw = cuda_kw(make_step_inputs(3, dtype=torch.float32, seed=22))
    before = kw["state"].clone()
    kw["state_batch_indices"] = torch.tensor([0, 1, 7], device=DEV)
    with pytest.raises(bm.BmojoValueError, match="state_batch_indices"):
        bm.selective_state_update(**kw)
    assert torch.equal(kw["state"], before)


# ---------------------------------------------------------------------------------------
# CUDA graphs, opcheck, devices
# ---------------------------------------------------------------------------------------


def test_cuda_graph_capture_and_replay():
    kw = cuda_kw(make_scan_inputs(2, 16, 8, 300, bc="var", dtype=torch.float32, seed=31,
                                  initial_state=True))  # fmt: skip
    step_kw = cuda_kw(make_step_inputs(2, dim=16, N=8, dtype=torch.float32, seed=32))
    # Warm up (compiles the kernels) on a side stream, as torch recommends.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        bm.selective_scan_fn(**kw)
        bm.selective_state_update(**{**step_kw, "state": step_kw["state"].clone()})
    torch.cuda.current_stream().wait_stream(s)
    state0 = step_kw["state"].clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = bm.selective_scan_fn(**kw)
        y = bm.selective_state_update(**step_kw)
    # Replay with new inputs written into the captured buffers.
    kw2 = cuda_kw(make_scan_inputs(2, 16, 8, 300, bc="var", dtype=torch.float32, seed=33,
                                   initial_state=True))  # fmt: skip
    for k in ("u", "delta", "B", "C", "z"):
        kw[k].copy_(kw2[k])
    step_kw["state"].copy_(state0)
    g.replay()
    torch.cuda.synchronize()
    ref_out = bm.selective_scan_fn(**kw)  # kw's buffers now hold kw2's activations
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    st = state0.clone()
    y_ref = bm.selective_state_update(**{**step_kw, "state": st})
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(step_kw["state"], st, rtol=0, atol=0)


def test_opcheck_cuda():
    kw = cuda_kw(make_scan_inputs(2, 4, 3, 70, bc="var", dtype=torch.float32, seed=41,
                                  initial_state=True, seq_idx=2))  # fmt: skip
    u = kw["u"].requires_grad_(True)
    fwd = (u, kw["delta"], kw["A"], kw["B"].unsqueeze(1), kw["C"].unsqueeze(1), kw["D"], kw["z"],
           kw["delta_bias"], kw["initial_state"], kw["seq_idx"].long(), True)  # fmt: skip
    torch.library.opcheck(torch.ops.bmojo.selective_scan_fwd.default, fwd)
    out, last, ckpt = torch.ops.bmojo.selective_scan_fwd(*[cpu_to(a) for a in fwd])
    bwd = (*[a.detach() if isinstance(a, torch.Tensor) else a for a in fwd[:8]], fwd[9], True,
           ckpt.detach(), torch.randn_like(out), torch.randn_like(last))  # fmt: skip
    torch.library.opcheck(torch.ops.bmojo.selective_scan_bwd.default, bwd)
    a = torch.rand(6, 33, device=DEV, requires_grad=True)
    b = torch.randn(6, 33, device=DEV)
    torch.library.opcheck(torch.ops.bmojo.diag_scan_fwd.default, (a, b, None, False))
    h, _ = torch.ops.bmojo.diag_scan_fwd(a.detach(), b, None, False)
    torch.library.opcheck(
        torch.ops.bmojo.diag_scan_bwd.default,
        (a.detach(), h, None, torch.randn_like(h), None, False),
    )
    st = make_step_inputs(3, T=2, dtype=torch.float32, seed=42)
    state = st["state"].to(DEV)
    args = (state, *(st[k].to(DEV) for k in ("x", "dt", "A")),
            st["B"].to(DEV).unsqueeze(2), st["C"].to(DEV).unsqueeze(2),
            *(st[k].to(DEV) for k in ("D", "z", "dt_bias")), True, None, None)  # fmt: skip
    torch.library.opcheck(torch.ops.bmojo.selective_state_update.default, args)


def test_half_kernels_read_half_activations():
    """On CUDA the op receives float16 activations as they are (no float32 copies)."""
    kw = cuda_kw(make_scan_inputs(1, 4, 4, 30, bc="var", dtype=torch.float16,
                                  weight_dtype=torch.float32, seed=43))  # fmt: skip
    out, last, _ = torch.ops.bmojo.selective_scan_fwd(
        kw["u"], kw["delta"], kw["A"], kw["B"].unsqueeze(1), kw["C"].unsqueeze(1), kw["D"],
        kw["z"], kw["delta_bias"], None, None, True,
    )  # fmt: skip
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    ref_out = ref.selective_scan(**kwargs64({**kw, "return_last_state": False}))
    assert_close(cpu(out), cpu(ref_out), torch.float16, "out")


@pytest.mark.parametrize("arg", ["delta", "A", "B", "D", "initial_state"])
def test_mixed_devices_name_the_argument(arg):
    kw = cuda_kw(make_scan_inputs(2, 4, 3, 5, bc="var", dtype=torch.float32, initial_state=True))
    kw[arg] = kw[arg].cpu()
    with pytest.raises(bm.BmojoValueError, match=arg):
        bm.selective_scan_fn(**kw)


def test_mixed_devices_step():
    kw = cuda_kw(make_step_inputs(3, dtype=torch.float32, seed=0))
    kw["B"] = kw["B"].cpu()
    with pytest.raises(bm.BmojoValueError, match="B"):
        bm.selective_state_update(**kw)
    kw2 = cuda_kw(make_step_inputs(3, dtype=torch.float32, seed=0))
    with pytest.raises(bm.BmojoValueError, match="^a: expected a tensor on cuda"):
        bm.diag_scan(torch.rand(2, 3), kw2["x"][:2])


def test_torch_compile_fullgraph_cuda():
    names = list(GRAD_NAMES)
    kw = cuda_kw(make_scan_inputs(2, 4, 3, 70, bc="var", seed=51, dtype=torch.float32,
                                  initial_state=True, seq_idx=2))  # fmt: skip
    rest = {k: v for k, v in kw.items() if k not in names and k != "return_last_state"}

    def f(*xs):
        out, last = bm.selective_scan_fn(
            **dict(zip(names, xs, strict=True)), **rest, return_last_state=True
        )
        return out.sum() + (last * last).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [kw[n].detach().clone().requires_grad_(True) for n in names]
    xs2 = [kw[n].detach().clone().requires_grad_(True) for n in names]
    y = cf(*xs)
    y.backward()
    y2 = f(*xs2)
    y2.backward()
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    for n, a, b in zip(names, xs, xs2, strict=True):
        torch.testing.assert_close(
            a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"{n} {m}"
        )


def test_torch_compile_step_cuda():
    kw = cuda_kw(make_step_inputs(3, T=2, dtype=torch.float32, seed=52, slots=4))
    kw["state_batch_indices"] = torch.tensor([3, -1, 0], device=DEV)
    s1, s2 = kw["state"].clone(), kw["state"].clone()
    torch._dynamo.reset()
    cf = torch.compile(bm.selective_state_update, fullgraph=True, backend="aot_eager")
    y1 = cf(**{**kw, "state": s1})
    y2 = bm.selective_state_update(**{**kw, "state": s2})
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
