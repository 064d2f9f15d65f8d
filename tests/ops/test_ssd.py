"""mamba_chunk_scan_combined (design §2.4) against the fp64 reference written from the
recurrence (bmojo_core.reference.ssd_scan): every option, gradients in fp64, chunk_size
invariance, pieces through states == whole, packed == separate, threads bitwise,
torch.compile, bad input."""

from __future__ import annotations

import math

import bmojo_core as bm
import pytest
import torch
from bmojo_core.ops.reference import ssd_scan
from hypothesis import given, settings
from hypothesis import strategies as st

SEQ = ("x", "dt", "B", "C", "z")


def inputs(b, length, h, p, g, n, *, seed=0, dtype=torch.float64, d_hp=False, opts=True):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    kw = dict(x=r(b, length, h, p), dt=r(b, length, h) * 0.5,
              A=(-torch.rand(h, generator=gen, dtype=torch.float64) - 0.2).to(dtype),
              B=r(b, length, g, n), C=r(b, length, g, n))  # fmt: skip
    if opts:
        kw.update(D=r(h, p) if d_hp else r(h), z=r(b, length, h, p), dt_bias=r(h) * 0.1,
                  initial_states=r(b, h, p, n), dt_softplus=True)  # fmt: skip
    return kw


def call(kw, **extra):
    return bm.mamba_chunk_scan_combined(**kw, chunk_size=extra.pop("chunk_size", 16), **extra)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 2), length=st.sampled_from([0, 1, 2, 5, 17, 64]), h=st.integers(1, 4),
    p=st.integers(1, 3), n=st.integers(1, 5), grouped=st.booleans(), d_hp=st.booleans(),
    opts=st.booleans(), limit=st.booleans(),
)  # fmt: skip
def test_matches_reference_fp64(b, length, h, p, n, grouped, d_hp, opts, limit):
    g = h if grouped and h > 1 else 1
    kw = inputs(b, length, h, p, g, n, d_hp=d_hp, opts=opts, seed=length + 7 * h)
    dl = (0.05, 0.8) if limit else (0.0, math.inf)
    out, last = call(kw, dt_limit=dl, return_final_states=True)
    want, want_last = ssd_scan(**kw, dt_limit=dl, return_final_states=True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, want_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_io(dtype):
    kw = inputs(2, 33, 4, 8, 2, 16, seed=1)
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k in SEQ else
               v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}  # fmt: skip
    out, last = call(low, return_final_states=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    want = ssd_scan(**{k: (v.double() if isinstance(v, torch.Tensor) else v)
                       for k, v in low.items()})  # fmt: skip
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * 10)


def test_chunk_size_does_not_change_results():
    kw = inputs(2, 50, 2, 3, 1, 4)
    ref = call(kw, chunk_size=1)
    for cs in (2, 7, 64, 256):
        assert torch.equal(call(kw, chunk_size=cs), ref)


def test_gradcheck_every_input():
    kw = inputs(1, 6, 2, 2, 1, 3, d_hp=True)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    ts = [kw[k].clone().requires_grad_() for k in names]

    def f(*args):
        o, s = bm.mamba_chunk_scan_combined(
            **dict(zip(names, args, strict=True)), chunk_size=4, dt_softplus=True,
            return_final_states=True,
        )  # fmt: skip
        return o, s

    assert torch.autograd.gradcheck(f, ts, atol=1e-7, rtol=1e-5)


def test_gradcheck_with_dt_limit_and_packing():
    kw = inputs(1, 7, 2, 2, 2, 2)
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    names = ["x", "dt", "B", "C", "initial_states"]
    ts = [kw[k].clone().requires_grad_() for k in names]

    def f(*args):
        k = {**kw, **dict(zip(names, args, strict=True))}
        return call(k, seq_idx=seq, dt_limit=(0.1, 1.5), return_final_states=True)

    assert torch.autograd.gradcheck(f, ts, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("lens", [(3, 4), (1, 1, 5), (6,), (2, 0, 3)])
def test_packed_and_varlen_match_reference(lens):
    total = sum(lens)
    kw = inputs(1, total, 2, 2, 1, 3, seed=total)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    got = call(kw, cu_seqlens=cu, return_final_states=True, return_varlen_states=True)
    want = ssd_scan(**kw, cu_seqlens=cu, return_final_states=True, return_varlen_states=True)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]
    o2 = call(kw, seq_idx=seq)
    torch.testing.assert_close(o2, want[0], rtol=1e-10, atol=1e-10)


