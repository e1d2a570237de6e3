"""Monte-Carlo prediction: dropout layers and learned gates sampled at test time.

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

from ..dropout import DropConnect, RecurrentDropout, StochasticLayer
from ..errors import InputError
from ..gates import Gate
from ..runtime import check_labels, correct, logits_of, run_on_examples
from .metrics import auroc, brier, expected_calibration_error, nll

__all__ = [
    "MCPrediction",
    "deterministic_probs",
    "has_noise",
    "mc_evaluate",
    "mc_mode",
    "mc_predict",
    "mc_report",
    "mc_samples",
    "per_example",
    "scores",
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

    ``nn.Dropout*`` layers and compressdrop's gates go to training mode (gates drawing one θ per
    example, whatever their training ``noise``), compressdrop's dropout
    layers (:class:`~compressdrop.dropout.StochasticLayer`,
    :class:`~compressdrop.dropout.RecurrentDropout`) get ``mc`` set; BatchNorm and everything else
    stays in eval. Every flag is restored on exit.

    Example:
        >>> with mc_mode(net):  # doctest: +SKIP
        ...     samples = torch.stack([net(x) for _ in range(30)])
    """
    saved = [(m, m.training) for m in model.modules()]
    modes = [(m, m.noise) for m in model.modules() if isinstance(m, Gate)]
    model.eval()
    flagged = []
    for m in model.modules():
        if isinstance(m, Gate):
            m.train()
            m.noise = "example"  # samples stacked in one batch need their own θ each
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
        elif isinstance(m, (StochasticLayer, RecurrentDropout)):
            m.mc = True
            flagged.append(m)
    try:
        yield model
    finally:
        for m in flagged:
            m.mc = False
        for m, noise in modes:
            m.noise = noise
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


def per_example(model: nn.Module) -> bool:
    """Whether every noise source of ``model`` draws independently for each example in a batch
    (in :func:`mc_mode`), so that Monte-Carlo samples can be stacked along the batch.

    DropConnect (one weight mask per forward pass) and the recurrent dropout schemes (masks
    tied across a sequence's steps) do not qualify.
    """
    return not any(isinstance(m, (DropConnect, RecurrentDropout)) for m in model.modules())


def _summary(probs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mean, variance, entropy, mutual information) of samples ``(S, B, C)``."""
    mean = probs.mean(0)
    entropy = _entropy(mean)
    expected = _entropy(probs).mean(0)
    return mean, probs.var(0), entropy, (entropy - expected).clamp(min=0)


@torch.no_grad()
def mc_samples(
    model: nn.Module, x: torch.Tensor, samples: int = 30, batch_size: int = 4096
) -> torch.Tensor:
    """The softmax probabilities of ``samples`` stochastic passes, ``(samples, N, C)``, on the CPU.

    Where every noise source draws per example (:func:`per_example`), the samples of a chunk of
    inputs are stacked into one batch of about ``batch_size`` rows: one forward pass instead of
    ``samples``. Otherwise one pass per sample and chunk.

    Raises:
        InputError: ``samples`` < 1, or the model does not run on ``x`` (its shape named).
    """
    if samples < 1:
        raise InputError(f"samples must be ≥ 1, got {samples}")
    device = next(model.parameters()).device
    stacked = per_example(model)
    chunk = max(1, batch_size // samples) if stacked else batch_size
    out = []
    try:
        with mc_mode(model):
            for i in range(0, len(x), chunk):
                xb = x[i : i + chunk].to(device)
                if stacked:
                    tiled = xb.repeat(samples, *([1] * (xb.dim() - 1)))
                    logits = logits_of(model(tiled)).float().unflatten(0, (samples, len(xb)))
                else:
                    logits = torch.stack([logits_of(model(xb)).float() for _ in range(samples)])
                # next-token logits (S, B, T, V): every token is a prediction of its own
                out.append(torch.softmax(logits.flatten(1, -2), -1).cpu())
    except torch.OutOfMemoryError:  # not the inputs' fault: a second try would fail the same
        raise
    except (RuntimeError, TypeError, ValueError, IndexError):
        # the failure of a stacked batch quotes its shape (samples × inputs): name x's instead
        run_on_examples(model, x[:2].to(device), "x")
        raise
    return torch.cat(out, 1)


def mc_predict(
    model: nn.Module, x: torch.Tensor, samples: int = 30, batch_size: int = 4096
) -> MCPrediction:
    """Average ``samples`` stochastic forward passes of a classifier on ``x``, in :func:`mc_mode`.

    Args:
        model: a classifier returning logits, with a source of noise (see :func:`has_noise`).
        x: inputs; moved chunk by chunk to the model's device.
        samples: forward passes per input, at least 2.
        batch_size: rows per forward pass (the samples of a chunk of inputs stacked, see
            :func:`mc_samples`).

    Returns:
        An :class:`MCPrediction`, on the CPU.

    Raises:
        InputError: ``model`` has no source of noise, or ``samples`` < 2.
    """
    _check_noise(model)
    if samples < 2:
        raise InputError(f"samples must be ≥ 2, got {samples}")
    return MCPrediction(*_summary(mc_samples(model, x, samples, batch_size)))


def _check_noise(model: nn.Module) -> None:
    if not has_noise(model):
        raise InputError(
            "the model has no dropout layer or gate: Monte-Carlo samples would all be the same "
            "(a slim model keeps its noise only through keep_noise)"
        )


@torch.no_grad()
def deterministic_probs(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Softmax probabilities of ``model`` in eval mode (every noise at its mean), on the CPU."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        return torch.cat(
            [
                torch.softmax(
                    logits_of(model(x[i : i + batch_size].to(device))).float().flatten(0, -2), -1
                ).cpu()
                for i in range(0, len(x), batch_size)
            ]
        )
    finally:
        model.train(was)


def scores(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier score of predictive probabilities ``(N, C)``."""
    return {
        "accuracy": correct(probs, y) / len(probs),
        "nll": nll(probs, y),
        "ece": expected_calibration_error(probs, y),
        "brier": brier(probs, y),
    }


