"""The gated wrapper of a fused experts module (:mod:`compressdrop.gating.experts`): the gate
scales each neuron's ``down_proj`` column, so any experts kernel runs on the gated weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import InputError
from .experts import is_experts, scaled_down
from .gated import Gated
from .packed_mlp_gated import PackedMLPGated
from .registry import register_wrapper

__all__ = ["ExpertsGated", "refuse_noise"]


class ExpertsGated(Gated):
    """A fused experts module whose neurons pass through one gate of ``E·I`` units (see
    :mod:`compressdrop.gating.experts`): ``experts(x, ...)`` computed with ``down_proj`` scaled by θ per neuron.

    Args:
        module: the experts module.
        gate: ``E·I`` units, expert-major.
        unit_dim: unused (−1).
    """

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The experts' output with each neuron multiplied by its gate: one θ for the forward
        pass in training, E[θ] (0 where pruned) in eval."""
        m, g = self.module, self.gate
        dtype = m.get_parameter("down_proj").dtype
        if g.training:
            theta = g._keep(g.sample(1)[0].to(dtype))  # (E·I,): one draw for every token
        else:
            theta = g.eval_factor()
        return functional_call(m, {"down_proj": scaled_down(m, theta)}, args, kwargs)

    @torch.no_grad()
    def fold_(self) -> None:
        """Scale each neuron's ``down_proj`` column by its E[θ]·keep for good."""
        m = self.module
        m.get_parameter("down_proj").copy_(scaled_down(m, self.gate.eval_factor()))


def refuse_noise(gated: nn.Module, layers: Sequence[str] | None) -> None:
    """Refuse to put the noise of fused experts or of a packed MLP (Phi-3's) back on a slim model
    (``keep_noise``): their kept neurons would need θ inside their forward (on ``down_proj``'s
    weight or input), which no slim layer has yet.

    Raises:
        InputError: ``gated`` has gated experts or packed MLPs among ``layers`` (``None``: every
            gate).
    """
    for name, m in gated.named_modules():
        if isinstance(m, ExpertsGated | PackedMLPGated) and (layers is None or name in layers):
            what = "fused experts" if isinstance(m, ExpertsGated) else "a packed MLP"
            raise InputError(
                f"keep_noise cannot put the noise of {what} back yet ({name!r}): "
                "name the other gates in layers"
            )


register_wrapper(is_experts, ExpertsGated)
