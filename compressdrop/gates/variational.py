"""Gaussian multiplicative noise with a log-uniform prior: (group) variational dropout."""

from __future__ import annotations

import math

import pyro.distributions as pdist
import torch
from torch import nn

from ._draws import MolchanovKL, NormalDraw
from .base import Gate
from .distributions import LOG_ALPHA_RANGE, LogUniformImproper

__all__ = ["VariationalGate"]


class VariationalGate(Gate):
    """θ ~ N(μ, σ²) per unit, prior p(θ) ∝ 1/|θ|; α = σ²/μ², SNR = 1/√α.

    −KL ≈ k1·sigmoid(k2 + k3·log α) − ½·log1p(1/α) − k1 (k1 = 0.63576, k2 = 1.87320,
    k3 = 1.48695), log α clipped to [−8, 8]. μ and log σ² are independent parameters (the additive
    reparameterization), so the gradient noise does not grow with α. Prunes where log α ≥ 3,
    i.e. SNR < e^{−1.5}.

    Numerics: the training step (θ = μ + σ·ε and the KL) runs in the parameters' dtype, float32
    at least: every term is bounded (log α is clipped, log μ² is floored at log of the dtype's
    smallest normal, −87 in float32), so float32 is exact to rounding. E θ and the SNR are float64.

    Args:
        num_units: neurons or channels gated.
        init_log_sigma2: initial log σ². The authors use −9 for group noise; compressdrop starts
            at −4 (noise std ≈ 0.14), which prunes within tens of epochs instead of hundreds;
            μ starts at N(1, 0.01²).
        noise: ``"example"`` (one θ per example and unit) or ``"batch"`` (one θ per unit and
            mini-batch), see :class:`~compressdrop.gates.Gate`.

    References: Kingma, Salimans & Welling, "Variational Dropout and the Local Reparameterization
    Trick", NeurIPS 2015; Molchanov, Ashukha & Vetrov, "Variational Dropout Sparsifies Deep Neural
    Networks", ICML 2017; Louizos, Ullrich & Welling, "Bayesian Compression for Deep Learning",
    NeurIPS 2017 (group form).
    """

    family = "variational"
    default_threshold = math.exp(-1.5)

    def __init__(
        self, num_units: int, init_log_sigma2: float = -4.0, noise: str = "example"
    ) -> None:
        super().__init__(num_units, noise=noise)
        self.mu = nn.Parameter(1.0 + 0.01 * torch.randn(num_units))
        self.log_sigma2 = nn.Parameter(torch.full((num_units,), float(init_log_sigma2)))

    def _moments(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """μ, σ and log α = log σ² − log μ² in ``dtype``, σ capped where log α reaches 8."""
        mu = self.mu.to(dtype)
        # Keep σ within the range where log α is clipped, so sampling never explodes.
        log_mu2 = torch.log(mu * mu + torch.finfo(mu.dtype).tiny)
        log_sigma2 = torch.minimum(self.log_sigma2.to(dtype), log_mu2 + LOG_ALPHA_RANGE[1])
        return mu, torch.exp(0.5 * log_sigma2), log_sigma2 - log_mu2

    def _training_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and log σ² in the parameters' dtype, float32 at least."""
        dtype = torch.promote_types(self.mu.dtype, torch.float32)
        return self.mu.to(dtype), self.log_sigma2.to(dtype)

    def posterior(self) -> pdist.Normal:
        """q(θ) = N(μ, σ²), σ capped where log α reaches its clip value 8."""
        mu, sigma, _ = self._moments(torch.float64)
        return pdist.Normal(mu, sigma)

    def sample(self, batch: int) -> torch.Tensor:
        """Draw θ = μ + σ·ε for ``batch`` examples, ε ~ N(0, 1); shape ``(batch, U)``."""
        mu, log_sigma2 = self._training_params()
        eps = torch.randn(batch, self.num_units, dtype=mu.dtype, device=mu.device)
        return self._out(NormalDraw.apply(mu, log_sigma2, eps, LOG_ALPHA_RANGE[1]))

    def kl_per_unit(self) -> torch.Tensor:
        """Molchanov's approximation of KL(N(μ, σ²) ‖ p) per unit (the class docstring)."""
        return self._out(MolchanovKL.apply(*self._training_params(), LOG_ALPHA_RANGE[1]))

    _bank_params = ("mu", "log_sigma2")  # compressdrop.gates.bank: the KL as it is

    def prior(self) -> LogUniformImproper:
        """p(θ) ∝ 1/|θ|, the improper log-uniform prior."""
        return LogUniformImproper((self.num_units,))

    def log_alpha(self) -> torch.Tensor:
        """log α = log σ² − log μ² per unit (the dropout rate's log-odds, in Molchanov's terms)."""
        q = self.posterior()
        return self._out(
            2 * torch.log(q.scale) - torch.log(q.loc * q.loc + torch.finfo(q.loc.dtype).tiny)
        )
