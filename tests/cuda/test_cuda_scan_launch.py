"""The CUDA implementations of the scan, step and SSD ops against the kernels' C
signatures, without a GPU: the launcher is replaced by a recorder, the ops' CUDA functions
run on CPU tensors, and every launch is checked against the `extern "C"` parameter lists
of cuda/scan.cu, cuda/step.cu and cuda/ssd.cu as the emulator reads them from the
compiled sources
(argument count, codes, pointer dtypes, contiguity, launch limits), and every result
against the op's fake implementation (shapes, dtypes)."""

from __future__ import annotations

import pytest
import torch
from bmojo_core import cuda as _cuda
from bmojo_core.ops import scan, ssd, step
from conftest import make_scan_inputs, make_step_inputs, needs
from cuda_emu import harness as H

pytestmark = needs(H.compiler() is not None, "g++ with C++20 <barrier> and _Float16")


@pytest.fixture
def launches(monkeypatch):
    """Records every Kernel.launch after checking it against the entry point's C signature
    (the emulator's table, read from the compiled sources) and the launch limits."""
    emu = H.Emulator()
    calls = []

    def fake(self, suffix, grid, block, args, fmt, shared_mem=0, device=None):
        emu.check(self, suffix, grid, block, args, fmt, shared_mem)
        calls.append((self.name, suffix, grid, block))

    monkeypatch.setattr(_cuda.Kernel, "launch", fake)
    return calls


def same_meta(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)


def normalised(kw, act, cdt):
    """The op arguments the public wrapper passes on CUDA."""

    def bc(m):
        m = m if m.dim() != 3 else m.unsqueeze(1)
        return m.to(act if m.dim() == 4 else cdt).contiguous()

    seq = kw["seq_idx"]
    return (
        kw["u"].to(act), kw["delta"].to(act), kw["A"].to(cdt), bc(kw["B"]), bc(kw["C"]),
        None if kw["D"] is None else kw["D"].to(cdt), None if kw["z"] is None else kw["z"].to(act),
        None if kw["delta_bias"] is None else kw["delta_bias"].to(cdt),
        None if kw["initial_state"] is None else kw["initial_state"].to(cdt),
        None if seq is None else seq.long(), kw["delta_softplus"],
    )  # fmt: skip


CASES = [
    # dtype, bc, optional inputs on
    (torch.float32, "var", True),
    (torch.float64, "const", False),
    (torch.float16, "group", True),
    (torch.bfloat16, "const/var", True),
    (torch.float32, "group/const", False),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_selective_scan_launches(case, launches):
    dtype, bc, opts = case
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    kw = make_scan_inputs(
        2, 12, 5, 130, bc=bc, G=3, dtype=dtype, D=opts, z=opts, delta_bias=opts,
        initial_state=opts, seq_idx=2 if opts else 0,
    )  # fmt: skip
    args = normalised(kw, dtype, cdt)
    res = scan._sel_fwd_cuda(*args)
    same_meta(res, _fake_fwd(args))
    out, last, ckpt = res
    bargs = (*args[:8], args[9], args[10], ckpt, torch.randn(out.shape).to(dtype),
             torch.randn(last.shape, dtype=cdt) if opts else None)  # fmt: skip
    grads = scan._sel_bwd_cuda(*bargs)
    same_meta(grads, _fake_bwd(bargs))
    assert [c[0] for c in launches] == ["selective_scan_fwd", "selective_scan_bwd"]
    # Backward blocks of several channels only with a variable B/C, never across a group
    # (12 channels, 3 groups of 4 for "group").
    blocks = {"var": 1, "const": 12, "group": 3, "const/var": 1, "group/const": 3}[bc]
    assert launches[1][2] == (blocks, 2, 1)


def _fake_fwd(args):
    u, A = args[0], args[2]
    batch, dim, length = u.shape
    n = A.shape[1]
    nck = (length + scan.CHUNK - 1) // scan.CHUNK
    return (u.new_empty(u.shape), A.new_empty(batch, dim, n), A.new_empty(batch, dim, nck, n))


def _fake_bwd(bargs):
    u, delta, A, B, C, D, z, bias = bargs[:8]
    batch, dim, _ = u.shape
    e = u.new_empty(0)
    return (
        torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B),
        torch.empty_like(C), e if D is None else torch.empty_like(D),
        e if z is None else torch.empty_like(z), e if bias is None else torch.empty_like(bias),
        A.new_empty(batch, dim, A.shape[1]),
    )  # fmt: skip


