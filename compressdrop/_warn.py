"""Run a call with its warnings held back, so that the caller chooses which to say."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["recorded"]


def recorded(fn: Callable[[], Any]) -> tuple[Any, Exception | None, list[warnings.WarningMessage]]:
    """``fn()``'s result (``None`` if it raised), what it raised, and the warnings it gave, every
    one recorded (none shown)."""
    result, failed = None, None
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as e:  # re-raised by the caller, once the warnings are said
            failed = e
    return result, failed, said
