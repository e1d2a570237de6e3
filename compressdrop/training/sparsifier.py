"""Plug Bayesian pruning into your own training loop."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import InputError
from ..gating import attach, is_gated, kl, named_gates
from ..recipes.schedule import KLSchedule, lr_factor

if TYPE_CHECKING:
    from ..recipes import Recipe, StageConfig

__all__ = ["Sparsifier", "param_groups", "units_kept"]


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


def make_optimizer(model: nn.Module, cfg: StageConfig) -> torch.optim.Optimizer:
    """A stage's optimizer (``cfg.optimizer``: Adam, or SGD with momentum 0.9) over
    :func:`param_groups`; each group keeps its starting rate as ``initial_lr`` for the schedule."""
    groups = param_groups(model, cfg.lr, cfg.gate_lr, cfg.weight_decay)
    for group in groups:
        group["initial_lr"] = group["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.Adam(groups)


def schedule_lr(opt: torch.optim.Optimizer, cfg: StageConfig, done: float) -> None:
    """Set each group's rate for the step after ``done`` of the stage (``cfg.lr_schedule``)."""
    factor = lr_factor(cfg.lr_schedule, done)
    for group in opt.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def units_kept(model: nn.Module, threshold: float | None = None) -> tuple[int, int]:
    """Units a gated model keeps at ``threshold`` (``None``: each gate family's default) and the
    units its gates control, counting a gate shared by several layers once."""
    kept = total = 0
    for _, g in named_gates(model):
        kept += int(g.mask(threshold).sum())
        total += g.num_units
    return kept, total


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
    def from_recipe(
        cls,
        model: nn.Module,
        recipe: Recipe,
        n_train: int,
        example_inputs: torch.Tensor | tuple | None = None,
        only_sites: Collection[str] | None = None,
    ) -> Sparsifier:
        """A Sparsifier with the recipe's gates (attached unless the model has gates already),
        KL schedule and pruning threshold.

        Args:
            model: the network to gate.
            recipe: a :class:`~compressdrop.recipes.Recipe`; its ``gates``, ``kl`` and ``prune``
                sections are used.
            n_train: N in β·KL/N: the number of labels the NLL averages over per epoch
                (training examples; for next-token data, training tokens).
            example_inputs: an input batch to trace the model with.
            only_sites: gate only these layers of the recipe's plan (attach's ``only_sites``: a
                resumed run's gates, as its file records them); ``None``: all of them.
        """
        kwargs = recipe.gates.attach_kwargs()
        if only_sites is not None:
            kwargs["only_sites"] = only_sites
        return cls(
            model,
            n_train,
            gate=kwargs.pop("gate"),
            schedule=recipe.kl,
            threshold=recipe.prune.threshold,
            example_inputs=example_inputs,
            **kwargs,
        )

    def param_groups(self, lr: float, gate_lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups of the gated model (see :func:`param_groups`)."""
        return param_groups(self.model, lr, gate_lr, weight_decay)

    def kl_per_example(self) -> torch.Tensor:
        """KL/N: the gates' KL divided by the training-set size (float32; the gates' closed forms
        run in float64)."""
        return kl(self.model) / self.n_train

    def penalty(self, t: float, kl_per_example: torch.Tensor | None = None) -> torch.Tensor:
        """β(t)·KL/N for ``t`` fractional epochs since sparsification began.

        Args:
            t: fractional epochs since sparsification began.
            kl_per_example: KL/N if the caller computed it already (see :meth:`kl_per_example`).
        """
        beta = self.schedule(t)
        if beta == 0 and kl_per_example is None:
            return torch.zeros((), device=next(self.model.parameters()).device)
        return beta * (self.kl_per_example() if kl_per_example is None else kl_per_example)

    def units(self, threshold: float | None = None) -> tuple[int, int]:
        """Units kept at the threshold (default: this Sparsifier's) and units gated, over all
        gates."""
        return units_kept(self.model, self.threshold if threshold is None else threshold)

    def finish(self, threshold: float | None = None) -> nn.Module:
        """Prune at the threshold and return the slim model (see :func:`compressdrop.prune`)."""
        from ..pruning import prune

        thr = self.threshold if threshold is None else threshold
        return prune(self.model, thr, example_inputs=self.example_inputs)

    def iter_gates(self) -> Iterable:
        """``(name, gate)`` for every gate of the model (see :func:`compressdrop.named_gates`)."""
        return named_gates(self.model)
