"""The dropout family the Bayesian gates grew from.

Bernoulli (classic and inverted), DropConnect, Gaussian, Standout, fast dropout, spatial dropout,
Cutout and Max-Drop.

Every layer keeps the expected activation of training at test time (each docstring says how), and
is deterministic in eval mode unless Monte-Carlo sampling is asked for (see
:func:`compressdrop.uncertainty.mc_predict`, which switches the layers' ``mc`` flag on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = [
    "BernoulliDropout",
    "Cutout",
    "DropConnect",
    "FastDropout",
    "GaussianDropout",
    "MaxDrop",
    "SpatialDropout",
    "Standout",
    "StochasticLayer",
]


def _check_p(p: float) -> float:
    if not 0 <= p < 1:
        raise InputError(f"drop probability p must be in [0, 1), got {p}")
    return float(p)


class StochasticLayer(nn.Module):
    """Base of the dropout layers whose noise Monte-Carlo sampling can switch on in eval mode.

    A subclass draws its noise while :attr:`sampling` is true: in training, and in eval when the
    ``mc`` flag is set (:func:`compressdrop.uncertainty.mc_mode` sets it and clears it again). A
    subclass with a drop probability keeps it in ``p``; ``p = 0`` means no noise at all.
    """

    mc: bool = False

    @property
    def sampling(self) -> bool:
        """Whether a forward pass draws noise: in training, or with ``mc`` set."""
        return self.training or self.mc


class BernoulliDropout(StochasticLayer):
    """Bernoulli dropout: each activation is kept with probability q = 1 − p.

    ``inverted=True`` (as ``nn.Dropout``): training multiplies by m/q, test time is the identity.
    ``inverted=False`` (Srivastava et al.'s original): training multiplies by m, test time by q.
    Both have the same expected activation, q·x·(1/q) = x versus q·x, at the scale each uses.

    Args:
        p: drop probability, in [0, 1).
        inverted: scale in training (True) or at test time (False).

    Reference: Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov, "Dropout: A Simple Way to
    Prevent Neural Networks from Overfitting", JMLR 2014.
    """

    def __init__(self, p: float = 0.5, inverted: bool = True) -> None:
        super().__init__()
        self.p, self.inverted = _check_p(p), bool(inverted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` times a fresh Bernoulli mask per element while sampling; test-time scaling else."""
        q = 1 - self.p
        if self.sampling:
            mask = torch.bernoulli(torch.full_like(x, q))
            return x * mask / q if self.inverted else x * mask
        return x if self.inverted else x * q

    def extra_repr(self) -> str:
        return f"p={self.p}, inverted={self.inverted}"


class GaussianDropout(StochasticLayer):
    """Multiplicative Gaussian noise N(1, p/(1 − p)): the variance of inverted Bernoulli dropout.

    Args:
        p: the Bernoulli drop probability whose variance the noise matches, in [0, 1).

    Reference: Srivastava et al., JMLR 2014, section 10.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` times fresh N(1, p/(1 − p)) noise per element while sampling; ``x`` else."""
        if not self.sampling or self.p == 0:
            return x
        std = math.sqrt(self.p / (1 - self.p))
        return x * (1 + std * torch.randn_like(x))


class DropConnect(StochasticLayer):
    """DropConnect: drops weights of a Linear or Conv layer instead of activations.

    Training: W ⊙ M / q with M ~ Bernoulli(q) per weight (one mask per forward pass, shared by the
    batch), the bias kept; test time: the plain layer, which is the expectation over masks.

    Args:
        layer: the Linear or Conv layer whose weights are dropped.
        p: drop probability of each weight, in [0, 1).

    Raises:
        TypeError: ``layer`` is neither a Linear nor a Conv layer.

    Reference: Wan, Zeiler, Zhang, LeCun & Fergus, "Regularization of Neural Networks using
    DropConnect", ICML 2013 (inverted scaling instead of their moment-matched inference).
    """

    def __init__(
        self, layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, p: float = 0.5
    ) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"DropConnect wraps Linear or Conv layers, got {type(layer).__name__}")
        self.layer, self.p = layer, _check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer on ``x``, with a fresh weight mask while sampling."""
        if not self.sampling or self.p == 0:
            return self.layer(x)
        q = 1 - self.p
        w = self.layer.weight * torch.bernoulli(torch.full_like(self.layer.weight, q)) / q
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


class Standout(StochasticLayer):
    """Standout (adaptive dropout): a belief network sets each unit's keep probability from the input.

    For a wrapped Linear layer h = f(Wx + b), the keep probability is π = sigmoid(α(Wx + b) + β),
    sharing the layer's weights as in the paper; training multiplies h by m ~ Bernoulli(π), test
    time by π (the expectation).

    Args:
        layer: the Linear layer (W, b).
        activation: f; ReLU by default.
        alpha: α, the belief network's scale of the pre-activation.
        beta: β, its offset.

    Raises:
        TypeError: ``layer`` is not a Linear.

    Reference: Ba & Frey, "Adaptive dropout for training deep neural networks", NeurIPS 2013.
    """

    def __init__(
        self,
        layer: nn.Linear,
        activation: nn.Module | None = None,
        alpha: float = 1.0,
        beta: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"Standout wraps a Linear layer, got {type(layer).__name__}")
        self.layer, self.activation = layer, activation or nn.ReLU()
        self.alpha, self.beta = float(alpha), float(beta)

    def keep_prob(self, pre: torch.Tensor) -> torch.Tensor:
        """π = sigmoid(α·pre + β): each unit's keep probability given its pre-activation."""
        return torch.sigmoid(self.alpha * pre + self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = f(Wx + b) times m ~ Bernoulli(π) while sampling, times π else."""
        pre = self.layer(x)
        h, keep = self.activation(pre), self.keep_prob(pre.detach())
        return h * torch.bernoulli(keep) if self.sampling else h * keep


class FastDropout(StochasticLayer):
    """Fast dropout: the Gaussian approximation of dropout on a Linear layer's inputs.

    With inputs kept with probability q and scaled by 1/q (inverted convention), the pre-activation
    s = Σ_j W_ij m_j x_j / q + b is approximately Gaussian (central limit), with mean μ = Wx + b and
    variance v = (1 − q)/q · W²x². Two training modes, as in the paper:

    * ``deterministic=False`` (sampling): one draw s = μ + √v·ε per example, no mask sampling;
    * ``deterministic=True`` (integrating, for a layer that feeds a sigmoid or softmax loss): no
      noise at all; the output is μ / √(1 + π v / 8), so that σ(output) ≈ E[σ(s)] (the probit
      approximation of the logistic-Gaussian integral that Wang & Manning use for the loss).

    Test time uses the mean μ in both modes (the plain layer).

    Args:
        layer: the Linear layer whose inputs are dropped.
        p: drop probability of each input, in [0, 1).
        deterministic: integrate the noise out instead of sampling it.

    Raises:
        TypeError: ``layer`` is not a Linear.

    Reference: Wang & Manning, "Fast dropout training", ICML 2013.
    """

    def __init__(self, layer: nn.Linear, p: float = 0.5, *, deterministic: bool = False) -> None:
        super().__init__()
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"FastDropout wraps a Linear layer, got {type(layer).__name__}")
        self.layer, self.p, self.deterministic = layer, _check_p(p), bool(deterministic)

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """The Gaussian's variance per output unit, v = (1 − q)/q · W²x² (clamped at 0)."""
        q = 1 - self.p
        return ((1 - q) / q * F.linear(x * x, self.layer.weight * self.layer.weight)).clamp(min=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-activation: sampled or integrated while sampling (see above), μ else."""
        mean = self.layer(x)
        if not self.sampling or self.p == 0:
            return mean
        if self.deterministic:
            return mean * torch.rsqrt(1 + math.pi / 8 * self.variance(x))
        return mean + self.variance(x).sqrt() * torch.randn_like(mean)


class SpatialDropout(nn.Dropout2d):
    """Spatial dropout: drops whole feature maps (channels), inverted scaling.

    This is ``torch.nn.Dropout2d`` (the same operation), named after the paper.

    Reference: Tompson, Goroshin, Jain, LeCun & Bregler, "Efficient Object Localization Using
    Convolutional Networks", CVPR 2015.
    """


class Cutout(nn.Module):
    """Cutout: zero one or several square (or rectangular) patches of each image, in training.

    A data augmentation on a batch ``(B, C, H, W)`` or one image ``(C, H, W)`` (so it also serves as
    a per-sample transform in a Dataset): each hole's centre is uniform over the image and
    the patch is clipped at the borders (as in the paper). Identity in eval mode.

    Args:
        size: side of a square hole, or ``(height, width)``.
        holes: patches per image.

    Reference: DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with
    Cutout", 2017.
    """

    def __init__(self, size: int | tuple[int, int] = 8, holes: int = 1) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if holes < 1 or min(self.size) < 1:
            raise InputError(
                f"Cutout needs holes ≥ 1 and a positive size, got {holes}, {self.size}"
            )
        self.holes = int(holes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with fresh holes per image in training; ``x`` itself in eval.

        Raises:
            InputError: ``x`` has neither 3 nor 4 dimensions.
        """
        if not self.training:
            return x
        if x.dim() == 3:  # one image (C, H, W), as a per-sample transform
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            raise InputError(f"Cutout takes (B, C, H, W) or (C, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        keep = torch.ones(b, h, w, dtype=torch.bool, device=x.device)
        for _ in range(self.holes):
            cy = torch.randint(0, h, (b, 1, 1), device=x.device)
            cx = torch.randint(0, w, (b, 1, 1), device=x.device)
            hh, hw = self.size[0] // 2, self.size[1] // 2
            hole = (
                (ys >= cy - hh)
                & (ys < cy - hh + self.size[0])
                & (xs >= cx - hw)
                & (xs < cx - hw + self.size[1])
            )
            keep &= ~hole
        return x * keep.unsqueeze(1).to(x.dtype)


class MaxDrop(StochasticLayer):
    """Max-Drop: drops the maximal activations instead of random ones.

    ``mode="feature"``: in each feature map (per example and channel) the activations equal to the
    map's maximum are dropped with probability p; ``mode="channel"``: at each position, the maximum
    across channels is dropped with probability p. For a (B, F) input both modes drop the
    per-example maximum feature. Test time multiplies the maxima by 1 − p (the expectation).

    Args:
        p: drop probability of a maximum, in [0, 1).
        mode: ``"feature"`` or ``"channel"``.

    Reference: Park & Kwak, "Analysis on the Dropout Effect in Convolutional Neural Networks",
    ACCV 2016.
    """

    def __init__(self, p: float = 0.5, mode: str = "feature") -> None:
        super().__init__()
        if mode not in ("feature", "channel"):
            raise InputError(f"mode must be 'feature' or 'channel', got {mode!r}")
        self.p, self.mode = _check_p(p), mode

    def _is_max(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 or self.mode == "channel":
            return x == x.amax(dim=1, keepdim=True)
        return x == x.flatten(2).amax(dim=2).view(*x.shape[:2], *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with maxima dropped at random while sampling, scaled by 1 − p else."""
        is_max = self._is_max(x)
        if self.sampling:
            drop = is_max & (torch.rand_like(x) < self.p)
            return x.masked_fill(drop, 0.0)
        return torch.where(is_max, x * (1 - self.p), x)
