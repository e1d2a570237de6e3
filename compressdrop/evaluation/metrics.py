"""Accuracy and NLL of a classifier, or of a next-token model, on a tensor data set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..runtime import check_labels, correct, logits_of

__all__ = ["Metrics", "bits_per_byte", "evaluate", "logits_of", "prediction_loss"]


@dataclass(frozen=True)
class Metrics:
    """Prediction quality: accuracy in [0, 1] and mean negative log-likelihood (nats).

    For a classifier ``n`` counts examples; for a next-token model (labels ``(N, T)``) it counts
    the predicted tokens, and accuracy and NLL are per token.
    """

    accuracy: float
    nll: float
    n: int

    @property
    def bits(self) -> float:
        """NLL in bits (per token: bits per byte for byte-level text)."""
        return self.nll / math.log(2)

    def record(self, prefix: str = "", data: Any = None) -> dict[str, float]:
        """``{prefix}accuracy`` and ``{prefix}nll``, and ``{prefix}bits_per_byte`` when ``data``
        is text (a data set whose ``task`` is ``"lm"``), scored on its test split."""
        out = {f"{prefix}accuracy": self.accuracy, f"{prefix}nll": self.nll}
        if getattr(data, "task", "classify") == "lm":
            out[f"{prefix}bits_per_byte"] = bits_per_byte(self.nll, data)
        return out


def bits_per_byte(nll: float, data: Any) -> float:
    """Bits per byte of text ``data``'s test split from its NLL per token in nats: bits per
    token over the split's bytes per token (1 where a token is a byte)."""
    return nll / math.log(2) / getattr(data, "bytes_per_token", 1.0)


def prediction_loss(out: Any, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the output's logits against ``y``, in float32.

    Labels ``(N,)`` against logits ``(N, C)``: classification; labels ``(N, T)`` against logits
    ``(N, T, V)``: next-token prediction, averaged (or summed) over every token.
    """
    logits = logits_of(out).float()
    if y.dim() > 1:
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return F.cross_entropy(logits, y, reduction=reduction)


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> Metrics:
    """Accuracy and NLL of ``model`` (put in eval mode, restored after) on ``(x, y)``.

    Inputs are moved to the model's device batch by batch. Labels ``(N, T)`` (next-token
    targets) are scored per token.

    Raises:
        InputError: ``x`` and ``y`` hold different numbers of examples.
    """
    if len(x) != len(y):
        raise InputError(f"{len(x)} inputs but {len(y)} labels: x and y must be the same length")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    right, nll = 0, 0.0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            logits = logits_of(model(xb))
            if i == 0:
                check_labels(logits.shape[-1], y)
            right += correct(logits, yb)
            nll += float(prediction_loss(logits, yb, reduction="sum"))
    finally:
        model.train(was)
    n = y.numel()
    return Metrics(right / n, nll / n, n)
