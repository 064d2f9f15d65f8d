"""The CUDA kernels of cuda/scan.cu and cuda/step.cu executed on the CPU, without a GPU.

The harness (tests/cuda_emu/harness.py, shared with test_cuda_emulated_ops.py) compiles
the sources as C++20 behind an emulation prelude (cooperative blocks run as OS threads
with real barriers for __syncthreads and the warp shuffles) and replaces the launcher, so
the ops' CUDA implementations (scan._sel_fwd_cuda, ...) run end to end on CPU tensors and
are compared with the CPU ops (themselves verified against the fp64 references); every
launch is checked against the entry point's C signature. float16/bfloat16 activations
included. Skipped without a C++20 compiler with _Float16.
"""

from __future__ import annotations

import pytest
import torch
from bmojo_core.ops import scan, step
from conftest import make_scan_inputs, make_step_inputs, needs, stable_seed
from cuda_emu import harness as H

pytestmark = needs(H.compiler() is not None, "g++ with C++20 <barrier> and _Float16")


@pytest.fixture(scope="module")
def emulated():
    """Kernel.launch runs the emulated kernel on CPU tensors."""
    with H.emulate() as emu:
        yield emu


def close(got: torch.Tensor, want: torch.Tensor, name: str, tol: float | None = None) -> None:
    """Relative to the scale of the reference; float64 near-exact, float32 loose enough
    for the different summation order of the block scans."""
    assert got.shape == want.shape, name
    assert tol is not None or got.dtype == want.dtype, name
    if want.numel() == 0:
        return
    if tol is None:
        tol = 1e-12 if want.dtype == torch.float64 else 3e-5
    scale = want.abs().max().item() + 1.0
    err = (got.double() - want.double()).abs().max().item() / scale
    assert err <= tol, f"{name}: max error {err:.3g} (relative to {scale:.3g})"


SCAN_CASES = [
    # batch, dim, N, L, bc, G, dtype, options, packed sequences
    (1, 1, 1, 1, "var", 1, torch.float64, False, 0),
    (2, 3, 4, 7, "const", 1, torch.float64, True, 2),
    (1, 4, 3, 200, "var", 1, torch.float64, True, 3),
    (2, 6, 2, 130, "group", 3, torch.float64, True, 3),
    (1, 2, 40, 90, "var/const", 1, torch.float64, True, 2),  # N > one warp
    (1, 2, 2, 1100, "const/var", 1, torch.float32, True, 4),  # several tiles
    (1, 2, 2, 600, "group/const", 1, torch.float64, False, 0),  # several f64 tiles
    (1, 3, 2, 0, "var", 1, torch.float64, True, 0),
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=str)
def test_selective_scan_emulated(case, emulated):
    batch, dim, n, length, bc, g, dtype, opts, seq = case
    kw = make_scan_inputs(
        batch, dim, n, length, bc=bc, G=g, dtype=dtype, D=opts, z=opts, delta_bias=opts,
        initial_state=opts, seq_idx=seq, seed=stable_seed("emu", case),
    )  # fmt: skip

    def mat(m):
        return m if m.dim() != 3 else m.unsqueeze(1)

    seq_idx = None if kw["seq_idx"] is None else kw["seq_idx"].long()
    args = (kw["u"], kw["delta"], kw["A"], mat(kw["B"]), mat(kw["C"]), kw["D"], kw["z"],
            kw["delta_bias"], kw["initial_state"], seq_idx, kw["delta_softplus"])  # fmt: skip
    want = torch.ops.bmojo.selective_scan_fwd(*args)
    got = scan._sel_fwd_cuda(*args)
    for name, x, y in zip(("out", "last_state", "checkpoints"), got, want, strict=True):
        close(x, y, name)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(want[0].shape, generator=gen, dtype=dtype)
    dlast = torch.randn(want[1].shape, generator=gen, dtype=dtype) if opts else None
    bargs = (*args[:8], seq_idx, kw["delta_softplus"], want[2], dout, dlast)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")
    grads = scan._sel_bwd_cuda(*bargs)
    for name, x, y in zip(names, grads, torch.ops.bmojo.selective_scan_bwd(*bargs), strict=True):
        close(x, y, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bc", ["var", "group/const"])
def test_selective_scan_emulated_half(dtype, bc, emulated):
    """float16/bfloat16 activations (and variable B/C) read as they are, parameters and
    states in float32: the float32 CPU op on the same values, up to the output rounding."""
    kw = make_scan_inputs(
        2, 4, 5, 150, bc=bc, G=2, dtype=dtype, weight_dtype=torch.float32, initial_state=True,
        seq_idx=2, seed=stable_seed("emu half", dtype, bc),
    )  # fmt: skip

    def mat(m):  # the wrapper's layout: constant matrices in float32
        return m.float() if m.dim() == 2 else m.unsqueeze(1) if m.dim() == 3 else m

    seq_idx = kw["seq_idx"].long()
    args = (kw["u"], kw["delta"], kw["A"], mat(kw["B"]), mat(kw["C"]), kw["D"], kw["z"],
            kw["delta_bias"], kw["initial_state"], seq_idx, True)  # fmt: skip
    args32 = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)  # fmt: skip
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    want = torch.ops.bmojo.selective_scan_fwd(*args32)
    got = scan._sel_fwd_cuda(*args)
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    close(got[0].float(), want[0], "out", tol)
    close(got[1], want[1], "last_state")
    close(got[2], want[2], "checkpoints")
    gen = torch.Generator().manual_seed(2)
    dout = torch.randn(want[0].shape, generator=gen).to(dtype)
    dlast = torch.randn(want[1].shape, generator=gen)
    bargs = (*args[:8], seq_idx, True, got[2], dout, dlast)
    bargs32 = (*args32[:8], seq_idx, True, want[2], dout.float(), dlast)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinitial_state")
    grads = scan._sel_bwd_cuda(*bargs)
    for name, x, y, a in zip(names, grads, torch.ops.bmojo.selective_scan_bwd(*bargs32),
                             (*args[:8], args[8]), strict=True):  # fmt: skip
        assert x.dtype == a.dtype, name
        close(x.float(), y, name, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [0, 5, 1100])