def test_pieces_through_states_equal_whole():
    kw = inputs(2, 40, 3, 2, 1, 4)
    out, last = call(kw, return_final_states=True)
    first = {k: (v[:, :17] if k in SEQ else v) for k, v in kw.items()}
    second = {k: (v[:, 17:] if k in SEQ else v) for k, v in kw.items()}
    o1, s1 = call(first, return_final_states=True)
    o2, s2 = call({**second, "initial_states": s1}, return_final_states=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, last, rtol=1e-12, atol=1e-12)


def _outputs_and_grads(kw, **extra):
    """Outputs, final state and the gradient of every float input of one call."""
    leaves = {k: v.clone().requires_grad_() for k, v in kw.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}  # fmt: skip
    out, last = call({**kw, **leaves}, return_final_states=True, **extra)
    gen = torch.Generator().manual_seed(5)
    w1 = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    w2 = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(last.dtype)
    ((out * w1).sum() + (last * w2).sum()).backward()
    return {"out": out.detach(), "last": last.detach(),
            **{"d" + k: v.grad for k, v in leaves.items()}}  # fmt: skip


def _reference_grads(kw, **extra):
    leaves = {k: v.clone().requires_grad_() for k, v in kw.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}  # fmt: skip
    out, last = ssd_scan(**{**kw, **leaves}, return_final_states=True, **extra)
    gen = torch.Generator().manual_seed(5)
    w1 = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    w2 = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(last.dtype)
    ((out * w1).sum() + (last * w2).sum()).backward()
    return {"out": out.detach(), "last": last.detach(),
            **{"d" + k: v.grad for k, v in leaves.items()}}  # fmt: skip


# Shapes that cross several backward checkpoints (CHECKPOINT_CHUNK steps), with a state
# width that is not a multiple of any vector width and more head channels than lanes.
LONG = [
    dict(b=2, length=3 * bm.ops.ssd.CHECKPOINT_CHUNK + 5, h=4, p=19, g=2, n=37),
    dict(b=1, length=2 * bm.ops.ssd.CHECKPOINT_CHUNK, h=3, p=8, g=1, n=16),
]


@pytest.mark.parametrize("shape", LONG, ids=str)
@pytest.mark.parametrize("packed, d_hp, limit", [(False, False, False), (True, True, True)])
def test_gradients_over_many_checkpoints_match_reference(shape, packed, d_hp, limit):
    kw = inputs(*shape.values(), seed=shape["n"], d_hp=d_hp)
    extra = {}
    if packed:
        length = shape["length"]
        third = length // 3
        cut = torch.tensor([0] * third + [1] * third + [3] * (length - 2 * third))
        extra["seq_idx"] = cut[None].expand(shape["b"], length).contiguous()
    if limit:
        extra["dt_limit"] = (0.2, 1.1)
    got = _outputs_and_grads(kw, **extra)
    want = _reference_grads(kw, **extra)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9, msg=k)


def test_threads_bitwise(restore_runtime):
    kw = inputs(2, 70, 4, 8, 2, 16, dtype=torch.float32)
    bm.set_num_threads(1)
    a = _outputs_and_grads(kw)
    for threads in (2, 3):
        bm.set_num_threads(threads)
        b = _outputs_and_grads(kw)
        for k in a:
            assert torch.equal(a[k], b[k]), (threads, k)


