"""Torch-Pruning baselines pruned to a FLOPs target, for the accuracy-against-size benchmarks.

A job name says the method, whether the pruning is global and the FLOPs target:
``l1-r10`` (L1 magnitude, each layer pruned at the same ratio, dense FLOPs / 10), ``taylor-r10``
(first-order Taylor importance, |w · ∂L/∂w|, the gradients of 8 training batches),
``groupnorm-r10`` (DepGraph's group-norm importance after sparse training: Torch-Pruning's
``GroupNormPruner`` regularizer, reg 1e-4, added to every step of the sparsify epochs),
``taylor-global-r10`` (one ranking over all layers instead of a ratio per layer). The pruning ratio
is found by binary search so that the pruned net's FLOPs are the closest under the target.

Epochs, against a Bayesian job's sparsify + fine-tune after the shared dense pretraining:
L1 and Taylor prune the dense net at once and fine-tune for sparsify + fine-tune epochs;
group-norm trains with its regularizer for the sparsify epochs, prunes, and fine-tunes for the
fine-tune epochs. The same total either way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compressdrop.evaluation.metrics import prediction_loss
from compressdrop.models import TinyViT
from compressdrop.pruning import PruneReport

METHODS = ("l1", "taylor", "groupnorm")
GROUPNORM_REG = 1e-4  # Torch-Pruning's default
MAX_RATIO = 0.95


def parse(name: str) -> tuple[str, bool, float]:
    """``(method, global pruning, FLOPs target ratio)`` of a job name like ``taylor-global-r10``."""
    head, ratio = name.rsplit("-r", 1)
    method, _, scope = head.partition("-")
    if method not in METHODS or scope not in ("", "global"):
        raise SystemExit(f"unknown Torch-Pruning job {name!r}: method-[global-]rRATIO, {METHODS}")
    return method, scope == "global", float(ratio)


def is_job(name: str) -> bool:
    return name.split("-", 1)[0] in METHODS


def _importance(method: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "groupnorm": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    }[method]()


def _pruner(model, example, method: str, ratio: float, global_: bool, extra: dict | None = None):
    import torch_pruning as tp

    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    kwargs: dict = {"ignored_layers": [last]}
    cls = tp.pruner.MetaPruner
    if method == "groupnorm":
        cls, kwargs = tp.pruner.GroupNormPruner, {"reg": GROUPNORM_REG}
    if isinstance(model, TinyViT):  # the class token and positions are tensors of the stream
        attns = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
        kwargs |= {
            "unwrapped_parameters": [(model.cls, 2), (model.pos, 2)],
            "num_heads": {a: a.num_heads for a in attns},
        }
    return cls(
        model,
        example,
        importance=_importance(method),
        pruning_ratio=ratio,
        global_pruning=global_,
        max_pruning_ratio=MAX_RATIO,  # a global ranking must not empty a layer
        **kwargs | (extra or {}),
    )


def _gradients_(model, train, batches: int = 8, batch: int = 128, seed: int = 0) -> None:
    """Accumulate the loss gradients of ``batches`` training batches (Taylor importance)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train.x_train), generator=gen)[: batches * batch]
    model.zero_grad()
    model.train()
    for i in range(0, len(idx), batch):
        j = idx[i : i + batch]
        prediction_loss(model(train.x_train[j]), train.y_train[j]).backward()
    model.eval()


def sparse_train_(model, train, example, epochs: int, lr: float, seed: int, global_: bool):
    """Train with the group-norm regularizer (DepGraph's sparse training), in place."""
    pruner = _pruner(model, example, "groupnorm", 0.5, global_)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y, n = train.x_train, train.y_train, len(train.x_train)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            pruner.regularize(model)
            opt.step()
    return model.eval()


def prune_to_flops(
    dense,
    train,
    example,
    name: str,
    count_flops: Callable,
    seed: int = 0,
    *,
    configure: Callable | None = None,
    grad_batch: int = 128,
    hi: float = MAX_RATIO,
    steps: int = 14,
):
    """``(pruned copy of dense, pruning ratio)``: the largest pruning whose FLOPs are at most the
    target's, by ``steps`` bisections of [0, ``hi``]; the copy carries a ``prune_report`` whose
    history rebuilds its structure. ``configure(copy)`` gives more ``MetaPruner`` arguments for a
    copy (which layers to leave, how to read its output). Taylor importance uses the gradients of
    8 training batches of ``grad_batch``, computed once."""
    method, global_, target_ratio = parse(name)
    target = count_flops(dense, example) / target_ratio
    grads = None
    if method == "taylor":
        base = copy.deepcopy(dense)
        _gradients_(base, train, batch=grad_batch, seed=seed)
        grads = [p.grad for p in base.parameters()]

    def pruned(ratio: float):
        m = copy.deepcopy(dense)  # deepcopy leaves .grad behind: the gradients are set here
        for p, g in zip(m.parameters(), grads or []):
            p.grad = None if g is None else g.clone()
        pruner = _pruner(m, example, method, ratio, global_, configure(m) if configure else None)
        pruner.step()
        m.zero_grad(set_to_none=True)
        m.prune_report = PruneReport(name, None, [], pruner.DG.pruning_history(), 0.0)
        return m

    lo = 0.0  # MAX_RATIO: above it Torch-Pruning prunes nothing at all
    for _ in range(steps):
        mid = (lo + hi) / 2
        if count_flops(pruned(mid), example) > target:
            lo = mid
        else:
            hi = mid
    return pruned(hi), hi
