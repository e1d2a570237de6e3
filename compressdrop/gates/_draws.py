"""The variational gate's training draw and KL as autograd functions with closed-form gradients.

The draw θ(μ, log σ², ε) is elementwise over (batch, units) with per-unit parameters, so its
gradient is a reduction over the batch of the incoming gradient times ∂θ/∂param, which the
forward pass already holds; the KL is a per-unit function of log α. Written as
:class:`torch.autograd.Function` s they are two nodes of the graph instead of about twenty, which
cuts the gates' cost per step by a third (LeNet-5's three gates, forward and backward, one
thread: 1.6–1.8 → 1.1 ms, ``benchmarks/bench_training_cost.py --gate-math``). The values are
those of the tensor code they replace, bit for bit; ``tests/test_gate_functions.py`` checks the
gradients against autograd through that code, ``tests/test_gates.py`` against finite differences.

The same rewrite of the concrete and hard-concrete draws was measured slower (0.94 → 1.03 ms):
their graphs are five or six cheap nodes, less than a Python-level function costs to call.
"""

from __future__ import annotations

from typing import Any

import torch

from .distributions import _K1, _K2, _K3, LOG_ALPHA_RANGE, molchanov_kl


def _capped(
    mu: torch.Tensor, log_sigma2: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """μ² (floored off 0), log μ² and whether the cap log σ² ≤ log μ² + cap is active."""
    mu2 = mu * mu + torch.finfo(mu.dtype).tiny
    log_mu2 = torch.log(mu2)
    return mu2, log_mu2, log_sigma2 > log_mu2 + cap


class NormalDraw(torch.autograd.Function):
    """θ = μ + σ·ε with σ = exp(½·min(log σ², log μ² + cap)), for given ε (batch, units).

    ∂θ/∂μ = 1 + ε·∂σ/∂μ and ∂θ/∂log σ² = ε·∂σ/∂log σ², where σ depends on μ only where the cap
    is active (σ = |μ|·e^{cap/2}) and on log σ² only where it is not.
    """

    @staticmethod
    def forward(
        ctx: Any, mu: torch.Tensor, log_sigma2: torch.Tensor, eps: torch.Tensor, cap: float
    ) -> torch.Tensor:
        mu2, log_mu2, capped = _capped(mu, log_sigma2, cap)
        sigma = torch.exp(0.5 * torch.minimum(log_sigma2, log_mu2 + cap))
        ctx.save_for_backward(eps, torch.where(capped, sigma * mu / mu2, 0.0),
                              torch.where(capped, 0.0, 0.5 * sigma))  # fmt: skip
        return torch.addcmul(mu, sigma, eps)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂L/∂μ and ∂L/∂log σ² from the gradient of θ (the class docstring)."""
        eps, d_sigma_mu, d_sigma_ls2 = ctx.saved_tensors
        g_eps = torch.linalg.vecdot(grad, eps, dim=0)
        return grad.sum(0) + d_sigma_mu * g_eps, d_sigma_ls2 * g_eps, None, None


class MolchanovKL(torch.autograd.Function):
    """Molchanov's KL approximation per unit from μ and log σ² (log α = min(log σ² − log μ², cap)).

    d KL/d log α = −(k1·k3·s(1 − s) + ½·sigmoid(−log α)), s = sigmoid(k2 + k3·log α), inside the
    clip range of log α and 0 outside; log α moves with log σ² (+1) and μ (−2μ/μ²) where the cap
    is not active, and not at all where it is.
    """

    @staticmethod
    def forward(ctx: Any, mu: torch.Tensor, log_sigma2: torch.Tensor, cap: float) -> torch.Tensor:
        mu2, log_mu2, capped = _capped(mu, log_sigma2, cap)
        log_alpha = torch.minimum(log_sigma2, log_mu2 + cap) - log_mu2
        free = ~capped & (log_alpha >= LOG_ALPHA_RANGE[0])
        free &= log_alpha <= LOG_ALPHA_RANGE[1]
        la = log_alpha.clamp(*LOG_ALPHA_RANGE)
        s = torch.sigmoid(_K2 + _K3 * la)
        slope = -(_K1 * _K3 * s * (1 - s) + 0.5 * torch.sigmoid(-la))
        slope = torch.where(free, slope, 0.0)
        ctx.save_for_backward(slope, -2 * mu / mu2)
        return molchanov_kl(log_alpha)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂L/∂μ and ∂L/∂log σ² from the gradient of the KL per unit."""
        slope, d_la_mu = ctx.saved_tensors
        g = grad * slope
        return g * d_la_mu, g, None
