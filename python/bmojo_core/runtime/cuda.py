"""CUDA runtime of bmojo_core: NVRTC compilation of the kernel sources in
``cuda/`` (embedded in the extension), an on-disk CUBIN cache, a per-device module cache
and launches on torch's current stream.

Op modules declare the kernels they use at import time (nothing is compiled or loaded, CUDA
is never initialised by ``import bmojo_core``)::

    K = declare("scan.cu", "selective_scan_fwd")             # entry points <name>_<dtype>
    K.launch("f32", grid=(gx, gy, gz), block=(bx, by, bz), args=(x, y, n, 1.0), fmt="ppif",
             shared_mem=0, device=x.device)

``fmt`` has one code per argument: ``p`` device pointer (a tensor, an int address or
``None`` for a null pointer), ``i`` int32, ``l`` int64, ``f`` float32, ``d`` float64.
``grid`` and ``block`` are 3-tuples. The first launch of a kernel on a device compiles its
source for the device's architecture (or takes the CUBIN from the disk cache) and loads
it; later launches cost one dictionary look-up and the driver call. Nothing is compiled
during CUDA-graph capture: call :func:`prepare` (or run the op once) before capturing.

Libraries: NVRTC is taken from ``BMOJO_NVRTC_LIB``, torch's pip wheels
(``nvidia/cu13/lib/libnvrtc.so.13``, ``nvidia/cuda_nvrtc/lib/libnvrtc.so.12``),
``CUDA_HOME``/``CUDA_PATH`` or the system loader; the driver from
``BMOJO_CUDA_DRIVER_LIB`` or ``libcuda.so.1`` / ``nvcuda.dll``. CUBINs are cached in
``BMOJO_CACHE_DIR`` (default ``~/.cache/bmojo_core/kernels``).
"""

from __future__ import annotations

import hashlib
import os
import site
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _core
from ..errors import (
    BmojoCompileError,
    BmojoCudaError,
    BmojoError,
    BmojoTypeError,
    BmojoValueError,
)
from .launch import capturing

__all__ = [
    "ARCHS",
    "DTYPES",
    "OPTIONS",
    "Kernel",
    "cache_dir",
    "compile_source",
    "declare",
    "declared",
    "info",
    "nvrtc_available",
    "prepare",
    "sources",
]

DTYPES = ("f32", "f64", "f16", "bf16")
"""Suffixes of a kernel's entry points: ``<name>_<suffix>``."""

ARCHS = ("sm_80", "sm_90", "sm_100")
"""Architectures every source is compile-checked for (Ampere, Hopper, Blackwell)."""

OPTIONS = ("-std=c++17", "-default-device", "-lineinfo")
"""NVRTC options besides ``--gpu-architecture=sm_XY``; IEEE math (no fast-math)."""

_REGISTRY: dict[tuple[str, str], Kernel] = {}
_LOCK = threading.RLock()
_MODULES: dict[tuple[int, str], int] = {}  # (device, source) -> module id
_ARCH: dict[int, str] = {}  # device -> "sm_XY"
_MEM_CUBIN: dict[str, bytes] = {}  # cache key -> CUBIN, for this process
_EXTRA_SOURCES: dict[str, str] = {}
_STATE: dict[str, Any] = {}  # memoised library look-ups
_STATS = {"memory": 0, "disk": 0, "compiled": 0, "corrupt": 0}

