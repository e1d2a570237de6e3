"""Log-normal multiplicative noise: Structured Bayesian Pruning."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .base import MIN_VARIANCE, Gate
from .distributions import LogUniform, TruncatedLogNormal

__all__ = ["LogNormalGate"]


class LogNormalGate(Gate):
    """θ with log θ ~ N(μ, σ²) truncated to [a, b]; prior log-uniform on [e^a, e^b].

    KL = log(b − a) − H[TN(μ, σ², a, b)] (closed form), E θ and SNR through the normal CDF in log
    space. μ and log σ are clamped to [−20, 5] where used, as in the authors' code (gradients stop
    outside that range, values stay finite). The paper prunes units with SNR < 1.

    Args:
        num_units: neurons or channels gated.
        low, high: truncation interval of log θ (the paper's [−20, 0]).
        init_mu, init_log_sigma: initial values (0 and −5: θ ≈ 1, almost no noise).

    Reference: Neklyudov, Molchanov, Ashukha & Vetrov, "Structured Bayesian Pruning via Log-Normal
    Multiplicative Noise", NeurIPS 2017.
    """

    family = "lognormal"
    default_threshold = 1.0
    param_range = (-20.0, 5.0)

    def __init__(
        self,
        num_units: int,
        low: float = -20.0,
        high: float = 0.0,
        init_mu: float = 0.0,
        init_log_sigma: float = -5.0,
    ) -> None:
        super().__init__(num_units)
        if not low < high:
            raise InputError(f"low must be < high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)
        self.mu = nn.Parameter(torch.full((num_units,), float(init_mu)))
        self.log_sigma = nn.Parameter(torch.full((num_units,), float(init_log_sigma)))

    def posterior(self) -> TruncatedLogNormal:
        """q(θ): log θ ~ N(μ, σ²) truncated to [low, high], μ and log σ clamped to [−20, 5]."""
        mu = self.mu.double().clamp(*self.param_range)
        sigma = self.log_sigma.double().clamp(*self.param_range).exp()
        return TruncatedLogNormal(mu, sigma, self.low, self.high)

    def prior(self) -> LogUniform:
        """p(θ): log θ ~ Uniform(low, high)."""
        n, device = self.num_units, self.mu.device
        return LogUniform(
            torch.full((n,), self.low, dtype=torch.float64, device=device),
            torch.full((n,), self.high, dtype=torch.float64, device=device),
        )

    def snr(self) -> torch.Tensor:
        """E θ / std θ per unit, from the relative variance (no cancellation for tiny noise)."""
        return self._out(self.posterior().relative_variance().clamp(min=MIN_VARIANCE).rsqrt())
