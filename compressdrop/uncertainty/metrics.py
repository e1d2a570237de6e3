"""Metrics that judge predictive probabilities: NLL, ECE, Brier score, OOD AUROC; temperature
scaling as the calibration baseline."""

from __future__ import annotations

import torch

from ..errors import InputError

__all__ = [
    "auroc",
    "brier",
    "expected_calibration_error",
    "fit_temperature",
    "nll",
]

_EPS = 1e-12


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under predicted probabilities (nats)."""
    return float(-(probs.gather(1, y.view(-1, 1)).squeeze(1) + _EPS).log().mean())


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error Σ_bins (n_b/N)·|accuracy_b − confidence_b|.

    The bins are ``bins`` equal-width intervals of the top-class confidence.

    Reference: Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks",
    ICML 2017.
    """
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
    """Area under the ROC curve of telling positives by a higher score.

    P(score_pos > score_neg) + ½·P(tie), the Mann–Whitney statistic, ties given average ranks.

    Args:
        scores_negative: scores of the negatives (in-distribution inputs, say).
        scores_positive: scores of the positives (out-of-distribution inputs, say).
    """
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


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean Brier score Σ_c (p_c − 1[c = y])² over the inputs (0 is perfect, 2 the worst)."""
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, steps: int = 200) -> float:
    """The temperature T > 0 that minimizes the NLL of ``softmax(logits / T)`` on held-out data.

    One scalar, fitted by L-BFGS on log T; use it on the validation split, never the test split.

    Reference: Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks",
    ICML 2017.

    Raises:
        InputError: ``logits`` and ``y`` disagree in length, or there are none.
    """
    if len(logits) != len(y) or len(y) == 0:
        raise InputError(f"need as many logits as labels (> 0), got {len(logits)} and {len(y)}")
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())
