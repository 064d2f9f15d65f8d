"""The SSD reference (design §2.4) against independent oracles: Mamba-1's selective-scan
reference (an SSD head is p channels sharing one scalar decay), transformers' chunked torch
``mamba2_chunk_scan`` (a different algorithm), and its own properties (pieces carried
through final/initial states == whole; packed == per-sequence; cu_seqlens == seq_idx)."""

from __future__ import annotations

import math

import pytest
import torch
from bmojo_core.ops.reference import selective_scan, ssd_scan
from conftest import needs, transformers_with_torch
from hypothesis import given, settings
from hypothesis import strategies as st

HAS_TRANSFORMERS = transformers_with_torch()


def inputs(b, length, h, p, g, n, *, seed=0, dtype=torch.float64, d_hp=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    return dict(
        x=r(b, length, h, p), dt=r(b, length, h) * 0.5, A=-torch.rand(h, generator=gen,
        dtype=torch.float64).to(dtype) - 0.2, B=r(b, length, g, n), C=r(b, length, g, n),
        D=r(h, p) if d_hp else r(h), z=r(b, length, h, p), dt_bias=r(h) * 0.1,
        initial_states=r(b, h, p, n), dt_softplus=True,
    )  # fmt: skip


def as_selective(kw):
    """The same computation as Mamba-1's selective scan over dim = h·p channels."""
    x, dt, A, B, C = kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"]
    b, length, h, p = x.shape
    n = B.shape[3]
    u = x.reshape(b, length, h * p).transpose(1, 2)
    delta = dt.repeat_interleave(p, dim=2).transpose(1, 2)
    a = A.repeat_interleave(p)[:, None].expand(h * p, n)
    bb = B.permute(0, 2, 3, 1)  # (b, g, n, l): grouped
    cc = C.permute(0, 2, 3, 1)
    D = kw["D"]
    d = (D[:, None].expand(h, p) if D.dim() == 1 else D).reshape(-1)
    z = kw["z"].reshape(b, length, h * p).transpose(1, 2)
    out, last = selective_scan(
        u, delta, a, bb, cc, d, z, kw["dt_bias"].repeat_interleave(p), True, True,
        initial_state=kw["initial_states"].reshape(b, h * p, n),
    )  # fmt: skip
    return out.transpose(1, 2).reshape(b, length, h, p), last.reshape(b, h, p, n)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2), length=st.sampled_from([0, 1, 2, 7, 16]), h=st.integers(1, 4),
    p=st.integers(1, 3), n=st.integers(1, 4), grouped=st.booleans(), d_hp=st.booleans(),
)  # fmt: skip
def test_equals_mamba1_reference(b, length, h, p, n, grouped, d_hp):
    g = h if grouped and h > 1 else 1
    kw = inputs(b, length, h, p, g, n, d_hp=d_hp)
    out, last = ssd_scan(**kw, return_final_states=True)
    want, want_last = as_selective(kw)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, want_last, rtol=1e-12, atol=1e-12)


@needs(HAS_TRANSFORMERS, "transformers")
@pytest.mark.parametrize("length, chunk", [(1, 4), (13, 4), (32, 8), (33, 16)])
def test_equals_transformers_chunked_torch_path(length, chunk):
    """transformers' own CPU fallback (chunked einsum SSD; no z, D (h,), fp32 inside)."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    kw = inputs(2, length, 4, 3, 2, 5, dtype=torch.float32, seed=length)
    kw.pop("z")
    fn = getattr(mamba2_chunk_scan, "__wrapped__", mamba2_chunk_scan)
    want, want_last = fn(
        kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk, D=kw["D"], dt_bias=kw["dt_bias"],
        initial_states=kw["initial_states"], dt_softplus=True, dt_limit=(0.0, 2.0),
        return_final_states=True,
    )  # fmt: skip
    out, last = ssd_scan(**kw, dt_limit=(0.0, 2.0), return_final_states=True)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, want_last, rtol=1e-4, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 12), data=st.data())
def test_pieces_through_states_equal_whole(length, data):
    kw = inputs(2, length, 2, 2, 1, 3, seed=length)
    out, last = ssd_scan(**kw, return_final_states=True)
    cut = data.draw(st.integers(0, length))
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    second = {k: (v[:, cut:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    o1, s1 = ssd_scan(**first, return_final_states=True)
    second["initial_states"] = s1
    o2, s2 = ssd_scan(**second, return_final_states=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lens", [(3, 4), (1, 1, 5), (6,), (2, 0, 3)])
def test_packed_equals_separate(lens):
    """seq_idx and cu_seqlens packings equal separate calls; varlen states are each
    sequence's final state (the initial state applies to the first sequence only)."""
    total = sum(lens)
    kw = inputs(1, total, 2, 2, 1, 3, seed=total)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]
    out, last, varlen = ssd_scan(**kw, seq_idx=seq, cu_seqlens=cu, return_final_states=True,
                                 return_varlen_states=True)  # fmt: skip
    out2, last2, varlen2 = ssd_scan(**kw, cu_seqlens=cu, return_final_states=True,
                                    return_varlen_states=True)  # fmt: skip
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(varlen2, varlen, rtol=0, atol=0)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        part = {k: (v[:, a:b] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
        if i:
            part["initial_states"] = None
        o, s = ssd_scan(**part, return_final_states=True)
        torch.testing.assert_close(out[:, a:b], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(varlen[i], s[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, varlen[-1][None], rtol=1e-12, atol=1e-12)


def test_dt_limit_and_options():
    kw = inputs(1, 5, 2, 2, 1, 3)
    base = ssd_scan(**kw)
    assert base.shape == (1, 5, 2, 2)
    lim = ssd_scan(**kw, dt_limit=(0.0, 1e-9))  # decay ≈ 1, input ≈ 0: y ≈ H0·C + D x
    kw0 = dict(kw, dt=torch.full_like(kw["dt"], -math.inf), dt_bias=None, dt_softplus=True)
    torch.testing.assert_close(lim, ssd_scan(**kw0), rtol=1e-7, atol=1e-7)
    no_z = ssd_scan(**dict(kw, z=None))
    torch.testing.assert_close(base, no_z * torch.nn.functional.silu(kw["z"]))
