"""Run a recipe end to end: pretrain → sparsify → prune → finetune → export, with checkpoints.

Every epoch ends with an atomic checkpoint (``checkpoint.pt`` in the output folder); ``resume=True``
continues from it and gives the same result as an uninterrupted run with the same seed (on the same
device and library versions). A NaN or infinite loss stops the run with :class:`TrainingDiverged`,
leaving the last good checkpoint in place.
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
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write, remove_stale_temps
from ..arch import Factory, build_arch
from ..checkpoint import RUN_FORMAT, CheckpointError, load_run_state, save_model
from ..errors import CompressDropError, InputError
from ..evaluation.metrics import Metrics, evaluate
from ..gating import attach, kl, named_gates
from ..recipes import Recipe, StageConfig
from ..runtime import resolve_device
from .distributed import Dist
from .sparsifier import param_groups

__all__ = ["RunResult", "TrainingDiverged", "run_recipe", "seed_everything"]

STAGES = ("pretrain", "sparsify", "finetune")
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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model: nn.Module, cfg: StageConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.lr, cfg.gate_lr, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.Adam(groups)


def _units(model: nn.Module, threshold: float | None) -> tuple[int, int]:
    kept = total = 0
    for _, g in named_gates(model):
        kept += int(g.mask(threshold).sum())
        total += g.num_units
    return kept, total


class _Run:
    """State of one run; one method per lifecycle step."""

    def __init__(
        self,
        recipe: Recipe,
        dataset,
        out_dir: Path,
        device: torch.device,
        progress: Callable | None,
        dist: Dist | None = None,
    ):
        self.recipe, self.data, self.out, self.device = recipe, dataset, out_dir, device
        # the dense structure every stage starts from (built once, with the user's consent)
        self.template: nn.Module | None = None
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
        self.ckpt = out_dir / "checkpoint.pt"

    # -- model structure per stage ------------------------------------------------------------------
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

    def attach(self, model: nn.Module) -> nn.Module:
        g = self.recipe.gates
        return attach(
            model,
            g.family,
            g.granularity,
            list(g.include) or None,
            list(g.exclude) or None,
            example_inputs=self.example(),
            gate_kwargs=g.kwargs,
            kl_cost=g.kl_cost,
        )

    def build_template(self, factory: Factory | str | None, trust_code: bool) -> nn.Module:
        """The recipe's dense net, freshly initialised; later stages copy its structure."""
        self.template = build_arch(
            self.arch(), factory=factory, trust_code=trust_code, where=self.recipe.name
        ).to(self.device)
        return self.template

    def model_for(self, stage: str, prune_history: list | None = None) -> nn.Module:
        assert self.template is not None
        model = copy.deepcopy(self.template)
        if stage == "sparsify":
            self.attach(model)
        elif stage == "finetune":
            from ..pruning import PruneReport, replay

            replay(model, prune_history, example_inputs=self.example())
            if self.prune_info is not None:  # a slim model, also when resumed in fine-tuning
                model.prune_report = PruneReport.from_dict(self.prune_info["report"])
        return model

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
        }
        with atomic_write(self.ckpt) as tmp:
            torch.save(payload, tmp)

    def load(self) -> dict[str, Any]:
        payload = load_run_state(self.ckpt)
        if payload.get("recipe") != self.recipe.to_dict():
            raise CheckpointError(
                f"{self.ckpt}: was written by a different recipe; resume with the same one"
            )
        return payload

    # -- training -----------------------------------------------------------------------------------
    def fit(
        self, stage: str, model: nn.Module, opt: torch.optim.Optimizer, start_epoch: int
    ) -> None:
        cfg: StageConfig = getattr(self.recipe.stages, stage)
        x, y = self.train.x_train.to(self.device), self.train.y_train.to(self.device)
        n, bs = len(x), self.recipe.data.batch_size
        dist = self.dist
        if dist.active and bs < 2 * dist.world:
            raise InputError(
                f"batch_size {bs} gives fewer than 2 examples to each of the {dist.world} processes"
            )
        starts = list(range(0, n, bs))
        if dist.active and len(starts) > 1 and n - starts[-1] < 2 * dist.world:
            # a tail too small to give every rank 2 examples (BatchNorm needs 2) joins the batch
            # before it; a single process never merges, so parity with it holds unless this happens
            starts.pop()
        steps = len(starts)
        bounds = [*starts[1:], n]
        net = dist.wrap(model)
        autocast = torch.autocast(
            torch.device(self.device).type,
            dtype=torch.bfloat16,
            enabled=self.recipe.precision == "bf16",
        )
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            # the order depends only on (seed, stage, epoch): resuming reproduces it
            gen = torch.Generator().manual_seed(
                self.recipe.seed * 1_000_003 + STAGES.index(stage) * 10_007 + epoch
            )
            perm = torch.randperm(n, generator=gen).to(self.device)
            tot_loss = tot_kl = 0.0
            for i, (lo, hi) in enumerate(zip(starts, bounds)):
                batch = perm[lo:hi]
                idx = dist.shard(batch)
                with dist.noise(len(batch)), autocast:
                    out = net(x[idx])
                out = out.float()  # the loss in float32 under bf16 autocast
                if dist.active:  # DDP averages gradients over ranks: W/B · Σ_rank = global mean
                    nll = F.cross_entropy(out, y[idx], reduction="sum") * (dist.world / len(batch))
                else:
                    nll = F.cross_entropy(out, y[idx])
                loss = nll
                if stage == "sparsify":
                    kl_term = kl(model) / n  # float32: the gates' closed forms run in float64
                    loss = nll + self.recipe.kl(epoch + i / steps) * kl_term
                    tot_kl += float(kl_term.detach())
                # every rank must agree, or the healthy ranks would wait in DDP's all-reduce
                finite = bool(torch.isfinite(loss))
                if not dist.all_true(finite):
                    what = (
                        f"loss is {float(loss.detach())}"
                        if not finite
                        else "another rank's loss is not finite"
                    )
                    raise TrainingDiverged(
                        f"{what} at stage {stage}, epoch {epoch + 1}, step {i + 1}"
                        f"{f' (rank {dist.rank})' if dist.active else ''}; the last good "
                        f"checkpoint is {self.ckpt} (lower the learning rate?)"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot_loss += float(loss.detach())
            val = evaluate(model, self.val.x_test, self.val.y_test)
            row = {
                "stage": stage,
                "epoch": epoch + 1,
                "epochs": cfg.epochs,
                "loss": dist.mean(tot_loss / steps),
                "kl": tot_kl / steps,
                "val_accuracy": val.accuracy,
                "val_nll": val.nll,
                "seconds": time.perf_counter() - t0,
            }
            if stage == "sparsify":
                row["units_kept"], row["units_total"] = _units(model, self.recipe.prune.threshold)
            self.history.append(row)
            self.save(stage, epoch + 1, model, opt)
            self.progress({"event": "epoch", **row})

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
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # a run killed mid-write leaves its temporary file beside the last good one
        remove_stale_temps(out, [*OUTPUTS, "checkpoint.pt"])
    dev = resolve_device(device)
    if model is not None:
        arch = getattr(model, "arch", None)
        if isinstance(arch, dict):
            name = arch.get("factory") or arch.get("name") or "program"
            recipe = recipe.override(
                {"model.arch": name, "model.kwargs": dict(arch.get("kwargs") or {})}
            )
        recipe = recipe.override({"stages.pretrain.epochs": 0})
    # every rank must run the same recipe (steps, epochs and stages decide the collectives)
    dist.check_same("recipe", json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode())
    run = _Run(recipe, dataset, out, dev, progress, dist)
    t_start = time.perf_counter()
    initial = model.to(dev) if model is not None else None
    model = None
    if initial is not None:
        run.template = copy.deepcopy(initial)

    state = None
    if resume:
        if not run.ckpt.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {run.ckpt}")
        state = run.load()
        run.history, run.dense_metrics, run.prune_info = (
            state["history"],
            state["dense_metrics"],
            state["prune_info"],
        )
    else:
        seed_everything(recipe.seed)
    if run.template is None:  # after seeding: the first stage copies these initial weights
        run.build_template(factory, trust_code)
    start_stage = STAGES.index(state["stage"]) if state else 0

    model: nn.Module | None = None
    gated_path = slim_path = onnx_path = None
    for s_idx in range(start_stage, len(STAGES)):
        stage = STAGES[s_idx]
        cfg: StageConfig = getattr(recipe.stages, stage)
        history = run.prune_info["history"] if (stage == "finetune" and run.prune_info) else None
        if state is not None and state["stage"] == stage:
            model = run.model_for(stage, history)
            model.load_state_dict(state["model"])
            opt = _optimizer(model, cfg)
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start_epoch = state["epoch"]
            state = None
        else:
            if stage == "sparsify" and model is not None:
                run.attach(model)  # gates on the pretrained weights
            elif stage == "finetune":
                model = _prune_stage(run, model)
            elif model is None and initial is not None:
                model = run.attach(initial) if stage == "sparsify" else initial
            elif model is None:
                model = run.model_for(stage)
            opt = _optimizer(model, cfg)
            start_epoch = 0
        run.progress({"event": "stage", "stage": stage, "epochs": cfg.epochs})
        run.fit(stage, model, opt, start_epoch)
        if stage == "pretrain" and run.dense_metrics is None:
            m = run.test(model)
            run.dense_metrics = {"test_accuracy": m.accuracy, "test_nll": m.nll}
        if stage == "sparsify":
            gated_path = out / "gated.pt"
            if dist.is_main:
                meta: dict[str, Any] = {
                    "val_accuracy": evaluate(model, run.val.x_test, run.val.y_test).accuracy
                }
                if run.dense_metrics is not None:  # the reference `compressdrop sweep` plots
                    d_params, d_flops = _dense_size(run)
                    meta["dense"] = {
                        **run.dense_metrics,
                        "params": d_params,
                        "flops": d_flops,
                        "dataset": run.data.name,
                    }
                save_model(model, gated_path, recipe=recipe.to_dict(), meta=meta)
    assert model is not None
    model.eval()
    slim_path = out / "slim.pt"
    report = _report(run, model, time.perf_counter() - t_start)
    if not dist.is_main:
        dist.barrier()  # rank 0 writes the outputs
        return RunResult(out, gated_path, slim_path, None, report)
    save_model(model, slim_path, recipe=recipe.to_dict())
    if recipe.export.onnx:
        from ..export import export_onnx

        onnx_path = out / "slim.onnx"
        meta = {
            "threshold": str(report["threshold"]),
            "units_kept": report["architecture_after"],
            "recipe": recipe.name,
        }
        exp = export_onnx(
            model.cpu(), run.example(4).cpu(), onnx_path, metadata=meta, opset=recipe.export.opset
        )
        report["onnx_bytes"] = exp.bytes
        # the same slim model as a torch.export program: loads with torch.export.load alone
        from ..export.program import export_program

        report["pt2_bytes"] = export_program(model, run.example(4).cpu(), out / "slim.pt2").bytes
    with atomic_write(out / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    run.ckpt.unlink(missing_ok=True)  # the run is complete: its resume point is no longer needed
    gated_path = gated_path or (out / "gated.pt" if (out / "gated.pt").exists() else None)
    dist.barrier()
    return RunResult(out, gated_path, slim_path, onnx_path, report)


def _prune_stage(run: _Run, model: nn.Module) -> nn.Module:
    from ..pruning import prune

    slim = prune(model, run.recipe.prune.threshold, example_inputs=run.example(4))
    rep = slim.prune_report
    run.prune_info = {"history": rep.to_dict()["history"], "report": rep.to_dict()}
    m = evaluate(slim, run.val.x_test, run.val.y_test)
    run.progress(
        {"event": "pruned", "architecture": rep.architecture(), "val_accuracy": m.accuracy}
    )
    return slim


def _dense_size(run: _Run) -> tuple[int, int]:
    """Parameters and FLOPs per example of the recipe's dense architecture."""
    from ..evaluation.model_size import count_flops, count_params

    assert run.template is not None
    return count_params(run.template), count_flops(run.template, run.example(1))


def _report(run: _Run, slim: nn.Module, seconds: float) -> dict[str, Any]:
    from ..evaluation.model_size import count_flops, count_params
    from ..pruning import PruneReport

    rep: PruneReport | Any = getattr(slim, "prune_report", None)
    test = run.test(slim)
    d_params, d_flops = _dense_size(run)
    s_params, s_flops = count_params(slim), count_flops(slim, run.example(1))
    layers = run.prune_info["report"]["layers"] if run.prune_info else []
    return {
        "recipe": run.recipe.name,
        "dataset": run.data.name,
        "device": str(run.device),
        "world_size": run.dist.world,
        "seed": run.recipe.seed,
        "epochs": {s: getattr(run.recipe.stages, s).epochs for s in STAGES},
        "threshold": run.recipe.prune.threshold
        if rep is None or rep.threshold is None
        else rep.threshold,
        "family": run.recipe.gates.family,
        "dense": {**(run.dense_metrics or {}), "params": d_params, "flops": d_flops},
        "slim": {
            "test_accuracy": test.accuracy,
            "test_nll": test.nll,
            "params": s_params,
            "flops": s_flops,
        },
        "params_reduction": d_params / max(s_params, 1),
        "flops_reduction": d_flops / max(s_flops, 1),
        "architecture_before": "-".join(str(layer["before"]) for layer in layers),
        "architecture_after": "-".join(str(layer["after"]) for layer in layers),
        "layers": layers,
        "history": run.history,
        "wall_seconds": seconds,
    }
