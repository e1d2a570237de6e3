"""Relaxed-Bernoulli keep gates: concrete dropout and hard-concrete L0 gates."""

from __future__ import annotations

import math

import pyro.distributions as pdist
import torch
from torch import nn
from torch.distributions import Bernoulli, RelaxedBernoulli

from ..errors import InputError
from .base import MIN_VARIANCE, Gate
from .distributions import HardConcrete, _SampleShape, hard_concrete_stretch

__all__ = ["BernoulliFactor", "ConcreteGate", "HardConcreteGate"]


class BernoulliFactor(pdist.TorchDistribution):
    """A Bernoulli keep factor: θ = b / q (``inverted=True``) or θ = b, with b ~ Bernoulli(q).

    Inverted: E θ = 1, Var θ = (1 − q)/q; plain: E θ = q, Var θ = q(1 − q). The SNR √(q/(1 − q)) is
    the same for both.

    ``rsample`` draws the concrete relaxation b̃ ~ RelaxedBernoulli(temperature, q) (Maddison et al.
    2017; Jang et al. 2017), differentiable in q; ``sample`` draws the exact Bernoulli.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self, keep: torch.Tensor, temperature: float, inverted: bool = True, validate_args=None
    ):
        self.keep = keep
        self.temperature = temperature
        self.scale = 1 / keep if inverted else torch.ones_like(keep)
        super().__init__(keep.shape, validate_args=False)

    @property
    def bernoulli(self) -> Bernoulli:
        """The unscaled keep indicator b ~ Bernoulli(q)."""
        return Bernoulli(probs=self.keep)

    @property
    def mean(self) -> torch.Tensor:
        """E θ: 1 inverted, q otherwise."""
        return self.keep * self.scale

    @property
    def variance(self) -> torch.Tensor:
        """Var θ = q(1 − q) · scale²."""
        return self.keep * (1 - self.keep) * self.scale**2

    def sample(self, sample_shape: _SampleShape = torch.Size()) -> torch.Tensor:
        """Exact draws of θ (no gradient)."""
        return self.bernoulli.sample(sample_shape) * self.scale

    def rsample(self, sample_shape: _SampleShape = torch.Size()) -> torch.Tensor:
        """Draws of the relaxed θ, differentiable in q.

        q is clamped to [1e-6, 1 − 1e-6] so that the relaxation's logits stay finite.
        """
        temp = torch.as_tensor(self.temperature, dtype=self.keep.dtype, device=self.keep.device)
        relaxed = RelaxedBernoulli(temp, probs=self.keep.clamp(1e-6, 1 - 1e-6))
        return relaxed.rsample(sample_shape) * self.scale


class ConcreteGate(Gate):
    """Concrete dropout per unit: a relaxed Bernoulli keep-gate with a learned keep probability q.

    Training multiplies each unit by z ~ RelaxedBernoulli(q, temperature) (one z per example and
    unit); eval multiplies by E θ. The regularizer is KL(Bernoulli(q) ‖ Bernoulli(q₀)) per unit;
    with q₀ = ½ it is, up to a constant, Gal et al.'s dropout-rate term −H(p), p = 1 − q.
    SNR = √(q/(1 − q)) in both conventions, so units with q < ½ are pruned at the default
    threshold 1.

    Two deliberate choices for compression, both switchable:

    * ``inverted=False`` (default): θ = z, E θ = q. With Gal's inverted scaling θ = z/q the eval
      factor is 1 for every unit, so a unit kept only 1 % of the time still contributes fully at
      test time and removing it changes the function (measured on LeNet-300-100/digits: 97.8 % →
      31 % after pruning 81 % of the units). Without it, low-q units carry almost nothing at test
      time and removing them is nearly free (96.7 % after pruning 68 %).
    * ``prior_keep=0.01``: a sparsity prior, so units the likelihood does not need drift to q ≈ q₀;
      q₀ = ½ gives Gal's regularizer, which never pushes a unit below SNR 1.

    Args:
        num_units: neurons or channels gated.
        init_drop: initial dropout rate p = 1 − q (Gal et al. use 0.1).
        prior_keep: q₀ of the Bernoulli prior.
        temperature: of the relaxation (0.1 as in the paper).
        inverted: use Gal's inverted scaling θ = z/q.
        noise: ``"example"`` (one θ per example and unit) or ``"batch"`` (one θ per unit and
            mini-batch), see :class:`~compressdrop.gates.Gate`.

    Numerics: the training step runs in the parameters' dtype, float32 at least; the relaxed
    draw z = sigmoid((logit u + logit q)/temperature), logit q clamped to ±logit(1 − 1e-6) and u
    to [ε, 1 − ε] (ε the dtype's machine epsilon), is bounded and monotone in every step, and the
    KL is written with logsigmoid, finite for every logit.

    Reference: Gal, Hron & Kendall, "Concrete Dropout", NeurIPS 2017.
    """

    family = "concrete"
    nonnegative = True
    default_threshold = 1.0

    def __init__(
        self,
        num_units: int,
        init_drop: float = 0.1,
        prior_keep: float = 0.01,
        temperature: float = 0.1,
        inverted: bool = False,
        noise: str = "example",
    ) -> None:
        super().__init__(num_units, noise=noise)
        for name, v in (("init_drop", init_drop), ("prior_keep", prior_keep)):
            if not 0 < v < 1:
                raise InputError(f"{name} must be in (0, 1), got {v}")
        if temperature <= 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        self.prior_keep, self.temperature, self.inverted = (
            float(prior_keep),
            float(temperature),
            bool(inverted),
        )
        self.keep_logit = nn.Parameter(
            torch.full((num_units,), math.log((1 - init_drop) / init_drop))
        )

    _bank_params = ("keep_logit",)  # compressdrop.gates.bank: the KL as it is

    def keep_prob(self) -> torch.Tensor:
        """The learned keep probability q per unit, in float64."""
        return torch.sigmoid(self.keep_logit.double())

    def posterior(self) -> BernoulliFactor:
        """q(θ): the keep factor with the learned q."""
        return BernoulliFactor(self.keep_prob(), self.temperature, self.inverted)

    def prior(self) -> BernoulliFactor:
        """p(θ): the keep factor with q₀ = ``prior_keep``."""
        q0 = torch.full_like(self.keep_prob(), self.prior_keep)
        return BernoulliFactor(q0, self.temperature, self.inverted)

    def _logit(self) -> torch.Tensor:
        """logit q in the parameters' dtype, float32 at least."""
        return self.keep_logit.to(torch.promote_types(self.keep_logit.dtype, torch.float32))

    def sample(self, batch: int) -> torch.Tensor:
        """Relaxed draws θ for ``batch`` examples, differentiable in q; shape ``(batch, U)``."""
        logit = self._logit()
        eps = torch.finfo(logit.dtype).eps
        bound = math.log((1 - 1e-6) / 1e-6)  # q in [1e-6, 1 − 1e-6], as BernoulliFactor.rsample
        u = torch.rand(batch, self.num_units, dtype=logit.dtype, device=logit.device)
        scaled = torch.add(logit.clamp(-bound, bound), torch.logit(u, eps)) / self.temperature
        z = torch.sigmoid(scaled).clamp(eps, 1 - eps)  # (B, U)
        return self._out(z / torch.sigmoid(logit) if self.inverted else z)

    def kl_per_unit(self) -> torch.Tensor:
        """KL(Bernoulli(q) ‖ Bernoulli(q₀)) per unit, finite as q → 0 or 1."""
        logit, q0 = self._logit(), self.prior_keep
        # KL(Bern(q) ‖ Bern(q0)) written with logsigmoid so it stays finite as q → 0 or 1.
        lq, l1q = nn.functional.logsigmoid(logit), nn.functional.logsigmoid(-logit)
        q = lq.exp()
        kl = q * (lq - math.log(q0)) + (1 - q) * (l1q - math.log1p(-q0))
        return self._out(kl)


class HardConcreteGate(Gate):
    """Hard-concrete L0 gate: z = clamp(sigmoid((logit u + log α)/β)(ζ − γ) + γ, 0, 1).

    The regularizer is not a KL but plays its part: the expected L0 norm, λ·cost_u·P(z_u ≠ 0) with
    P(z ≠ 0) = sigmoid(log α − β·log(−γ/ζ)); with ``unit_cost`` = parameters of the unit it is the
    paper's expected number of non-zero parameters. E[z] and std[z] come from quadrature (see
    :class:`HardConcrete`); eval multiplies by E[z] like every gate (``test_gate()`` gives the paper's
    deterministic estimator). β = 2/3, γ = −0.1, ζ = 1.1. The default threshold is the SNR at
    log α = −log 11, where the paper's test gate becomes exactly 0.

    Args:
        num_units: neurons or channels gated.
        init_drop: initial drop rate; log α starts at logit(1 − init_drop) (+ N(0, 0.01²)).
        penalty: λ, the cost of one expected non-zero unit, in the units of the ELBO's KL (nats).
            The default 10 is of the order of a log-normal gate's KL at initialization (≈ 7 nats),
            so that β = 1 compresses comparably across families.
        noise: ``"example"`` (one z per example and unit) or ``"batch"`` (one z per unit and
            mini-batch), see :class:`~compressdrop.gates.Gate`.

    Numerics: draws and the penalty run in the parameters' dtype, float32 at least (every step is
    bounded: log α is clamped to [−10, 10], u to [1e-6, 1 − 1e-6]); E[z] and std[z] come from the
    float64 quadrature.

    Reference: Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0
    Regularization", ICLR 2018.
    """

    family = "hardconcrete"
    nonnegative = True
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    log_alpha_range = (-10.0, 10.0)

    def __init__(
        self,
        num_units: int,
        init_drop: float = 0.5,
        penalty: float = 10.0,
        noise: str = "example",
    ) -> None:
        super().__init__(num_units, noise=noise)
        if not 0 < init_drop < 1:
            raise InputError(f"init_drop must be in (0, 1), got {init_drop}")
        if penalty <= 0:
            raise InputError(f"penalty must be > 0, got {penalty}")
        self.penalty = float(penalty)
        init = math.log((1 - init_drop) / init_drop)
        self.log_alpha = nn.Parameter(init + 0.01 * torch.randn(num_units))

    def posterior(self) -> HardConcrete:
        """q(z): the hard-concrete distribution with log α clamped to [−10, 10]."""
        la = self.log_alpha.double().clamp(*self.log_alpha_range)
        return HardConcrete(la, self.beta, self.gamma, self.zeta)

    _bank_params = ("log_alpha",)  # compressdrop.gates.bank: the KL as it is

    def _log_alpha(self) -> torch.Tensor:
        """log α clamped to [−10, 10], in the parameters' dtype (float32 at least)."""
        la = self.log_alpha.to(torch.promote_types(self.log_alpha.dtype, torch.float32))
        return la.clamp(*self.log_alpha_range)

    def sample(self, batch: int) -> torch.Tensor:
        """Hard-concrete draws z for ``batch`` examples, reparameterized; shape ``(batch, U)``."""
        la = self._log_alpha()
        u = torch.rand(batch, self.num_units, dtype=la.dtype, device=la.device)
        z = hard_concrete_stretch(torch.logit(u, 1e-6), la, self.beta, self.gamma, self.zeta)
        return self._out(z)

    def kl_per_unit(self) -> torch.Tensor:
        """The L0 penalty λ·P(z_u ≠ 0) per unit, in place of a KL."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return self._out(self.penalty * torch.sigmoid(self._log_alpha() - shift))

    def expected(self) -> torch.Tensor:
        """E[z] per unit, by quadrature (:class:`HardConcrete`)."""
        return self._out(self._quadrature()[0])

    def snr(self) -> torch.Tensor:
        """E[z] / std[z] per unit, by quadrature, the variance floored at 1e-24."""
        mean, var = self._quadrature()
        return self._out(mean.abs() / var.clamp(min=MIN_VARIANCE).sqrt())

    def _quadrature(self) -> tuple[torch.Tensor, torch.Tensor]:
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            q = self.posterior()
            return q.mean, q.variance

        return self._memo("quadrature", compute)

    def test_gate(self) -> torch.Tensor:
        """The paper's deterministic test-time gate per unit (:meth:`HardConcrete.test_gate`)."""
        return self._out(self.posterior().test_gate())


def _snr_at_paper_cutoff() -> float:
    """The SNR at log α = −log 11 (:class:`HardConcreteGate`'s default threshold)."""
    q = HardConcrete(torch.tensor([-math.log(11.0)], dtype=torch.float64))
    return float(q.mean / q.variance.sqrt())


# :func:`_snr_at_paper_cutoff`'s value, written out (tests/test_gates.py checks it): importing
# compressdrop runs no torch operation. One starts torch's OpenMP threads, and a process forked
# after them (multiprocessing's default start on Linux) waited forever at its first parallel
# operation (tests/prewarmed.py's children did, at two threads)
HardConcreteGate.default_threshold = 0.4403528269837837
