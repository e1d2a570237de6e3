"""What the checks of :mod:`compressdrop.payload` share: a value in a few words
(:func:`~compressdrop.errors.brief`), a choice looked up without trusting its type, a module's
dotted name."""

from __future__ import annotations

from typing import Any, TypeGuard

from ..errors import brief

__all__: list[str] = []  # internal

_what = brief  # a value from the file in a few words, for a message

#: the most dimensions an input or a unit index may have
_MAX_DIMS = 16


def _among(value: Any, allowed: Any) -> bool:
    """Whether ``value`` is one of ``allowed``, of the same type: a list or a numpy array in a
    file is not looked up (unhashable, or a truth value that raises), ``True`` is not ``1``."""
    return any(type(value) is type(a) and value == a for a in allowed)


def _name(value: Any) -> TypeGuard[str]:
    """Whether ``value`` is a module's dotted name (``"features.3"``)."""
    return isinstance(value, str) and bool(value) and all(value.split("."))
