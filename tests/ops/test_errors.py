"""Bad inputs raise BmojoError subclasses naming the argument; odd-but-valid inputs work."""

from __future__ import annotations

import re

import bmojo_core as bm
import pytest
import torch
from conftest import make_scan_inputs, make_step_inputs

BATCH, DIM, N, L = 2, 4, 3, 5


def scan_kw(**over):
    kw = make_scan_inputs(
        BATCH,
        DIM,
        N,
        L,
        bc="var",
        dtype=torch.float32,
        seed=0,
        initial_state=True,
        seq_idx=2,
        return_last_state=True,
    )
    kw.update(over)
    return kw


def step_kw(**over):
    kw = make_step_inputs(3, dim=DIM, N=N, T=None, dtype=torch.float32, seed=0)
    kw.update(over)
    return kw


def multi_kw(**over):
    kw = make_step_inputs(
        3, heads=True, H=2, P=2, N=N, T=4, G=2, slots=5, dtype=torch.float32, seed=0
    )
    kw.update(over)
    return kw


def diag_kw(**over):
    kw = dict(a=torch.rand(2, 3, 6), b=torch.randn(2, 3, 6), initial_state=torch.randn(2, 3))
    kw.update(over)
    return kw


def assert_raises_naming(fn, kw, names, exc=None):
    """fn(**kw) raises a BmojoError (of class ``exc`` if given) naming one of ``names``."""
    exc = exc or bm.BmojoError
    with pytest.raises(bm.BmojoError) as info:
        fn(**kw)
    assert isinstance(info.value, exc), f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    names = (names,) if isinstance(names, str) else names
    assert any(
        re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names
    ), f"message {msg!r} does not name any of {names}"


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(
        dtype
    )


# ---------------------------------------------------------------------------------------
# the error types
# ---------------------------------------------------------------------------------------


def test_error_hierarchy():
    assert issubclass(bm.BmojoError, Exception)
    assert issubclass(bm.BmojoValueError, bm.BmojoError)
    assert issubclass(bm.BmojoValueError, ValueError)
    assert issubclass(bm.BmojoTypeError, bm.BmojoError)
    assert issubclass(bm.BmojoTypeError, TypeError)


# ---------------------------------------------------------------------------------------
# wrong rank / size, one argument at a time
# ---------------------------------------------------------------------------------------

SCAN_SHAPE_CASES = [
    ("u", dict(u=r(DIM, L)), "u"),
    ("u-rank4", dict(u=r(BATCH, DIM, L, 1)), "u"),
    ("delta", dict(delta=r(BATCH, DIM, L + 1)), "delta"),
    ("delta-rank", dict(delta=r(DIM, L)), "delta"),
    ("delta-dim", dict(delta=r(BATCH, DIM + 1, L)), "delta"),
    ("A-dim", dict(A=-r(DIM + 1, N).abs()), "A"),
    ("A-rank", dict(A=-r(DIM).abs()), "A"),
    ("A-rank3", dict(A=-r(DIM, N, 1).abs()), "A"),
    ("B-N", dict(B=r(BATCH, N + 1, L)), "B"),
    ("B-L", dict(B=r(BATCH, N, L + 1)), "B"),
    ("B-batch", dict(B=r(BATCH + 1, N, L)), "B"),
    ("B-const", dict(B=r(DIM + 1, N)), "B"),
    ("B-const-N", dict(B=r(DIM, N + 1)), "B"),
    ("B-groups", dict(B=r(BATCH, 3, N, L)), "B"),
    ("B-rank1", dict(B=r(N)), "B"),
    ("B-rank5", dict(B=r(BATCH, 1, N, L, 1)), "B"),
    ("C-N", dict(C=r(BATCH, N + 1, L)), "C"),
    ("C-L", dict(C=r(BATCH, N, L - 1)), "C"),
    ("C-groups", dict(C=r(BATCH, 3, N, L)), "C"),
    ("C-const", dict(C=r(DIM + 1, N)), "C"),
    ("C-rank1", dict(C=r(N)), "C"),
    ("D-size", dict(D=r(DIM + 1)), "D"),
    ("D-rank", dict(D=r(DIM, 1)), "D"),
    ("z-size", dict(z=r(BATCH, DIM, L + 1)), "z"),
    ("z-rank", dict(z=r(DIM, L)), "z"),
    ("delta_bias-size", dict(delta_bias=r(DIM - 1)), "delta_bias"),
    ("delta_bias-rank", dict(delta_bias=r(DIM, 1)), "delta_bias"),
    ("initial_state-N", dict(initial_state=r(BATCH, DIM, N + 1)), "initial_state"),
    ("initial_state-rank", dict(initial_state=r(DIM, N)), "initial_state"),
    ("initial_state-batch", dict(initial_state=r(BATCH + 1, DIM, N)), "initial_state"),
    ("seq_idx-L", dict(seq_idx=torch.zeros(BATCH, L + 1, dtype=torch.int32)), "seq_idx"),
    ("seq_idx-rank", dict(seq_idx=torch.zeros(L, dtype=torch.int32)), "seq_idx"),
    ("seq_idx-batch", dict(seq_idx=torch.zeros(BATCH + 1, L, dtype=torch.int32)), "seq_idx"),
]


