"""Posterior and prior distributions of the gates, with their closed-form KL registered.

Every distribution here is a Pyro ``TorchDistribution`` (a ``torch.distributions.Distribution``),
so ``kl_divergence``, ``rsample`` and ``log_prob`` work as usual, the closed-form KLs registered with
``register_kl`` serve both libraries, and ``pyro.sample`` sites with Pyro's ``TraceMeanField_ELBO``
use the gates' posteriors and priors directly.

Numerics: the normal CDF differences of the truncated normal are computed in log space
(``log Φ(b) − log Φ(a)`` with the upper-tail reflection), so they neither underflow nor lose
precision for standardized bounds anywhere in [−1e30, 1e30]. Callers pass float64 parameters for
the per-unit closed forms (see :class:`compressdrop.gates.Gate`).
"""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as pdist
import torch
from torch.distributions import ExpTransform, Uniform, constraints, register_kl
from torch.distributions.utils import broadcast_all

from ..errors import InputError

__all__ = [
    "HardConcrete",
    "LogUniform",
    "LogUniformImproper",
    "TruncatedLogNormal",
    "TruncatedNormal",
    "clamp_probability",
    "hard_concrete_stretch",
    "log_ndtr_diff",
    "lognormal_log_terms",
    "molchanov_kl",
    "truncnorm_entropy",
    "truncnorm_icdf_coefs",
    "truncnorm_terms",
]

# a sample_shape as torch.distributions.Distribution.sample/rsample declare it
_SampleShape = torch.Size | list[int] | tuple[int, ...]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)
# E[log|ε|] for ε ~ N(0, 1): −(γ_Euler + log 2) / 2.
_E_LOG_ABS_NORMAL = -(np.euler_gamma + math.log(2.0)) / 2


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate on the whole range (Mächler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_ndtr_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Φ(hi) − Φ(lo)) for lo ≤ hi, stable in both tails.

    In the upper tail Φ(lo) and Φ(hi) both round to 1; there the identity
    Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi) moves the computation into the lower tail, where
    ``log_ndtr`` keeps full relative precision.
    """
    upper = lo > 0
    a = torch.where(upper, -hi, lo)
    b = torch.where(upper, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    return log_b + _log1mexp(torch.special.log_ndtr(a) - log_b)


def _log_normal_pdf(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x * x - _LOG_SQRT_2PI


def truncnorm_terms(
    loc: torch.Tensor, scale: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized bounds α = (low − loc)/scale, β = (high − loc)/scale and log Z = log(Φ(β) − Φ(α)).

    The per-unit terms that the truncated normal's density, entropy, moments and sampler share.
    """
    alpha = (low - loc) / scale
    beta = (high - loc) / scale
    return alpha, beta, log_ndtr_diff(alpha, beta)


def truncnorm_entropy(
    scale: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, log_z: torch.Tensor
) -> torch.Tensor:
    """log(√(2πe)·scale·Z) + (αφ(α) − βφ(β)) / (2Z), finite for infinite bounds."""

    def term(x: torch.Tensor) -> torch.Tensor:
        # x·φ(x)/Z → 0 as x → ±∞; torch.where keeps ±inf·0 out of the value and the gradient
        finite = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        return finite * torch.exp(_log_normal_pdf(x) - log_z)

    return _HALF_LOG_2PI_E + torch.log(scale) + log_z + 0.5 * (term(alpha) - term(beta))