@pytest.mark.parametrize("reverse", [False, True])
def test_diag_scan_emulated(dtype, length, reverse, emulated):
    gen = torch.Generator().manual_seed(length)
    a = (0.5 + 0.5 * torch.rand(3, length, generator=gen)).to(dtype)
    b = torch.randn(3, length, generator=gen).to(dtype)
    h0 = torch.randn(3, generator=gen).to(dtype)
    want = torch.ops.bmojo.diag_scan_fwd(a, b, h0, reverse)
    got = scan._diag_fwd_cuda(a, b, h0, reverse)
    for name, x, y in zip(("h", "last"), got, want, strict=True):
        close(x, y, name)
    dh = torch.randn(3, length, generator=gen).to(dtype)
    dlast = torch.randn(3, generator=gen).to(dtype)
    want = torch.ops.bmojo.diag_scan_bwd(a, want[0], h0, dh, dlast, reverse)
    got = scan._diag_bwd_cuda(a, got[0], h0, dh, dlast, reverse)
    for name, x, y in zip(("da", "db", "dh0"), got, want, strict=True):
        close(x, y, name)


STEP_CASES = [
    dict(),
    dict(G=1),
    dict(heads=True, G=2),
    dict(T=3),
    dict(T=4, heads=True, G=2, slots=6),
    dict(slots=5),
    dict(D=False, z=False, dt_bias=False, dt_softplus=False),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_update_emulated(case, dtype, emulated):
    kw = make_step_inputs(3, dtype=dtype, seed=stable_seed("emu step", case), **case)
    state = kw["state"]
    slots, n = state.shape[0], state.shape[-1]
    batch, ntok, dim, g = 3, case.get("T", 1), state[0].numel() // n, case.get("G") or 1
    idx = torch.tensor([slots - 1, -1, 0]) if "slots" in case else None

    def flat(t, *shape):
        return None if t is None else t.reshape(*shape)

    def args(st, snaps):
        return (st, flat(kw["x"], batch, ntok, dim), flat(kw["dt"], batch, ntok, dim),
                flat(kw["A"], dim, n), flat(kw["B"], batch, ntok, g, n),
                flat(kw["C"], batch, ntok, g, n), flat(kw["D"], dim),
                flat(kw["z"], batch, ntok, dim), flat(kw["dt_bias"], dim), kw["dt_softplus"],
                idx, snaps)  # fmt: skip

    s_want, s_got = state.reshape(slots, dim, n).clone(), state.reshape(slots, dim, n).clone()
    sn_want = torch.full((batch, ntok, dim, n), 7.0, dtype=dtype)
    sn_got = sn_want.clone()
    out_want = torch.ops.bmojo.selective_state_update(*args(s_want, sn_want))
    out_got = step._step_cuda(*args(s_got, sn_got))
    close(out_got, out_want, "out")
    close(s_got, s_want, "state")
    close(sn_got, sn_want, "intermediate_states")
    if ntok == 1 and idx is None:  # the decode fast path: same kernel, same results
        s_fast = state.reshape(slots, dim, n).clone()
        bc = (batch, g, n) if g > 1 else (batch, n)
        out_fast = step._cuda_fast(
            s_fast, flat(kw["x"], batch, dim), flat(kw["dt"], batch, dim), flat(kw["A"], dim, n),
            flat(kw["B"], *bc), flat(kw["C"], *bc), flat(kw["D"], dim), flat(kw["z"], batch, dim),
            flat(kw["dt_bias"], dim), kw["dt_softplus"],
        )  # fmt: skip
        assert out_fast is not None
        close(out_fast, out_want.reshape(batch, dim), "fast path out")
        close(s_fast, s_want, "fast path state")