@pytest.mark.parametrize("case", SCAN_SHAPE_CASES, ids=lambda c: c[0])
def test_selective_scan_bad_shape(case):
    _, over, name = case
    assert_raises_naming(bm.selective_scan_fn, scan_kw(**over), name, bm.BmojoValueError)


STEP_SHAPE_CASES = [
    ("state-rank2", dict(state=r(3, DIM)), ("state",)),
    ("state-rank5", dict(state=r(3, 2, 2, N, 1)), ("state",)),
    ("state-rows", dict(state=r(4, DIM, N)), ("state", "x", "state_batch_indices")),
    ("x-dim", dict(x=r(3, DIM + 1)), ("x",)),
    ("x-batch", dict(x=r(4, DIM)), ("x", "dt", "state")),
    ("x-rank", dict(x=r(DIM)), ("x",)),
    ("dt-dim", dict(dt=r(3, DIM + 1)), ("dt",)),
    ("dt-rank", dict(dt=r(3, DIM, 1, 1)), ("dt",)),
    ("A-dim", dict(A=-r(DIM + 1, N).abs()), ("A",)),
    ("A-N", dict(A=-r(DIM, N + 1).abs()), ("A",)),
    ("B-N", dict(B=r(3, N + 1)), ("B",)),
    ("B-batch", dict(B=r(2, N)), ("B",)),
    ("B-groups", dict(B=r(3, 3, N), C=r(3, 3, N)), ("B", "C")),
    ("BC-groups-differ", dict(B=r(3, 2, N)), ("B", "C")),
    ("C-N", dict(C=r(3, N - 1)), ("C",)),
    ("C-rank", dict(C=r(N)), ("C",)),
    ("D-size", dict(D=r(DIM + 1)), ("D",)),
    ("z-size", dict(z=r(3, DIM - 1)), ("z",)),
    ("dt_bias-size", dict(dt_bias=r(DIM + 2)), ("dt_bias",)),
    ("sbi-length", dict(state_batch_indices=torch.tensor([0, 1])), ("state_batch_indices",)),
    ("sbi-rank", dict(state_batch_indices=torch.tensor([[0, 1, 2]])), ("state_batch_indices",)),
    # int64 indices on plain contiguous inputs: the dispatcher-free decode path is tried first
    ("sbi-range", dict(state_batch_indices=torch.tensor([0, 3, 1])), ("state_batch_indices",)),
    (
        "sbi-range32",
        dict(state_batch_indices=torch.tensor([0, 9, 1], dtype=torch.int32)),
        ("state_batch_indices",),
    ),
    ("sbi-dup", dict(state_batch_indices=torch.tensor([1, -1, 1])), ("state_batch_indices",)),
]


@pytest.mark.parametrize("case", STEP_SHAPE_CASES, ids=lambda c: c[0])
def test_state_update_bad_shape_leaves_state_unchanged(case):
    _, over, names = case
    kw = step_kw(**over)
    before = kw["state"].clone()
    assert_raises_naming(bm.selective_state_update, kw, names, bm.BmojoValueError)
    assert torch.equal(kw["state"], before)