_MAGIC = b"BMOJO-CUBIN\x01"  # disk entry: magic, sha256(cubin), cubin


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Kernel:
    """A declared kernel family: ``source`` (a file of ``cuda/``), ``name`` and the dtype
    suffixes it is instantiated for."""

    source: str
    name: str
    dtypes: tuple[str, ...] = DTYPES
    _funcs: dict[tuple[int, str], int] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )

    def symbol(self, suffix: str) -> str:
        return f"{self.name}_{suffix}"

    def launch(self, suffix, grid, block, args, fmt, shared_mem=0, device=None) -> None:
        """Launches ``<name>_<suffix>`` on torch's current stream of ``device`` (default:
        the current CUDA device). Asynchronous; allocates nothing on the device and never
        synchronises."""
        idx = _index(device)
        f = self._funcs.get((idx, suffix))
        if f is None:
            _check_args(self.symbol(suffix), fmt, args)
            f = self._resolve(idx, suffix)
        try:
            _core.cuda.launch(f, grid, block, shared_mem, _stream(idx), fmt, args)
        except Exception as e:  # noqa: BLE001 - mapped to the package's error classes
            raise _map_error(self.symbol(suffix), e) from None

    def _resolve(self, idx: int, suffix: str) -> int:
        """Compiles/loads the source on device ``idx`` and looks up the entry point."""
        if suffix not in self.dtypes:
            raise BmojoValueError(
                f"{self.name}: dtype suffix {suffix!r} is not one of {self.dtypes}"
            )
        with _LOCK:
            f = self._funcs.get((idx, suffix))
            if f is not None:
                return f
            # Looking up an entry point of a loaded module is no stream work; compiling
            # and loading a module are never done while a graph is being captured.
            if (idx, self.source) not in _MODULES and capturing():
                raise BmojoCudaError(
                    f"{self.symbol(suffix)} is not loaded on cuda:{idx} and kernels are never "
                    "compiled or loaded during CUDA-graph capture: call "
                    "bmojo_core.cuda.prepare(device) (or run the op once) before capturing"
                )
            m = _module(idx, self.source)
            try:
                f = _core.cuda.module_function(m, self.symbol(suffix))
            except RuntimeError as e:
                raise BmojoCudaError(
                    f"kernel {self.symbol(suffix)} not found in {self.source} ({e}); "
                    'entry points must be extern "C" and instantiated for every declared dtype'
                ) from None
            self._funcs[(idx, suffix)] = f
            return f


def declare(source: str, name: str, dtypes: tuple[str, ...] = DTYPES) -> Kernel:
    """Registers (once) and returns the kernel family ``name`` of ``cuda/<source>``."""
    key = (source, name)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"kernel {name}: unknown dtype suffixes {bad} (expected {DTYPES})")
    k = _REGISTRY.get(key)
    if k is None:
        k = _REGISTRY[key] = Kernel(source, name, tuple(dtypes))
    elif k.dtypes != tuple(dtypes):
        raise ValueError(f"kernel {name} of {source} declared twice with different dtypes")
    return k


def declared() -> list[Kernel]:
    """Every declared kernel family (the compile test walks this list)."""
    return list(_REGISTRY.values())


def prepare(device=None, dtypes=None) -> int:
    """Compiles (or takes from the cache) and loads every declared kernel for ``device``
    and the dtype suffixes ``dtypes`` (default: all), so that later launches, including
    those recorded in a CUDA graph, never compile. Returns the number of entry points
    ready."""
    idx = _index(device)
    n = 0
    for k in declared():
        for s in k.dtypes:
            if dtypes is None or s in dtypes:
                k._resolve(idx, s)
                n += 1
    return n


# --------------------------------------------------------------------------- errors


def _map_error(what: str, e: Exception) -> Exception:
    """``e`` with ``what`` (the entry point) in front, in the same class. ``_core.cuda``
    raises the package's classes itself; PyO3's argument conversions raise TypeError or
    OverflowError, mapped here."""
    if isinstance(e, BmojoError):
        cls = type(e)
    elif isinstance(e, TypeError):
        cls = BmojoTypeError
    elif isinstance(e, ValueError | OverflowError):
        cls = BmojoValueError
    else:
        cls = BmojoCudaError
    return cls(f"{what}: {e}")


def _check_args(what: str, fmt, args) -> None:
    try:
        _core.cuda.check_args(fmt, args)
    except Exception as e:  # noqa: BLE001 - mapped to the package's error classes
        raise _map_error(what, e) from None


# --------------------------------------------------------------------------- sources


def sources() -> dict[str, str]:
    """The kernel sources by file name (``common.cuh``, ``scan.cu``, ...)."""
    s = _STATE.get("sources")
    if s is None:
        s = _STATE["sources"] = dict(_core.cuda.sources())
    return {**s, **_EXTRA_SOURCES}


def _add_source(name: str, text: str) -> None:
    """Adds a source under ``name`` (tests: a tiny kernel that is not part of cuda/)."""
    with _LOCK:
        _EXTRA_SOURCES[name] = text


def _headers() -> list[tuple[str, str]]:
    return sorted((n, t) for n, t in sources().items() if n.endswith(".cuh"))


# --------------------------------------------------------------------------- NVRTC


def _site_dirs() -> list[Path]:
    dirs: list[str] = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some virtualenv layouts lack it
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    dirs.append(str(Path(torch.__file__).resolve().parent.parent))
    out: list[Path] = []
    for d in dirs:
        p = Path(d)
        if p not in out and p.is_dir():
            out.append(p)
    return out


def _version_key(p: Path) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in p.name).split()
    return tuple(int(x) for x in digits)


