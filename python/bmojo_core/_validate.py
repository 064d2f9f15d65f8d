"""Argument checks shared by every layer of the package: each error names the argument and
says what was expected."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .errors import BmojoTypeError, BmojoValueError

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def int_arg(name: str, v: object, lo: int) -> int:
    """An integer (Python or NumPy, not bool) >= `lo`, as a Python int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise BmojoTypeError(f"{name}: expected an int >= {lo}, got {v!r}")
    if v < lo:
        raise BmojoValueError(f"{name}: expected an int >= {lo}, got {v}")
    return int(v)


def number_arg(name: str, v: object) -> float:
    """A real number (not bool), as a float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise BmojoTypeError(f"{name}: expected a number, got {type(v).__name__}")
    return float(v)


def indices(name: str, value: object, n: int, what: str) -> torch.Tensor:
    """Indices into ``n`` rows (int64, 1-D) from None (all), an int, a sequence of ints, an
    int tensor or a bool mask ``(n,)``; ``what`` names one row ("slot", "row")."""
    if value is None:
        return torch.arange(n)
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        shape(name, value, (n,), f"({n},) bool mask")
        return value.nonzero().flatten()
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        raise BmojoTypeError(f"{name}: expected integer indices, got {value.dtype}")
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        idx = torch.as_tensor(items, dtype=torch.int64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise BmojoTypeError(
            f"{name}: expected {what} indices or a bool mask, got {value!r}"
        ) from None
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise BmojoValueError(f"{name}: indices must be in [-{n}, {n}), got {idx.tolist()}")
    return idx


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
