"""The CUDA runtime: NVRTC compilation of every kernel source for sm_80/sm_90/
sm_100 (the declared entry points must be in each CUBIN), the disk cache, the error
mapping, argument checking, ``bmojo info`` and lazy loading. These need no GPU (only
NVRTC, which torch's pip install carries); the launch tests at the end need a CUDA device
and are skipped without one."""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from bmojo_core import _core, cuda
from bmojo_core.errors import BmojoCompileError, BmojoCudaError, BmojoTypeError, BmojoValueError
from conftest import STRICT, needs

# Every op module: importing them registers their kernel declarations.
OP_MODULES = (
    "ops.scan", "ops.step", "ops.conv", "ops.companion", "ops.bilinear", "ops.eidetic",
    "ops.ssd", "layers", "inference.stream",
)  # fmt: skip
for _m in OP_MODULES:
    importlib.import_module(f"bmojo_core.{_m}")

HAS_NVRTC = cuda.nvrtc_available()
needs_nvrtc = needs(HAS_NVRTC, "the NVRTC library")
HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

REPO_CUDA = Path(__file__).resolve().parents[2] / "cuda"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("BMOJO_")}
    e.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def registry():
    """Declarations made by a test are removed afterwards (the compile test walks them)."""
    saved = dict(cuda._REGISTRY)
    yield
    cuda._REGISTRY.clear()
    cuda._REGISTRY.update(saved)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty disk cache and an empty in-memory cache."""
    d = tmp_path / "kernels"
    monkeypatch.setenv("BMOJO_CACHE_DIR", str(d))
    monkeypatch.setattr(cuda, "_MEM_CUBIN", {})
    monkeypatch.setattr(cuda, "_STATS", dict.fromkeys(cuda._STATS, 0))
    return d


# A tiny source that is not part of cuda/ (unique text per test keeps caches apart).
TINY = """#include "common.cuh"
// {tag}
template <typename S> __device__ void axpy(S* y, const S* x, const S* bias, float a,
                                           long long n) {{
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    typedef typename bm_io<S>::C C;
    C v = bm_io<S>::load(y + i) + C(a) * bm_io<S>::load(x + i);
    if (bias) v += bm_io<S>::load(bias + i);
    bm_io<S>::store(y + i, v);
}}
#define BM_AXPY(S, suffix) \\
    extern "C" __global__ void bm_test_axpy_##suffix(S* y, const S* x, const S* bias, \\
                                                     float a, long long n) {{ \\
        axpy<S>(y, x, bias, a, n); \\
    }}
