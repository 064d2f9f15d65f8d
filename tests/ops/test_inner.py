"""mamba_inner_fn (Mamba-1's fused block) against the same block written from the
pure-torch references (fp64), gradcheck, and bad input."""

from __future__ import annotations

import bmojo_core as bm
import pytest
import torch
import torch.nn.functional as F
from bmojo_core.ops import reference as R


def make(b=2, d=6, L=21, n=4, rank=3, K=4, out=5, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(
        xz=r(b, 2 * d, L), conv1d_weight=r(d, 1, K, scale=0.5), conv1d_bias=r(d),
        x_proj_weight=r(rank + 2 * n, d, scale=0.4), delta_proj_weight=r(d, rank, scale=0.4),
        out_proj_weight=r(out, d), out_proj_bias=r(out),
        A=-(torch.rand(d, n, generator=g, dtype=torch.float64) + 0.2).to(dtype),
        D=r(d), delta_bias=r(d, scale=0.1),
    )  # fmt: skip


def ref(kw, *, B_proj_bias=None, C_proj_bias=None, rms=None, eps=1e-6):
    """The block written out from the references, after mamba_ssm's mamba_inner_ref."""
    xz = kw["xz"]
    b, d2, L = xz.shape
    d = d2 // 2
    rank = kw["delta_proj_weight"].shape[1]
    n = kw["A"].shape[1]
    x, z = xz.chunk(2, dim=1)
    x, _ = R.causal_conv1d(x, kw["conv1d_weight"][:, 0], kw["conv1d_bias"], activation="silu")
    x_dbl = x.transpose(1, 2).reshape(b * L, d) @ kw["x_proj_weight"].t()
    delta = (x_dbl[:, :rank] @ kw["delta_proj_weight"].t()).reshape(b, L, d)

    def norm(m, w):
        return m * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + eps) * w

    if rms is not None:
        delta = norm(delta, rms[2])
    B = x_dbl[:, rank : rank + n] + (0 if B_proj_bias is None else B_proj_bias)
    C = x_dbl[:, rank + n :] + (0 if C_proj_bias is None else C_proj_bias)
    if rms is not None:
        B, C = norm(B, rms[0]), norm(C, rms[1])
    y = R.selective_scan(
        x, delta.transpose(1, 2), kw["A"], B.reshape(b, L, n).transpose(1, 2),
        C.reshape(b, L, n).transpose(1, 2), kw["D"], z, kw["delta_bias"], True,
    )  # fmt: skip
    return F.linear(y.transpose(1, 2), kw["out_proj_weight"], kw["out_proj_bias"])


@pytest.mark.parametrize("variant", ["plain", "biases", "rms"])
def test_matches_the_block_written_from_the_references(variant):
    kw = make(seed=len(variant))
    extra, ref_extra = {}, {}
    g = torch.Generator().manual_seed(9)
    if variant == "biases":
        bb, cb = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
        extra = dict(B_proj_bias=bb, C_proj_bias=cb)
        ref_extra = dict(B_proj_bias=bb, C_proj_bias=cb)
    if variant == "rms":
        ws = [torch.rand(s, generator=g, dtype=torch.float64) + 0.5 for s in (4, 4, 6)]
        extra = dict(b_rms_weight=ws[0], c_rms_weight=ws[1], dt_rms_weight=ws[2])
        ref_extra = dict(rms=ws)
    got = bm.mamba_inner_fn(**kw, **extra)
    want = ref(kw, **ref_extra)
    assert got.shape == (2, 21, 5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck_every_input():
    kw = make(b=1, d=3, L=7, n=2, rank=2, K=3, out=2)
    names = list(kw)
    ts = [kw[k].clone().requires_grad_() for k in names]

    def f(*args):
        return bm.mamba_inner_fn(**dict(zip(names, args, strict=True)))

    assert torch.autograd.gradcheck(f, ts, atol=1e-7, rtol=1e-5)


def test_float32_and_conv_weight_without_the_middle_axis():
    kw = make(dtype=torch.float32)
    a = bm.mamba_inner_fn(**kw)
    b = bm.mamba_inner_fn(**{**kw, "conv1d_weight": kw["conv1d_weight"][:, 0]})
    assert torch.equal(a, b)
    want = ref({k: v.double() for k, v in kw.items()})
    torch.testing.assert_close(a.double(), want, rtol=1e-4, atol=1e-4)


BAD = [
    ("xz", lambda k: k.update(xz=k["xz"][:, :-1]), "xz"),
    ("conv1d_weight", lambda k: k.update(conv1d_weight=k["conv1d_weight"][:-1]), "conv1d_weight"),
    ("x_proj_weight", lambda k: k.update(x_proj_weight=k["x_proj_weight"][:-1]), "x_proj_weight"),
    ("delta_proj_weight", lambda k: k.update(delta_proj_weight=k["delta_proj_weight"][:-1]),
     "delta_proj_weight"),
    ("A", lambda k: k.update(A=k["A"][:-1]), "A"),
    ("out_proj_weight", lambda k: k.update(out_proj_weight=k["out_proj_weight"][:, :-1]),
     "out_proj_weight"),
    ("checkpoint_lvl", lambda k: k.update(checkpoint_lvl=-1), "checkpoint_lvl"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, edit, name = case
    kw = make()
    edit(kw)
    with pytest.raises(bm.BmojoError, match=name):
        bm.mamba_inner_fn(**kw)
