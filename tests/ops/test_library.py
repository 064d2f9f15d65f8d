"""ops/_library.custom_op: one schema from modern, postponed annotations on every torch that
pyproject.toml admits (torch 2.4 reads only evaluated ``typing`` spellings)."""

from __future__ import annotations

import typing
from collections.abc import Sequence

import pytest
import torch
from bmojo_core.ops._library import _typing_form, custom_op
from torch import Tensor


@pytest.mark.parametrize(
    "modern, legacy",
    [
        (Tensor | None, typing.Optional[Tensor]),  # noqa: UP007, UP045
        (list[int], typing.List[int]),  # noqa: UP006
        (tuple[Tensor, Tensor], typing.Tuple[Tensor, Tensor]),  # noqa: UP006
        (list[int] | None, typing.Optional[typing.List[int]]),  # noqa: UP006, UP007, UP045
        (Sequence[float], typing.Sequence[float]),  # noqa: UP006
        (int | float | bool, typing.Union[int, float, bool]),  # noqa: UP007
        (Tensor, Tensor),
        (int, int),
    ],
)
def test_typing_form(modern, legacy):
    got = _typing_form(modern)
    assert got == legacy
    assert repr(got) == repr(legacy)


@custom_op("bmojo_test_library::pure", mutates_args=(), device_types="cpu")
def _pure(
    x: Tensor, y: Tensor | None, n: int, s: list[int], b: bool, q: int | None = None
) -> tuple[Tensor, Tensor]:
    return x + n, x.clone() if y is None else x + y


@custom_op("bmojo_test_library::mutating", mutates_args=("state",), device_types="cpu")
def _mutating(state: Tensor, x: Tensor, scale: float) -> None:
    state.add_(x * scale)


def test_schemas():
    pure = torch.ops.bmojo_test_library.pure.default._schema
    assert str(pure) == (
        "bmojo_test_library::pure(Tensor x, Tensor? y, SymInt n, SymInt[] s, bool b, "
        "SymInt? q=None) -> (Tensor, Tensor)"
    )
    mutating = torch.ops.bmojo_test_library.mutating.default._schema
    assert str(mutating) == (
        "bmojo_test_library::mutating(Tensor(a0!) state, Tensor x, float scale) -> ()"
    )


def test_ops_run():
    x = torch.arange(3.0)
    a, b = _pure(x, None, 2, [1], True)
    assert torch.equal(a, x + 2) and torch.equal(b, x)
    state = torch.zeros(3)
    _mutating(state, x, 0.5)
    assert torch.equal(state, x * 0.5)
