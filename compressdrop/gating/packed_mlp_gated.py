"""The gated wrapper of a packed gate/up MLP (:mod:`compressdrop.gating.packed_mlp`): the gate
multiplies ``down_proj``'s input, each neuron ``up · act(gate)`` once."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .gated import Gated
from .packed_mlp import is_packed_mlp, packed_names
from .registry import register_wrapper, spec_of

__all__ = ["PackedMLPGated"]


class PackedMLPGated(Gated):
    """A packed MLP (Phi-3's) whose ``I`` neurons pass through one gate of ``I`` units:
    ``down_proj(gate(up · act(gate_row)))``, the MLP's own forward with the gate on
    ``down_proj``'s input (per example in training, as any gate).

    Args:
        module: the MLP.
        gate: ``I`` units.
        unit_dim: the dimension of ``down_proj``'s input that holds the neurons (−1).
    """

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The MLP's output with each neuron multiplied by its gate."""

        def gated(_m: nn.Module, inputs: tuple) -> tuple:
            return (self.gate(inputs[0], dim=self.unit_dim), *inputs[1:])

        # a hook for this call only: the MLP keeps its own forward, and nothing stays on it
        handle = self._down().register_forward_pre_hook(gated)
        try:
            return self.module(*args, **kwargs)
        finally:
            handle.remove()

    def _down(self) -> nn.Module:
        names = packed_names(self.module)
        assert names is not None  # is_packed_mlp
        return self.module.get_submodule(names[1])

    @torch.no_grad()
    def fold_(self) -> None:
        """Scale each neuron's ``down_proj`` column by its E[θ]·keep for good."""
        down = self._down()
        spec = spec_of(down)
        assert spec is not None and spec.fold_in is not None  # a Linear
        spec.fold_in(down, self.gate.eval_factor())


register_wrapper(is_packed_mlp, PackedMLPGated)
