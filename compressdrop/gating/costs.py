"""What each unit's KL weighs: its cost (``kl_cost``) and a factor per kind of unit or per layer
(``kl_scale``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch

from ..errors import InputError
from .units import UnitGroup

__all__: list[str] = []  # internal to compressdrop.gating

KL_COSTS = ("uniform", "params", "flops")
UNIT_KINDS = ("channel", "neuron", "head")


def check_kl_scale(kl_scale: Mapping[str, float] | None) -> dict[str, float]:
    """``kl_scale`` as a plain dict, checked: string keys (a unit kind or a layer-name glob),
    positive finite factors. Whether a glob names a gated layer is known at attach
    (:func:`group_factors`).

    Raises:
        InputError: a key that is not a non-empty string or a factor that is not a positive number.
    """
    out = {}
    for kind, factor in dict(kl_scale or {}).items():
        if not isinstance(kind, str) or not kind:
            raise InputError(
                f"kl_scale: a key is a unit kind {UNIT_KINDS} or a layer-name glob, got {kind!r}"
            )
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


def group_factors(groups: Sequence[UnitGroup], kl_scale: dict[str, float]) -> list[float]:
    """Each group's ``kl_scale`` factor: the product of the factors of its kind and of every
    layer-name glob that one of its producers matches (1 where none applies).

    Raises:
        InputError: a key that is neither a unit kind nor a glob matching a gated layer's name
            (a typo such as ``"heads"`` would otherwise weigh nothing, silently).
    """
    factors = [kl_scale.get(g.kind, 1.0) for g in groups]
    for pattern, f in kl_scale.items():
        if pattern in UNIT_KINDS:
            continue
        hit = [any(fnmatch.fnmatchcase(p, pattern) for p in g.producers) for g in groups]
        if not any(hit):
            gated = ", ".join(sorted(repr(p) for g in groups for p in g.producers))
            raise InputError(
                f"kl_scale: {pattern!r} is not a unit kind {UNIT_KINDS} and matches no gated "
                f"layer's name (gated: {gated})"
            )
        factors = [factor * f if h else factor for factor, h in zip(factors, hit, strict=True)]
    return factors