def test_channels_per_block():
    A = torch.zeros(1)
    g4 = torch.zeros(1, 4, 1, 1)
    const = torch.zeros(2, 2)
    assert scan._channels_per_block(64, 16, 4, (const, const)) == 1
    assert scan._channels_per_block(64, 16, 4, (g4, const)) == 16
    assert scan._channels_per_block(28, 16, 4, (g4, g4)) == 7  # 7 channels per group
    assert scan._channels_per_block(26, 16, 4, (torch.zeros(1, 2, 1, 1), g4[:, :1])) == 13
    # shared memory: (4N + 2) * cb * 8 bytes must fit in 47 KiB
    assert scan._channels_per_block(64, 512, 8, (g4, const)) == 2
    assert scan._channels_per_block(64, 1024, 8, (g4, const)) == 1
    del A


@pytest.mark.parametrize("cdt", [torch.float32, torch.float64])
def test_diag_scan_launches(cdt, launches):
    a, b = torch.rand(5, 40, dtype=cdt), torch.randn(5, 40, dtype=cdt)
    h, last = scan._diag_fwd_cuda(a, b, torch.zeros(5, dtype=cdt), True)
    assert h.shape == b.shape and last.shape == (5,)
    da, db, dh0 = scan._diag_bwd_cuda(
        a, h, None, torch.randn_like(h), torch.randn(5, dtype=cdt), True
    )
    assert da.shape == db.shape == a.shape and dh0.shape == (5,)
    assert [c[0] for c in launches] == ["diag_scan", "diag_scan"]


@pytest.mark.parametrize("multi", [False, True])
def test_state_update_launches(multi, launches):
    kw = make_step_inputs(3, heads=True, H=2, P=3, N=4, T=2 if multi else None, G=2, slots=5,
                          dtype=torch.float32, seed=1)  # fmt: skip
    batch, ntok, dim, n = 3, 2 if multi else 1, 6, 4
    state = kw["state"].reshape(5, dim, n)

    def tok(t):
        return t.reshape(batch, ntok, dim)

    snaps = torch.zeros(batch, ntok, dim, n) if multi else None
    out = step._step_cuda(
        state, tok(kw["x"]), tok(kw["dt"]), kw["A"].reshape(dim, n),
        kw["B"].reshape(batch, ntok, 2, n), kw["C"].reshape(batch, ntok, 2, n),
        kw["D"].reshape(dim), tok(kw["z"]), kw["dt_bias"].reshape(dim), True,
        torch.tensor([4, -1, 0]), snaps,
    )  # fmt: skip
    assert out.shape == (batch, ntok, dim)
    assert launches == [("selective_state_update", "f32", (1, batch, 1), (128, 1, 1))]


