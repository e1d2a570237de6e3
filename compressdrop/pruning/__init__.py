"""Pruning and structural surgery: from gates and a threshold to a plain, smaller model."""

from .surgery import (
    LayerReport,
    PruneReport,
    PruningWarning,
    SurgeryError,
    check_threshold,
    mask_,
    prune,
    replay,
    unmask_,
)

__all__ = [
    "LayerReport",
    "PruneReport",
    "PruningWarning",
    "SurgeryError",
    "check_threshold",
    "mask_",
    "prune",
    "replay",
    "unmask_",
]
