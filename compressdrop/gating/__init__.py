"""Attach gates to any PyTorch model (and detach them)."""

from .gated import (
    Gated,
    attach,
    attach_config,
    detach,
    example_input_for,
    groups_of,
    input_shapes_of,
    is_gated,
    kl,
    named_gates,
    sites,
)
from .groups import GatingWarning, Site, UnitGroup, find_groups

__all__ = [
    "Gated",
    "GatingWarning",
    "Site",
    "UnitGroup",
    "attach",
    "attach_config",
    "detach",
    "example_input_for",
    "find_groups",
    "groups_of",
    "input_shapes_of",
    "is_gated",
    "kl",
    "named_gates",
    "sites",
]
