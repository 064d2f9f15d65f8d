"""Shared fixtures and helpers of the bmojo_core test suite.

Helpers live here (tests import them with ``from conftest import ...``) so the suite needs
no package of its own.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

# ---------------------------------------------------------------------------------------
# hypothesis profiles
# ---------------------------------------------------------------------------------------

settings.register_profile(
    "bmojo-ci",
    deadline=None,
    derandomize=True,
    max_examples=25,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "bmojo-dev",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("bmojo-ci" if os.environ.get("CI") else "bmojo-dev")

# ---------------------------------------------------------------------------------------
# tools the machine may lack
# ---------------------------------------------------------------------------------------

STRICT = os.environ.get("BMOJO_TEST_STRICT") == "1"
"""Set by scripts/test.sh (and so by CI): a missing tool fails the tests that need it
instead of skipping them, so a broken look-up (of NVRTC, the emulator's compiler...) cannot
pass as a skip. Only the lack of a GPU stays a skip."""


def needs(available: bool, what: str):
    """Skip marker for a test that needs ``what`` (a tool, not a GPU); under
    ``BMOJO_TEST_STRICT=1`` the test runs anyway and fails where the tool is missing."""
    return pytest.mark.skipif(not available and not STRICT, reason=f"needs {what}")


def transformers_with_torch() -> bool:
    """transformers is installed and runs its PyTorch models with the installed torch (a
    transformers too new for this torch imports, but disables its models)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return False
    from transformers.utils import is_torch_available

    return is_torch_available()


if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 6):

    @pytest.fixture(autouse=True)
    def _undo_inductor_fast_math():
        """torch < 2.6's inductor builds its C++ kernels with -ffast-math, and loading one
        turns on flush-to-zero/denormals-are-zero for the whole thread: every later test in
        that worker would compute without subnormals (hypothesis refuses to run then).
        Turn them back off after each test."""
        yield
        torch.set_flush_denormal(False)


# ---------------------------------------------------------------------------------------
# tolerances (design §1; measured against an fp64 reference)
# ---------------------------------------------------------------------------------------

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=6e-4, atol=2e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=5e-2),
    torch.float16: dict(rtol=3e-3, atol=5e-3),
}


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, msg: str = ""):
    """Compare ``got`` (any dtype) with an (fp64) reference at the tolerance of ``dtype``."""
    assert got.shape == ref.shape, f"{msg}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    torch.testing.assert_close(
        got.detach().to(torch.float64),
        ref.detach().to(torch.float64),
        **TOL[dtype],
        msg=(lambda m: f"{msg}: {m}") if msg else None,
    )


FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def stable_seed(*parts) -> int:
    """A seed derived from test parameters, identical in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode()) % (2**31)


def to64(x):
    """Detached float64 copy of a floating tensor (other values unchanged)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64)
    return x


def kwargs64(kw: dict) -> dict:
    return {k: to64(v) for k, v in kw.items()}


def with_grad(kw: dict, names) -> dict:
    """Copy of ``kw`` where the named tensors are fresh leaves requiring grad."""
    out = dict(kw)
    for n in names:
        if out.get(n) is not None:
            out[n] = out[n].detach().clone().requires_grad_(True)
    return out


