"""diag_scan (first-order diagonal recurrence) against the fp64 reference."""

from __future__ import annotations

import bmojo_core as bm
import pytest
import torch
from bmojo_core import reference as ref
from conftest import assert_close, stable_seed


def make_diag(lanes, L, dtype, seed, init=False, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand((*lanes, L), generator=gen, dtype=torch.float64) * 2.0 - 1.0).to(dtype)
    b = torch.randn((*lanes, L), generator=gen, dtype=torch.float64).to(dtype)
    h0 = torch.randn(tuple(lanes), generator=gen, dtype=torch.float64).to(dtype) if init else None
    if requires_grad:
        a.requires_grad_(True)
        b.requires_grad_(True)
        if h0 is not None:
            h0.requires_grad_(True)
    return a, b, h0


def to64(x):
    return None if x is None else x.detach().to(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lanes", [(), (1,), (5,), (2, 3), (2, 3, 17), (40,)], ids=str)
@pytest.mark.parametrize("L", [0, 1, 2, 37, 1000])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("init", [False, True])
def test_parity(lanes, L, reverse, init, dtype):
    a, b, h0 = make_diag(lanes, L, dtype, stable_seed(lanes, L, reverse, init), init)
    h, last = bm.diag_scan(a, b, h0, reverse=reverse, return_last_state=True)
    h_ref, last_ref = ref.diag_scan(to64(a), to64(b), to64(h0), reverse, True)
    assert h.shape == a.shape and h.dtype == dtype
    assert last.shape == lanes
    assert_close(h, h_ref, dtype, "h")
    assert_close(last, last_ref, dtype, "last")
    if L > 0:
        assert torch.equal(last.to(h.dtype), h[..., 0] if reverse else h[..., -1])
    h_only = bm.diag_scan(a, b, h0, reverse=reverse)
    assert isinstance(h_only, torch.Tensor)
    assert torch.equal(h_only, h)


@pytest.mark.parametrize("reverse", [False, True])
def test_reverse_is_flipped_forward(reverse):
    a, b, h0 = make_diag((3, 4), 25, torch.float64, 1, init=True)
    h = bm.diag_scan(a, b, h0, reverse=True)
    hf = bm.diag_scan(a.flip(-1), b.flip(-1), h0)
    torch.testing.assert_close(h, hf.flip(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("init", [False, True])
def test_empty(init):
    a, b, h0 = make_diag((2, 3), 0, torch.float32, 0, init=init)
    for rev in (False, True):
        h, last = bm.diag_scan(a, b, h0, reverse=rev, return_last_state=True)
        assert h.shape == (2, 3, 0)
        assert torch.equal(last, h0 if init else torch.zeros(2, 3))


def test_known_values():
    a = torch.tensor([[0.5, 2.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0]], dtype=torch.float64)
    h0 = torch.tensor([4.0], dtype=torch.float64)
    h, last = bm.diag_scan(a, b, h0, return_last_state=True)
    # 0.5*4+1 = 3; 2*3+1 = 7; -7+3 = -4
    assert h.tolist() == [[3.0, 7.0, -4.0]] and last.tolist() == [-4.0]
    h, last = bm.diag_scan(a, b, h0, reverse=True, return_last_state=True)
    # -4+3 = -1; 2*-1+1 = -1; 0.5*-1+1 = 0.5
    assert h.tolist() == [[0.5, -1.0, -1.0]] and last.tolist() == [0.5]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("lanes,L", [((2, 3), 5), ((4,), 1), ((), 6)], ids=str)
def test_gradcheck(lanes, L, reverse, init):
    a, b, h0 = make_diag(lanes, L, torch.float64, 3, init=init, requires_grad=True)
    inputs = [a, b] + ([h0] if init else [])

    def f(*xs):
        return bm.diag_scan(
            xs[0], xs[1], xs[2] if init else None, reverse=reverse, return_last_state=True
        )

    assert torch.autograd.gradcheck(f, inputs)

    def f_last(*xs):  # gradient flowing through the last state only
        return f(*xs)[1]

    assert torch.autograd.gradcheck(f_last, inputs)


@pytest.mark.parametrize("reverse", [False, True])
def test_grad_fp32_vs_reference(reverse):
    a, b, h0 = make_diag((3, 8), 200, torch.float32, 5, init=True, requires_grad=True)
    h, last = bm.diag_scan(a, b, h0, reverse=reverse, return_last_state=True)
    gen = torch.Generator().manual_seed(0)
    gh, gl = torch.randn(h.shape, generator=gen), torch.randn(last.shape, generator=gen)
    grads = torch.autograd.grad((h * gh).sum() + (last * gl).sum(), [a, b, h0])
    a64, b64, h064 = (to64(x).requires_grad_(True) for x in (a, b, h0))
    h_r, last_r = ref.diag_scan(a64, b64, h064, reverse, True)
    grads_r = torch.autograd.grad(
        (h_r * gh.double()).sum() + (last_r * gl.double()).sum(), [a64, b64, h064]
    )
    for name, g, gr in zip("a b h0".split(), grads, grads_r, strict=True):
        assert g.dtype == torch.float32
        assert_close(g, gr, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    a, b, h0 = make_diag((4, 8), 64, dtype, 6)
    h = bm.diag_scan(a, b)
    assert h.dtype == dtype
    assert_close(h, ref.diag_scan(to64(a), to64(b)), dtype)


def test_noncontiguous():
    a, b, h0 = make_diag((6, 5), 9, torch.float64, 8, init=True)
    at, bt = a.transpose(0, 1), b.transpose(0, 1)  # (5, 6, 9), non-contiguous
    h0t = h0.t()
    assert not at.is_contiguous()
    h, last = bm.diag_scan(at, bt, h0t, return_last_state=True)
    hc, lastc = bm.diag_scan(
        at.contiguous(), bt.contiguous(), h0t.contiguous(), return_last_state=True
    )
    assert torch.equal(h, hc) and torch.equal(last, lastc)


def _diag_ops():
    from test_selective_scan import _bmojo_op_names

    return [n for n in _bmojo_op_names() if "diag" in n]


@pytest.mark.parametrize("op_name", _diag_ops())
def test_opcheck(op_name):
    from test_selective_scan import _captured_calls

    calls = _captured_calls().get(op_name)
    assert calls, f"torch.ops.bmojo.{op_name} is not reached by diag_scan"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)


def test_torch_compile():
    a, b, h0 = make_diag((3, 4), 12, torch.float32, 9, init=True)

    def f(a, b, h0):
        h, last = bm.diag_scan(a, b, h0, reverse=False, return_last_state=True)
        return h.sum() + last.pow(2).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [x.clone().requires_grad_(True) for x in (a, b, h0)]
    ys = [x.clone().requires_grad_(True) for x in (a, b, h0)]
    cf(*xs).backward()
    f(*ys).backward()
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)
