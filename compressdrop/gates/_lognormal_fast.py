"""The log-normal gate's training step as two autograd functions with closed-form gradients.

The draw log θ = μ + σ·w, w = Φ⁻¹(Φ(α) + u·Z) a standardized truncated normal, and the KL
log(b − a) − H[TN(μ, σ², a, b)] are written as :class:`torch.autograd.Function` s. Their forward
passes run on per-unit terms computed once per step without a graph; their backward passes are
the derivatives below, so autograd records two nodes a gate instead of the dozens of small
float64 operations that the closed forms take (on a LeNet-5 step that graph cost more than the
draws themselves).

Draw (implicit reparameterization of the inverse CDF; u' the CDF position of w in [α, β]):

    ∂X/∂μ = 1 − [(1 − u')·φ(α) + u'·φ(β)] / φ(w)
    ∂X/∂σ = w − [(1 − u')·α·φ(α) + u'·β·φ(β)] / φ(w)

each ratio φ(c)/φ(w) evaluated as e^{w²/2}·e^{−c²/2} (per unit, then summed over the batch),
finite because |w| ≤ 37.5 (the clamped probability bounds it). Entropy H = log(√(2πe)·σ·Z) + (α·A − β·B)/2, A = φ(α)/Z, B = φ(β)/Z:

    ∂H/∂μ = (A − B)/σ + [(α² − 1)·A − (β² − 1)·B]/(2σ) − T·(A − B)/σ
    ∂H/∂σ = 1/σ + (α·A − β·B)/σ + [β·(1 − β²)·B − α·(1 − α²)·A]/(2σ) − T·(α·A − β·B)/σ

with T = (α·A − β·B)/2. ``tests/test_gate_functions.py`` checks both against autograd through
the tensor formulas they replace (values bit for bit), ``tests/test_gates.py`` against finite
differences.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .distributions import clamp_probability, truncnorm_icdf_coefs, truncnorm_terms

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


class StepTerms(NamedTuple):
    """Per-unit float64 terms of one step, without a graph (see :func:`step_terms`)."""

    mu: torch.Tensor
    sigma: torch.Tensor
    log_sigma: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    log_z: torch.Tensor
    offset: torch.Tensor
    width: torch.Tensor
    signed_scale: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    sign: torch.Tensor
    mu_grad: torch.Tensor
    sigma_grad: torch.Tensor


@torch.no_grad()
def step_terms(
    mu_param: torch.Tensor,
    log_sigma_param: torch.Tensor,
    low: float,
    high: float,
    param_range: tuple[float, float],
) -> StepTerms:
    """The per-unit terms that the draw, the KL and their gradients share.

    ``mu_grad`` and ``sigma_grad`` are the factors that carry a gradient with respect to the
    clamped μ and σ back to the raw parameters (0 where the clamp is active, σ for log σ).
    """
    raw_mu, raw_ls = mu_param.double(), log_sigma_param.double()
    mu, log_sigma = raw_mu.clamp(*param_range), raw_ls.clamp(*param_range)
    sigma = log_sigma.exp()
    alpha, beta, log_z = truncnorm_terms(mu, sigma, low, high)
    offset, width, signed_scale = truncnorm_icdf_coefs(sigma, alpha, beta, log_z)
    # the quantile is taken in the reflected lower tail when the interval lies above the mean
    upper = alpha > 0
    lo, hi = torch.where(upper, beta, alpha), torch.where(upper, alpha, beta)
    ones = torch.ones_like(mu)
    inside = (raw_mu >= param_range[0]) & (raw_mu <= param_range[1])
    ls_inside = (raw_ls >= param_range[0]) & (raw_ls <= param_range[1])
    return StepTerms(
        mu=mu, sigma=sigma, log_sigma=log_sigma, alpha=alpha, beta=beta, log_z=log_z,
        offset=offset, width=width, signed_scale=signed_scale, lo=lo, hi=hi,
        sign=torch.where(upper, -ones, ones), mu_grad=inside.double(),
        sigma_grad=sigma * ls_inside.double(),
    )  # fmt: skip


class LogNormalDraw(torch.autograd.Function):
    """θ = exp(clamp(μ + σ·w, low, high)) for uniforms ``u`` (B, U), with the implicit gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        mu_param: torch.Tensor,
        log_sigma_param: torch.Tensor,
        u: torch.Tensor,
        mu: torch.Tensor,
        offset: torch.Tensor,
        width: torch.Tensor,
        signed_scale: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        sign: torch.Tensor,
        mu_grad: torch.Tensor,
        sigma_grad: torch.Tensor,
        low: float,
        high: float,
    ) -> torch.Tensor:
        z = torch.special.ndtri(clamp_probability(torch.addcmul(offset, u, width)))
        log_theta = torch.addcmul(mu, signed_scale, z)
        # a draw that rounding (or a probability pinned at its clamp) puts past a bound is
        # clamped there and passes no gradient, as torch.clamp does
        inside = (log_theta >= low).logical_and_(log_theta <= high)
        theta = log_theta.clamp_(low, high).exp_().to(mu_param.dtype)
        ctx.save_for_backward(u, z, theta, inside, lo, hi, sign, mu_grad, sigma_grad)
        return theta

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂L/∂μ and ∂L/∂log σ (raw parameters) from the gradient of θ (the module docstring)."""
        u, z, theta, inside, lo, hi, sign, mu_grad, sigma_grad = ctx.saved_tensors
        g = (grad * theta).double().mul_(inside)  # ∂L/∂X, X = log θ
        # Σ_b g·(1 − u)·φ(lo)/φ(z) and Σ_b g·u·φ(hi)/φ(z), with φ(c)/φ(z) = e^{z²/2}·e^{−c²/2}:
        # in the reflected case z = −w and the roles of the bounds and of u and 1 − u swap
        # together, so one form serves both. |z| ≤ 37.5 keeps e^{z²/2} finite; the cap at e^600
        # only touches draws of probability below 1e-260.
        v = torch.square(z).mul_(0.5).clamp_(max=600.0).exp_().mul_(g)
        v_hi = torch.linalg.vecdot(v, u, dim=0)
        g_lo = (v.sum(0) - v_hi) * torch.exp(-0.5 * lo * lo)
        g_hi = v_hi * torch.exp(-0.5 * hi * hi)
        g_mu = g.sum(0) - g_lo - g_hi
        g_sigma = sign * torch.linalg.vecdot(g, z, dim=0) - lo * g_lo - hi * g_hi
        dtype = grad.dtype
        return (g_mu * mu_grad).to(dtype), (g_sigma * sigma_grad).to(dtype), *[None] * 12


class LogNormalKL(torch.autograd.Function):
    """KL(q ‖ p) = log(b − a) − H[TN(μ, σ², a, b)] per unit, with the closed-form gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        mu_param: torch.Tensor,
        log_sigma_param: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        sigma: torch.Tensor,
        log_sigma: torch.Tensor,
        log_z: torch.Tensor,
        mu_grad: torch.Tensor,
        sigma_grad: torch.Tensor,
        log_width: float,
    ) -> torch.Tensor:
        shift = -_LOG_SQRT_2PI - log_z  # log φ(x)/Z = shift − x²/2
        a_ratio = torch.exp(torch.addcmul(shift, alpha, alpha, value=-0.5))  # φ(α)/Z
        b_ratio = torch.exp(torch.addcmul(shift, beta, beta, value=-0.5))  # φ(β)/Z
        half_t = 0.5 * (alpha * a_ratio - beta * b_ratio)
        entropy = _HALF_LOG_2PI_E + log_sigma + log_z + half_t
        ctx.save_for_backward(alpha, beta, sigma, a_ratio, b_ratio, half_t, mu_grad, sigma_grad)
        return (log_width - entropy).to(mu_param.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂L/∂μ and ∂L/∂log σ (raw parameters) from the gradient of the KL per unit."""
        alpha, beta, sigma, a, b, half_t, mu_grad, sigma_grad = ctx.saved_tensors
        d_log_z_mu, d_log_z_sigma = a - b, alpha * a - beta * b  # both ·1/σ
        d_t_mu = 0.5 * ((alpha * alpha - 1) * a - (beta * beta - 1) * b) - half_t * d_log_z_mu
        d_t_sigma = (
            0.5 * (beta * (1 - beta * beta) * b - alpha * (1 - alpha * alpha) * a)
            - half_t * d_log_z_sigma
        )
        g = -grad.double() / sigma  # the KL is −H
        g_mu = g * (d_log_z_mu + d_t_mu) * mu_grad
        g_sigma = g * (1 + d_log_z_sigma + d_t_sigma) * sigma_grad
        return g_mu.to(grad.dtype), g_sigma.to(grad.dtype), *[None] * 8