BM_AXPY(float, f32)
BM_AXPY(double, f64)
BM_AXPY(bm_half, f16)
BM_AXPY(bm_bf16, bf16)
// Writes its dynamic shared memory size in floats to out[0] after touching all of it.
extern "C" __global__ void bm_test_shared_f32(float* out, int n) {{
    extern __shared__ float buf[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) {{
        float s = 0.0f;
        for (int i = 0; i < n; ++i) s += buf[i];
        out[0] = s;
    }}
}}
"""


def _has_symbol(cubin: bytes, sym: str) -> bool:
    return b"\0" + sym.encode() + b"\0" in cubin


# --------------------------------------------------------------------------- sources


def test_embedded_sources_are_the_cuda_folder():
    got = cuda.sources()
    for name in ("common.cuh", "scan.cu", "step.cu", "conv.cu", "companion.cu"):
        assert name in got
    assert {"bilinear.cu", "eidetic.cu", "ssd.cu"} <= set(got)
    if not REPO_CUDA.is_dir() and not STRICT:
        pytest.skip("not running from a source checkout")
    on_disk = {p.name: p.read_text() for p in REPO_CUDA.iterdir() if p.suffix in (".cu", ".cuh")}
    # A stale extension (built before a source changed) would fail here.
    assert {n: got[n] for n in on_disk} == on_disk
    assert set(on_disk) == {n for n, _ in _core.cuda.sources()}, "cuda/ file not embedded"


def test_declared_kernels_name_embedded_sources():
    for k in cuda.declared():
        assert k.source in cuda.sources(), k
        assert set(k.dtypes) <= set(cuda.DTYPES), k


# --------------------------------------------------------------------------- compile test


_CUBINS: dict[str, dict[str, bytes]] = {}


def _cubins(arch: str) -> dict[str, bytes]:
    """CUBIN of every embedded source for ``arch``, compiled once per test process through
    the runtime's caches (two threads: NVRTC releases the GIL). One arch per test, so that
    pytest-xdist workers share the work instead of repeating it."""
    got = _CUBINS.get(arch)
    if got is None:
        names = sorted(n for n, _ in _core.cuda.sources())
        with ThreadPoolExecutor(max_workers=2) as ex:
            out = ex.map(lambda n: cuda.compile_source(n, arch), names)
            got = _CUBINS[arch] = dict(zip(names, out, strict=True))
    return got


@needs_nvrtc
@pytest.mark.parametrize("arch", cuda.ARCHS)
def test_every_source_compiles_with_every_declared_entry_point(arch):
    for name, cubin in _cubins(arch).items():
        assert cubin[:4] == b"\x7fELF", name
    missing = _missing(arch)
    assert not missing, f"entry points missing from the {arch} CUBINs: {missing}"


def _missing(arch: str) -> list[str]:
    cubins = _cubins(arch)
    return [
        f"{k.source}:{k.symbol(s)}"
        for k in cuda.declared()
        if k.source in cubins
        for s in k.dtypes
        if not _has_symbol(cubins[k.source], k.symbol(s))
    ]


@needs_nvrtc
def test_compile_check_catches_a_missing_entry_point(registry):
    cuda.declare("step.cu", "bm_test_absent", dtypes=("f32", "bf16"))
    assert _missing("sm_90")[-2:] == ["step.cu:bm_test_absent_f32", "step.cu:bm_test_absent_bf16"]


@needs_nvrtc
def test_symbol_check_sees_extern_c_entry_points(fresh_cache):
    cubin = cuda._compile("tiny.cu", TINY.format(tag="symbols"), "sm_90")
    for s in ("f32", "f64", "f16", "bf16"):
        assert _has_symbol(cubin, f"bm_test_axpy_{s}")
    assert not _has_symbol(cubin, "bm_test_axpy_f8")
    assert not _has_symbol(cubin, "bm_test_axpy")


@needs_nvrtc
def test_broken_source_raises_compile_error_with_the_log(fresh_cache):
    src = '#include "common.cuh"\nextern "C" __global__ void k(float* y) { y[0] = nope; }\n'
    with pytest.raises(BmojoCompileError) as ei:
        cuda._compile("broken.cu", src, "sm_90")
    msg = str(ei.value)
    assert 'identifier "nope" is undefined' in msg
    assert "broken.cu(2)" in msg
    assert isinstance(ei.value, BmojoCudaError)
    assert cuda._STATS["compiled"] == 0
    assert not list(fresh_cache.glob("*.cubin"))
    with pytest.raises(BmojoCompileError, match="sm_1"):
        cuda._compile("ok.cu", "", "sm_1")


def test_compile_source_rejects_unknown_names():
    with pytest.raises(BmojoValueError, match="nope.cu"):
        cuda.compile_source("nope.cu", "sm_90")


# --------------------------------------------------------------------------- disk cache


@needs_nvrtc
def test_disk_cache_miss_then_hit(fresh_cache):
    text = TINY.format(tag="miss-hit")
    a = cuda._compile("tiny.cu", text, "sm_90")
    assert cuda._STATS == {"memory": 0, "disk": 0, "compiled": 1, "corrupt": 0}
    entries = list(fresh_cache.glob("*.cubin"))
    assert len(entries) == 1
    assert not list(fresh_cache.glob(".tmp-*")), "temporary file left behind"
    assert cuda._compile("tiny.cu", text, "sm_90") is a  # memory
    cuda._MEM_CUBIN.clear()
    b = cuda._compile("tiny.cu", text, "sm_90")  # disk
    assert b == a
    assert cuda._STATS == {"memory": 1, "disk": 1, "compiled": 1, "corrupt": 0}
    # another arch is another entry
    cuda._compile("tiny.cu", text, "sm_80")
    assert len(list(fresh_cache.glob("*.cubin"))) == 2
    assert cuda._STATS["compiled"] == 2


@needs_nvrtc
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "directory"])
def test_corrupt_entry_is_recompiled(fresh_cache, damage):
    text = TINY.format(tag=f"corrupt-{damage}")
    good = cuda._compile("tiny.cu", text, "sm_90")
    (entry,) = fresh_cache.glob("*.cubin")
    data = entry.read_bytes()
    if damage == "flip":
        i = len(data) // 2
        entry.write_bytes(data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1 :])
    elif damage == "truncate":
        entry.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        entry.write_bytes(b"\x7fELF" + b"x" * 200)
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        entry.unlink()
        entry.mkdir()  # unreadable as a file, and cannot be replaced
    cuda._MEM_CUBIN.clear()
    again = cuda._compile("tiny.cu", text, "sm_90")
    assert again == good
    assert cuda._STATS["corrupt"] == 1
    assert cuda._STATS["compiled"] == 2
    assert cuda._STATS["disk"] == 0
    if damage != "directory":
        assert entry.read_bytes() == data  # rewritten whole
    assert not list(fresh_cache.glob(".tmp-*"))


@needs_nvrtc
def test_unwritable_cache_still_compiles(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BMOJO_CACHE_DIR", str(blocker / "kernels"))
    monkeypatch.setattr(cuda, "_MEM_CUBIN", {})
    cubin = cuda._compile("tiny.cu", TINY.format(tag="unwritable"), "sm_80")
    assert cubin[:4] == b"\x7fELF"


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("BMOJO_CACHE_DIR", raising=False)
    assert cuda.cache_dir() == Path.home() / ".cache" / "bmojo_core" / "kernels"
    monkeypatch.setenv("BMOJO_CACHE_DIR", str(tmp_path))
    assert cuda.cache_dir() == tmp_path


def test_cache_key_covers_everything_that_shapes_the_cubin(monkeypatch):
    v = (13, 2)
    opts = cuda._options("sm_90")
    base = cuda._cache_key("a.cu", "int x;", v, opts)
    assert base == cuda._cache_key("a.cu", "int x;", v, list(opts))
    assert len(base) == 64
    variants = [
        cuda._cache_key("a.cu", "int y;", v, opts),  # source
        cuda._cache_key("b.cu", "int x;", v, opts),  # program name (line info)
        cuda._cache_key("a.cu", "int x;", (12, 9), opts),  # NVRTC version
        cuda._cache_key("a.cu", "int x;", v, cuda._options("sm_80")),  # arch
        cuda._cache_key("a.cu", "int x;", v, cuda._options("sm_90", ["-std=c++17"])),
        cuda._cache_key("a.cu", "int x;", v, [*opts, "-DX=1"]),  # options
    ]
    assert len({base, *variants}) == len(variants) + 1
    # a header change changes every key
    hdr = dict(cuda.sources())
    monkeypatch.setattr(cuda, "_EXTRA_SOURCES", {"common.cuh": hdr["common.cuh"] + "\n// x"})
    assert cuda._cache_key("a.cu", "int x;", v, opts) != base


def test_options_are_ieee_cubin_for_the_arch():
    opts = cuda._options("sm_100")
    assert opts[0] == "--gpu-architecture=sm_100"
    assert {"-std=c++17", "-default-device", "-lineinfo"} <= set(opts)
    assert not any("fast-math" in o or "fast_math" in o for o in opts)


# --------------------------------------------------------------------------- declare/launch checks


def test_declare_registry(registry):
    k = cuda.declare("scan.cu", "bm_test_only")
    assert cuda.declare("scan.cu", "bm_test_only") is k
    assert k in cuda.declared()
    assert k.dtypes == cuda.DTYPES and k.symbol("bf16") == "bm_test_only_bf16"
    with pytest.raises(ValueError, match="different dtypes"):
        cuda.declare("scan.cu", "bm_test_only", dtypes=("f32",))
    with pytest.raises(ValueError, match="unknown dtype"):
        cuda.declare("scan.cu", "bm_test_other", dtypes=("f8",))


@pytest.mark.parametrize(
    "fmt, args, err, match",
    [
        ("pp", (None, 0, 1), BmojoValueError, "2 codes but 3 arguments"),
        ("ppx", (None, 0, 1), BmojoValueError, "unknown code 'x'"),
        ("i", (2**31,), BmojoValueError, "int32"),
        ("l", (2**63,), BmojoValueError, "int64"),
        ("i", (1.5,), BmojoTypeError, "expected an int"),
        ("f", (1e39,), BmojoValueError, "float32"),
        ("f", ("x",), BmojoTypeError, "expected a float"),
        ("p", ("abc",), BmojoTypeError, "a tensor, an int address or None"),
        ("p", (-1,), BmojoValueError, "pointer"),
    ],
)
def test_bad_launch_arguments_are_clear_errors(registry, fmt, args, err, match):
    k = cuda.declare("scan.cu", "bm_test_args")
    with pytest.raises(err, match=match) as ei:
        k.launch("f32", (1, 1, 1), (1, 1, 1), args, fmt, device="cuda:0")
    assert "bm_test_args_f32" in str(ei.value)


def test_good_launch_arguments_pass_the_check():
    t = torch.zeros(3)
    _core.cuda.check_args("pppilfd", (t, None, 12345, -(2**31), 2**62, 1.5, 1e300))
    _core.cuda.check_args("ff", (float("inf"), float("nan")))
    _core.cuda.check_args("", ())


def test_launch_with_an_undeclared_dtype_or_a_cpu_device(registry):
    k = cuda.declare("scan.cu", "bm_test_dtypes", dtypes=("f32", "f64"))
    with pytest.raises(BmojoValueError, match="'f16' is not one of"):
        k.launch("f16", (1, 1, 1), (1, 1, 1), (), "", device="cuda:0")
    with pytest.raises(BmojoValueError, match="expected a CUDA device"):
        k.launch("f32", (1, 1, 1), (1, 1, 1), (), "", device="cpu")


def test_no_driver_is_a_cuda_error():
    code = (
        "import torch, bmojo_core\n"
        "from bmojo_core import cuda\n"
        "from bmojo_core.errors import BmojoCudaError\n"
        "k = cuda.declare('scan.cu', 'bm_test_nodriver')\n"
        "for f in (lambda: k.launch('f32', (1, 1, 1), (1, 1, 1), (), '', device='cuda:0'),\n"
        "          lambda: cuda.prepare('cuda:0')):\n"
        "    try:\n"
        "        f()\n"
        "    except BmojoCudaError as e:\n"
        "        print('raised', e)\n"
        "i = cuda.info()\n"
        "print('info', i['cuda'], i['reason'])\n"
    )
    res = _run(code, BMOJO_CUDA_DRIVER_LIB="/nonexistent/libcuda.so.1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3, res.stdout
    assert lines[0].startswith("raised no CUDA driver") and "/nonexistent/libcuda.so.1" in lines[0]
    assert lines[1].startswith("raised no CUDA driver")
    assert lines[2].startswith("info False no CUDA driver")


def test_missing_nvrtc_is_a_cuda_error():
    code = (
        "from bmojo_core import cuda\n"
        "from bmojo_core.errors import BmojoCudaError, BmojoCompileError\n"
        "try:\n"
        "    cuda.compile_source('scan.cu', 'sm_90')\n"
        "except BmojoCompileError:\n"
        "    print('wrong class')\n"
        "except BmojoCudaError as e:\n"
        "    print('raised', e)\n"
        "print('info', cuda.info()['nvrtc_error'])\n"
    )
    res = _run(code, BMOJO_NVRTC_LIB="/nonexistent/libnvrtc.so.13")
    assert res.returncode == 0, res.stderr
    raised, info = res.stdout.splitlines()
    assert raised.startswith("raised NVRTC not found") and "/nonexistent/libnvrtc.so.13" in raised
    assert info.startswith("info NVRTC not found")


def test_torch_pip_nvrtc_is_found():
    torch_lib = Path(torch.__file__).resolve().parent.parent / "nvidia"
    pip = sorted(torch_lib.glob("cu*/lib/libnvrtc.so.*")) + sorted(
        torch_lib.glob("cuda_nvrtc/lib/libnvrtc.so.*")
    )
    pip = [p for p in pip if "builtins" not in p.name and "alt" not in p.name]
    if not pip:
        pytest.skip("torch was installed without the NVIDIA pip libraries")
    found = cuda._nvrtc_candidates()
    assert found and found[0] in pip


def test_import_loads_neither_nvrtc_nor_the_driver():
    mods = ", ".join(f"bmojo_core.{m}" for m in OP_MODULES)
    code = (
        f"import torch, bmojo_core, bmojo_core.runtime.cuda, {mods}\n"
        "from bmojo_core import _core, cuda\n"
        "print(_core.cuda.loaded(), torch.cuda.is_initialized(), len(cuda._MODULES))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(False, False) False 0"


# --------------------------------------------------------------------------- info


def test_info_never_raises_and_names_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BMOJO_CACHE_DIR", str(tmp_path))
    i = cuda.info()
    assert i["cache_dir"] == str(tmp_path)
    for key in ("cuda", "reason", "device", "capability", "driver_version", "nvrtc_version"):
        assert key in i
    if HAS_NVRTC:
        assert i["nvrtc_version"] and i["nvrtc_path"]
    if i["cuda"]:
        assert i["device"] and i["arch"].startswith("sm_") and i["driver_version"]
    else:
        assert i["reason"]


def test_bmojo_info_shows_the_cuda_runtime(tmp_path):
    code = "import sys\nfrom bmojo_core.cli import main\nsys.exit(main(['info']))\n"
    res = _run(code, BMOJO_CACHE_DIR=str(tmp_path / "kc"))
    assert res.returncode == 0, res.stderr
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in res.stdout.splitlines())
    assert rows["kernel cache"] == str(tmp_path / "kc")
    assert "CUDA device" in rows and "CUDA driver" in rows
    if HAS_NVRTC:
        major, minor, _ = _core.cuda.nvrtc_version(cuda._nvrtc()[0])
        assert rows["NVRTC"].startswith(f"{major}.{minor} (")
    else:
        assert rows["NVRTC"].startswith("not available")
    if not HAS_CUDA:
        assert rows["CUDA device"].startswith("not available (")
    res = _run(code, BMOJO_CUDA_DRIVER_LIB="/nonexistent/libcuda.so.1")
    assert res.returncode == 0, res.stderr
    assert "not available (no CUDA driver" in res.stdout


# --------------------------------------------------------------------------- GPU


DT = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture
def tiny_kernel(registry):
    """The tiny test kernels, on a source of their own."""
    cuda._add_source("bm_test.cu", TINY.format(tag="gpu"))
    yield (
        cuda.declare("bm_test.cu", "bm_test_axpy"),
        cuda.declare("bm_test.cu", "bm_test_shared", dtypes=("f32",)),
    )
    cuda._EXTRA_SOURCES.pop("bm_test.cu", None)


def _axpy(k, suffix, y, x, bias, a):
    n = y.numel()
    k.launch(suffix, ((n + 127) // 128, 1, 1), (128, 1, 1), (y, x, bias, a, n), "pppfl",
             device=y.device)  # fmt: skip


@needs_gpu
@pytest.mark.parametrize("suffix", ["f32", "f64", "f16", "bf16"])
def test_launch_on_the_current_stream(tiny_kernel, suffix):
    k, _ = tiny_kernel
    dt = DT[suffix]
    n = 1000
    x = torch.linspace(-2, 2, n, device="cuda", dtype=dt)
    y = torch.ones(n, device="cuda", dtype=dt)
    bias = torch.full((n,), 0.5, device="cuda", dtype=dt)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _axpy(k, suffix, y, x, None, 3.0)  # null pointer: no bias
        _axpy(k, suffix, y, x, bias, -1.0)
    s.synchronize()
    want = (1 + 2 * x.double() + 0.5).to(dt)
    torch.testing.assert_close(y, want, rtol=1e-2 if dt.itemsize == 2 else 1e-6, atol=1e-2)


@needs_gpu
def test_dynamic_shared_memory_above_48k(tiny_kernel):
    _, ks = tiny_kernel
    _, _, _, optin, _ = _core.cuda.device(torch.cuda.current_device())
    nbytes = min(optin, 96 * 1024)
    if nbytes <= 48 * 1024:
        pytest.skip("device cannot opt in to more than 48 KB of shared memory")
    out = torch.zeros(1, device="cuda")
    n = nbytes // 4
    ks.launch("f32", (1, 1, 1), (256, 1, 1), (out, n), "pi", shared_mem=nbytes, device=out.device)
    torch.cuda.synchronize()
    assert out.item() == n


@needs_gpu
def test_launch_overhead_is_small(tiny_kernel):
    k, _ = tiny_kernel
    y = torch.zeros(256, device="cuda")
    x = torch.ones(256, device="cuda")
    _axpy(k, "f32", y, x, None, 1.0)
    torch.cuda.synchronize()
    reps = 2000
    t = time.perf_counter()
    for _ in range(reps):
        k.launch("f32", (2, 1, 1), (128, 1, 1), (y, x, None, 1.0, 256), "pppfl", device=y.device)
    us = (time.perf_counter() - t) / reps * 1e6
    torch.cuda.synchronize()
    assert y[0].item() == reps + 1
    print(f"launch overhead: {us:.2f} us")
    assert us < 100, f"{us:.1f} us per launch"


@needs_gpu
def test_cuda_graph_capture_and_replay(tiny_kernel):
    k, _ = tiny_kernel
    dev = torch.device("cuda", torch.cuda.current_device())
    assert cuda.prepare(dev, ("f32",)) >= 1
    before = dict(cuda._STATS)
    n = 4096
    x = torch.arange(n, device=dev, dtype=torch.float32)
    y = torch.zeros(n, device=dev)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            _axpy(k, "f32", y, x, None, 2.0)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.count_nonzero(y).item() == 0  # capture records, it does not run
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, 4 * x)
    assert cuda._STATS == before  # nothing compiled after prepare


@needs_gpu
def test_compiling_during_capture_raises(registry):
    cuda._add_source("bm_test_capture.cu", TINY.format(tag="capture"))
    try:
        k = cuda.declare("bm_test_capture.cu", "bm_test_axpy", dtypes=("f32",))
        y = torch.zeros(8, device="cuda")
        g = torch.cuda.CUDAGraph()
        with pytest.raises(BmojoCudaError, match="prepare"):
            with torch.cuda.graph(g):
                _axpy(k, "f32", y, y, None, 1.0)
        assert not k._funcs
    finally:
        cuda._EXTRA_SOURCES.pop("bm_test_capture.cu", None)


@needs_gpu
def test_missing_entry_point_is_a_cuda_error(tiny_kernel, registry):
    k = cuda.declare("bm_test.cu", "bm_test_nope", dtypes=("f32",))
    with pytest.raises(BmojoCudaError, match="bm_test_nope_f32"):
        k.launch("f32", (1, 1, 1), (1, 1, 1), (), "", device="cuda")


@needs_gpu
def test_zero_grid_is_rejected(tiny_kernel):
    k, _ = tiny_kernel
    y = torch.zeros(4, device="cuda")
    with pytest.raises(BmojoValueError, match="positive"):
        k.launch("f32", (0, 1, 1), (1, 1, 1), (y, y, None, 1.0, 4), "pppfl", device=y.device)
    assert math.isfinite(y.sum().item())


@needs_gpu
def test_fmt_is_checked_against_the_kernel_signature(tiny_kernel):
    if _core.cuda.driver_version(None) < 12040:
        pytest.skip("the driver reports kernel parameter sizes from CUDA 12.4 on")
    k, _ = tiny_kernel
    y = torch.zeros(4, device="cuda")
    _axpy(k, "f32", y, y, None, 1.0)  # resolves the kernel
    with pytest.raises(BmojoValueError, match="takes 5 parameters"):
        k.launch("f32", (1, 1, 1), (4, 1, 1), (y, y, None, 1.0), "pppf", device=y.device)
    with pytest.raises(BmojoValueError, match="sizes"):
        k.launch("f32", (1, 1, 1), (4, 1, 1), (y, y, None, 1.0, 4), "pppfi", device=y.device)
