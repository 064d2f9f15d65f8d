"""Argument checks shared by every layer of the package: each error names the argument and
says what was expected."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence

import torch

from .errors import BmojoTypeError, BmojoValueError

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


INT64_MAX = 2**63 - 1


def int_arg(name: str, v: object, lo: int, hi: int | None = None) -> int:
    """An integer (Python or NumPy, not bool) in ``[lo, hi]`` (``hi`` None: any that fits
    in int64), as a Python int."""
    want = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"
    if hi is None:
        hi = INT64_MAX
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise BmojoTypeError(f"{name}: expected {want}, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise BmojoValueError(f"{name}: expected {want}, got {v}")
    return int(v)


@contextlib.contextmanager
def allocating(name: str) -> Iterator[None]:
    """Turns a failed allocation inside the block (torch's ``RuntimeError``, a
    ``MemoryError``) into a ``BmojoValueError`` naming the argument that sized it."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "out of memory"
        raise BmojoValueError(
            f"{name}: too large, the memory cannot be allocated ({first})"
        ) from None


def int_tensor(name: str, value: object, what: str = "ints") -> torch.Tensor:
    """``value`` (an integer tensor or NumPy array, an int, or nested sequences of ints) as
    an int64 tensor. Floats, bools and anything else raise: nothing is truncated or
    reinterpreted."""
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        t = torch.tensor(int(value)) if -(2**63) <= value < 2**63 else None
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            t = None
    if t is None or t.dtype not in _INT_DTYPES:
        got = type(value).__name__ if t is None else f"dtype {dtype_name(t.dtype)}"
        raise BmojoTypeError(f"{name}: expected {what} (an int tensor or nested lists of ints), "
                             f"got {got}")  # fmt: skip
    if t.device.type != "cpu":
        raise BmojoValueError(f"{name}: expected a CPU tensor, got device {t.device}")
    return t.to(torch.int64)


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def number_arg(name: str, v: object) -> float:
    """A real number (not bool), as a float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise BmojoTypeError(f"{name}: expected a number, got {type(v).__name__}")
    return float(v)


def indices(name: str, value: object, n: int, what: str) -> torch.Tensor:
    """Indices into ``n`` rows (int64, 1-D) from None (all), an int, a sequence of ints, an
    int tensor or array, or a bool mask ``(n,)`` (tensor, array or list); ``what`` names one
    row ("slot", "row"). Floats and other types raise (nothing is truncated)."""
    if value is None:
        return torch.arange(n)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and not len(value):
        return torch.empty(0, dtype=torch.int64)
    mask = value
    if not isinstance(value, (torch.Tensor, numbers.Integral)):
        try:
            mask = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            mask = None
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        shape(name, mask, (n,), f"({n},) bool mask")
        return mask.nonzero().flatten()
    idx = int_tensor(name, value, f"{what} indices or a bool mask").flatten()
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise BmojoValueError(f"{name}: indices must be in [-{n}, {n}), got {idx.tolist()}")
    return idx


def writable(name: str, t: torch.Tensor, reads: dict[str, torch.Tensor | None]) -> None:
    """Checks a tensor an op writes in place: no two of its elements share memory (as
    after ``expand``), and it shares no memory with any tensor in ``reads`` (the op's
    other arguments, whose values the writes would change mid-call)."""
    if not _no_internal_overlap(t):
        raise BmojoValueError(
            f"{name}: elements share memory (e.g. made by expand); an in-place argument must "
            "own each of its elements (use .clone() or .contiguous())"
        )
    if torch.compiler.is_compiling():
        return  # storages are not traceable; functionalization owns aliasing there
    lo, hi = _span(t)
    for other, r in reads.items():
        if r is None or r is t or r.device != t.device or not r.numel() or not t.numel():
            continue
        if r.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            continue
        rlo, rhi = _span(r)
        if rlo < hi and lo < rhi:
            raise BmojoValueError(
                f"{name}: shares memory with {other}; an in-place argument may not overlap "
                "the op's other arguments (pass a copy)"
            )


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[lo, hi)`` of the storage that ``t``'s elements can touch."""
    if not t.numel():
        return 0, 0
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride < 0:
            lo += (size - 1) * stride
        else:
            hi += (size - 1) * stride
    es = t.element_size()
    return lo * es, (hi + 1) * es


def _no_internal_overlap(t: torch.Tensor) -> bool:
    """True when no two elements of ``t`` share memory (a sufficient test: ordered by
    stride, each axis must step past the whole extent of the axes below it)."""
    dims = sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz > 1)
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return False
        extent = stride * size
    return True


def tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype] = FLOATS) -> torch.Tensor:
    """Checks that `t` is a CPU tensor of one of `dtypes` (for code with no CUDA path)."""
    if not isinstance(t, torch.Tensor):
        raise BmojoTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(t.dtype).replace("torch.", "")
        raise BmojoTypeError(f"{name}: expected dtype {allowed}, got {got}")
    if t.device.type != "cpu":
        raise BmojoValueError(f"{name}: expected a CPU tensor, got device {t.device}")
    return t


def device_tensor(name: str, t: object, *, dtypes: Sequence[torch.dtype] = FLOATS) -> torch.Tensor:
    """Like `tensor`, for an op with a CUDA kernel: CPU and CUDA tensors are both accepted;
    `same_device` then checks that all inputs share one device."""
    if not isinstance(t, torch.Tensor):
        raise BmojoTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise BmojoTypeError(f"{name}: expected dtype {allowed}, got {dtype_name(t.dtype)}")
    if t.device.type not in ("cpu", "cuda"):
        raise BmojoValueError(f"{name}: expected a CPU or CUDA tensor, got device {t.device}")
    return t


def same_device(named: dict[str, torch.Tensor | None], anchor: str) -> torch.device:
    """The anchor's device; every other given tensor must be on it."""
    dev = named[anchor].device  # type: ignore[union-attr]
    for name, t in named.items():
        if t is not None and t.device != dev:
            raise BmojoValueError(
                f"{name}: expected a tensor on {dev} (the device of {anchor}), got device "
                f"{t.device}; move all inputs to one device"
            )
    return dev


def shape(name: str, t: torch.Tensor, expected: Sequence[int | None], desc: str) -> None:
    """Checks the shape; `None` entries match any size."""
    ok = t.dim() == len(expected) and all(
        e is None or e == s for e, s in zip(expected, t.shape, strict=True)
    )
    if not ok:
        want = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"
        raise BmojoValueError(f"{name}: expected shape {want} {desc}, got {tuple(t.shape)}")


def compute_dtype(named: dict[str, torch.Tensor | None], anchor: str) -> torch.dtype:
    """float64 when the anchor is float64 (then every input must be), else float32
    (then no input may be float64): inputs are never silently down- or up-cast."""
    wide = named[anchor].dtype == torch.float64  # type: ignore[union-attr]
    for name, t in named.items():
        if t is None or not t.is_floating_point():
            continue
        if (t.dtype == torch.float64) != wide:
            raise BmojoTypeError(
                f"{name}: dtype {str(t.dtype).replace('torch.', '')} does not match "
                f"{anchor} ({str(named[anchor].dtype).replace('torch.', '')}); use float64 "  # type: ignore[union-attr]
                "for all inputs or for none"
            )
    return torch.float64 if wide else torch.float32


def as_compute(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Differentiable cast to the compute dtype, contiguous."""
    return None if t is None else t.to(dtype).contiguous()
