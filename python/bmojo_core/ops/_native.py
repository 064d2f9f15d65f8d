"""The ops' one route into the extension ``bmojo_core._core``: the extension and NumPy views
of torch CPU tensors (zero-copy; the kernels re-check every shape and dtype and raise the
classes of :mod:`bmojo_core.errors` themselves), and the test for when an eager call may
skip the dispatcher."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _core

__all__ = ["array", "core", "eager_no_grad", "inout", "view", "view_opt"]

core = _core
"""The extension: one submodule per op module (``core.scan``, ``core.conv``, ...); the op
modules reach it only through this module."""


# NumPy type strings of the dtypes the kernels take (little-endian machines only: the
# extension is built for x86-64 and aarch64).
_TYPESTR = {
    torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2", torch.int64: "<i8",
    torch.int32: "<i4", torch.int16: "<i2", torch.int8: "|i1", torch.uint8: "|u1",
    torch.bool: "|b1", torch.complex64: "<c8", torch.complex128: "<c16",
}  # fmt: skip


class _Memory:
    """Exposes a tensor's memory to NumPy through the array interface and keeps the tensor
    alive as the array's base."""

    __slots__ = ("__array_interface__", "tensor")


def array(t: Tensor):
    """A NumPy array over ``t``'s memory (same shape, strides and dtype; writable), as
    ``t.numpy()`` but without its side effect: ``Tensor.numpy`` marks the tensor's whole
    storage as never resizable again, which breaks, for one, FSDP2 (it frees and refills
    the storage that its unsharded parameters view) and any later ``resize_`` of a
    caller's tensor."""
    ts = _TYPESTR.get(t.dtype)
    if ts is None or t.numel() == 0 or t.requires_grad or t.device.type != "cpu":
        return t.numpy()  # its own errors and empty arrays
    m = _Memory()
    m.tensor = t
    size = t.element_size()
    m.__array_interface__ = {
        "data": (t.data_ptr(), False),
        "shape": tuple(t.shape),
        "strides": None if t.is_contiguous() else tuple(x * size for x in t.stride()),
        "typestr": ts,
        "version": 3,
    }
    return np.asarray(m)


def view(t: Tensor):
    """An input: a contiguous NumPy view (a copy only when ``t`` is not contiguous)."""
    return array(t.detach().contiguous())


def view_opt(t: Tensor | None):
    """:func:`view` of an optional input (None stays None)."""
    return None if t is None else view(t)


def inout(t: Tensor):
    """An array the kernel writes: the tensor's own memory (never a copy, so the writes
    land in ``t``; a non-contiguous ``t`` is refused by the kernel)."""
    return array(t.detach())


def eager_no_grad(named: dict[str, Tensor | None]) -> bool:
    """True outside tracing when every tensor is a plain eager tensor and no gradient can
    flow (grad mode off, or no input requires grad): then an op module may call its kernel
    directly, without the dispatcher and the autograd wrapper."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(
        t is None or (type(t) is Tensor and not (grad and t.requires_grad)) for t in named.values()
    )
