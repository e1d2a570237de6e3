"""What the checks of :mod:`compressdrop.payload` share: a value in a few words, a choice
looked up without trusting its type, a module's dotted name."""

from __future__ import annotations

import reprlib
from typing import Any, TypeGuard

__all__: list[str] = []  # internal

#: the most dimensions an input or a unit index may have
_MAX_DIMS = 16


def _what(value: Any) -> str:
    """``value`` in a few words for an error message: plain data by a repr cut short (a list's
    first items), else its type."""
    if value is None or isinstance(value, bool | int | float | str | list | tuple):
        return reprlib.repr(value)
    return f"a {type(value).__name__}"


def _among(value: Any, allowed: Any) -> bool:
    """Whether ``value`` is one of ``allowed``, of the same type: a list or a numpy array in a
    file is not looked up (unhashable, or a truth value that raises), ``True`` is not ``1``."""
    return any(type(value) is type(a) and value == a for a in allowed)


def _name(value: Any) -> TypeGuard[str]:
    """Whether ``value`` is a module's dotted name (``"features.3"``)."""
    return isinstance(value, str) and bool(value) and all(value.split("."))
