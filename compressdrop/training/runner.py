"""Run a recipe end to end: pretrain → sparsify → prune → finetune → export, with checkpoints.

Every epoch ends with an atomic checkpoint (``checkpoint.pt`` in the output folder); ``resume=True``
continues from it and gives the same result as an uninterrupted run with the same seed (on the same
device and library versions). A NaN or infinite loss stops the run with :class:`TrainingDiverged`,
leaving the last good checkpoint in place. What each stage does is in :mod:`.stages`; how the
slim model is written, in :mod:`.finish`.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._attrs import set_record
from .._io import atomic_write, remove_stale_temps
from ..arch import Factory, build_arch
from ..checkpoint import RUN_FORMAT, CheckpointError, load_run_state
from ..data import check_trainable
from ..errors import CompressDropError, InputError
from ..evaluation.metrics import Metrics, evaluate, prediction_loss
from ..gating import gate_sites
from ..recipes import Recipe, StageConfig
from ..runtime import resolve_device
from .distributed import Dist
from .finish import drop_stale, prune_summary, resume_error, say_replaced_checkpoint, write_slim
from .sparsifier import make_optimizer, schedule_lr
from .stages import STAGES, Stage, sharing_weights

__all__ = ["RunResult", "TrainingDiverged", "run_recipe", "seed_everything"]

OUTPUTS = ("gated.pt", "slim.pt", "slim.onnx", "slim.pt2", "report.json")


class TrainingDiverged(CompressDropError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """Where a run left its files, and what it measured (also written to ``report.json``)."""

    out_dir: Path
    gated_path: Path | None
    slim_path: Path | None
    onnx_path: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Run:
    """The state one run shares between its stages: data splits, the dense template, history."""

    def __init__(
        self,
        recipe: Recipe,
        dataset: Any,
        out_dir: Path,
        device: torch.device,
        progress: Callable | None,
        dist: Dist | None = None,
    ):
        self.recipe, self.data, self.out, self.device = recipe, dataset, out_dir, device
        # the dense structure every stage starts from (built once, with the user's consent)
        self.template: nn.Module | None = None
        self.initial: nn.Module | None = None  # the user's trained weights, used once
        self.dist = dist or Dist()
        self.progress = (progress if self.dist.is_main else None) or (lambda event: None)
        self.train, self.val = (
            dataset.split_validation(recipe.data.val_fraction, seed=recipe.seed)
            if recipe.data.val_fraction > 0
            else (dataset, dataset)
        )
        self.history: list[dict[str, Any]] = []
        self.dense_metrics: dict[str, Any] | None = None
        self.prune_info: dict[str, Any] | None = None
        self.sites: list[dict[str, Any]] | None = None  # the gates a resume file records
        self.ckpt = out_dir / "checkpoint.pt"

    # -- model structure ----------------------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        m = self.recipe.model
        record: dict[str, Any] = {
            "input_shape": list(self.data.input_shape),
            "num_classes": self.data.num_classes,
            "kwargs": dict(m.kwargs),
        }
        record["factory" if ":" in m.arch else "name"] = m.arch
        return record

    def example(self, batch: int = 2) -> torch.Tensor:
        return self.train.x_train[:batch].to(self.device)

    def build_template(self, factory: Factory | str | None, trust_code: bool) -> nn.Module:
        """The recipe's dense net, freshly initialised; later stages copy its structure."""
        where = f"recipe {self.recipe.name!r}"
        model = build_arch(self.arch(), factory=factory, trust_code=trust_code, where=where)
        self.template = model.to(self.device)
        return self.template

    def copy_template(self) -> nn.Module:
        assert self.template is not None
        return copy.deepcopy(self.template)

    def fresh(self) -> nn.Module:
        """The model a first stage starts from: the user's weights once, else the template's."""
        model, self.initial = self.initial, None
        return model if model is not None else self.copy_template()

    def dense_size(self) -> tuple[int, int]:
        """Parameters and FLOPs per example of the recipe's dense architecture."""
        from ..evaluation.model_size import count_flops, count_params

        assert self.template is not None
        return count_params(self.template), count_flops(self.template, self.example(1))

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, stage: str, epoch: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        if not self.dist.is_main:
            return
        payload = {
            "format": RUN_FORMAT,
            "stage": stage,
            "epoch": epoch,
            "recipe": self.recipe.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),
            "history": self.history,
            "dense_metrics": self.dense_metrics,
            "prune_info": self.prune_info,
            "sites": gate_sites(model) or None,  # the gates, put back as they are on resume
        }
        with atomic_write(self.ckpt) as tmp:
            torch.save(payload, tmp)

    def load(self) -> dict[str, Any]:
        payload = load_run_state(self.ckpt)
        if payload.get("recipe") != self.recipe.to_dict():
            raise CheckpointError(
                f"{self.ckpt}: was written by a different recipe; resume with the same one"
            )
        self.history, self.dense_metrics = payload["history"], payload["dense_metrics"]
        self.prune_info, self.sites = payload["prune_info"], payload.get("sites")
        return payload

    # -- training -----------------------------------------------------------------------------------
    def fit(
        self, stage: Stage, model: nn.Module, opt: torch.optim.Optimizer, start_epoch: int
    ) -> None:
        cfg: StageConfig = getattr(self.recipe.stages, stage.name)
        x, y = self.train.x_train.to(self.device), self.train.y_train.to(self.device)
        n, bs = len(x), self.recipe.data.batch_size
        dist = self.dist
        if dist.active and bs < 2 * dist.world:
            raise InputError(
                f"batch_size {bs} gives fewer than 2 examples to each of the {dist.world} processes"
            )
        starts = list(range(0, n, bs))
        if len(starts) > 1 and n - starts[-1] < 2 * dist.world:
            # a tail too small to give every rank (or the one process) 2 examples joins the batch
            # before it: BatchNorm needs 2 (a 1×1 feature map of one example failed in training)
            starts.pop()
        steps = len(starts)
        bounds = [*starts[1:], n]
        net: Callable[..., torch.Tensor] = dist.wrap(model)
        if self.recipe.compile is not None:
            net = torch.compile(net, backend=self.recipe.compile)
        autocast = torch.autocast(
            torch.device(self.device).type,
            dtype=torch.bfloat16,
            enabled=self.recipe.precision == "bf16",
        )
        stage_index = [cls.name for cls in STAGES].index(stage.name)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            # the order depends only on (seed, stage, epoch): resuming reproduces it
            gen = torch.Generator().manual_seed(
                self.recipe.seed * 1_000_003 + stage_index * 10_007 + epoch
            )
            perm = torch.randperm(n, generator=gen).to(self.device)
            tot_loss = 0.0
            for i, (lo, hi) in enumerate(zip(starts, bounds)):
                batch = perm[lo:hi]
                idx = dist.shard(batch)
                with dist.noise(len(batch)), autocast:
                    out = net(x[idx])
                # the loss in float32 under bf16 autocast; per token for next-token labels
                if dist.active:  # DDP averages gradients over ranks: W/B · Σ_rank = global mean
                    scale = dist.world / (len(batch) * y[0].numel())
                    nll = prediction_loss(out, y[idx], reduction="sum") * scale
                else:
                    nll = prediction_loss(out, y[idx])
                term = stage.loss_term(model, epoch + i / steps)
                loss = nll if term is None else nll + term
                self._check_finite(loss, stage.name, epoch, i)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                schedule_lr(opt, cfg, (epoch + i / steps) / cfg.epochs)
                opt.step()
                tot_loss += float(loss.detach())
            val = evaluate(model, self.val.x_test, self.val.y_test)
            row = {
                "stage": stage.name,
                "epoch": epoch + 1,
                "epochs": cfg.epochs,
                "loss": dist.mean(tot_loss / steps),
                "kl": 0.0,
                "val_accuracy": val.accuracy,
                "val_nll": val.nll,
                "lr": opt.param_groups[0]["lr"],  # of the epoch's last step
                "seconds": time.perf_counter() - t0,
                **stage.epoch_record(model, steps),
            }
            self.history.append(row)
            self.save(stage.name, epoch + 1, model, opt)
            self.progress({"event": "epoch", **row})

    def _check_finite(self, loss: torch.Tensor, stage: str, epoch: int, step: int) -> None:
        """Every rank must agree, or the healthy ranks would wait in DDP's all-reduce."""
        finite = bool(torch.isfinite(loss))
        if self.dist.all_true(finite):
            return
        what = (
            f"loss is {float(loss.detach())}" if not finite else "another rank's loss is not finite"
        )
        kept = f"the last good checkpoint is {self.ckpt}" if self.ckpt.exists() else "no checkpoint"
        rank = f" (rank {self.dist.rank})" if self.dist.active else ""
        raise TrainingDiverged(
            f"{what} at stage {stage}, epoch {epoch + 1}, step {step + 1}{rank}; {kept} (lower "
            "the learning rate?)"
        )

    def test(self, model: nn.Module) -> Metrics:
        return evaluate(model, self.data.x_test, self.data.y_test)


