"""Pruned units that reach a layer as a constant, not a zero, folded into that layer's bias.

A BatchNorm after a concatenation (DenseNet) turns a pruned, zero channel into the constant
β − γμ/σ (through an activation, still a constant). The layer that reads it — a Linear, or a 1×1
convolution without padding (see :func:`compressdrop.gating.paths.folds_constant`) — adds
``W[:, c] · constant`` to every output, which is a bias. :class:`ConstantInputs` records, during
the masked model's reference forward, which input channels of such layers are constant and
their values; before the channels are cut, :meth:`ConstantInputs.fold_` adds their contribution
to the layer's bias (creating a zero bias where the layer had none; the pruning history records
that, so that :func:`compressdrop.pruning.replay` rebuilds the same structure).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..gating.paths import folds_constant
from .report import BIAS

__all__: list[str] = []  # internal to compressdrop.pruning


class ConstantInputs:
    """Per input channel of every layer that can fold constants: its value, and whether it is
    the same at every position and example of the first call (a context manager: hooks on
    entry, removed on exit). A model without BatchNorm makes no such constants: nothing is
    recorded there."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.records: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.biased: list[str] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> ConstantInputs:
        modules = list(self.model.modules())
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
            return self
        for m in modules:
            if folds_constant(m):
                self._hooks.append(m.register_forward_pre_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _record(self, m: nn.Module, args: tuple) -> None:
        if m in self.records or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        per = x.transpose(0, 1) if isinstance(m, nn.modules.conv._ConvNd) else x.movedim(-1, 0)
        per = per.reshape(per.shape[0], -1)
        lo, hi = per.amin(1).double(), per.amax(1).double()
        same = (hi - lo) <= 1e-6 * torch.maximum(hi.abs(), lo.abs()).clamp(min=1e-30)
        self.records[m] = per.mean(1, dtype=torch.float64), same

    @torch.no_grad()
    def fold_(self, group) -> str | None:
        """Fold into their layers' biases the constant inputs that ``group`` (a Torch-Pruning
        pruning group, not yet applied) removes.

        Returns:
            ``None``, or why a removed input is neither zero nor a constant (the slim model would
            not match: the caller raises).
        """
        names = {m: n for n, m in self.model.named_modules()}  # the gates are detached by now
        for dep, idxs in group:
            m = dep.target.module
            if dep.handler.__name__ != "prune_in_channels" or m not in self.records:
                continue
            values, same = self.records[m]
            weight = m.get_parameter("weight")
            if weight.shape[1] != values.numel():
                continue  # the layer changed width since the record (not a fold target)
            idx = torch.as_tensor(sorted(idxs), dtype=torch.long)
            v, ok = values[idx], same[idx]
            live = v != 0
            if not live.any():
                continue
            if not ok[live].all():
                return f"input channels of {names[m]!r} that it removes vary (not a constant)"
            w = weight[:, idx].reshape(weight.shape[0], len(idx), -1).sum(-1).double()
            delta = (w @ v).to(weight.dtype)
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros_like(delta))
                self.biased.append(names[m])
            m.bias.add_(delta)
        return None


def add_biases_(model: nn.Module, history: list) -> None:
    """Give the layers that the history's :data:`BIAS` steps name a zero bias (replay)."""
    for name, op, _ in history:
        if op == BIAS:
            m = model.get_submodule(name)
            weight = m.get_parameter("weight")
            m.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype))
