"""Exception classes: every bad-input error of bmojo_core derives from BmojoError. The
extension raises these classes itself (its one error conversion imports this module)."""

__all__ = [
    "BmojoCompileError",
    "BmojoCudaError",
    "BmojoError",
    "BmojoTypeError",
    "BmojoValueError",
]


class BmojoError(Exception):
    """Base class of the errors raised by bmojo_core."""


class BmojoValueError(BmojoError, ValueError):
    """An argument has the wrong shape, size, device or value."""


class BmojoTypeError(BmojoError, TypeError):
    """An argument has the wrong type or dtype."""


class BmojoCudaError(BmojoError, RuntimeError):
    """The CUDA runtime failed: no driver or NVRTC library, a driver call returned an error
    (the message carries the driver's error string), or a kernel is unavailable."""


class BmojoCompileError(BmojoCudaError):
    """NVRTC rejected a kernel source (the message carries the NVRTC log)."""
