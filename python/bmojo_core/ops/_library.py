"""How the op modules declare their ``torch.library`` custom ops, on every torch that
pyproject.toml admits.

torch 2.4 infers an op's schema from the function's annotations as written: it needs them
evaluated (the op modules use ``from __future__ import annotations``, so they are strings)
and spelled with :mod:`typing`'s forms (``Optional[Tensor]``, ``List[int]``, ``Tuple[...]``),
where torch >= 2.5 also reads ``Tensor | None``, ``list[int]`` and ``tuple[...]``. The
decorator here hands every torch the evaluated, :mod:`typing`-spelled annotations, so the
op modules keep the modern spelling and one schema on every version.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["custom_op"]


def _typing_form(t: Any) -> Any:
    """``t`` with PEP 604 unions and builtin generics rewritten as their :mod:`typing` forms
    (equal types: only the spelling torch 2.4's schema table looks up changes)."""
    origin = typing.get_origin(t)
    if origin is None:
        return t
    args = tuple(_typing_form(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return typing.Union[args]  # noqa: UP007 - the spelling torch 2.4 looks up
    if origin is list:
        return typing.List[args]  # noqa: UP006
    if origin is tuple:
        return typing.Tuple[args]  # noqa: UP006
    if origin is collections.abc.Sequence:
        return typing.Sequence[args]
    return t


def custom_op(
    name: str, *, mutates_args: Iterable[str] | str, device_types: str | None = None
) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.custom_op`` for a function whose annotations may be strings or
    modern spellings (see the module doc); same arguments, same result."""

    def register(fn: Callable[..., Any]) -> Any:
        hints = typing.get_type_hints(fn)
        fn.__annotations__ = {k: _typing_form(v) for k, v in hints.items()}
        if hints.get("return") is type(None):  # get_type_hints turns ``-> None`` into NoneType
            fn.__annotations__["return"] = None
        return torch.library.custom_op(name, mutates_args=mutates_args, device_types=device_types)(
            fn
        )

    return register