MULTI_SHAPE_CASES = [
    ("x-T", dict(x=r(3, 5, 2, 2)), ("x", "dt")),
    ("dt-T", dict(dt=r(3, 5, 2, 2)), ("dt",)),
    ("z-T", dict(z=r(3, 3, 2, 2)), ("z",)),
    ("B-T", dict(B=r(3, 5, 2, N)), ("B",)),
    ("C-T", dict(C=r(3, 4, 3, N)), ("C",)),
    ("A-heads", dict(A=-r(2, 3, N).abs()), ("A",)),
    ("D-heads", dict(D=r(2, 3)), ("D",)),
    ("inter-T", dict(intermediate_states=torch.zeros(3, 3, 2, 2, N)), ("intermediate_states",)),
    ("inter-N", dict(intermediate_states=torch.zeros(3, 4, 2, 2, N + 1)), ("intermediate_states",)),
    ("inter-batch", dict(intermediate_states=torch.zeros(2, 4, 2, 2, N)), ("intermediate_states",)),
    ("inter-rank", dict(intermediate_states=torch.zeros(3, 4, 2, N)), ("intermediate_states",)),
    ("sbi-range", dict(state_batch_indices=torch.tensor([0, 5, 1])), ("state_batch_indices",)),
    ("sbi-dup", dict(state_batch_indices=torch.tensor([2, -1, 2])), ("state_batch_indices",)),
]


@pytest.mark.parametrize("case", MULTI_SHAPE_CASES, ids=lambda c: c[0])
def test_state_update_multi_bad_input_leaves_state_unchanged(case):
    _, over, names = case
    kw = multi_kw(
        state_batch_indices=torch.tensor([4, -1, 0]), intermediate_states=torch.zeros(3, 4, 2, 2, N)
    )
    kw.update(over)
    before = kw["state"].clone()
    inter_before = kw["intermediate_states"].clone()
    assert_raises_naming(bm.selective_state_update, kw, names, bm.BmojoValueError)
    assert torch.equal(kw["state"], before)
    assert torch.equal(kw["intermediate_states"], inter_before)


def test_state_update_without_indices_needs_matching_pool():
    kw = multi_kw()  # 5 slots, batch 3, no indices
    before = kw["state"].clone()
    assert_raises_naming(
        bm.selective_state_update, kw, ("state", "state_batch_indices", "x"), bm.BmojoValueError
    )
    assert torch.equal(kw["state"], before)


def test_padding_only_duplicates_are_fine():
    kw = multi_kw(state_batch_indices=torch.tensor([-1, -1, 3]))
    before = kw["state"].clone()
    out = bm.selective_state_update(**kw)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.equal(kw["state"][:3], before[:3])


DIAG_SHAPE_CASES = [
    ("b-shape", dict(b=r(2, 3, 7)), ("b", "a")),
    ("b-rank", dict(b=r(3, 6)), ("b", "a")),
    ("initial_state-shape", dict(initial_state=r(2, 4)), ("initial_state",)),
    ("initial_state-rank", dict(initial_state=r(2, 3, 1)), ("initial_state",)),
    ("a-rank0", dict(a=torch.tensor(0.5), b=torch.tensor(1.0), initial_state=None), ("a", "b")),
    ("a-rank0-only", dict(a=torch.tensor(0.5)), ("a",)),
]


@pytest.mark.parametrize("case", DIAG_SHAPE_CASES, ids=lambda c: c[0])
def test_diag_scan_bad_shape(case):
    _, over, names = case
    assert_raises_naming(bm.diag_scan, diag_kw(**over), names, bm.BmojoValueError)


# ---------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------

SCAN_DTYPE_CASES = [
    ("u-int", dict(u=torch.ones(BATCH, DIM, L, dtype=torch.int32)), "u"),
    ("delta-fp64", dict(delta=r(BATCH, DIM, L, dtype=torch.float64)), "delta"),
    ("delta-int", dict(delta=torch.ones(BATCH, DIM, L, dtype=torch.int64)), "delta"),
    ("z-bf16", dict(z=r(BATCH, DIM, L, dtype=torch.bfloat16)), "z"),
    ("B-fp64", dict(B=r(BATCH, N, L, dtype=torch.float64)), "B"),
    ("C-fp16", dict(C=r(BATCH, N, L, dtype=torch.float16)), "C"),
    ("A-int", dict(A=-torch.ones(DIM, N, dtype=torch.int32)), "A"),
    ("A-fp16", dict(A=-r(DIM, N, dtype=torch.float16).abs()), "A"),
    ("D-int", dict(D=torch.ones(DIM, dtype=torch.int64)), "D"),
    ("delta_bias-int", dict(delta_bias=torch.ones(DIM, dtype=torch.int32)), "delta_bias"),
    ("seq_idx-float", dict(seq_idx=torch.zeros(BATCH, L)), "seq_idx"),
    ("u-complex", dict(u=torch.ones(BATCH, DIM, L, dtype=torch.complex64)), "u"),
    (
        "initial_state-int",
        dict(initial_state=torch.zeros(BATCH, DIM, N, dtype=torch.int32)),
        "initial_state",
    ),
]


