"""Monte-Carlo dropout uncertainty and the metrics that judge it.

``mc_predict`` keeps every source of noise on (dropout layers, compressdrop's gates and dropout
family) while BatchNorm stays in eval mode, averages ``samples`` stochastic forward passes and
returns the predictive mean, its variance, the predictive entropy and the mutual information
(entropy minus expected entropy: the model's own, epistemic, uncertainty).

Reference: Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in
Deep Learning", ICML 2016.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .dropout.layers import _Stochastic
from .gates import Gate

__all__ = ["MCPrediction", "auroc", "expected_calibration_error", "mc_mode", "mc_predict", "nll"]

_EPS = 1e-12


@dataclass(frozen=True)
class MCPrediction:
    """Predictive mean (N, C), its variance over samples (N, C), predictive entropy (N,) and
    mutual information (N,), all in nats."""

    mean: torch.Tensor
    variance: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor


@contextlib.contextmanager
def mc_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with every noise source sampling: nn.Dropout*, compressdrop dropout layers and
    gates. BatchNorm (and everything else) stays in eval; all flags are restored on exit."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    flagged = []
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, Gate)):
            m.train()
        elif isinstance(m, _Stochastic):
            m.mc = True
            flagged.append(m)
    try:
        yield model
    finally:
        for m in flagged:
            m.mc = False
        for m, was in saved:
            m.training = was


@torch.no_grad()
def mc_predict(
    model: nn.Module, x: torch.Tensor, samples: int = 30, batch_size: int = 512
) -> MCPrediction:
    """Average ``samples`` stochastic forward passes of a classifier (logits out) on ``x``."""
    if samples < 2:
        raise ValueError(f"samples must be ≥ 2, got {samples}")
    device = next(model.parameters()).device
    means, variances, entropies, mis = [], [], [], []
    with mc_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            probs = torch.stack(
                [torch.softmax(model(xb).float(), -1) for _ in range(samples)]
            )  # (S, B, C)
            mean = probs.mean(0)
            entropy = -(mean * (mean + _EPS).log()).sum(-1)
            expected = -(probs * (probs + _EPS).log()).sum(-1).mean(0)
            means.append(mean)
            variances.append(probs.var(0))
            entropies.append(entropy)
            mis.append((entropy - expected).clamp(min=0))
    return MCPrediction(*(torch.cat(t).cpu() for t in (means, variances, entropies, mis)))


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under predicted probabilities (nats)."""
    return float(-(probs.gather(1, y.view(-1, 1)).squeeze(1) + _EPS).log().mean())


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE: Σ_bins (n_b/N)·|accuracy_b − confidence_b| over equal-width confidence bins
    (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017)."""
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += float(sel.float().mean() * (correct[sel].mean() - conf[sel].mean()).abs())
    return ece


def auroc(scores_negative: torch.Tensor, scores_positive: torch.Tensor) -> float:
    """Area under the ROC curve of telling positives (e.g. out-of-distribution inputs) by a higher
    score: P(score_pos > score_neg) + ½·P(tie), the Mann–Whitney statistic."""
    neg, pos = scores_negative.flatten().double(), scores_positive.flatten().double()
    allv = torch.cat([neg, pos])
    ranks = torch.empty_like(allv)
    order = allv.argsort()
    sorted_v = allv[order]
    ranks[order] = torch.arange(1, len(allv) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique(sorted_v, return_inverse=True, return_counts=True)
    if len(uniq) < len(sorted_v):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    r_pos = ranks[len(neg) :].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
