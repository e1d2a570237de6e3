"""A Lightning callback: gates from a recipe, the scheduled KL term in the loss, prune and export
at the end of ``fit``.

Install with ``pip install 'compressdrop[lightning]'``. Usage::

    from compressdrop.integrations.lightning import CompressDropCallback

    cb = CompressDropCallback("lenet300-lognormal", out_dir="runs/pl")
    trainer = lightning.Trainer(max_epochs=20, callbacks=[cb])
    trainer.fit(module, train_loader, val_loader)   # module.model gets the gates
    cb.slim                                         # the pruned nn.Module (also runs/pl/slim.pt)

What it does, hook by hook:

* ``setup`` (before Lightning builds the optimizers, so gate parameters are in them):
  :func:`compressdrop.attach` on the LightningModule's network (attribute ``target``, default
  ``model``) with the recipe's gate family, granularity, include/exclude and KL cost; and wraps
  ``training_step`` so that the loss it returns gains β(t)·KL/N — β(t) the recipe's KL schedule at
  fractional epoch t, N the training-set size (``len(train_dataloader.dataset)`` unless given).
  Because the term is added to the returned loss, gradient accumulation, AMP loss scaling and
  DDP's gradient averaging treat it like the rest of the loss.
* ``on_fit_end`` (global rank 0 only): :func:`compressdrop.prune` at the recipe's threshold, then
  ``slim.pt`` (and ``slim.onnx`` if the recipe exports) in ``out_dir``. Fine-tuning the slim
  model is a second ``fit`` of your own (the recipes' "finetune" stage).

Under DDP (``strategy="ddp"``) each rank draws its own gate noise for its own examples, which is
correct but not bit-identical to one process (compressdrop's own runner, ``compressdrop train
--nproc``, is). Manual optimization (``automatic_optimization = False``) is not supported: add
``compressdrop.kl(net) / N`` yourself there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._attrs import set_record
from .._torchvision import import_torchvision
from ..errors import InputError
from ..gating import attach, detach, example_input_for, is_gated
from ..programs import program_record
from ..recipes import Recipe, load_recipe
from ..training.finish import SlimFiles, finish
from ..training.sparsifier import Sparsifier

import_torchvision()  # Lightning's metrics import torchvision: a mismatched build must load
try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "compressdrop.integrations.lightning needs Lightning: pip install 'compressdrop[lightning]'"
    ) from e

__all__ = ["CompressDropCallback"]


class CompressDropCallback(pl.Callback):
    """Attach gates from a recipe, add its scheduled KL term, prune and export at the end of fit.

    Args:
        recipe: a recipe name, YAML path or :class:`~compressdrop.recipes.Recipe`; its ``gates``,
            ``kl``, ``prune`` and ``export`` sections are used (stages and data are yours).
        out_dir: where ``slim.pt`` and ``slim.onnx`` go (``None``: write nothing).
        target: attribute of the LightningModule holding the network to gate.
        example_input: an input batch for tracing (default: inferred from the network).
        num_train: training-set size N in β·KL/N (default: from the train dataloader).
    """

    def __init__(
        self,
        recipe: str | Recipe,
        out_dir: str | Path | None = None,
        *,
        target: str = "model",
        example_input: torch.Tensor | None = None,
        num_train: int | None = None,
    ) -> None:
        super().__init__()
        self.recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.target, self.example_input, self.num_train = target, example_input, num_train
        self.slim: nn.Module | None = None
        self.files: SlimFiles | None = None
        self.last_beta: float = 0.0
        self._wrapped: Any = None
        self._sparsifier: Sparsifier | None = None

    # -- helpers ------------------------------------------------------------------------------------
    def _net(self, pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, self.target, None)
        if not isinstance(net, nn.Module):
            raise AttributeError(
                f"CompressDropCallback: the LightningModule has no network at .{self.target}; "
                "pass target=<attribute name>"
            )
        return net

    def _sparsifier_for(self, trainer: pl.Trainer, net: nn.Module) -> Sparsifier:
        """The recipe's β(t)·KL/N on ``net``, once the training-set size N is known."""
        if self._sparsifier is None:
            n = self.num_train
            if n is None:
                try:
                    n = len(trainer.train_dataloader.dataset)  # type: ignore[union-attr]
                except (AttributeError, TypeError) as e:  # no loader yet, or an iterable dataset
                    raise InputError(
                        "CompressDropCallback: cannot tell the training-set size; pass num_train=N"
                    ) from e
            self.num_train = n
            self._sparsifier = Sparsifier.from_recipe(net, self.recipe, n)
        return self._sparsifier

    # -- hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Attach the recipe's gates and wrap ``training_step`` to add β(t)·KL/N (fit only)."""
        if stage != "fit":
            return
        net = self._net(pl_module)
        if not is_gated(net):  # before Lightning builds the optimizers: gates must be in them
            example = self.example_input
            if example is None:
                try:
                    example = example_input_for(net)
                except InputError as e:  # its advice names attach's argument, not this one's
                    raise InputError(
                        "CompressDropCallback: cannot infer the network's input shape; pass "
                        "example_input=<a batch of inputs>"
                    ) from e
            if self.out_dir is not None and not isinstance(getattr(net, "arch", None), Mapping):
                # a user's own network names no factory: its dense structure, as a torch.export
                # program, is what lets slim.pt rebuild (without pickled code) at the end; where
                # torch.export cannot capture it, slim.pt2 is written instead (on_fit_end)
                with contextlib.suppress(Exception):
                    set_record(net, "arch", program_record(net, example))
            attach(
                net,
                **self.recipe.gates.attach_kwargs(),
                example_inputs=example.to(next(net.parameters()).device),
            )
        self._sparsifier = None
        original = pl_module.training_step
        schedule = self.recipe.kl

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any):
            out = original(*args, **kwargs)
            if out is None:  # Lightning skips the step (manual optimization or a skipped batch)
                return None
            batches = max(int(trainer.num_training_batches), 1)
            batch_idx = kwargs.get("batch_idx", args[1] if len(args) > 1 else 0)
            t = trainer.current_epoch + batch_idx / batches
            self.last_beta = float(schedule(t))
            term = self._sparsifier_for(trainer, net).penalty(t)
            if isinstance(out, Mapping):
                return {**out, "loss": out["loss"] + term}
            return out + term

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = (pl_module, original)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the LightningModule its own ``training_step`` back."""
        if self._wrapped is not None and self._wrapped[0] is pl_module:
            pl_module.training_step = self._wrapped[1]
            self._wrapped = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune at the recipe's threshold; rank 0 writes ``slim.pt`` (``slim.pt2`` for a network
        that ``torch.export`` could not record) and ``slim.onnx``."""
        net = self._net(pl_module)
        out = self.out_dir if trainer.is_global_zero else None  # rank 0 writes
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        # a network no record can rebuild (see setup) is written as a torch.export program
        first = ".pt" if isinstance(getattr(net, "arch", None), Mapping) else ".pt2"
        self.slim, self.files = finish(
            net,
            out / "slim.pt" if out is not None else None,
            threshold=self.recipe.prune.threshold,
            example_input=self.example_input,
            formats=(first, ".onnx") if self.recipe.export.onnx else (first,),
            recipe=self.recipe.to_dict(),
            opset=self.recipe.export.opset,
        )

    def detach(self, pl_module: pl.LightningModule) -> nn.Module:
        """Take the gates off the LightningModule's network (its learned state is dropped)."""
        return detach(self._net(pl_module))
