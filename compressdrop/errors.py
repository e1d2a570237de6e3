"""The base of every error compressdrop raises on purpose.

A caller (the CLI among them) can catch :class:`CompressDropError` to report bad input in one line
and let anything else, a real bug, surface with its traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CompressDropError", "DataError", "InputError"]


class CompressDropError(Exception):
    """Bad input, a refused file, a failed check: the message says what and what to do."""


class CheckpointError(CompressDropError, ValueError):
    """A model file that cannot be loaded, or that asks to run code nobody allowed."""


class InputError(CompressDropError, ValueError):
    """A value the caller gave does not fit: an option, a shape, a model for the operation."""


class DataError(InputError):
    """A data set that cannot be read or does not make a classification task."""
