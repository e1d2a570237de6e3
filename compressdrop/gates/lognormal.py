"""Log-normal multiplicative noise: Structured Bayesian Pruning."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ._lognormal_fast import LogNormalDraw, LogNormalKL, StepTerms, step_terms
from .bank import shared
from .base import MIN_VARIANCE, Gate
from .distributions import LogUniform, TruncatedLogNormal, lognormal_log_terms, truncnorm_terms

__all__ = ["LogNormalGate"]


class LogNormalGate(Gate):
    """θ with log θ ~ N(μ, σ²) truncated to [a, b]; prior log-uniform on [e^a, e^b].

    KL = log(b − a) − H[TN(μ, σ², a, b)] (closed form), E θ and SNR through the normal CDF in log
    space. μ and log σ are clamped to [−20, 5] where used, as in the authors' code (gradients stop
    outside that range, values stay finite). The paper prunes units with SNR < 1.

    Numerics: the per-unit terms (the standardized bounds α, β and log Z, the entropy, the moments)
    are computed once per step in float64, from float32 parameters: the log-CDF differences need
    it for bounds beyond about ±13 σ, which a unit near θ = 1 with small σ reaches. Each draw
    log θ = μ + σ·Φ⁻¹(Φ(α) + u·Z) is also float64 (the ndtri of a float32 probability would pin
    every draw of such a unit to the bound): exact for standardized bounds in about [−37, 37], the
    nearer bound beyond. Only θ itself is cast to the activations' dtype.

    Args:
        num_units: neurons or channels gated.
        low, high: truncation interval of log θ (the paper's [−20, 0]).
        init_mu, init_log_sigma: initial values (0 and −5: θ ≈ 1, almost no noise).
        noise: ``"example"`` (one θ per example and unit) or ``"batch"`` (one θ per unit and
            mini-batch), see :class:`~compressdrop.gates.Gate`.

    Reference: Neklyudov, Molchanov, Ashukha & Vetrov, "Structured Bayesian Pruning via Log-Normal
    Multiplicative Noise", NeurIPS 2017.
    """

    family = "lognormal"
    nonnegative = True
    default_threshold = 1.0
    param_range = (-20.0, 5.0)

    def __init__(
        self,
        num_units: int,
        low: float = -20.0,
        high: float = 0.0,
        init_mu: float = 0.0,
        init_log_sigma: float = -5.0,
        noise: str = "example",
    ) -> None:
        super().__init__(num_units, noise=noise)
        if not low < high:
            raise InputError(f"low must be < high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)
        self.mu = nn.Parameter(torch.full((num_units,), float(init_mu)))
        self.log_sigma = nn.Parameter(torch.full((num_units,), float(init_log_sigma)))

    def _loc_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and σ of log θ in float64, clamped as the class docstring says."""
        mu = self.mu.double().clamp(*self.param_range)
        return mu, self.log_sigma.double().clamp(*self.param_range).exp()

    def posterior(self) -> TruncatedLogNormal:
        """q(θ): log θ ~ N(μ, σ²) truncated to [low, high], μ and log σ clamped to [−20, 5]."""
        return TruncatedLogNormal(*self._loc_scale(), self.low, self.high)

    def _terms(self) -> tuple[torch.Tensor, ...]:
        """(μ, σ, α, β, log Z) per unit, float64, once per step."""

        def compute() -> tuple[torch.Tensor, ...]:
            mu, sigma = self._loc_scale()
            return (mu, sigma, *truncnorm_terms(mu, sigma, self.low, self.high))

        return self._memo("terms", compute)

    # --- several gates as one (compressdrop.gates.bank) -----------------------------------------
    _bank_params = ("mu", "log_sigma")

    @classmethod
    def _bank_terms(cls, bank: list[LogNormalGate]) -> StepTerms:
        """The step terms of the bank's units, concatenated, once per step."""

        def compute() -> StepTerms:
            g = bank[0]
            with torch.no_grad():
                mu, log_sigma = (
                    torch.cat([b.mu for b in bank]),
                    torch.cat([b.log_sigma for b in bank]),
                )
            return step_terms(mu, log_sigma, g.low, g.high, g.param_range)

        return shared(bank, "step", compute)

    @classmethod
    def _bank_prime(cls, bank: list[LogNormalGate]) -> None:
        """Hand each gate its slice of the bank's step terms (its draw and KL then reuse them)."""
        sizes = [g.num_units for g in bank]
        parts = [term.split(sizes) for term in cls._bank_terms(bank)]
        for i, g in enumerate(bank):

            def mine(i: int = i) -> StepTerms:
                return StepTerms(*(p[i] for p in parts))

            g._memo("step", mine)

    @classmethod
    def _bank_kl_per_unit(
        cls, bank: list[LogNormalGate], params: list[torch.Tensor]
    ) -> torch.Tensor:
        """:meth:`kl_per_unit` of the concatenated gates, one autograd node for all."""
        t, g = cls._bank_terms(bank), bank[0]
        return LogNormalKL.apply(
            *params, t.alpha, t.beta, t.sigma, t.log_sigma, t.log_z, t.mu_grad, t.sigma_grad,
            math.log(g.high - g.low),
        )  # fmt: skip

    def _step_terms(self) -> StepTerms:
        """The per-unit terms of the training step (draw and KL), without a graph, once per step."""
        return self._memo(
            "step",
            lambda: step_terms(self.mu, self.log_sigma, self.low, self.high, self.param_range),
        )

    def sample(self, batch: int) -> torch.Tensor:
        """Draw θ for ``batch`` examples by the inverse CDF, reparameterized; ``(batch, U)``.

        One autograd node (:class:`~compressdrop.gates._lognormal_fast.LogNormalDraw`) whose
        backward is the closed-form implicit gradient of the draw.
        """
        t = self._step_terms()
        u = torch.rand(batch, self.num_units, dtype=torch.float64, device=t.mu.device)
        return LogNormalDraw.apply(
            self.mu, self.log_sigma, u, t.mu, t.offset, t.width, t.signed_scale, t.lo, t.hi,
            t.sign, t.mu_grad, t.sigma_grad, self.low, self.high,
        )  # fmt: skip

    def kl_per_unit(self) -> torch.Tensor:
        """KL(q ‖ p) = log(b − a) − H[TN(μ, σ², a, b)] per unit (the KL is invariant under exp).

        The entropy is :func:`~compressdrop.gates.distributions.truncnorm_entropy` without its
        guards for infinite bounds (α and β are finite here), as one autograd node with its
        closed-form gradient (:class:`~compressdrop.gates._lognormal_fast.LogNormalKL`).
        """
        t = self._step_terms()
        return LogNormalKL.apply(
            self.mu, self.log_sigma, t.alpha, t.beta, t.sigma, t.log_sigma, t.log_z, t.mu_grad,
            t.sigma_grad, math.log(self.high - self.low),
        )  # fmt: skip

    def _log_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log E θ and Var θ / (E θ)² per unit (:class:`TruncatedLogNormal`'s formulas)."""

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            mu, sigma, alpha, beta, log_z = self._terms()
            log_n, log_d = lognormal_log_terms(sigma, alpha, beta)
            log_mean = mu + 0.5 * sigma**2 + log_n - log_z
            return log_mean, torch.expm1(sigma**2 + log_z + log_d - 2 * log_n).clamp(min=0)

        return self._memo("moments", compute)

    def expected(self) -> torch.Tensor:
        """E θ = e^{μ+σ²/2}·N/Z per unit."""
        return self._out(self._log_moments()[0].exp())

    def prior(self) -> LogUniform:
        """p(θ): log θ ~ Uniform(low, high)."""
        n, device = self.num_units, self.mu.device
        return LogUniform(
            torch.full((n,), self.low, dtype=torch.float64, device=device),
            torch.full((n,), self.high, dtype=torch.float64, device=device),
        )

    def snr(self) -> torch.Tensor:
        """E θ / std θ per unit, from the relative variance (no cancellation for tiny noise)."""
        return self._out(self._log_moments()[1].clamp(min=MIN_VARIANCE).rsqrt())