def make_seq_idx(batch: int, L: int, n_seqs: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted packed-sequence ids (batch, L) int32 with up to ``n_seqs`` segments."""
    rows = []
    for _ in range(batch):
        if L <= 1 or n_seqs <= 1:
            rows.append(torch.zeros(L, dtype=torch.int32))
            continue
        k = min(n_seqs - 1, L - 1)
        cuts = torch.randperm(L - 1, generator=gen)[:k] + 1
        row = torch.zeros(L, dtype=torch.int32)
        for c in cuts.tolist():
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros((0, L), dtype=torch.int32)


def make_scan_inputs(
    batch: int = 2,
    dim: int = 3,
    N: int = 4,
    L: int = 8,
    *,
    bc: str = "var",
    G: int = 1,
    dtype: torch.dtype = torch.float64,
    weight_dtype: torch.dtype | None = None,
    seed: int = 0,
    D: bool = True,
    z: bool = True,
    delta_bias: bool = True,
    delta_softplus: bool = True,
    initial_state: bool = False,
    seq_idx: int = 0,
    return_last_state: bool = False,
) -> dict:
    """Keyword arguments for ``selective_scan_fn`` / ``reference.selective_scan``.

    ``bc`` is "const" ((dim, N)), "var" ((batch, N, L)), "group" ((batch, G, N, L)) or a
    pair "const/var"-style string giving B's and C's forms separately. ``seq_idx`` > 0 adds
    packed sequences with up to that many segments. Magnitudes follow mamba_ssm's tests.
    """
    gen = torch.Generator().manual_seed(seed)
    wdt = weight_dtype or dtype

    def rn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    def ru(*shape, dt=dtype):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).to(dt)

    b_form, c_form = bc.split("/") if "/" in bc else (bc, bc)

    def bcmat(form):
        if form == "const":
            return rn(dim, N)
        if form == "var":
            return rn(batch, N, L)
        if form == "group":
            return rn(batch, G, N, L)
        raise ValueError(form)

    kw = dict(
        u=rn(batch, dim, L),
        delta=(0.5 * ru(batch, dim, L, dt=torch.float64)).to(dtype)
        if not delta_softplus
        else (ru(batch, dim, L, dt=torch.float64) - 0.5).to(dtype),
        A=(-0.5 - ru(dim, N, dt=torch.float64)).to(wdt),
        B=bcmat(b_form),
        C=bcmat(c_form),
        D=rn(dim, dt=wdt) if D else None,
        z=rn(batch, dim, L) if z else None,
        delta_bias=(0.5 * ru(dim, dt=torch.float64) - 1.0).to(wdt)
        if (delta_bias and delta_softplus)
        else ((0.1 * ru(dim, dt=torch.float64)).to(wdt) if delta_bias else None),
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
        initial_state=rn(
            batch, dim, N, dt=torch.float64 if dtype == torch.float64 else torch.float32
        )
        if initial_state
        else None,
        seq_idx=make_seq_idx(batch, L, seq_idx, gen) if seq_idx else None,
    )
    return kw


def make_step_inputs(
    batch: int = 3,
    *,
    heads: bool = False,
    dim: int = 5,
    H: int = 2,
    P: int = 3,
    N: int = 4,
    T: int | None = None,
    G: int | None = None,
    slots: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    D: bool = True,
    z: bool = True,
    dt_bias: bool = True,
    dt_softplus: bool = True,
) -> dict:
    """Keyword arguments for ``selective_state_update`` (``state`` included).

    ``T`` None gives the single-token form, an int the multi-token form. ``G`` None gives
    B/C of shape (batch[, T], N); an int gives (batch[, T], G, N). ``slots`` sets the state
    pool size (default: batch).
    """
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    def ru(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).to(dtype)

    S = batch if slots is None else slots
    ch = (H, P) if heads else (dim,)
    tok = (batch,) if T is None else (batch, T)
    bc = tok + ((N,) if G is None else (G, N))
    return dict(
        state=rn(S, *ch, N),
        x=rn(*tok, *ch),
        dt=(ru(*tok, *ch) - 0.5) if dt_softplus else 0.5 * ru(*tok, *ch),
        A=-0.5 - ru(*ch, N),
        B=rn(*bc),
        C=rn(*bc),
        D=rn(*ch) if D else None,
        z=rn(*tok, *ch) if z else None,
        dt_bias=(0.5 * ru(*ch) - 1.0) if dt_bias else None,
        dt_softplus=dt_softplus,
    )


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture
def restore_runtime():
    """Restore bmojo_core's SIMD level and thread count after the test."""
    import bmojo_core

    level = bmojo_core.simd_level()
    threads = bmojo_core.get_num_threads()
    try:
        yield bmojo_core
    finally:
        bmojo_core.set_simd_level(level)
        bmojo_core.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# saved streams (format 2), taken apart and written back with a valid checksum
# ---------------------------------------------------------------------------------------


def _format():
    from bmojo_core.inference import format as F

    return F


def stream_parts(data: bytes) -> tuple[dict, dict, dict]:
    """(our header, safetensors entries, tensors by name) of a format-2 file."""
    (n,) = struct.unpack_from("<Q", data)
    top = json.loads(data[8 : 8 + n])
    meta = json.loads(top.pop("__metadata__")["bmojo_core.stream"])
    body = data[8 + n :]
    tensors = {}
    for name, e in top.items():
        a, b = e["data_offsets"]
        dt = _format()._ST_DTYPES[e["dtype"]]
        raw = bytearray(body[a:b])
        t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensors[name] = t.view(dt).reshape(e["shape"]).clone()
    return json.loads(meta["header"]), top, tensors


def write_stream(header: dict, tensors: dict, order: list[str], entries: dict | None = None,
          meta: dict | None = None) -> bytes:  # fmt: skip
    """A format-2 file with a *valid* checksum over ``header`` and ``tensors`` in
    ``order`` (names missing from ``tensors`` are skipped); ``entries`` overrides the
    declared dtype/shape/offsets of some tensors."""
    text = json.dumps(header, sort_keys=True)
    chunks, top, off = [], {}, 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        top[name] = {"dtype": _format()._CODES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [off, off + len(raw)]}  # fmt: skip
        chunks.append(raw)
        off += len(raw)
    for name, e in (entries or {}).items():
        top.setdefault(name, {}).update(e)
    ordered = [tensors[n] for n in order if n in tensors]
    digest = _format()._checksum(text.encode(), [_format()._bytes(t) for t in ordered])
    ours = {"version": 2, "header": text, "sha256": digest, **(meta or {})}
    fmt = ours.pop("format", "bmojo_core.stream")
    top["__metadata__"] = {fmt: json.dumps(ours)}
    hj = json.dumps(top).encode()
    hj += b" " * (-len(hj) % 8)
    return struct.pack("<Q", len(hj)) + hj + b"".join(chunks)
