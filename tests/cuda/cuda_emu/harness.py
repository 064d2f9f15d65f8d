"""Runs the CUDA kernels of ``cuda/*.cu`` on the CPU, for the emulated-CUDA tests.

Every source is compiled once (g++ -std=c++20, behind ``prelude.hpp``, which emulates the
CUDA built-ins) into a shared library with a table of its entry points and their C
signatures. `emulate()` replaces ``Kernel.launch`` of the runtime by `Emulator.launch`,
which checks each launch the way a GPU would need it right (the runtime packs arguments
by ``fmt``: a mismatch would be silent there) and then runs the kernel on CPU tensors:

- ``fmt`` equals the entry point's signature, one argument per code; pointer arguments
  are contiguous tensors of the parameter's dtype (or 0 for a null pointer); integers fit
  their C type; the dtype suffix is one the kernel declares;
- grid and block within the CUDA limits, dynamic shared memory within the 48 KiB a
  launch gets without opting in; cooperative kernels in whole warps.

Cooperative kernels (`COOPERATIVE`) run every thread of a block as an OS thread with real
barriers and shuffles; the others call their threads one after another (no thread start
per CUDA thread: the emulated suites ran about 20 % faster than with every kernel threaded);
a barrier or shuffle in such a launch fails the test with a message naming the kernel.

Each source's library is built on its first launch, cached by content under the temp
directory and built under a file lock, so pytest-xdist workers build it once per change.
What this cannot check: concurrency and memory ordering between blocks, the GPU's own
rounding of exp/log, performance.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from bmojo_core import cuda as _cuda

ROOT = Path(__file__).resolve().parents[3]
CUDA_DIR = ROOT / "cuda"
PRELUDE = Path(__file__).resolve().parent / "prelude.hpp"
SOURCES = tuple(sorted(p.name for p in CUDA_DIR.glob("*.cu")))

COOPERATIVE = frozenset(
    {
        "diag_scan",
        "selective_scan_fwd",
        "selective_scan_bwd",
        "causal_conv1d_dw_part",
        "bilinear_scan_fwd",
        "bilinear_scan_bwd",
        "companion_scan_fwd",
        "companion_scan_bwd",
        "ssd_fwd_n32",
        "ssd_fwd_n64",
        "ssd_fwd_n128",
        "ssd_fwd_n256",
        "ssd_bwd_n32",
        "ssd_bwd_n64",
        "ssd_bwd_n128",
        "ssd_bwd_n256",
    }
)
"""Kernels whose threads share memory, barriers or shuffles: run as real threads."""

SMEM_LIMIT = 48 * 1024  # dynamic shared memory without cudaFuncSetAttribute
_CTYPES = {"i": ctypes.c_int32, "l": ctypes.c_int64, "f": ctypes.c_float, "d": ctypes.c_double}
_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-ffp-contract=off"]


def _header(text: str) -> str:
    """common.cuh with its PTX half conversions replaced by the prelude's."""
    text = re.sub(
        r'asm\("cvt\.f32\.f16 %0, %1;"\s*:\s*"=f"\(([\w.]+)\)\s*:\s*"h"\(([\w.]+)\)\);',
        r"\1 = bm_emu_h2f(\2);", text,
    )  # fmt: skip
    text = re.sub(
        r'asm\("cvt\.rn\.f16\.f32 %0, %1;"\s*:\s*"=h"\(([\w.]+)\)\s*:\s*"f"\(([\w.]+)\)\);',
        r"\1 = bm_emu_f2h(\2);", text,
    )  # fmt: skip
    assert "asm(" not in text, "common.cuh has PTX the emulation does not know"
    return text


def _source(text: str) -> str:
    """A kernel source with its dynamic shared memory mapped to the prelude's buffer."""
    text = re.sub(
        r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];",
        r"static unsigned char* const \1 = bm_emu_dyn_smem;",
        text,
    )
    assert "asm(" not in text, "a kernel source has PTX the emulation does not know"
    return text


