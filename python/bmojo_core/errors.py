"""Exception classes: every bad-input error of bmojo_core derives from BmojoError."""


class BmojoError(Exception):
    """Base class of the errors raised by bmojo_core."""


class BmojoValueError(BmojoError, ValueError):
    """An argument has the wrong shape, size, device or value."""


class BmojoTypeError(BmojoError, TypeError):
    """An argument has the wrong type or dtype."""