@pytest.mark.parametrize("case", SCAN_DTYPE_CASES, ids=lambda c: c[0])
def test_selective_scan_bad_dtype(case):
    _, over, name = case
    assert_raises_naming(bm.selective_scan_fn, scan_kw(**over), name)


STEP_DTYPE_CASES = [
    ("state-int", dict(state=torch.zeros(3, DIM, N, dtype=torch.int32)), ("state",)),
    ("x-int", dict(x=torch.ones(3, DIM, dtype=torch.int64)), ("x",)),
    ("dt-fp64", dict(dt=r(3, DIM, dtype=torch.float64)), ("dt",)),
    ("B-fp64", dict(B=r(3, N, dtype=torch.float64)), ("B",)),
    ("A-int", dict(A=-torch.ones(DIM, N, dtype=torch.int32)), ("A",)),
    (
        "sbi-float",
        dict(state_batch_indices=torch.tensor([0.0, 1.0, 2.0])),
        ("state_batch_indices",),
    ),
]


@pytest.mark.parametrize("case", STEP_DTYPE_CASES, ids=lambda c: c[0])
def test_state_update_bad_dtype(case):
    _, over, names = case
    kw = step_kw(**over)
    before = kw["state"].clone()
    assert_raises_naming(bm.selective_state_update, kw, names)
    assert torch.equal(kw["state"], before)


DIAG_DTYPE_CASES = [
    ("a-int", dict(a=torch.ones(2, 3, 6, dtype=torch.int32)), ("a",)),
    ("b-fp64", dict(b=r(2, 3, 6, dtype=torch.float64)), ("b",)),
    (
        "initial_state-int",
        dict(initial_state=torch.zeros(2, 3, dtype=torch.int64)),
        ("initial_state",),
    ),
]


@pytest.mark.parametrize("case", DIAG_DTYPE_CASES, ids=lambda c: c[0])
def test_diag_scan_bad_dtype(case):
    _, over, names = case
    assert_raises_naming(bm.diag_scan, diag_kw(**over), names)


# ---------------------------------------------------------------------------------------
# device
# ---------------------------------------------------------------------------------------


def _to_meta(kw: dict, only: str | None = None) -> dict:
    return {
        k: (v.to("meta") if isinstance(v, torch.Tensor) and (only is None or k == only) else v)
        for k, v in kw.items()
    }