@cache
def compiler() -> str | None:
    """g++ able to build the prelude (C++20 <barrier>, _Float16), or None."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe.cpp"
        probe.write_text(
            "#include <barrier>\n"
            "int main() { std::barrier<> b(1); b.arrive_and_wait(); _Float16 h = 1;\n"
            "             return (int)h - 1; }\n"
        )
        r = subprocess.run([cxx, "-std=c++20", "-pthread", str(probe), "-o", f"{d}/probe"],
                           capture_output=True)  # fmt: skip
    return cxx if r.returncode == 0 else None


def _entry_points(cxx: str, src: Path) -> list[str]:
    """Names of a source's extern "C" kernels (after its macros are expanded)."""
    pre = subprocess.run([cxx, "-E", "-P", "-x", "c++", str(src)], check=True,
                         capture_output=True, text=True, cwd=src.parent)  # fmt: skip
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                      r"(\w+)\s*\(", pre.stdout)  # fmt: skip


def _build_one(cxx: str, work: Path, source: str, out: Path) -> None:
    src = work / source
    names = _entry_points(cxx, src)
    assert names, f'{source}: no extern "C" __global__ entry points found'
    rows = "".join(f"    BM_EMU_ENTRY({n}),\n" for n in names)
    wrapper = work / f"{source}.emu.cpp"
    wrapper.write_text(
        f'#include "{PRELUDE}"\n#include "{source}"\n'
        f"static const bm_emu_entry bm_emu_table[] = {{\n{rows}}};\n"
        "BM_EMU_EXPORTS(bm_emu_table)\n"
    )
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    r = subprocess.run([cxx, *_FLAGS, str(wrapper), "-o", str(tmp)], capture_output=True,
                       text=True, cwd=work)  # fmt: skip
    assert r.returncode == 0, f"{source}: emulated build failed\n{r.stderr[-4000:]}"
    tmp.replace(out)  # atomic: another worker never sees half a library


@cache
def _build_root() -> Path:
    """The cache folder of this content of the prelude, harness and sources."""
    h = hashlib.sha256(PRELUDE.read_bytes() + Path(__file__).read_bytes())
    for name in sorted((*SOURCES, "common.cuh")):
        h.update(name.encode() + b"\0" + (CUDA_DIR / name).read_bytes() + b"\0")
    root = Path(tempfile.gettempdir()) / "bmojo_cuda_emu" / h.hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    return root


