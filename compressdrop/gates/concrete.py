"""Relaxed-Bernoulli keep gates: concrete dropout and hard-concrete L0 gates."""

from __future__ import annotations

import math

import torch
from torch import nn
import pyro.distributions as pdist
from torch.distributions import Bernoulli, RelaxedBernoulli

from .base import Gate
from .distributions import HardConcrete

__all__ = ["ConcreteGate", "HardConcreteGate", "InvertedBernoulli"]


class InvertedBernoulli(pdist.TorchDistribution):
    """θ = b / q with b ~ Bernoulli(q): inverted dropout's factor. E θ = 1, Var θ = (1 − q)/q.

    ``rsample`` draws the concrete relaxation b̃ ~ RelaxedBernoulli(temperature, q) (Maddison et al.
    2017; Jang et al. 2017), differentiable in q; ``sample`` draws the exact Bernoulli.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, keep: torch.Tensor, temperature: float, validate_args=None):
        self.keep = keep
        self.temperature = temperature
        super().__init__(keep.shape, validate_args=False)

    @property
    def bernoulli(self) -> Bernoulli:
        return Bernoulli(probs=self.keep)

    @property
    def mean(self) -> torch.Tensor:
        return torch.ones_like(self.keep)

    @property
    def variance(self) -> torch.Tensor:
        return (1 - self.keep) / self.keep

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.bernoulli.sample(sample_shape) / self.keep

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        temp = torch.as_tensor(self.temperature, dtype=self.keep.dtype, device=self.keep.device)
        relaxed = RelaxedBernoulli(temp, probs=self.keep.clamp(1e-6, 1 - 1e-6))
        return relaxed.rsample(sample_shape) / self.keep


class ConcreteGate(Gate):
    """Concrete dropout per unit: θ = z/q, z ~ RelaxedBernoulli(q) with a learned keep probability.

    The regularizer is KL(Bernoulli(q) ‖ Bernoulli(q₀)) per unit. With q₀ = ½ it equals, up to a
    constant, Gal et al.'s dropout-rate term −H(p) (p = 1 − q); a smaller q₀ is a sparsity prior that
    lets units the likelihood does not need drift to high dropout rates, where SNR = √(q/(1 − q))
    falls below 1 (q < ½) and they are pruned. E θ = 1 (inverted scaling), so kept units fold nothing.

    Args:
        num_units: neurons or channels gated.
        init_drop: initial dropout rate p (Gal et al. use 0.1).
        prior_keep: q₀ of the Bernoulli prior.
        temperature: of the relaxation (0.1 as in the paper).

    Reference: Gal, Hron & Kendall, "Concrete Dropout", NeurIPS 2017.
    """

    family = "concrete"
    default_threshold = 1.0

    def __init__(
        self,
        num_units: int,
        init_drop: float = 0.1,
        prior_keep: float = 0.1,
        temperature: float = 0.1,
    ) -> None:
        super().__init__(num_units)
        for name, v in (("init_drop", init_drop), ("prior_keep", prior_keep)):
            if not 0 < v < 1:
                raise ValueError(f"{name} must be in (0, 1), got {v}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.prior_keep, self.temperature = float(prior_keep), float(temperature)
        self.keep_logit = nn.Parameter(torch.full((num_units,), math.log((1 - init_drop) / init_drop)))

    def keep_prob(self) -> torch.Tensor:
        return torch.sigmoid(self.keep_logit.double())

    def posterior(self) -> InvertedBernoulli:
        return InvertedBernoulli(self.keep_prob(), self.temperature)

    def prior(self) -> InvertedBernoulli:
        q0 = torch.full_like(self.keep_prob(), self.prior_keep)
        return InvertedBernoulli(q0, self.temperature)

    def kl_per_unit(self) -> torch.Tensor:
        q, q0 = self.keep_prob(), self.prior_keep
        # KL(Bern(q) ‖ Bern(q0)) written with logsigmoid so it stays finite as q → 0 or 1.
        lq, l1q = nn.functional.logsigmoid(self.keep_logit.double()), nn.functional.logsigmoid(-self.keep_logit.double())
        kl = q * (lq - math.log(q0)) + (1 - q) * (l1q - math.log1p(-q0))
        return self._out(kl)


class HardConcreteGate(Gate):
    """Hard-concrete L0 gate: z = clamp(sigmoid((logit u + log α)/β)(ζ − γ) + γ, 0, 1).

    The regularizer is not a KL but plays its part: the expected L0 norm, cost_u · P(z_u ≠ 0) with
    P(z ≠ 0) = sigmoid(log α − β·log(−γ/ζ)); with ``unit_cost`` = parameters of the unit it is the
    paper's expected number of non-zero parameters. E[z] and std[z] come from quadrature (see
    :class:`HardConcrete`); eval multiplies by E[z] like every gate (``test_gate()`` gives the paper's
    deterministic estimator). β = 2/3, γ = −0.1, ζ = 1.1. The default threshold is the SNR at
    log α = −log 11, where the paper's test gate becomes exactly 0.

    Args:
        num_units: neurons or channels gated.
        init_drop: initial drop rate; log α starts at logit(1 − init_drop) (+ N(0, 0.01²)).

    Reference: Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0
    Regularization", ICLR 2018.
    """

    family = "hardconcrete"
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    log_alpha_range = (-10.0, 10.0)

    def __init__(self, num_units: int, init_drop: float = 0.5) -> None:
        super().__init__(num_units)
        if not 0 < init_drop < 1:
            raise ValueError(f"init_drop must be in (0, 1), got {init_drop}")
        init = math.log((1 - init_drop) / init_drop)
        self.log_alpha = nn.Parameter(init + 0.01 * torch.randn(num_units))

    def posterior(self) -> HardConcrete:
        la = self.log_alpha.double().clamp(*self.log_alpha_range)
        return HardConcrete(la, self.beta, self.gamma, self.zeta)

    def kl_per_unit(self) -> torch.Tensor:
        return self._out(self.posterior().prob_nonzero())

    def test_gate(self) -> torch.Tensor:
        return self._out(self.posterior().test_gate())


def _snr_at_paper_cutoff() -> float:
    q = HardConcrete(torch.tensor([-math.log(11.0)], dtype=torch.float64))
    return float(q.mean / q.variance.sqrt())


HardConcreteGate.default_threshold = _snr_at_paper_cutoff()