def truncnorm_icdf_coefs(
    scale: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, log_z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-unit coefficients of the inverse CDF: x(u) = loc + signed_scale·Φ⁻¹(offset + u·width).

    When the whole interval lies above the mean (α > 0) the quantile is taken in the reflected
    lower tail, where Φ keeps full relative precision: offset = Φ(−β) and the sign flips.

    Returns:
        ``(offset, width, signed_scale)``, each shaped like ``scale``.
    """
    upper = alpha > 0
    offset = torch.special.ndtr(torch.where(upper, -beta, alpha))
    return offset, torch.exp(log_z), torch.where(upper, -scale, scale)


def clamp_probability(p: torch.Tensor) -> torch.Tensor:
    """``p`` clamped off 0 and 1 so that Φ⁻¹(p) is finite: to [tiny, 1 − 1e-16] in float64,
    [1e-30, 1 − 1e-7] in float32 (|Φ⁻¹| ≤ 38.5 and ≤ 11.4)."""
    if p.dtype == torch.float64:
        return p.clamp(torch.finfo(p.dtype).tiny, 1 - 1e-16)
    return p.clamp(1e-30, 1 - 1e-7)


class TruncatedNormal(pdist.TorchDistribution):
    """Normal(loc, scale) truncated to [low, high].

    With α = (low − loc)/scale, β = (high − loc)/scale and Z = Φ(β) − Φ(α):
    density φ((x − loc)/scale) / (scale·Z) on [low, high];
    entropy log(√(2πe)·scale·Z) + (αφ(α) − βφ(β)) / (2Z).
    Sampling is by the inverse CDF (reparameterized), reflected into the lower tail when the
    interval lies above the mean.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc, scale, low, high, validate_args=None):
        self.loc, self.scale, self.low, self.high = broadcast_all(loc, scale, low, high)
        self._alpha, self._beta, self._log_z = truncnorm_terms(
            self.loc, self.scale, self.low, self.high
        )
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        """The interval [low, high]."""
        return constraints.interval(self.low, self.high)

    def _ratio(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x)/Z computed in log space (0 where φ underflows)."""
        return torch.exp(_log_normal_pdf(x) - self._log_z)

    @property
    def mean(self) -> torch.Tensor:
        """loc + scale·(φ(α) − φ(β))/Z."""
        return self.loc + self.scale * (self._ratio(self._alpha) - self._ratio(self._beta))

    def entropy(self) -> torch.Tensor:
        """log(√(2πe)·scale·Z) + (αφ(α) − βφ(β)) / (2Z), finite for infinite bounds."""
        return truncnorm_entropy(self.scale, self._alpha, self._beta, self._log_z)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log density; −inf outside [low, high]."""
        z = (value - self.loc) / self.scale
        lp = _log_normal_pdf(z) - torch.log(self.scale) - self._log_z
        inside = (value >= self.low) & (value <= self.high)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    def rsample(self, sample_shape: _SampleShape = torch.Size()) -> torch.Tensor:
        """Reparameterized draws: the inverse CDF of uniform noise."""
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.icdf(u)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """The quantile at probability ``u``, clamped into [low, high].

        Safe for u in [0, 1]: the probability is clamped off 0 and 1 before Φ⁻¹, so the quantile
        is finite.
        """
        offset, width, signed_scale = truncnorm_icdf_coefs(
            self.scale, self._alpha, self._beta, self._log_z
        )
        z = torch.special.ndtri(clamp_probability(torch.addcmul(offset, u, width)))
        x = torch.addcmul(self.loc, signed_scale, z)
        return torch.minimum(torch.maximum(x, self.low), self.high)


