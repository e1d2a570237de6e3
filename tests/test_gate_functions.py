"""The autograd functions behind the log-normal and variational training steps give the values of
the tensor formulas they replace, bit for bit, and the gradients autograd takes through those
formulas, at float32 and float64 and at the edges of the parameters' ranges."""

import math

import pytest
import torch
from torch.distributions import kl_divergence

from compressdrop.gates import LogNormalGate, VariationalGate
from compressdrop.gates.distributions import (
    LOG_ALPHA_RANGE,
    clamp_probability,
    molchanov_kl,
    truncnorm_icdf_coefs,
    truncnorm_terms,
)

U, B = 12, 9


def _lognormal_reference(g: LogNormalGate, u: torch.Tensor):
    """The draw and KL as plain autograd formulas (the code before the functions)."""
    mu = g.mu.double().clamp(*g.param_range)
    sigma = g.log_sigma.double().clamp(*g.param_range).exp()
    alpha, beta, log_z = truncnorm_terms(mu, sigma, g.low, g.high)
    offset, width, signed_scale = truncnorm_icdf_coefs(sigma, alpha, beta, log_z)
    z = torch.special.ndtri(clamp_probability(torch.addcmul(offset, u, width)))
    theta = torch.addcmul(mu, signed_scale, z).clamp(g.low, g.high).exp().to(g.mu.dtype)
    shift = -0.5 * math.log(2 * math.pi) - log_z

    def x_ratio(x):  # x·φ(x)/Z
        return x * torch.exp(torch.addcmul(shift, x, x, value=-0.5))

    log_sigma = g.log_sigma.double().clamp(*g.param_range)
    entropy = 0.5 * math.log(2 * math.pi * math.e) + log_sigma + log_z
    entropy = entropy + 0.5 * (x_ratio(alpha) - x_ratio(beta))
    kl = (math.log(g.high - g.low) - entropy).to(g.mu.dtype)
    # the registered closed form agrees (it orders the terms differently: rounding only)
    expected = kl_divergence(g.posterior(), g.prior()).to(g.mu.dtype)
    sane = log_z > -1e6  # past that the entropy is a difference of numbers near 1e18
    torch.testing.assert_close(kl[sane], expected[sane], rtol=1e-6, atol=1e-6)
    return theta, kl


def _variational_reference(g: VariationalGate, eps: torch.Tensor):
    mu, ls2 = g.mu, g.log_sigma2
    log_mu2 = torch.log(mu * mu + torch.finfo(mu.dtype).tiny)
    log_sigma2 = torch.minimum(ls2, log_mu2 + LOG_ALPHA_RANGE[1])
    theta = torch.addcmul(mu, torch.exp(0.5 * log_sigma2), eps)
    return theta, molchanov_kl(log_sigma2 - log_mu2)


# μ and σ over the useful range and past both clamps; units near θ = 1 with tiny σ (bounds far
# beyond ±13σ), units whose interval lies above the mean (the reflected quantile)
LOGNORMAL = {
    "mu": [-20.5, -19.0, -8.0, -3.0, -1.0, -0.2, 0.0, 0.01, 0.3, 1.0, 4.0, 6.0],
    "log_sigma": [-3.0, 0.5, -1.0, -6.0, 0.0, -4.0, -5.0, -9.0, -2.0, -0.5, 1.0, -21.0],
}
VARIATIONAL = {
    "mu": [1e-8, -1.0, 1.0, 1e3, 0.5, 1.5, -0.3, 2.0, 0.05, 1.0, 0.9, -2.0],
    "log_sigma2": [-30.0, 20.0, -9.0, 0.0, -1.0, 2.0, -4.0, 0.5, -6.0, 9.0, -0.1, 1.0],
}


def _gate(cls, values, dtype):
    g = cls(U).to(dtype).train()
    with torch.no_grad():
        for name, v in values.items():
            getattr(g, name).copy_(torch.tensor(v, dtype=dtype))
    return g


def _grads(g, outputs, weights):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    return torch.autograd.grad(loss, list(g.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", ["lognormal", "variational"])
def test_functions_match_the_autograd_formulas(family, dtype):
    torch.manual_seed(0)
    if family == "lognormal":
        g = _gate(LogNormalGate, LOGNORMAL, dtype)
        torch.manual_seed(1)
        fast = (g.sample(B), g.kl_per_unit())
        torch.manual_seed(1)
        noise = torch.rand(B, U, dtype=torch.float64)  # what sample() drew
        ref = _lognormal_reference(g, noise)
    else:
        g = _gate(VariationalGate, VARIATIONAL, dtype)
        torch.manual_seed(1)
        fast = (g.sample(B), g.kl_per_unit())
        torch.manual_seed(1)
        ref = _variational_reference(g, torch.randn(B, U, dtype=dtype))
    for f, r in zip(fast, ref, strict=True):
        assert f.dtype == dtype
        torch.testing.assert_close(f, r, rtol=0, atol=0)  # the same values, bit for bit
    weights = (torch.randn(B, U, dtype=dtype), torch.randn(U, dtype=dtype))
    fast_grads, ref_grads = _grads(g, fast, weights), _grads(g, ref, weights)
    for name, a, b in zip(("first", "second"), fast_grads, ref_grads, strict=True):
        assert torch.isfinite(a).all(), name
        # float64 closed forms against autograd's float64 chain: rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-9)
