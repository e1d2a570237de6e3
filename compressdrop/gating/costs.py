"""What each unit's KL weighs: its cost (``kl_cost``) and a factor per kind of unit (``kl_scale``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import InputError
from .units import UnitGroup

__all__: list[str] = []  # internal to compressdrop.gating

KL_COSTS = ("uniform", "params", "flops")
UNIT_KINDS = ("channel", "neuron", "head")


def check_kl_scale(kl_scale: Mapping[str, float] | None) -> dict[str, float]:
    """``kl_scale`` as a plain dict, checked: known unit kinds, positive finite factors.

    Raises:
        InputError: an unknown kind or a factor that is not a positive number.
    """
    out = {}
    for kind, factor in dict(kl_scale or {}).items():
        if kind not in UNIT_KINDS:
            raise InputError(f"kl_scale: unknown unit kind {kind!r}; one of {UNIT_KINDS}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise InputError(f"kl_scale[{kind!r}] must be a number, got {factor!r}")
        if not (0 < float(factor) < float("inf")):
            raise InputError(f"kl_scale[{kind!r}] must be positive and finite, got {factor}")
        out[kind] = float(factor)
    return out


def normalized_costs(groups: list[UnitGroup], kl_cost: str) -> list[torch.Tensor]:
    """Each group's per-unit KL weights for ``kl_cost``: 1 (``"uniform"``), or the units'
    parameters or multiply-adds divided by their mean over every group."""
    if kl_cost == "uniform":
        return [torch.ones(g.num_units) for g in groups]
    raw = [g.params_per_unit if kl_cost == "params" else g.macs_per_unit for g in groups]
    mean = torch.cat(raw).mean().clamp(min=1e-12)
    return [r / mean for r in raw]