@torch.no_grad()
def mc_evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    samples: int = 30,
    x_ood: torch.Tensor | None = None,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Monte-Carlo prediction against the deterministic net (eval mode, noise at its mean).

    Args:
        model: a classifier returning logits, with a source of noise.
        x: test inputs.
        y: their labels.
        samples: Monte-Carlo forward passes per input, at least 2.
        x_ood: out-of-distribution inputs of the same shape, or ``None``.
        batch_size: rows per forward pass (see :func:`mc_samples`).

    Returns:
        Accuracy, NLL, ECE and Brier score of both; the mean predictive entropy and mutual
        information; the convergence check ``nll_half``, the NLL from the first ``samples // 2``
        samples, and ``nll_change``, (NLL − nll_half) / NLL (small: more samples would change
        little); and, given ``x_ood``, the AUROC of entropy and of mutual information at telling
        ``x_ood`` from ``x`` (higher is better; 0.5 is chance).

    Raises:
        InputError: ``model`` has no source of noise, or ``samples`` < 2.
    """
    _check_noise(model)
    if samples < 2:
        raise InputError(f"samples must be ≥ 2, got {samples}")
    det = deterministic_probs(model, x, batch_size)
    ood = None if x_ood is None else mc_samples(model, x_ood, samples, batch_size)
    out = mc_report(mc_samples(model, x, samples, batch_size), y, ood)
    out.update({f"deterministic_{k}": v for k, v in scores(det, y.reshape(-1)).items()})
    if x_ood is not None:
        det_ood = deterministic_probs(model, x_ood, batch_size)
        out["deterministic_ood_auroc_entropy"] = auroc(_entropy(det), _entropy(det_ood))
    return out


def mc_report(
    draws: torch.Tensor, y: torch.Tensor, draws_ood: torch.Tensor | None = None
) -> dict[str, float]:
    """The Monte-Carlo metrics of sampled probabilities ``(S, N, C)`` (see :func:`mc_evaluate`):
    ``samples``, :func:`scores` of their mean, the convergence check, the mean entropy and mutual
    information, and with ``draws_ood`` (samples on out-of-distribution inputs) the AUROCs."""
    y = y.reshape(-1)  # next-token labels (N, T): one per token, as the draws
    check_labels(draws.shape[-1], y)
    if draws.shape[1] != len(y):
        raise InputError(f"{draws.shape[1]} predictions but {len(y)} labels")
    mc = MCPrediction(*_summary(draws))
    samples = len(draws)
    half = nll(draws[: samples // 2].mean(0), y)
    out: dict[str, float] = {"samples": samples, **scores(mc.mean, y)}
    out.update(
        {
            "nll_half": half,
            "nll_change": (out["nll"] - half) / max(out["nll"], _EPS),
            "mean_entropy": float(mc.entropy.mean()),
            "mean_mutual_information": float(mc.mutual_information.mean()),
        }
    )
    if draws_ood is not None:
        ood = MCPrediction(*_summary(draws_ood))
        out["ood_mean_entropy"] = float(ood.entropy.mean())
        out["ood_auroc_entropy"] = auroc(mc.entropy, ood.entropy)
        out["ood_auroc_mutual_information"] = auroc(mc.mutual_information, ood.mutual_information)
    return out


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * (p + _EPS).log()).sum(-1)
