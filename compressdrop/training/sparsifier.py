"""Plug Bayesian pruning into your own training loop."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import InputError
from ..gating import attach, is_gated, kl, named_gates
from .schedule import KLSchedule

__all__ = ["Sparsifier", "param_groups"]


def param_groups(
    model: nn.Module, lr: float, gate_lr: float, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups: the model's weights (with weight decay) and the gates' own
    parameters (their learning rate, no weight decay — decay would bias the noise posteriors)."""
    gate_ids = {id(p) for _, g in named_gates(model) for p in g.parameters()}
    weights = [p for p in model.parameters() if id(p) not in gate_ids and p.requires_grad]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay}]
    gate_params = [p for p in model.parameters() if id(p) in gate_ids]
    if gate_params:
        groups.append({"params": gate_params, "lr": gate_lr, "weight_decay": 0.0})
    return groups


class Sparsifier:
    """The KL side of the ELBO for a user's loop: ``loss = nll + sparsifier.penalty(t)``.

    ``penalty(t)`` is β(t)·KL/N: the KL of all gates scaled by the data-set size N (the ELBO per
    example) and by the schedule's weight at ``t`` fractional epochs into sparsification.

    Example:
        >>> sp = Sparsifier(model, n_train=len(train_set), gate="lognormal",
        ...                 schedule=KLSchedule(beta=1, warmup=5))        # doctest: +SKIP
        >>> opt = torch.optim.Adam(sp.param_groups(lr=1e-3, gate_lr=1e-2))  # doctest: +SKIP
        >>> for epoch in range(20):                                          # doctest: +SKIP
        ...     for i, (x, y) in enumerate(loader):
        ...         loss = F.cross_entropy(model(x), y) + sp.penalty(epoch + i / len(loader))
        ...         opt.zero_grad(); loss.backward(); opt.step()
        >>> slim = sp.finish()                                               # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        n_train: int,
        *,
        gate: str = "lognormal",
        schedule: KLSchedule | None = None,
        threshold: float | None = None,
        example_inputs: torch.Tensor | tuple | None = None,
        **attach_kwargs,
    ) -> None:
        if n_train < 1:
            raise InputError(f"n_train must be ≥ 1, got {n_train}")
        self.model = model
        self.n_train = int(n_train)
        self.schedule = schedule or KLSchedule()
        self.threshold = threshold
        self.example_inputs = example_inputs
        if not is_gated(model):
            attach(model, gate, example_inputs=example_inputs, **attach_kwargs)

    @classmethod
    def from_recipe(cls, model: nn.Module, recipe, n_train: int, example_inputs=None) -> Sparsifier:
        """Attach the recipe's gates and use its KL schedule and threshold."""
        g = recipe.gates
        return cls(
            model,
            n_train,
            gate=g.family,
            schedule=recipe.kl,
            threshold=recipe.prune.threshold,
            example_inputs=example_inputs,
            granularity=g.granularity,
            include=list(g.include) or None,
            exclude=list(g.exclude) or None,
            gate_kwargs=g.kwargs,
            kl_cost=g.kl_cost,
        )

    def param_groups(self, lr: float, gate_lr: float, weight_decay: float = 0.0) -> list[dict]:
        return param_groups(self.model, lr, gate_lr, weight_decay)

    def penalty(self, t: float) -> torch.Tensor:
        """β(t)·KL/N for ``t`` fractional epochs since sparsification began."""
        beta = self.schedule(t)
        if beta == 0:
            return torch.zeros((), device=next(self.model.parameters()).device)
        return beta * kl(self.model) / self.n_train

    def units(self, threshold: float | None = None) -> tuple[int, int]:
        """(units kept at the threshold, units gated) over all gates."""
        thr = self.threshold if threshold is None else threshold
        kept = total = 0
        for _, g in named_gates(self.model):
            kept += int(g.mask(thr).sum())
            total += g.num_units
        return kept, total

    def finish(self, threshold: float | None = None) -> nn.Module:
        """Prune at the threshold and return the slim model (see :func:`compressdrop.prune`)."""
        from ..pruning import prune

        thr = self.threshold if threshold is None else threshold
        return prune(self.model, thr, example_inputs=self.example_inputs)

    def iter_gates(self) -> Iterable:
        return named_gates(self.model)