def test_state_update_fast_path_launch(launches):
    kw = make_step_inputs(2, dim=300, N=16, dtype=torch.float32, seed=2)
    out = step._cuda_fast(*(kw[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z")),
                          kw["dt_bias"], True)  # fmt: skip
    assert out is not None and out.shape == (2, 300)
    assert launches == [("selective_state_update", "f32", (3, 2, 1), (128, 1, 1))]
    # Anything off the decode layout falls back to the validating path.
    assert step._cuda_fast(kw["state"], kw["x"][:1], kw["dt"], kw["A"], kw["B"], kw["C"],
                           None, None, None, True) is None  # fmt: skip
    assert step._cuda_fast(kw["state"].double(), kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"],
                           None, None, None, True) is None  # fmt: skip


def test_declared_kernels():
    names = {(k.source, k.name) for k in _cuda.declared()}
    want = [("scan.cu", "diag_scan"), ("scan.cu", "selective_scan_fwd"),
            ("scan.cu", "selective_scan_bwd"), ("step.cu", "selective_state_update")]  # fmt: skip
    emu = H.Emulator()
    for src, name in want:
        assert (src, name) in names
        for suffix in _cuda.DTYPES:  # every declared entry point is instantiated
            assert f"{name}_{suffix}" in emu.lib(src).sigs, (name, suffix)


@pytest.mark.parametrize(
    ("dtype", "n", "rows"),
    [(torch.float32, 128, 8), (torch.float64, 128, 4), (torch.float64, 256, 2),
     (torch.float32, 256, 4), (torch.float32, 16, 8)],
)  # fmt: skip
def test_ssd_launches(dtype, n, rows, launches, monkeypatch):
    """Mamba-2's head dim 64: forward blocks of 8 rows; backward blocks of as many rows as
    its shared memory holds; the backward in windows of whole chunks when its partials
    would exceed the bound (here two launches over 200 steps), then one dt launch."""
    b, length, h, p, g = 2, 200, 4, 64, 2
    monkeypatch.setattr(ssd, "_CUDA_PART_ELEMS", 2 * b * h * (p // rows) * n * 128)
    x = torch.randn(b, length, h, p, dtype=dtype)
    dt, A = torch.rand(b, length, h, dtype=dtype), -torch.rand(h, dtype=dtype)
    B, C = torch.randn(b, length, g, n, dtype=dtype), torch.randn(b, length, g, n, dtype=dtype)
    D, bias, h0 = torch.randn(h, p, dtype=dtype), torch.randn(h, dtype=dtype), None
    seq = torch.zeros(b, length, dtype=torch.int64)
    args = (x, dt, A, B, C, D, x, bias, h0, seq, True, True, 0.0, 5.0)
    out, last, ckpt = ssd._ssd_fwd_cuda(*args)
    same_meta((out, last, ckpt), (x.new_empty(b, h, length, p), x.new_empty(b, h, p, n),
                                  x.new_empty(b, h, 4, p, n)))  # fmt: skip
    grads = ssd._ssd_bwd_cuda(*args[:8], seq, True, True, 0.0, 5.0, ckpt,
                              torch.randn_like(out), torch.randn_like(last))  # fmt: skip
    same_meta(grads, (out, dt.new_empty(b, h, length), A, B, C, D, out, bias, last))
    sfx = "f64" if dtype == torch.float64 else "f32"
    nmax = 32 if n <= 32 else n  # the entry point of the smallest bound 32, 64, 128, 256
    assert launches[:3] == [
        (f"ssd_fwd_n{nmax}", sfx, (8, h, b), (256, 1, 1)),
        (f"ssd_bwd_n{nmax}", sfx, (p // rows, h, b), (32 * rows, 1, 1)),
        (f"ssd_bwd_n{nmax}", sfx, (p // rows, h, b), (32 * rows, 1, 1)),
    ]
    assert [c[0] for c in launches[3:]] == ["ssd_bwd_dt"]


def test_ssd_empty_launches_nothing(launches):
    f64 = dict(dtype=torch.float64)
    x, B = torch.zeros(2, 0, 3, 4, **f64), torch.zeros(2, 0, 1, 5, **f64)
    args = (x, torch.zeros(2, 0, 3, **f64), torch.zeros(3, **f64), B, B, None, None, None)
    h0 = torch.randn(2, 3, 4, 5, **f64)
    out, last, ckpt = ssd._ssd_fwd_cuda(*args, h0, None, False, False, 0.0, 0.0)
    assert [c[0] for c in launches] == ["ssd_fwd_n32"]  # writes the final state (= h0)
    assert out.shape == (2, 3, 0, 4) and ckpt.shape == (2, 3, 0, 4, 5)
    launches.clear()
    dlast = torch.randn(2, 3, 4, 5, **f64)
    grads = ssd._ssd_bwd_cuda(*args, None, False, False, 0.0, 0.0, ckpt, out, dlast)
    assert launches == []
    assert torch.equal(grads[8], dlast) and torch.equal(grads[2], torch.zeros(3, **f64))
