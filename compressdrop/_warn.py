"""Run a call with its warnings held back, so that the caller chooses which to say."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["recorded"]


def recorded(fn: Callable[[], Any]) -> tuple[Any, Exception | None, list[warnings.WarningMessage]]:
    """``fn()``'s result (``None`` if it raised), what it raised, and the warnings it gave, each
    recorded (none shown) once: the first of those with the same category and text (a library
    that warns in a loop gave Swin-T's attach 2,927 lines of Torch-Pruning's "Maximum recursive
    depth reached!", which a caller that says them again with ``warn_explicit`` repeated)."""
    result, failed = None, None
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as e:  # re-raised by the caller, once the warnings are said
            failed = e
    seen: set[tuple[type, str]] = set()
    once = []
    for w in said:
        if (w.category, str(w.message)) not in seen:
            seen.add((w.category, str(w.message)))
            once.append(w)
    return result, failed, once
