"""The base of every error compressdrop raises on purpose.

A caller (the CLI among them) can catch :class:`CompressDropError` to report bad input in one line
and let anything else, a real bug, surface with its traceback. :func:`brief` puts a value read
from a file into such a line.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["CheckpointError", "CompressDropError", "DataError", "InputError", "brief", "prefixed"]


def brief(value: Any) -> str:
    """``value`` in a few words for an error message: plain data by a repr cut short (a list's
    first items, a long string's ends), anything else by its type (a file's numpy array)."""
    if value is None or isinstance(value, bool | int | float | str | list | tuple | dict):
        return reprlib.repr(value)
    return f"a {type(value).__name__}"


class CompressDropError(Exception):
    """Bad input, a refused file, a failed check: the message says what and what to do."""


class CheckpointError(CompressDropError, ValueError):
    """A model file that cannot be loaded, or that asks to run code nobody allowed."""


class InputError(CompressDropError, ValueError):
    """A value the caller gave does not fit: an option, a shape, a model for the operation."""


class DataError(InputError):
    """A data set that cannot be read or does not make a classification task."""


@contextmanager
def prefixed(where: str, catch: type[CompressDropError] = CheckpointError) -> Iterator[None]:
    """Re-raise an error of ``catch`` from the block as a
    :class:`CheckpointError` with ``where`` (the file, the record) in front of its message; the
    inner traceback is dropped, as the message already says what failed."""
    try:
        yield
    except catch as e:
        raise CheckpointError(f"{where}: {e}") from None
