"""The ops' one route into the extension ``bmojo_core._core``: the extension and NumPy views
of torch CPU tensors (zero-copy; the kernels re-check every shape and dtype and raise the
classes of :mod:`bmojo_core.errors` themselves)."""

from __future__ import annotations

from torch import Tensor

from .. import _core

__all__ = ["core", "inout", "view", "view_opt"]

core = _core
"""The extension: one submodule per op module (``core.scan``, ``core.conv``, ...); the op
modules reach it only through this module."""


def view(t: Tensor):
    """An input: a contiguous NumPy view (a copy only when ``t`` is not contiguous)."""
    return t.detach().contiguous().numpy()


def view_opt(t: Tensor | None):
    """:func:`view` of an optional input (None stays None)."""
    return None if t is None else view(t)


def inout(t: Tensor):
    """An array the kernel writes: the tensor's own memory (never a copy, so the writes
    land in ``t``; a non-contiguous ``t`` is refused by the kernel)."""
    return t.detach().numpy()
