"""What attach finds and records: unit groups, the sites of their gates, and its warning."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import spec_of

__all__ = ["GatingWarning", "Site", "UnitGroup", "unit_count_problem"]


class GatingWarning(UserWarning):
    """A layer that attach could not gate (it stays as it was); the message says why."""


@dataclass(frozen=True)
class Site:
    """Where a gate multiplies: the output of module ``name`` along ``unit_dim``, or, for a head
    gate, its input split into heads of ``head_dim`` features.

    Attributes:
        name: the gated module's name in the model (as ``named_modules`` gives it).
        unit_dim: the dimension of its output that holds the units (1 for channels, −1 for
            neurons and LSTM hidden units; −2 for heads, of the input split into heads).
        head_dim: 0 for a gate on the output; > 0: the gate multiplies the module's *input*
            (an attention's output projection) split into heads of this many features.
        attention: for a head gate, the name of the attention module whose heads it gates.
    """

    name: str
    unit_dim: int
    head_dim: int = 0
    attention: str = ""


@dataclass
class UnitGroup:
    """Units that must be removed together, and where their gate goes.

    Attributes:
        name: the group's label: the name of its first producer.
        num_units: channels or neurons in the group.
        kind: ``"neuron"`` when every producer is a Linear, ``"head"`` for an attention's heads,
            ``"channel"`` otherwise.
        producers: names of the layers whose outputs are the units (several for a residual
            stream).
        sites: where the group's one gate multiplies.
        params_per_unit: parameters each unit controls, shape ``(num_units,)``.
        macs_per_unit: multiply-adds per example each unit controls, shape ``(num_units,)``.
        blocks: equal blocks of consecutive units that must each keep as many units (the groups
            of the grouped convolutions the units feed or come from; 1: none).
        multiple: each block keeps a multiple of this many units, or all of them (a fused
            experts module: kernels that need 16-byte aligned rows; 1: any number).
    """

    name: str
    num_units: int
    kind: str  # "channel" or "neuron"
    producers: list[str]
    sites: list[Site]
    params_per_unit: torch.Tensor = field(repr=False)
    macs_per_unit: torch.Tensor = field(repr=False)
    blocks: int = 1
    multiple: int = 1


def _matches(name: str, module: nn.Module, patterns: Sequence[str | type] | None) -> bool:
    if not patterns:
        return False
    for p in patterns:
        if isinstance(p, type) and isinstance(module, p):
            return True
        if isinstance(p, str) and (fnmatch.fnmatchcase(name, p) or type(module).__name__ == p):
            return True
    return False


def unit_count_problem(
    producers: Sequence[nn.Module], num_units: int, shapes: dict[nn.Module, tuple[int, ...]]
) -> str | None:
    """Why a gate of ``num_units`` units (Torch-Pruning's count of the producers' output
    channels) cannot multiply a producer's output as it was on the example inputs (``shapes``):
    its size along the spec's unit dimension differs, as for a Linear subclass whose forward
    reshapes its weight into groups (DeepSeek-V4's grouped ``o_a_proj``: 8,192 rows, its output
    ``(..., 8, 1024)``). ``None``: every producer's output matches."""
    for p in producers:
        spec, shape = spec_of(p), shapes.get(p)
        if spec is None or shape is None or not -len(shape) <= spec.unit_dim < len(shape):
            continue
        dim = spec.unit_dim
        if shape[dim] != num_units:
            return (
                f"its gate would have {num_units:,} units (its output channels, as Torch-Pruning "
                f"counts them), but its output on the example inputs has {shape[dim]:,} along "
                f"dim {dim} (shape {shape}): {type(p).__name__}'s forward does not lay out one "
                "unit per output channel (a weight reshaped into groups?), so no gate fits it"
            )
    return None