def run_recipe(
    recipe: Recipe,
    dataset,
    out_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    model: nn.Module | None = None,
    dist: Dist | None = None,
    factory: Factory | str | None = None,
    trust_code: bool = False,
) -> RunResult:
    """Run ``recipe`` on ``dataset`` and leave in ``out_dir``: ``gated.pt`` (the trained gated
    model), ``slim.pt`` (pruned and fine-tuned), ``slim.onnx`` and ``report.json``.

    The test split is used once, at the end; epochs and thresholds come from the recipe and the
    validation split carved from the training set.

    ``model``: start from these (trained, dense) weights instead of the recipe's architecture; the
    pretrain stage is skipped. Its ``arch`` record, if it has one, replaces the recipe's model.

    ``factory`` / ``trust_code``: consent to the factory that the recipe's ``model.arch`` names
    (reference nets need none): the user's own factory to call instead, or trust in the recipe
    (see :mod:`compressdrop.arch`).

    ``dist``: this process's rank in a torch.distributed run (see
    :mod:`compressdrop.training.distributed`; the CLI sets it up under ``torchrun``). Every rank
    trains; only rank 0 writes files, and every rank returns the same result.
    """
    dist = dist or Dist()
    out = Path(out_dir)
    dev = resolve_device(device)
    if model is not None:
        arch = getattr(model, "arch", None)
        if isinstance(arch, dict):
            name = arch.get("factory") or arch.get("name") or "program"
            recipe = recipe.override(
                {"model.arch": name, "model.kwargs": dict(arch.get("kwargs") or {})}
            )
        recipe = recipe.override({"stages.pretrain.epochs": 0})
    recipe_bytes = json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode()
    dist.check_same("recipe", recipe_bytes)  # every rank runs the same steps and collectives
    check_trainable(dataset)  # labels a model can train on (an npz may hold a subset)
    run = Run(recipe, dataset, out, dev, progress, dist)
    t_start = time.perf_counter()
    if model is not None:
        run.initial = model.to(dev)
        run.template = sharing_weights(run.initial)  # its weights: the first stage trains them

    state = None
    if resume:
        if not run.ckpt.exists():
            raise resume_error(run.ckpt)  # a completed run's folder: nothing to resume
        state = run.load()
    else:
        seed_everything(recipe.seed)
    if run.template is None:  # after seeding: the first stage copies these initial weights
        run.build_template(factory, trust_code)
    for m in (run.initial, run.template):  # an image folder's class names go into every file
        if m is not None and dataset.classes:
            set_record(m, "class_names", tuple(dataset.classes))
    stages = [cls(run) for cls in STAGES]
    names = [st.name for st in stages]
    start = names.index(state["stage"]) if state else 0
    for stage in stages[start:]:  # before any training: a recipe that gates nothing fails here
        stage.check()
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out, [*OUTPUTS, "checkpoint.pt"])  # a run killed mid-write's
        say_replaced_checkpoint(out, resume, run.progress)

    current: nn.Module | None = None
    for stage in stages[start:]:
        cfg: StageConfig = getattr(recipe.stages, stage.name)
        if state is not None:  # resuming inside this stage
            current = stage.rebuild()
            current.load_state_dict(state["model"])
            opt = make_optimizer(current, cfg)
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start_epoch, state = state["epoch"], None
        else:
            current = stage.enter(current)
            opt, start_epoch = make_optimizer(current, cfg), 0
        run.progress({"event": "stage", "stage": stage.name, "epochs": cfg.epochs})
        run.fit(stage, current, opt, start_epoch)
        stage.leave(current)
    assert current is not None
    slim = current.eval()
    report = _report(run, slim, time.perf_counter() - t_start)
    gated = out / "gated.pt"
    gated_path = gated if gated.exists() or "sparsify" in names[start:] else None
    if not dist.is_main:
        dist.barrier()  # rank 0 writes the outputs
        return RunResult(out, gated_path, out / "slim.pt", None, report)
    formats = (".pt", ".onnx", ".pt2") if recipe.export.onnx else (".pt",)
    files = write_slim(
        slim,
        out / "slim.pt",
        run.example(4).cpu(),
        formats=formats,
        recipe=recipe.to_dict(),
        metadata={"recipe": recipe.name},
        opset=recipe.export.opset,
    )
    report.update({f"{kind}_bytes": n for kind, n in files.bytes.items() if kind != "checkpoint"})
    with atomic_write(out / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    run.ckpt.unlink(missing_ok=True)  # the run is complete: its resume point is no longer needed
    drop_stale(out, OUTPUTS, [*files.paths.values(), gated_path, "report.json"], run.progress)
    dist.barrier()
    return RunResult(out, gated_path, files.paths["checkpoint"], files.paths.get("onnx"), report)


def _report(run: Run, slim: nn.Module, seconds: float) -> dict[str, Any]:
    from ..evaluation.model_size import count_flops, count_params

    test = run.test(slim)
    d_params, d_flops = run.dense_size()
    s_params, s_flops = count_params(slim), count_flops(slim, run.example(1))
    pruned = prune_summary(slim) if hasattr(slim, "prune_report") else None
    return {
        "recipe": run.recipe.name,
        "dataset": run.data.name,
        "device": str(run.device),
        "world_size": run.dist.world,
        "seed": run.recipe.seed,
        "epochs": {cls.name: getattr(run.recipe.stages, cls.name).epochs for cls in STAGES},
        "threshold": run.recipe.prune.threshold
        if pruned is None or pruned["threshold"] is None
        else pruned["threshold"],
        "family": run.recipe.gates.family,
        "dense": {**(run.dense_metrics or {}), "params": d_params, "flops": d_flops},
        "slim": {**test.record("test_", run.data), "params": s_params, "flops": s_flops},
        "params_reduction": d_params / max(s_params, 1),
        "flops_reduction": d_flops / max(s_flops, 1),
        "architecture_before": pruned["architecture_before"] if pruned else "",
        "architecture_after": pruned["architecture_after"] if pruned else "",
        "layers": pruned["layers"] if pruned else [],
        "history": run.history,
        "wall_seconds": seconds,
    }