def lognormal_log_terms(
    scale: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log N and log D of the truncated log-normal's moments (see :class:`TruncatedLogNormal`):
    N = Φ(σ−α) − Φ(σ−β), D = Φ(2σ−α) − Φ(2σ−β), as log-CDF differences."""
    return log_ndtr_diff(scale - beta, scale - alpha), log_ndtr_diff(
        2 * scale - beta, 2 * scale - alpha
    )


class TruncatedLogNormal(pdist.TransformedDistribution):
    """θ = exp(X) with X ~ TruncatedNormal(loc, scale, low, high): the SBP posterior.

    With N = Φ(σ−α) − Φ(σ−β) and D = Φ(2σ−α) − Φ(2σ−β):
    E θ = e^{μ+σ²/2}·N/Z and Var θ / (E θ)² = e^{σ²}·Z·D/N² − 1, both evaluated in log space.
    Reference: Neklyudov et al., "Structured Bayesian Pruning via Log-Normal Multiplicative Noise",
    NeurIPS 2017.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, loc, scale, low, high, validate_args=None):
        super().__init__(
            TruncatedNormal(loc, scale, low, high), ExpTransform(), validate_args=validate_args
        )

    @property
    def truncated(self) -> TruncatedNormal:
        """The distribution of log θ."""
        return self.base_dist

    def _log_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tn = self.base_dist
        return (*lognormal_log_terms(tn.scale, tn._alpha, tn._beta), tn._log_z)

    @property
    def mean(self) -> torch.Tensor:
        """E θ = e^{μ+σ²/2}·N/Z."""
        tn = self.base_dist
        log_n, _, log_z = self._log_terms()
        return torch.exp(tn.loc + 0.5 * tn.scale**2 + log_n - log_z)

    def relative_variance(self) -> torch.Tensor:
        """Var θ / (E θ)² = 1 / SNR², computed without cancellation."""
        s = self.base_dist.scale
        log_n, log_d, log_z = self._log_terms()
        return torch.expm1(s**2 + log_z + log_d - 2 * log_n).clamp(min=0)

    @property
    def variance(self) -> torch.Tensor:
        """Var θ = (E θ)² · :meth:`relative_variance`."""
        return self.mean**2 * self.relative_variance()

    def entropy(self) -> torch.Tensor:
        """H[θ] = H[X] + E[X] for θ = exp(X)."""
        return self.base_dist.entropy() + self.base_dist.mean


class LogUniform(pdist.TransformedDistribution):
    """θ with log θ ~ Uniform(low, high): the SBP prior.

    The paper uses low = −20, high = 0, the defaults of :class:`LogNormalGate`.
    """

    arg_constraints: dict = {}

    def __init__(self, low, high, validate_args=None):
        super().__init__(Uniform(low, high), ExpTransform(), validate_args=validate_args)


@register_kl(TruncatedLogNormal, LogUniform)
def _kl_truncated_lognormal_loguniform(q: TruncatedLogNormal, p: LogUniform) -> torch.Tensor:
    # KL is invariant under the shared bijection exp: KL(TN ‖ U) = log(b − a) − H[TN].
    tn, u = q.base_dist, p.base_dist
    if not (
        torch.equal(tn.low, u.low.expand_as(tn.low))
        and torch.equal(tn.high, u.high.expand_as(tn.high))
    ):
        raise InputError("KL(TruncatedLogNormal ‖ LogUniform) needs the same truncation interval")
    return torch.log(tn.high - tn.low) - tn.entropy()


