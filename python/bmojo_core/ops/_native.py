"""The ops' one route into the extension ``bmojo_core._core``: the extension and NumPy views
of torch CPU tensors (zero-copy; the kernels re-check every shape and dtype and raise the
classes of :mod:`bmojo_core.errors` themselves), and the test for when an eager call may
skip the dispatcher."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _core

__all__ = ["core", "eager_no_grad", "inout", "view", "view_opt"]

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