def test_every_simd_level_vs_scalar(restore_runtime):
    kw = inputs(2, 75, 3, 21, 1, 37, dtype=torch.float32, d_hp=True)
    bm.set_simd_level("scalar")
    want = _outputs_and_grads(kw)
    ref = _reference_grads(inputs(2, 75, 3, 21, 1, 37, d_hp=True))
    for level in bm.simd_levels():
        bm.set_simd_level(level)
        assert bm.simd_level() == level
        got = _outputs_and_grads(kw)
        for k in want:
            scale = max(1.0, want[k].abs().max().item())
            torch.testing.assert_close(got[k] / scale, want[k] / scale, rtol=1e-4, atol=1e-5,
                                       msg=f"{level} {k}")  # fmt: skip
            torch.testing.assert_close(got[k].double() / scale, ref[k] / scale, rtol=1e-4,
                                       atol=1e-5, msg=f"{level} {k} vs fp64")  # fmt: skip


@pytest.mark.parametrize("opts", [True, False])
def test_opcheck(opts):
    kw = inputs(2, 37, 2, 3, 1, 5, dtype=torch.float64, d_hp=opts, opts=opts)
    z = lambda k: kw.get(k)  # noqa: E731
    seq = torch.tensor([[0] * 20 + [1] * 17, [0] * 37])
    args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], z("D"), z("z"), z("dt_bias"),
            z("initial_states"), seq if opts else None, opts, opts, 0.1, 2.0)  # fmt: skip
    leaves = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and
                   a.is_floating_point() else a for a in args)  # fmt: skip
    torch.library.opcheck(torch.ops.bmojo.ssd_fwd.default, args)
    torch.library.opcheck(torch.ops.bmojo.ssd_fwd.default, leaves)
    out, last, ck = torch.ops.bmojo.ssd_fwd(*args)
    bwd = (*args[:5], z("D"), z("z"), z("dt_bias"), args[9], opts, opts, 0.1, 2.0, ck,
           torch.randn_like(out), torch.randn_like(last))  # fmt: skip
    torch.library.opcheck(torch.ops.bmojo.ssd_bwd.default, bwd)


def test_torch_compile():
    kw = inputs(1, 9, 2, 2, 1, 3, dtype=torch.float32)
    f = torch.compile(lambda k: call(k), fullgraph=False)
    torch.testing.assert_close(f(kw), call(kw), rtol=1e-6, atol=1e-6)