class LogUniformImproper(pdist.TorchDistribution):
    """The scale-invariant log-uniform prior p(θ) ∝ 1/|θ| (Kingma et al. 2015).

    It is improper, so its KL to a Gaussian is defined up to a constant. ``log_prob`` fixes that
    constant so that KL(N(μ, σ²) ‖ p) → 0 as α = σ²/μ² → ∞, the convention of Molchanov et al.'s
    approximation; with it, Monte-Carlo estimates E_q[log q − log p] and the approximation agree.
    """

    arg_constraints: dict = {}
    support = constraints.real

    def __init__(self, batch_shape: torch.Size | tuple = (), validate_args=None):
        super().__init__(torch.Size(batch_shape), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        """The same prior with batch shape ``batch_shape`` (it has no parameters)."""
        return LogUniformImproper(batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """−log|θ| plus the constant that makes the KL vanish as α → ∞."""
        return -torch.log(value.abs()) - _HALF_LOG_2PI_E + _E_LOG_ABS_NORMAL


# Molchanov, Ashukha & Vetrov (2017), "Variational Dropout Sparsifies Deep Neural Networks", eq. 14.
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_RANGE = (-8.0, 8.0)


@register_kl(torch.distributions.Normal, LogUniformImproper)
def _kl_normal_loguniform(q: torch.distributions.Normal, p: LogUniformImproper) -> torch.Tensor:
    # −KL ≈ k1·σ(k2 + k3·log α) − ½·log1p(1/α) − k1, log α clipped to [−8, 8] as in the authors' code.
    # log μ² with a floor, so that μ = 0 gives a finite (zero) gradient instead of ∞·0
    log_mu2 = torch.log(q.loc * q.loc + torch.finfo(q.loc.dtype).tiny)
    return molchanov_kl(2 * torch.log(q.scale) - log_mu2)


def molchanov_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, α μ²) ‖ p(θ) ∝ 1/|θ|) ≈ k1 − k1·σ(k2 + k3·log α) + ½·log1p(1/α) (Molchanov et al.
    2017, eq. 14), log α clipped to [−8, 8]; accurate to about 0.01 nats there, float32 or float64.
    """
    log_alpha = log_alpha.clamp(*LOG_ALPHA_RANGE)
    neg_kl = (
        _K1 * torch.sigmoid(_K2 + _K3 * log_alpha)
        - 0.5 * torch.nn.functional.softplus(-log_alpha)
        - _K1
    )
    return -neg_kl


def hard_concrete_stretch(
    logit_u: torch.Tensor, log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float
) -> torch.Tensor:
    """z = clamp(sigmoid((logit u + log α)/β)·(ζ − γ) + γ, 0, 1): a hard-concrete draw from the
    logistic noise ``logit_u`` (float32 is exact enough: every step is bounded and monotone)."""
    s = torch.sigmoid(torch.add(log_alpha / beta, logit_u, alpha=1 / beta))
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


class HardConcrete(pdist.TorchDistribution):
    """The hard-concrete gate of L0 regularization (Louizos, Welling & Kingma, ICLR 2018).

    s = sigmoid((logit u + log α)/β), z = clamp(s·(ζ − γ) + γ, 0, 1), u ~ U(0, 1).
    P(z ≠ 0) = sigmoid(log α − β·log(−γ/ζ)). The moments have no closed form; E[z] = ∫₀¹ P(z > t) dt
    and E[z²] = ∫₀¹ 2t·P(z > t) dt are integrated by 64-point Gauss–Legendre quadrature of the smooth
    P(z > t) = sigmoid(log α − β·logit((t − γ)/(ζ − γ))), accurate to ~1e-10 and differentiable.
    """

    arg_constraints = {"log_alpha": constraints.real}
    support = constraints.unit_interval
    has_rsample = True
    _nodes, _weights = np.polynomial.legendre.leggauss(64)

    def __init__(self, log_alpha, beta=2 / 3, gamma=-0.1, zeta=1.1, validate_args=None):
        self.log_alpha = log_alpha
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        super().__init__(log_alpha.shape, validate_args=validate_args)

    def rsample(self, sample_shape: _SampleShape = torch.Size()) -> torch.Tensor:
        """Reparameterized draws of z, from u clamped to [1e-6, 1 − 1e-6]."""
        shape = self._extended_shape(sample_shape)
        eps = 1e-6
        u = torch.rand(shape, dtype=self.log_alpha.dtype, device=self.log_alpha.device)
        return hard_concrete_stretch(
            torch.logit(u, eps), self.log_alpha, self.beta, self.gamma, self.zeta
        )

    def prob_nonzero(self) -> torch.Tensor:
        """P(z ≠ 0) = sigmoid(log α − β·log(−γ/ζ)): the expected L0 norm per gate."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def _tail_quadrature(self, power: int) -> torch.Tensor:
        t = torch.as_tensor(
            (self._nodes + 1) / 2, dtype=self.log_alpha.dtype, device=self.log_alpha.device
        )
        w = torch.as_tensor(
            self._weights / 2, dtype=self.log_alpha.dtype, device=self.log_alpha.device
        )
        r = (t - self.gamma) / (self.zeta - self.gamma)  # in (0, 1) for t in [0, 1]
        tail = torch.sigmoid(self.log_alpha.unsqueeze(-1) - self.beta * torch.logit(r))  # (..., 64)
        integrand = tail if power == 1 else 2 * t * tail
        return (integrand * w).sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        """E[z] by quadrature."""
        return self._tail_quadrature(1)

    @property
    def variance(self) -> torch.Tensor:
        """E[z²] − E[z]² by quadrature, clamped at 0."""
        m = self.mean
        return (self._tail_quadrature(2) - m * m).clamp(min=0)

    def test_gate(self) -> torch.Tensor:
        """The paper's deterministic test-time gate clamp(sigmoid(log α)(ζ − γ) + γ, 0, 1)."""
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)