def library(source: str) -> Path:
    """The emulated library of one source, built on first use, once per content: a file
    lock makes concurrent pytest-xdist workers wait for one build and reuse it."""
    cxx = compiler()
    assert cxx is not None, "no C++20 compiler with _Float16"
    root = _build_root()
    out = root / f"{source}.so"
    with open(root / f"{source}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            work = Path(tempfile.mkdtemp(prefix=f"{source}.", dir=root))
            try:
                header = _header((CUDA_DIR / "common.cuh").read_text())
                (work / "common.cuh").write_text(header)
                (work / source).write_text(_source((CUDA_DIR / source).read_text()))
                _build_one(cxx, work, source, out)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return out


class _Lib:
    """One source's emulated library: entry point -> (index, [(code, dtype or None)])."""

    def __init__(self, path: Path):
        self.dll = ctypes.CDLL(str(path))
        self.dll.bm_emu_name.restype = ctypes.c_char_p
        self.dll.bm_emu_signature.restype = ctypes.c_char_p
        self.sigs: dict[str, tuple[int, list[tuple[str, torch.dtype | None]]]] = {}
        for i in range(self.dll.bm_emu_count()):
            params = []
            for code in self.dll.bm_emu_signature(i).decode().split():
                if code.startswith("p:"):
                    params.append(("p", getattr(torch, code[2:]) if code[2:] else None))
                else:
                    params.append((code, None))
            self.sigs[self.dll.bm_emu_name(i).decode()] = (i, params)


class Emulator:
    """The emulated ``Kernel.launch``; ``launches`` lists the kernel names run."""

    def __init__(self):
        self._libs: dict[str, _Lib] = {}
        self.launches: list[str] = []

    def lib(self, source: str) -> _Lib:
        if source not in self._libs:
            self._libs[source] = _Lib(library(source))
        return self._libs[source]

    def signatures(self, source: str) -> dict[str, str]:
        """Entry point -> fmt of its C signature."""
        return {n: "".join(c for c, _ in p) for n, (_, p) in self.lib(source).sigs.items()}

    def check(self, kernel, suffix, grid, block, args, fmt, shared_mem=0):
        """Checks a launch against the entry point's C signature (one format code and,
        for pointers, one dtype per parameter) and the launch limits; returns the library,
        the entry point's index and the arguments as ctypes objects."""
        name = kernel.symbol(suffix)
        assert suffix in kernel.dtypes, f"{name}: suffix not declared"
        lib = self.lib(kernel.source)
        assert name in lib.sigs, f"{kernel.source}: no entry point {name}"
        index, sig = lib.sigs[name]
        assert len(args) == len(fmt), f"{name}: {len(args)} args for fmt {fmt}"
        assert fmt == "".join(c for c, _ in sig), f"{name}: fmt {fmt} != signature"
        objs = []
        for a, (code, dt) in zip(args, sig, strict=True):
            if code == "p":
                if isinstance(a, torch.Tensor):
                    assert dt is None or a.dtype == dt, f"{name}: pointer of {dt} given {a.dtype}"
                    assert a.is_contiguous(), f"{name}: non-contiguous tensor"
                    objs.append(ctypes.c_void_p(a.data_ptr()))
                else:
                    assert a == 0, f"{name}: a pointer must be a tensor or 0"
                    objs.append(ctypes.c_void_p(0))
                continue
            assert not isinstance(a, torch.Tensor), f"{name}: tensor for a scalar"
            if code in "il":
                assert isinstance(a, int), f"{name}: {a!r} for an integer"
                bits = 32 if code == "i" else 64
                assert -(2 ** (bits - 1)) <= a < 2 ** (bits - 1), f"{name}: {a} overflows"
            objs.append(_CTYPES[code](a))
        gx, gy, gz = grid
        bx, by, bz = block
        assert 0 < gx < 2**31 and 0 < gy <= 65535 and 0 < gz <= 65535, f"{name}: grid {grid}"
        assert 0 < bx <= 1024 and 0 < by <= 1024 and 0 < bz <= 64, f"{name}: block {block}"
        assert bx * by * bz <= 1024, f"{name}: {bx * by * bz} threads per block"
        assert 0 <= shared_mem <= SMEM_LIMIT, f"{name}: {shared_mem} B of dynamic shared memory"
        if kernel.name in COOPERATIVE:
            assert (bx * by * bz) % 32 == 0, f"{name}: cooperative block of partial warps"
        return lib, index, objs

    def launch(self, kernel, suffix, grid, block, args, fmt, shared_mem=0, device=None):
        """Runs the launch on CPU tensors (after :meth:`check`)."""
        lib, index, objs = self.check(kernel, suffix, grid, block, args, fmt, shared_mem)
        name = kernel.symbol(suffix)
        coop = kernel.name in COOPERATIVE
        gx, gy, gz = grid
        bx, by, bz = block
        ptrs = (ctypes.c_void_p * len(objs))(*[ctypes.addressof(o) for o in objs])
        dims = (ctypes.c_uint * 6)(gx, gy, gz, bx, by, bz)
        err = ctypes.create_string_buffer(200)
        self.launches.append(kernel.name)
        rc = lib.dll.bm_emu_run(index, ptrs, dims, int(shared_mem), int(coop), err, len(err))
        assert rc == 0, (
            f"{name} uses {err.value.decode()} but is run sequentially: "
            "add it to COOPERATIVE in tests/cuda/cuda_emu/harness.py"
        )


@contextlib.contextmanager
def emulate():
    """Kernel.launch of every declared kernel runs `Emulator.launch` (on CPU tensors)."""
    emu = Emulator()
    classes = {type(k) for k in _cuda.declared()}
    saved = {c: c.__dict__.get("launch") for c in classes}

    def launch(self, suffix, grid, block, args, fmt, shared_mem=0, device=None):
        emu.launch(self, suffix, grid, block, args, fmt, shared_mem, device)

    for c in classes:
        c.launch = launch
    try:
        yield emu
    finally:
        for c, f in saved.items():
            if f is None:
                del c.launch
            else:
                c.launch = f


def cuda_impl(op):
    """The CUDA implementation registered for a custom op (called here with CPU tensors)."""
    return op._backend_fns["cuda"]
