"""The stages of a recipe run, looked up by name: what model each trains, what it adds to the loss
and to each epoch's record, and what it leaves behind.

A stage is entered with the model the previous stage ended with (``None`` for the first stage a
process runs), or rebuilt empty to take a checkpoint's weights when a run resumes inside it.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from .._attrs import set_record
from .._reattach import moved_gates, recorded_layers
from .._warn import recorded
from ..checkpoint import save_model
from ..errors import CompressDropError, InputError
from ..evaluation.metrics import Metrics, evaluate
from ..gating import attach, is_gated
from ..gating.record import gate_sites, sites_differ
from ..recipes import Recipe
from ..runtime import check_labels, run_on_examples
from .distributed import Dist
from .sparsifier import Sparsifier

if TYPE_CHECKING:
    from ..pruning import PruneReport

__all__ = ["STAGES", "Finetune", "Pretrain", "RunState", "Sparsify", "Stage"]


class RunState(Protocol):
    """What a stage reads and records of the run it belongs to (the runner's ``Run``)."""

    recipe: Recipe
    data: Any
    train: Any
    val: Any
    out: Path
    dist: Dist
    progress: Callable[[dict[str, Any]], None]
    dense_metrics: dict[str, Any] | None
    prune_info: dict[str, Any] | None
    sites: list[dict[str, Any]] | None  # the gates a resume file records (None: none recorded)
    ckpt: Path
    template: nn.Module | None  # the dense structure every stage starts from
    initial: nn.Module | None  # the user's model (not a recipe's factory's), until a stage takes it

    def example(self, batch: int = 2) -> torch.Tensor:
        """The first ``batch`` training inputs, on the run's device."""
        ...

    def copy_template(self) -> nn.Module:
        """A copy of the dense template (its initial weights)."""
        ...

    def fresh(self) -> nn.Module:
        """The user's trained weights the first time, else a copy of the template."""
        ...

    def dense_size(self) -> tuple[int, int]:
        """Parameters and FLOPs per example of the dense architecture."""
        ...

    def test(self, model: nn.Module) -> Metrics:
        """``model``'s metrics on the test split."""
        ...


class Stage:
    """One stage of a run. Subclasses override what differs; the training loop is the runner's."""

    name = ""

    def __init__(self, run: RunState) -> None:
        self.run = run

    def check(self) -> None:
        """Called for every stage a run will go through, before the first trains: refuse a
        recipe that would fail only once this stage is reached."""

    def enter(self, previous: nn.Module | None) -> nn.Module:
        """The model this stage trains, from the previous stage's (``None``: a fresh one)."""
        return previous if previous is not None else self.run.fresh()

    def rebuild(self) -> nn.Module:
        """An untrained model of the structure this stage's checkpoints hold."""
        return self.run.copy_template()

    def loss_term(self, model: nn.Module, t: float) -> torch.Tensor | None:
        """What this stage adds to the NLL at ``t`` fractional epochs into it (``None``: nothing)."""
        return None

    def epoch_record(self, model: nn.Module, steps: int) -> dict[str, Any]:
        """Fields of the history row (and progress event) of the epoch of ``steps`` steps that
        just ended, beyond loss and validation metrics."""
        return {}

    def leave(self, model: nn.Module) -> None:
        """Called once the stage's last epoch is done."""


class Pretrain(Stage):
    """Train the dense net; its test metrics are the reference the report compares against."""

    name = "pretrain"

    def check(self) -> None:
        """The dense net runs on two training examples and has an output for every label of the
        data (a factory of the user's need not fit them), before the first step: else an error
        naming the data, not the layer's or the loss's traceback."""
        run = self.run
        assert run.template is not None, "the run builds its template before the checks"
        where = f"data {run.data.name!r}"
        # the template itself, not a copy: a forward pass in eval mode leaves its weights as they are
        logits = run_on_examples(run.template, run.example(), where)
        for y in (run.data.y_train, run.data.y_test):
            check_labels(logits.shape[-1], y, where, setting="the recipe's model.kwargs.")
        outputs, classes = logits.shape[-1], run.data.num_classes
        if run.data.task == "classify" and outputs != classes and run.initial is not None:
            raise InputError(  # the user's model, not a recipe's factory: no setting changes it
                f"the model gives {outputs} outputs for {where} of {classes} classes (labels "
                f"0-{classes - 1}): a model brought to be pruned keeps its outputs (its weights'), "
                f"so give data with a class for each of them, or a model with {classes} outputs"
            )
        if run.data.task == "classify" and outputs != classes:  # (a factory ignored num_classes)
            raise InputError(
                f"the recipe's model gives {outputs} outputs for {where} of {classes} classes: its"
                " factory does not name num_classes (torchvision's take it through **kwargs); "
                f"set it in the recipe: model.kwargs.num_classes={classes}"
            )

    def leave(self, model: nn.Module) -> None:
        """Record the dense model's test metrics (once: a resumed run keeps the first)."""
        run = self.run
        if run.dense_metrics is None:
            m = run.test(model)
            run.dense_metrics = m.record("test_", run.data)


class Sparsify(Stage):
    """Train gates and weights on NLL + β(t)·KL/N, through the :class:`Sparsifier` users get."""

    name = "sparsify"

    def __init__(self, run: RunState) -> None:
        super().__init__(run)
        self.sparsifier: Sparsifier | None = None
        self.kl_total: torch.Tensor | float = 0.0  # summed on the device: no sync per step
        self.said: set[str] = set()  # the warnings check() gave

    def _gate(self, model: nn.Module, only_sites: list[str] | None = None) -> nn.Module:
        run = self.run
        # the NLL is a mean over labels (a label per token for a language model), so the KL is
        # divided by the number of labels: both terms are the ELBO per label
        sparsifier, failed, said = recorded(
            lambda: Sparsifier.from_recipe(
                model, run.recipe, run.train.y_train.numel(), run.example(), only_sites
            )
        )
        for w in said:  # the plan's warnings that check() did not say already
            if str(w.message) not in self.said:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if failed is not None:
            raise failed
        self.sparsifier = sparsifier
        return model

    def check(self) -> None:
        """Attach the recipe's gates to a copy of the dense template: a plan that gates nothing
        (an include pattern that matches no layer, a granularity the model lacks) fails here,
        before the pretrain stage, and leaves no checkpoint. The plan's warnings are said here,
        before any training, and not again when the gates are attached for good; the random
        state is left as it was."""
        run = self.run
        assert run.template is not None, "the run builds its template before the checks"
        model = sharing_weights(run.template)  # attach changes its modules, not its tensors
        if is_gated(model):
            return
        kwargs = run.recipe.gates.attach_kwargs()
        with _same_random_state(model):
            _, failed, said = recorded(
                lambda: attach(model, **kwargs, example_inputs=run.example())
            )
        for w in said:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.said = {str(w.message) for w in said}
        if isinstance(failed, CompressDropError):
            raise InputError(f"recipe {run.recipe.name!r}, gates: {failed}") from None
        if failed is not None:
            raise failed

    def enter(self, previous: nn.Module | None) -> nn.Module:
        """The previous stage's model (or a fresh one) with the recipe's gates attached."""
        return self._gate(super().enter(previous))

    def rebuild(self) -> nn.Module:
        """The dense template with the recipe's gates attached: those the resume file records, as
        a gated checkpoint's are put back (``compressdrop._reattach``), if it records them."""
        run = self.run
        where = f"{run.ckpt}: a run checkpoint"
        if run.sites is None:  # a file written before the sites were recorded: planned afresh
            return self._gate(run.copy_template())
        try:
            model = self._gate(run.copy_template(), recorded_layers(run.sites))
        except InputError as e:  # none of its layers can be gated now
            raise moved_gates(where, sites_differ(run.sites, []), [str(e)]) from None
        differ = sites_differ(run.sites, gate_sites(model))
        if differ:
            raise moved_gates(where, differ)
        return model

    def loss_term(self, model: nn.Module, t: float) -> torch.Tensor:
        """β(t)·KL/N, its KL/N summed for the epoch's record."""
        assert self.sparsifier is not None
        kl_n = self.sparsifier.kl_per_example()
        self.kl_total = self.kl_total + kl_n.detach().double()
        return self.sparsifier.penalty(t, kl_n)

    def epoch_record(self, model: nn.Module, steps: int) -> dict[str, Any]:
        """The epoch's mean KL/N and the units kept at the recipe's threshold."""
        assert self.sparsifier is not None
        kept, total = self.sparsifier.units()
        mean_kl, self.kl_total = float(self.kl_total) / steps, 0.0
        return {"kl": mean_kl, "units_kept": kept, "units_total": total}

    def leave(self, model: nn.Module) -> None:
        """Write ``gated.pt``: the trained gated model, with the dense reference ``sweep`` plots."""
        run = self.run
        if not run.dist.is_main:
            return
        meta: dict[str, Any] = {
            "val_accuracy": evaluate(model, run.val.x_test, run.val.y_test).accuracy
        }
        if run.dense_metrics is not None:
            params, flops = run.dense_size()
            meta["dense"] = {
                **run.dense_metrics,
                "params": params,
                "flops": flops,
                "dataset": run.data.name,
            }
        save_model(model, run.out / "gated.pt", recipe=run.recipe.to_dict(), meta=meta)


def sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that holds the same parameter and buffer tensors (no memory
    for weights): for a structure a run keeps or checks but never trains. A model's weights are
    its size again for each full copy (a 1B decoder: 4 GB), and a run held two beside the one it
    trains (the template of a model brought to be pruned, the gate plan's check)."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, shared)


def _same_random_state(model: nn.Module) -> contextlib.AbstractContextManager:
    """A context that restores the CPU's random state, and that of the model's GPU if it is on
    one (tracing may draw dropout masks there)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    index = torch.cuda.current_device() if device.index is None else device.index
    return torch.random.fork_rng(devices=[index])


class Finetune(Stage):
    """Prune the gated model at the recipe's threshold, then train the slim one."""

    name = "finetune"

    def enter(self, previous: nn.Module | None) -> nn.Module:
        """Prune the sparsified model; its pruning history goes into every later checkpoint."""
        from ..pruning import prune

        run = self.run
        assert previous is not None, "fine-tuning starts from the sparsified model"
        slim = prune(
            previous,
            run.recipe.prune.threshold,
            example_inputs=run.example(4),
            uniform=run.recipe.prune.uniform,
        )
        rep = cast("PruneReport", slim.prune_report)
        run.prune_info = {"history": rep.to_dict()["history"], "report": rep.to_dict()}
        m = evaluate(slim, run.val.x_test, run.val.y_test)
        run.progress(
            {"event": "pruned", "architecture": rep.architecture(), "val_accuracy": m.accuracy}
        )
        return slim

    def rebuild(self) -> nn.Module:
        """The template with the recorded pruning replayed on it: the slim structure."""
        from ..pruning import PruneReport, replay

        run = self.run
        assert run.prune_info is not None, "a fine-tuning checkpoint records its pruning"
        model = run.copy_template()
        replay(model, run.prune_info["history"], example_inputs=run.example())
        set_record(model, "prune_report", PruneReport.from_dict(run.prune_info["report"]))
        return model


STAGES: tuple[type[Stage], ...] = (Pretrain, Sparsify, Finetune)