BAD = [
    ("x", lambda k: k["x"][0], "x"),
    ("dt shape", lambda k: k["dt"][..., :1], "dt"),
    ("A shape", lambda k: k["A"][None], "A"),
    ("B groups", lambda k: k["B"].expand(-1, -1, 3, -1), "B"),
    ("C shape", lambda k: k["C"][..., :1], "C"),
    ("D shape", lambda k: k["D"][:1], "D"),
    ("z shape", lambda k: k["z"][..., :1], "z"),
    ("dt_bias", lambda k: k["dt_bias"][:1], "dt_bias"),
    ("initial_states", lambda k: k["initial_states"][..., :1], "initial_states"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, edit, name = case
    kw = inputs(1, 5, 2, 2, 1, 3)
    arg = name if name in kw else "x"
    kw[arg] = edit(kw)
    with pytest.raises(bm.BmojoError, match=name):
        call(kw)


def test_bad_options():
    kw = inputs(2, 5, 2, 2, 1, 3)
    for extra, name in (
        (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2.0), "chunk_size"),
        (dict(dt_limit=(1.0, 0.5)), "dt_limit"), (dict(dt_limit=3), "dt_limit"),
        (dict(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens"),
        (dict(return_varlen_states=True), "return_varlen_states"),
        (dict(seq_idx=torch.zeros(2, 5)), "seq_idx"),
    ):  # fmt: skip
        with pytest.raises(bm.BmojoError, match=name):
            call(kw, **extra)
    one = inputs(1, 5, 2, 2, 1, 3)
    with pytest.raises(bm.BmojoValueError, match="cu_seqlens"):
        call(one, cu_seqlens=torch.tensor([0, 3, 2, 5]))


# ----------------------------------------------------------------------------- fused block


def split_inputs(b, length, h, p, g, n, k=4, *, seed=0, d_hp=False, out_dim=5):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    dim = h * p
    conv_dim = dim + 2 * g * n
    return dict(
        zxbcdt=r(b, length, 2 * dim + 2 * g * n + h), conv1d_weight=r(conv_dim, k) * 0.5,
        conv1d_bias=r(conv_dim) * 0.1, dt_bias=r(h) * 0.1,
        A=-torch.rand(h, generator=gen, dtype=torch.float64) - 0.2,
        D=r(h, p) if d_hp else r(h), rmsnorm_weight=1 + 0.1 * r(dim),
        outproj_weight=r(out_dim, dim) * 0.3, outproj_bias=r(out_dim), ngroups=g,
        headdim=None if d_hp else p,
    )  # fmt: skip


def split_ref(kw, *, norm_before_gate, use_norm=True, use_out=True, seq_idx=None,
              initial_states=None, dt_limit=(0.0, math.inf)):  # fmt: skip
    """The block from the oracles: reference conv, reference SSD, the gated RMSNorm and
    the projection written out."""
    from bmojo_core.ops.reference import causal_conv1d

    zx, D, g = kw["zxbcdt"], kw["D"], kw["ngroups"]
    h = D.shape[0]
    p = D.shape[1] if D.dim() == 2 else kw["headdim"]
    dim = h * p
    n = (zx.shape[-1] - 2 * dim - h) // (2 * g)
    b, length, _ = zx.shape
    z, xbc, dt = torch.split(zx, [dim, dim + 2 * g * n, h], dim=-1)
    xbc, _ = causal_conv1d(xbc.transpose(1, 2), kw["conv1d_weight"], kw["conv1d_bias"],
                           seq_idx=seq_idx, activation="silu")  # fmt: skip
    x, B, C = torch.split(xbc.transpose(1, 2), [dim, g * n, g * n], dim=-1)
    y, last = ssd_scan(
        x.reshape(b, length, h, p), dt, kw["A"], B.reshape(b, length, g, n),
        C.reshape(b, length, g, n), D=D, z=None if use_norm else z.reshape(b, length, h, p),
        dt_bias=kw["dt_bias"], initial_states=initial_states, seq_idx=seq_idx,
        dt_softplus=True, dt_limit=dt_limit, return_final_states=True,
    )  # fmt: skip
    y = y.reshape(b, length, dim)
    if use_norm:
        gate = torch.nn.functional.silu(z)
        v = y if norm_before_gate else y * gate
        gs = dim // g
        vg = v.reshape(b, length, g, gs)
        v = (vg / torch.sqrt(vg.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(b, length, dim)
        v = v * kw["rmsnorm_weight"]
        y = v * gate if norm_before_gate else v
    if use_out:
        y = y @ kw["outproj_weight"].T + kw["outproj_bias"]
    return y, last


def split_call(kw, *, norm_before_gate, use_norm=True, use_out=True, **extra):
    args = dict(kw)
    if not use_norm:
        args["rmsnorm_weight"] = None
    if not use_out:
        args["outproj_weight"] = args["outproj_bias"] = None
    return bm.mamba_split_conv1d_scan_combined(
        **args, chunk_size=8, norm_before_gate=norm_before_gate, rmsnorm_eps=1e-6,
        return_final_states=True, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("use_norm, use_out, d_hp", [(True, True, False), (True, False, True),
                                                      (False, True, False)])  # fmt: skip
def test_split_block_matches_oracles(norm_before_gate, use_norm, use_out, d_hp):
    kw = split_inputs(2, 19, 4, 3, 2, 5, d_hp=d_hp)
    h0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    got = split_call(kw, norm_before_gate=norm_before_gate, use_norm=use_norm, use_out=use_out,
                     initial_states=h0, dt_limit=(0.0, 3.0))  # fmt: skip
    want = split_ref(kw, norm_before_gate=norm_before_gate, use_norm=use_norm, use_out=use_out,
                     initial_states=h0, dt_limit=(0.0, 3.0))  # fmt: skip
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10)


def test_split_block_packed_and_gradcheck():
    kw = split_inputs(1, 9, 2, 2, 1, 3, seed=3)
    seq = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2]])
    got = split_call(kw, norm_before_gate=False, seq_idx=seq)
    want = split_ref(kw, norm_before_gate=False, seq_idx=seq)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    names = ["zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "rmsnorm_weight",
             "outproj_weight", "outproj_bias"]  # fmt: skip
    ts = [kw[k].clone().requires_grad_() for k in names]

    def f(*args):
        return split_call({**kw, **dict(zip(names, args, strict=True))}, norm_before_gate=True)

    assert torch.autograd.gradcheck(f, ts, atol=1e-7, rtol=1e-5)


def test_split_block_bad_input():
    kw = split_inputs(1, 5, 2, 2, 1, 3)
    for edit, name in (
        (dict(zxbcdt=kw["zxbcdt"][..., :-1]), "zxbcdt"), (dict(headdim=None), "headdim"),
        (dict(ngroups=3), "ngroups"), (dict(rmsnorm_weight=kw["rmsnorm_weight"][:3]),
        "rmsnorm_weight"), (dict(outproj_weight=kw["outproj_weight"][:, :3]), "outproj_weight"),
        (dict(conv1d_weight=kw["conv1d_weight"][:3]), "weight"),
    ):  # fmt: skip
        with pytest.raises(bm.BmojoError, match=name):
            split_call({**kw, **edit}, norm_before_gate=True)


def test_column_slices_of_one_projection_read_in_place_equal_contiguous():
    """Mamba-2 blocks pass x, B, C, dt (and z) as column slices of one projection: the
    kernel reads their rows in place; results and gradients equal those of contiguous
    copies bitwise (the same computation)."""
    b, length, h, p, g, n = 2, 70, 3, 4, 1, 9
    gen = torch.Generator().manual_seed(11)
    sizes = [h * p, h * p, g * n, g * n, h]
    proj = torch.randn(b, length, sum(sizes), generator=gen, dtype=torch.float64)
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.2

    def run(contiguous):
        leaf = proj.clone().requires_grad_()
        z, x, B, C, dt = torch.split(leaf, sizes, dim=-1)
        parts = [x.reshape(b, length, h, p), dt, B.reshape(b, length, g, n),
                 C.reshape(b, length, g, n), z.reshape(b, length, h, p)]  # fmt: skip
        if contiguous:
            parts = [t.contiguous() for t in parts]
        else:
            assert not parts[0].is_contiguous() and not parts[2].is_contiguous()
        x, dt, B, C, z = parts
        out, last = bm.mamba_chunk_scan_combined(x, dt, A, B, C, 8, z=z, dt_softplus=True,
                                                 return_final_states=True)  # fmt: skip
        (out.sum() + last.square().sum()).backward()
        return out, last, leaf.grad

    for a, c in zip(run(False), run(True), strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_path_equals_the_op_bitwise(dtype):
    """Without gradients the kernel writes mamba_ssm's (b, l, h, p) layout directly (every
    task into its own rows of one output); with them the op writes head-major and the
    wrapper copies: the same numbers either way."""
    kw = inputs(2, 77, 5, 7, 1, 19, dtype=dtype, d_hp=True)
    with torch.no_grad():
        fast, fast_last = call(kw, return_final_states=True)
    leaves = {k: (v.clone().requires_grad_() if k == "x" else v) for k, v in kw.items()}
    slow, slow_last = call(leaves, return_final_states=True)
    assert fast.is_contiguous() and fast.shape == slow.shape
    assert torch.equal(fast, slow.detach()) and torch.equal(fast_last, slow_last.detach())