def _nvrtc_candidates() -> list[Path]:
    """NVRTC libraries on disk, best first: torch's pip wheels, then CUDA_HOME/CUDA_PATH."""
    if sys.platform == "win32":
        pip = ["nvidia/*/bin/nvrtc64_*.dll"]
        home = ["bin/nvrtc64_*.dll", "bin/x64/nvrtc64_*.dll"]
    else:
        pip = ["nvidia/cu*/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"]
        home = ["lib64/libnvrtc.so*", "lib/libnvrtc.so*", "targets/*/lib/libnvrtc.so*"]
    found: list[Path] = []

    def add(base: Path, patterns: list[str]) -> None:
        hits = [
            p
            for pat in patterns
            for p in base.glob(pat)
            if "builtins" not in p.name and "alt" not in p.name and p.is_file()
        ]
        for p in sorted(hits, key=_version_key, reverse=True):
            if p not in found:
                found.append(p)

    for d in _site_dirs():
        add(d, pip)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            add(Path(os.environ[var]), home)
    return found


def _nvrtc() -> tuple[str | None, tuple[int, int], str]:
    """``(path given to the loader, version, loaded from)``; loads NVRTC on first use."""
    got = _STATE.get("nvrtc")
    if got is not None:
        return got
    with _LOCK:
        env = os.environ.get("BMOJO_NVRTC_LIB")
        tries: list[str | None] = [env] if env else [str(p) for p in _nvrtc_candidates()]
        if not env:
            tries.append(None)  # the system loader
        errors = []
        for path in tries:
            try:
                major, minor, where = _core.cuda.nvrtc_version(path)
            except RuntimeError as e:
                errors.append(str(e))
                continue
            got = _STATE["nvrtc"] = (path, (major, minor), where)
            return got
        hint = "" if env else "; install torch with CUDA or set BMOJO_NVRTC_LIB"
        raise BmojoCudaError("NVRTC not found: " + "; ".join(errors) + hint)


def nvrtc_available() -> bool:
    """Whether an NVRTC library can be loaded (loads it)."""
    try:
        _nvrtc()
    except BmojoCudaError:
        return False
    return True


# --------------------------------------------------------------------------- CUBIN cache


