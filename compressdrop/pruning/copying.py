"""A deep copy of a model that a forward pass left holding tensors with autograd history."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["model_copy"]


def model_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, with each tensor that one of its modules keeps as a plain
    attribute and that autograd computed copied detached (the same values).

    A stateful model keeps the state of its last forward pass on its modules (RecurrentGemma's
    ``rg_lru.recurrent_states`` and ``conv1d_state``); after a pass with gradients (attach's
    trace, a training step) that state is not a graph leaf, and ``copy.deepcopy`` refuses it
    ("Only Tensors created explicitly by the user (graph leaves) support the deepcopy
    protocol"). Its history is of no use to the copy: the model itself is left as it was."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
