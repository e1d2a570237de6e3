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

from .dropout import RecurrentDropout, StochasticLayer
from .errors import InputError
from .gates import Gate

__all__ = [
    "MCPrediction",
    "auroc",
    "expected_calibration_error",
    "has_noise",
    "mc_evaluate",
    "mc_mode",
    "mc_predict",
    "nll",
    "resize_images",
]

_EPS = 1e-12


@dataclass(frozen=True)
class MCPrediction:
    """What :func:`mc_predict` returns: Monte-Carlo estimates per input, entropies in nats.

    Attributes:
        mean: predictive probabilities, the mean over samples, ``(N, C)``.
        variance: their variance over samples, ``(N, C)``.
        entropy: entropy of the predictive mean, ``(N,)``.
        mutual_information: entropy minus the mean entropy of the samples (epistemic
            uncertainty), ``(N,)``.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor


@contextlib.contextmanager
def mc_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with every noise source sampling, for Monte-Carlo dropout.

    ``nn.Dropout*`` layers and compressdrop's gates go to training mode, compressdrop's dropout
    layers (:class:`~compressdrop.dropout.StochasticLayer`,
    :class:`~compressdrop.dropout.RecurrentDropout`) get ``mc`` set; BatchNorm and everything else
    stays in eval. Every flag is restored on exit.

    Example:
        >>> with mc_mode(net):  # doctest: +SKIP
        ...     samples = torch.stack([net(x) for _ in range(30)])
    """
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    flagged = []
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, Gate)):
            m.train()
        elif isinstance(m, (StochasticLayer, RecurrentDropout)):
            m.mc = True
            flagged.append(m)
    try:
        yield model
    finally:
        for m in flagged:
            m.mc = False
        for m, was in saved:
            m.training = was


def has_noise(model: nn.Module) -> bool:
    """Whether ``model`` has a source of noise that Monte-Carlo sampling can switch on.

    A gate, or a dropout layer (torch's or compressdrop's) with a non-zero rate, counts.
    """
    for m in model.modules():
        if isinstance(m, Gate) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0):
            return True
        if isinstance(m, StochasticLayer) and getattr(m, "p", 1) != 0:
            return True
        if isinstance(m, RecurrentDropout) and m.scheme != "none" and m.p > 0:
            return True
    return False


@torch.no_grad()
def mc_predict(
    model: nn.Module, x: torch.Tensor, samples: int = 30, batch_size: int = 512
) -> MCPrediction:
    """Average ``samples`` stochastic forward passes of a classifier on ``x``, in :func:`mc_mode`.

    Args:
        model: a classifier returning logits, with a source of noise (see :func:`has_noise`).
        x: inputs; moved batch by batch to the model's device.
        samples: forward passes per input, at least 2.
        batch_size: inputs per forward pass.

    Returns:
        An :class:`MCPrediction`, on the CPU.

    Raises:
        InputError: ``samples`` < 2.
    """
    if samples < 2:
        raise InputError(f"samples must be ≥ 2, got {samples}")
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


def resize_images(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Bring images (N, C, H, W) to one example's ``shape`` (C', H', W').

    Bilinear resize (antialiased when shrinking); channels averaged to 1 or repeated from 1. Used
    for out-of-distribution sets (digits' 8×8 images for a 28×28 model, say).

    Returns:
        ``x`` itself if it already has the shape, else a new float tensor.

    Raises:
        InputError: ``x`` is not a batch of images, or the channels cannot be mapped.
    """
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if x.dim() != 4 or len(shape) != 3:
        raise InputError(f"cannot resize inputs of shape {tuple(x.shape[1:])} to {tuple(shape)}")
    c, h, w = shape
    y = torch.nn.functional.interpolate(
        x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=h < x.shape[2]
    )
    if y.shape[1] != c:
        if c == 1:
            y = y.mean(1, keepdim=True)
        elif y.shape[1] == 1:
            y = y.expand(-1, c, -1, -1)
        else:
            raise InputError(f"cannot map {y.shape[1]} channels to {c}")
    return y.contiguous()


@torch.no_grad()
def mc_evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    samples: int = 30,
    x_ood: torch.Tensor | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Monte-Carlo dropout against the deterministic net (eval mode, noise at its mean).

    Args:
        model: a classifier returning logits, with a source of noise.
        x: test inputs.
        y: their labels.
        samples: Monte-Carlo forward passes per input.
        x_ood: out-of-distribution inputs of the same shape, or ``None``.
        batch_size: inputs per forward pass.

    Returns:
        Accuracy, NLL and ECE of both; the mean predictive entropy and mutual information; and,
        given ``x_ood``, the AUROC of entropy and of mutual information at telling ``x_ood`` from
        ``x`` (higher is better; 0.5 is chance).

    Raises:
        InputError: ``model`` has no source of noise.
    """
    if not has_noise(model):
        raise InputError(
            "the model has no dropout layer or gate: Monte-Carlo samples would all be the same"
        )
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    det = torch.cat(
        [
            torch.softmax(model(x[i : i + batch_size].to(device)).float(), -1).cpu()
            for i in range(0, len(x), batch_size)
        ]
    )
    model.train(was)
    mc = mc_predict(model, x, samples=samples, batch_size=batch_size)
    out = {
        "samples": float(samples),
        "accuracy": float((mc.mean.argmax(1) == y).float().mean()),
        "nll": nll(mc.mean, y),
        "ece": expected_calibration_error(mc.mean, y),
        "deterministic_accuracy": float((det.argmax(1) == y).float().mean()),
        "deterministic_nll": nll(det, y),
        "deterministic_ece": expected_calibration_error(det, y),
        "mean_entropy": float(mc.entropy.mean()),
        "mean_mutual_information": float(mc.mutual_information.mean()),
    }
    if x_ood is not None:
        ood = mc_predict(model, x_ood, samples=samples, batch_size=batch_size)
        out["ood_mean_entropy"] = float(ood.entropy.mean())
        out["ood_auroc_entropy"] = auroc(mc.entropy, ood.entropy)
        out["ood_auroc_mutual_information"] = auroc(mc.mutual_information, ood.mutual_information)
        det_ood = torch.cat(
            [
                torch.softmax(model.eval()(x_ood[i : i + batch_size].to(device)).float(), -1).cpu()
                for i in range(0, len(x_ood), batch_size)
            ]
        )
        model.train(was)
        ent = lambda p: -(p * (p + _EPS).log()).sum(-1)  # noqa: E731
        out["deterministic_ood_auroc_entropy"] = auroc(ent(det), ent(det_ood))
    return out


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
