"""Accuracy and NLL of a classifier on a tensor data set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Metrics", "evaluate"]


@dataclass(frozen=True)
class Metrics:
    """Classification quality: accuracy in [0, 1] and mean negative log-likelihood (nats)."""

    accuracy: float
    nll: float
    n: int


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> Metrics:
    """Accuracy and NLL of ``model`` (put in eval mode, restored after) on ``(x, y)``.

    Inputs are moved to the model's device batch by batch.
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, nll = 0, 0.0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            logits = model(xb)
            correct += int((logits.argmax(1) == yb).sum())
            nll += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
    finally:
        model.train(was)
    n = len(x)
    return Metrics(correct / n, nll / n, n)