def cache_dir() -> Path:
    """Directory of the on-disk CUBIN cache."""
    env = os.environ.get("BMOJO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bmojo_core" / "kernels"


def _options(arch: str, options=None) -> list[str]:
    return [f"--gpu-architecture={arch}", *(OPTIONS if options is None else options)]


def _cache_key(name: str, text: str, version: tuple[int, int], options: list[str]) -> str:
    """sha256 over everything that determines the CUBIN: program name and source, every
    header, the NVRTC version and the options (which carry the architecture)."""
    h = hashlib.sha256()
    parts = ["bmojo-cubin-1", name, text]
    for hn, ht in _headers():
        parts += [hn, ht]
    parts += [f"nvrtc {version[0]}.{version[1]}", *options]
    for p in parts:
        b = p.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _read_entry(path: Path) -> bytes | None:
    """The CUBIN of a disk entry, or None when absent; a damaged entry counts as corrupt."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        _STATS["corrupt"] += 1
        return None
    n = len(_MAGIC)
    cubin = data[n + 32 :]
    if (
        data[:n] != _MAGIC
        or hashlib.sha256(cubin).digest() != data[n : n + 32]
        or cubin[:4] != b"\x7fELF"
    ):
        _STATS["corrupt"] += 1
        return None
    return cubin


def _write_entry(path: Path, cubin: bytes) -> None:
    """Atomic write (temporary file + rename): readers never see half an entry. A cache
    that cannot be written is skipped (the CUBIN stays in memory)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cubin")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(cubin).digest() + cubin)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _compile(name: str, text: str, arch: str, options=None, fresh: bool = False) -> bytes:
    """CUBIN of ``text`` for ``arch``: memory cache, disk cache, else NVRTC. ``fresh``
    skips both caches on the way in (the entry is rewritten)."""
    path, version, _ = _nvrtc()
    opts = _options(arch, options)
    key = _cache_key(name, text, version, opts)
    entry = cache_dir() / f"{key}.cubin"
    if not fresh:
        cubin = _MEM_CUBIN.get(key)
        if cubin is not None:
            _STATS["memory"] += 1
            return cubin
        cubin = _read_entry(entry)
        if cubin is not None:
            _STATS["disk"] += 1
            _MEM_CUBIN[key] = cubin
            return cubin
    try:
        cubin = _core.cuda.nvrtc_compile(path, text, name, _headers(), opts)
    except BmojoCudaError as e:  # BmojoCompileError with the log, or no library
        raise BmojoCompileError(f"NVRTC could not compile {name} for {arch}: {e}") from None
    _STATS["compiled"] += 1
    _write_entry(entry, cubin)
    _MEM_CUBIN[key] = cubin
    return cubin


def compile_source(source: str, arch: str, options=None) -> bytes:
    """CUBIN of the source file ``source`` (a key of :func:`sources`) for ``arch``
    (``"sm_90"``...), through the caches. ``options`` replaces :data:`OPTIONS`."""
    text = sources().get(source)
    if text is None:
        raise BmojoValueError(f"source: expected one of {sorted(sources())}, got {source!r}")
    return _compile(source, text, arch, options)


# --------------------------------------------------------------------------- devices


def _driver_version() -> int:
    return _core.cuda.driver_version(os.environ.get("BMOJO_CUDA_DRIVER_LIB") or None)


def _index(device) -> int:
    """Ordinal of a CUDA device given as torch.device, str, int or None (current)."""
    if device is not None and getattr(device, "type", None) == "cuda":
        idx = device.index
        if idx is not None:
            return idx
    if device is None:
        try:
            return torch.cuda.current_device()
        except (RuntimeError, AssertionError) as e:
            raise BmojoCudaError(f"no current CUDA device ({e})") from None
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BmojoValueError(f"device: expected a CUDA device, got {device!r} ({e})") from None
    if d.type != "cuda":
        raise BmojoValueError(f"device: expected a CUDA device, got {d}")
    return d.index if d.index is not None else _index(None)


def _arch(idx: int) -> str:
    a = _ARCH.get(idx)
    if a is None:
        _driver_version()
        _, major, minor, _, _ = _core.cuda.device(idx)
        a = _ARCH[idx] = f"sm_{major}{minor}"
    return a


def _module(idx: int, source: str) -> int:
    """Module id of ``source`` on device ``idx`` (compiled or cached once per pair)."""
    with _LOCK:
        m = _MODULES.get((idx, source))
        if m is not None:
            return m
        text = sources().get(source)
        if text is None:
            raise BmojoCudaError(
                f"no kernel source {source!r} (expected one of {sorted(sources())})"
            )
        arch = _arch(idx)
        cubin = _compile(source, text, arch)
        try:
            m = _core.cuda.module_load(idx, cubin)
        except BmojoError:
            # A cached image the driver refuses (BmojoCudaError) or that is no CUBIN
            # (BmojoValueError) is rebuilt once before giving up.
            cubin = _compile(source, text, arch, fresh=True)
            try:
                m = _core.cuda.module_load(idx, cubin)
            except BmojoError as e:
                raise BmojoCudaError(f"loading {source} on cuda:{idx} ({arch}): {e}") from None
        _MODULES[(idx, source)] = m
        return m


def _stream(idx: int) -> int:
    """Raw handle of torch's current stream on device ``idx``."""
    f = _STATE.get("stream")
    if f is None:
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        f = _STATE["stream"] = raw or (lambda i: torch.cuda.current_stream(i).cuda_stream)
    return f(idx)


# --------------------------------------------------------------------------- info


def info() -> dict[str, Any]:
    """Device, driver, NVRTC and cache facts for ``bmojo info``; never raises. ``cuda`` is
    False with ``reason`` on a machine without driver or device."""
    out: dict[str, Any] = {
        "cuda": False,
        "reason": None,
        "device": None,
        "capability": None,
        "arch": None,
        "devices": 0,
        "driver_version": None,
        "nvrtc_version": None,
        "nvrtc_path": None,
        "nvrtc_error": None,
        "cache_dir": str(cache_dir()),
    }
    try:
        v = _driver_version()
        out["driver_version"] = f"{v // 1000}.{(v % 1000) // 10}"
        n = _core.cuda.device_count()
        out["devices"] = n
        if n == 0:
            out["reason"] = "no CUDA device visible"
        else:
            idx = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
            name, major, minor, _, _ = _core.cuda.device(idx)
            out.update(cuda=True, device=name, capability=f"{major}.{minor}")
            out["arch"] = f"sm_{major}{minor}"
    except Exception as e:  # noqa: BLE001 - info reports, it never fails
        out["reason"] = str(e)
    try:
        _, (major, minor), where = _nvrtc()
        out["nvrtc_version"] = f"{major}.{minor}"
        out["nvrtc_path"] = where
    except Exception as e:  # noqa: BLE001
        out["nvrtc_error"] = str(e)
    return out