@pytest.mark.parametrize(
    "arg", [None, "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
)
def test_selective_scan_non_cpu(arg):
    kw = _to_meta(scan_kw(), arg)
    assert_raises_naming(
        bm.selective_scan_fn, kw, arg or ("u", "delta", "A", "B", "C"), bm.BmojoValueError
    )


@pytest.mark.parametrize("arg", [None, "state", "x", "dt", "B"])
def test_state_update_non_cpu(arg):
    kw = step_kw()
    state_cpu = kw["state"].clone()
    kw = _to_meta(kw, arg)
    assert_raises_naming(
        bm.selective_state_update,
        kw,
        arg or ("state", "x", "dt", "A", "B", "C"),
        bm.BmojoValueError,
    )
    if arg != "state" and arg is not None:
        assert torch.equal(kw["state"], state_cpu)


@pytest.mark.parametrize("arg", [None, "a", "b", "initial_state"])
def test_diag_scan_non_cpu(arg):
    kw = _to_meta(diag_kw(), arg)
    assert_raises_naming(bm.diag_scan, kw, arg or ("a", "b"), bm.BmojoValueError)


# ---------------------------------------------------------------------------------------
# non-contiguous inputs are accepted
# ---------------------------------------------------------------------------------------


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous layout (a strided slice of a bigger buffer)."""
    big = torch.empty(*t.shape, 2, dtype=t.dtype)
    big[..., 0] = t
    big[..., 1] = 12345
    v = big[..., 0]
    assert not v.is_contiguous() or t.numel() <= 1
    return v


@pytest.mark.parametrize("bc", ["const", "var", "group"])
def test_selective_scan_noncontiguous(bc):
    kw = make_scan_inputs(
        2,
        4,
        3,
        7,
        bc=bc,
        G=2,
        dtype=torch.float64,
        seed=5,
        initial_state=True,
        seq_idx=2,
        return_last_state=True,
    )
    nc = {k: (_noncontig(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out, last = bm.selective_scan_fn(**kw)
    out2, last2 = bm.selective_scan_fn(**nc)
    assert torch.equal(out, out2) and torch.equal(last, last2)
    # transposed (channel-last) u/delta, as produced by a linear layer
    ut = kw["u"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not ut.is_contiguous()
    out3, _ = bm.selective_scan_fn(**{**kw, "u": ut})
    assert torch.equal(out, out3)
    # gradients too
    names = ["u", "delta", "A", "B", "C", "initial_state"]
    leaves = {n: kw[n].clone().requires_grad_() for n in names}
    leaves_nc = {n: _noncontig(kw[n]).requires_grad_() for n in names}
    ga = torch.autograd.grad(
        bm.selective_scan_fn(**{**kw, **leaves})[0].sum(), list(leaves.values())
    )
    gb = torch.autograd.grad(
        bm.selective_scan_fn(**{**nc, **leaves_nc})[0].sum(), list(leaves_nc.values())
    )
    for n, a, b in zip(names, ga, gb, strict=True):
        assert torch.equal(a, b), n


def test_state_update_noncontiguous_state_written_back():
    kw = multi_kw(state_batch_indices=torch.tensor([4, -1, 0]))
    s_contig = kw["state"].clone()
    out = bm.selective_state_update(**{**kw, "state": s_contig})
    s_nc = _noncontig(kw["state"])
    nc = {
        k: (_noncontig(v) if isinstance(v, torch.Tensor) and k != "state" else v)
        for k, v in kw.items()
    }
    out2 = bm.selective_state_update(**{**nc, "state": s_nc})
    assert torch.equal(out, out2)
    assert torch.equal(s_nc, s_contig)  # the in-place update reached the strided view


def test_diag_scan_noncontiguous():
    kw = diag_kw()
    h, last = bm.diag_scan(**kw, return_last_state=True)
    h2, last2 = bm.diag_scan(**{k: _noncontig(v) for k, v in kw.items()}, return_last_state=True)
    assert torch.equal(h, h2) and torch.equal(last, last2)


def test_expanded_broadcast_inputs():
    """Stride-0 (expanded) inputs are valid inputs too."""
    kw = scan_kw()
    kw["delta"] = kw["delta"][:, :1, :].expand(BATCH, DIM, L)
    kw["A"] = kw["A"][:1].expand(DIM, N)
    out, last = bm.selective_scan_fn(**kw)
    out2, last2 = bm.selective_scan_fn(
        **{k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    )
    assert torch.equal(out, out2) and torch.equal(last, last2)


# ---------------------------------------------------------------------------------------
# NaN / inf propagate
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["u", "delta", "B", "C", "z"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_propagates_scan(arg, value):
    kw = scan_kw(seq_idx=None)
    kw[arg] = kw[arg].clone()
    kw[arg][0, ..., 2] = value
    out, last = bm.selective_scan_fn(**kw)
    assert not torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1]).all()  # the other batch row is unaffected


def test_nonfinite_propagates_diag_and_step():
    kw = diag_kw()
    kw["b"] = kw["b"].clone()
    kw["b"][0, 0, 1] = float("nan")
    h = bm.diag_scan(**kw)
    assert torch.isnan(h[0, 0, 1:]).all() and torch.isfinite(h[1]).all()
    kw = step_kw()
    kw["x"] = kw["x"].clone()
    kw["x"][1, 0] = float("nan")
    out = bm.selective_state_update(**kw)
    assert torch.isnan(out[1, 0]) and torch.isfinite(out[0]).all()
    assert torch.isnan(kw["state"][1, 0]).all()


# ---------------------------------------------------------------------------------------
# other argument errors
# ---------------------------------------------------------------------------------------


def test_missing_or_wrong_type_arguments():
    kw = scan_kw()
    with pytest.raises(bm.BmojoError) as info:
        bm.selective_scan_fn(**{**kw, "u": kw["u"].tolist()})
    assert "u" in str(info.value)
    with pytest.raises(bm.BmojoError):
        bm.selective_scan_fn(**{**kw, "B": None})
