"""The base of every error compressdrop raises on purpose.

A caller (the CLI among them) can catch :class:`CompressDropError` to report bad input in one line
and let anything else, a real bug, surface with its traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CompressDropError"]


class CompressDropError(Exception):
    """Bad input, a refused file, a failed check: the message says what and what to do."""


class CheckpointError(CompressDropError, ValueError):
    """A model file that cannot be loaded, or that asks to run code nobody allowed."""
