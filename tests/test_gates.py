"""Contract suite over every gate family (neuron and channel granularity), and the probability
checks: closed-form KL, E[θ] and SNR against Monte-Carlo estimates."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, kl_divergence

from compressdrop.errors import InputError
from compressdrop.gates import (
    ConcreteGate,
    HardConcreteGate,
    LogNormalGate,
    VariationalGate,
    noise_shard,
)
from compressdrop.gates.distributions import log_ndtr_diff

UNITS = 6
SHAPES = {"neuron": ((5, UNITS), -1), "channel": ((5, UNITS, 4, 3), 1)}


def randomize_(gate: nn.Module) -> nn.Module:
    """Spread the gate's parameters over their useful ranges (units differ from each other)."""
    with torch.no_grad():
        if isinstance(gate, LogNormalGate):
            gate.mu.copy_(torch.linspace(-8, 1, gate.num_units))
            gate.log_sigma.copy_(torch.linspace(-4, 0.5, gate.num_units))
        elif isinstance(gate, VariationalGate):
            gate.mu.copy_(torch.linspace(0.3, 1.5, gate.num_units))
            gate.log_sigma2.copy_(torch.linspace(-6, 2, gate.num_units))
        elif isinstance(gate, ConcreteGate):
            gate.keep_logit.copy_(torch.linspace(-3, 4, gate.num_units))
        elif isinstance(gate, HardConcreteGate):
            gate.log_alpha.copy_(torch.linspace(-4, 5, gate.num_units))
    return gate


@pytest.fixture(params=list(SHAPES))
def granularity(request):
    return request.param


def test_forward_shapes_train_and_eval(gate_cls, granularity):
    shape, dim = SHAPES[granularity]
    g = randomize_(gate_cls(UNITS))
    x = torch.randn(shape)
    assert g.train()(x, dim=dim).shape == x.shape
    assert g.eval()(x, dim=dim).shape == x.shape
    with pytest.raises(ValueError, match="units"):
        g(torch.randn(5, UNITS + 1), dim=1)


def test_eval_is_deterministic_and_multiplies_by_expectation(gate_cls, granularity):
    shape, dim = SHAPES[granularity]
    g = randomize_(gate_cls(UNITS)).eval()
    x = torch.randn(shape)
    y1, y2 = g(x, dim=dim), g(x, dim=dim)
    assert torch.equal(y1, y2)
    view = [1] * x.dim()
    view[dim] = UNITS
    torch.testing.assert_close(y1, x * g.expected().detach().reshape(view))


def test_training_noise_is_per_example_and_unit(gate_cls, granularity):
    shape, dim = SHAPES[granularity]
    g = randomize_(gate_cls(UNITS)).train()
    x = torch.ones(shape)
    y = g(x, dim=dim)
    # broadcast over every dim but the batch and the unit dim: one factor per (example, unit)
    theta = y.movedim(dim, 1).reshape(shape[0], UNITS, -1)
    assert torch.allclose(theta, theta[..., :1].expand_as(theta))
    assert not torch.allclose(theta[0], theta[1])


def _theta(gate: nn.Module, batch: int) -> torch.Tensor:
    """One training draw of θ, shape (batch, UNITS), read off a forward pass on ones."""
    return gate.train()(torch.ones(batch, UNITS), dim=1)


def test_noise_shard_draws_this_ranks_rows_of_the_global_batch(gate_cls):
    g = randomize_(gate_cls(UNITS))
    torch.manual_seed(1)
    whole = _theta(g, 6)
    for rank in range(3):
        torch.manual_seed(1)
        with noise_shard(rank, 3, 6):
            torch.testing.assert_close(_theta(g, 2), whole[rank::3])


def test_noise_shard_sets_nests_and_restores_the_shard():
    g = LogNormalGate(UNITS)
    _theta(g, 5)  # no shard: any batch size
    with noise_shard(0, 2, 8):
        assert _theta(g, 4).shape == (4, UNITS)
        with pytest.raises(InputError, match="rank 0 of 2 got 5 examples"):
            _theta(g, 5)
        with noise_shard(1, 3, 7):  # rows 1 and 4 of 7
            assert _theta(g, 2).shape == (2, UNITS)
            with pytest.raises(InputError, match="rank 1 of 3"):
                _theta(g, 4)
        assert _theta(g, 4).shape == (4, UNITS)  # the outer shard is back
    _theta(g, 5)


def test_noise_shard_is_restored_when_the_body_raises():
    g = LogNormalGate(UNITS)
    with pytest.raises(RuntimeError, match="boom"), noise_shard(0, 2, 8):
        raise RuntimeError("boom")
    assert _theta(g, 5).shape == (5, UNITS)
    with noise_shard(0, 2, 8):
        with pytest.raises(RuntimeError, match="boom"), noise_shard(1, 2, 6):
            raise RuntimeError("boom")
        assert _theta(g, 4).shape == (4, UNITS)


@pytest.mark.parametrize("rank, world, global_batch", [(2, 2, 8), (-1, 2, 8), (0, 0, 8), (0, 1, 0)])
def test_noise_shard_rejects_an_impossible_shard(rank, world, global_batch):
    with pytest.raises(InputError, match="noise_shard"), noise_shard(rank, world, global_batch):
        pass


def test_kl_is_finite_and_non_negative(gate_cls):
    for g in (gate_cls(UNITS), randomize_(gate_cls(UNITS))):
        kl = g.kl()
        assert kl.dim() == 0 and torch.isfinite(kl)
        assert (g.kl_per_unit() >= -1e-6).all()


def test_masks_shrink_as_threshold_rises(gate_cls):
    g = randomize_(gate_cls(UNITS))
    snr = g.snr().detach()
    counts = [int(g.mask(t).sum()) for t in torch.linspace(0, float(snr.max()) * 1.1, 25)]
    assert counts[0] == UNITS and counts[-1] == 0
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert g.mask().dtype == torch.bool
    assert torch.equal(g.mask(), snr >= g.default_threshold)


def test_gradients_reach_every_parameter(gate_cls, granularity):
    shape, dim = SHAPES[granularity]
    g = randomize_(gate_cls(UNITS)).train()
    x = torch.randn(shape)
    loss = (g(x, dim=dim) ** 2).sum() + g.kl()
    loss.backward()
    for name, p in g.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert (p.grad != 0).any(), name


class _Probe(nn.Module):
    def __init__(self, gate, method):
        super().__init__()
        self.gate, self.method = gate, method

    def forward(self, x=None, dim=1):
        if self.method == "forward":
            torch.manual_seed(1)  # the same noise at every gradcheck evaluation
            return self.gate(x, dim=dim)
        return getattr(self.gate, self.method)()


@pytest.mark.parametrize("method", ["kl_per_unit", "expected", "snr", "forward"])
def test_gradcheck_float64(gate_cls, method):
    g = randomize_(gate_cls(UNITS)).double().train()
    if isinstance(g, ConcreteGate) and method == "expected":
        pytest.skip("E[θ] = 1 for inverted concrete dropout: no parameter dependence")
    probe = _Probe(g, method)
    names = [n for n, _ in probe.named_parameters()]
    x = torch.randn(3, UNITS, 2, dtype=torch.float64)

    def f(*params):
        return torch.func.functional_call(probe, dict(zip(names, params)), (x,))

    params = tuple(p.detach().clone().requires_grad_() for _, p in probe.named_parameters())
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5, rtol=1e-3)


EDGES = {
    LogNormalGate: {
        "mu": [-20.0, -19.99, 0.0, 4.99, 5.0, 30.0],
        "log_sigma": [-20.0, 5.0, -5.0, 5.0, -20.0, 10.0],
    },
    VariationalGate: {
        "mu": [1e-8, -1.0, 1.0, 1e3, 0.0, 1.0],
        "log_sigma2": [-30.0, 20.0, -9.0, 0.0, 5.0, 40.0],
    },
    ConcreteGate: {"keep_logit": [-40.0, -10.0, 0.0, 10.0, 40.0, 3.0]},
    HardConcreteGate: {"log_alpha": [-30.0, -10.0, 0.0, 10.0, 30.0, -2.4]},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_values_and_gradients_finite_at_range_edges(gate_cls, dtype):
    g = gate_cls(UNITS).to(dtype).train()
    with torch.no_grad():
        for name, values in EDGES[gate_cls].items():
            getattr(g, name).copy_(torch.tensor(values, dtype=dtype))
    x = torch.randn(64, UNITS, dtype=dtype)
    outputs = {"kl": g.kl(), "snr": g.snr(), "expected": g.expected(), "forward": g(x)}
    for key, value in outputs.items():
        assert torch.isfinite(value).all(), key
    total = (
        outputs["kl"]
        + outputs["snr"].clamp(max=1e6).sum()
        + outputs["expected"].sum()
        + outputs["forward"].sum()
    )
    total.backward()
    for name, p in g.named_parameters():
        assert torch.isfinite(p.grad).all(), name


# --- probability: closed forms against Monte-Carlo --------------------------------------------------

N_MC = 400_000


def _assert_within(estimate, stderr, exact, k=5.0, slack=0.0, what=""):
    bound = k * stderr + slack
    assert ((estimate - exact).abs() <= bound).all(), (
        f"{what}: MC {estimate} vs closed form {exact}"
    )


def test_moments_match_monte_carlo(gate_cls):
    g = randomize_(gate_cls(UNITS))
    q = g.posterior()
    with torch.no_grad():
        s = q.sample((N_MC,)) if isinstance(g, ConcreteGate) else q.rsample((N_MC,))
        mean, std = g.expected().double(), (g.expected() / g.snr()).double()
    _assert_within(s.mean(0), s.std(0) / math.sqrt(N_MC), mean, what="E[θ]")
    # std of the sample std ≈ sqrt(Var[(θ−μ)²]) / (2σ sqrt(n))
    c = (s - s.mean(0)) ** 2
    _assert_within(s.std(0), c.std(0) / (2 * s.std(0) * math.sqrt(N_MC)), std, what="std[θ]")


def test_lognormal_kl_matches_monte_carlo():
    g = randomize_(LogNormalGate(UNITS))
    q, p = g.posterior(), g.prior()
    with torch.no_grad():
        s = q.rsample((N_MC,))
        lr = q.log_prob(s) - p.log_prob(s)
        _assert_within(lr.mean(0), lr.std(0) / math.sqrt(N_MC), kl_divergence(q, p), what="KL")


def test_variational_kl_matches_monte_carlo_within_approximation_error():
    # Molchanov's sigmoid fit is accurate to ~0.01 nats inside log α ∈ [−8, 8].
    g = randomize_(VariationalGate(UNITS))
    q, p = g.posterior(), g.prior()
    with torch.no_grad():
        s = q.rsample((N_MC,))
        lr = q.log_prob(s) - p.log_prob(s)
        _assert_within(
            lr.mean(0), lr.std(0) / math.sqrt(N_MC), kl_divergence(q, p), slack=0.015, what="KL"
        )


def test_concrete_kl_is_bernoulli_kl_and_relaxation_is_close():
    g = randomize_(ConcreteGate(UNITS, prior_keep=0.2))
    q = g.keep_prob()
    with torch.no_grad():
        b = Bernoulli(probs=q).sample((N_MC,))
        lr = Bernoulli(probs=q).log_prob(b) - Bernoulli(probs=torch.full_like(q, 0.2)).log_prob(b)
        _assert_within(lr.mean(0), lr.std(0) / math.sqrt(N_MC), g.kl_per_unit().double(), what="KL")
        # the relaxed sample (used in training) has the Bernoulli's mean up to the temperature's bias
        relaxed = g.posterior().rsample((N_MC,))
        assert ((relaxed.mean(0) - q).abs() < 0.05).all()


def test_concrete_inverted_convention_keeps_expectation_one():
    g = randomize_(ConcreteGate(UNITS, inverted=True))
    torch.testing.assert_close(g.expected(), torch.ones(UNITS))
    plain = randomize_(ConcreteGate(UNITS))
    torch.testing.assert_close(g.snr(), plain.snr())  # the SNR does not depend on the convention


def test_hardconcrete_penalty_is_probability_of_nonzero():
    g = randomize_(HardConcreteGate(UNITS))
    with torch.no_grad():
        nz = (g.posterior().rsample((N_MC,)) > 0).double()
        penalty = g.kl_per_unit().double() / g.penalty
        _assert_within(nz.mean(0), nz.std(0) / math.sqrt(N_MC) + 1e-4, penalty, what="P(z≠0)")


def test_hardconcrete_default_threshold_is_the_snr_at_the_paper_cutoff():
    from compressdrop.gates.concrete import _snr_at_paper_cutoff

    assert HardConcreteGate.default_threshold == pytest.approx(_snr_at_paper_cutoff(), rel=1e-12)


def test_hardconcrete_default_threshold_is_paper_cutoff():
    g = HardConcreteGate(2)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-math.log(11) - 0.05, -math.log(11) + 0.05]))
    assert g.test_gate()[0] == 0 and g.test_gate()[1] > 0
    assert g.mask().tolist() == [False, True]


def test_log_ndtr_diff_is_stable_in_both_tails():
    lo = torch.tensor([-40.0, 30.0, -1.0, 5.0], dtype=torch.float64)
    hi = torch.tensor([-39.0, 31.0, 1.0, 1e30], dtype=torch.float64)
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50

    def phi(x):
        return mpmath.ncdf(x)

    ref = torch.tensor(
        [
            float(mpmath.log(phi(h) - phi(lo_)))
            for lo_, h in [(-40, -39), (-31, -30), (-1, 1), (-mpmath.inf, -5)]
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(log_ndtr_diff(lo, hi), ref, rtol=1e-6, atol=0)
    assert torch.isfinite(log_ndtr_diff(lo.float(), hi.float())).all()


@pytest.mark.parametrize("cls", [LogNormalGate, VariationalGate])
def test_pyro_mean_field_elbo_uses_the_closed_form_kl(cls):
    # With no observed site, TraceMeanField_ELBO's loss is exactly Σ KL(guide ‖ model), computed
    # through the same register_kl entries the gates use.
    import pyro
    from pyro.infer import TraceMeanField_ELBO

    g = randomize_(cls(UNITS))

    def model():
        pyro.sample("theta", g.prior().to_event(1))

    def guide():
        pyro.sample("theta", g.posterior().to_event(1))

    loss = TraceMeanField_ELBO().differentiable_loss(model, guide)
    torch.testing.assert_close(
        loss.double(), kl_divergence(g.posterior(), g.prior()).sum().double()
    )


def test_snr_matches_known_values():
    g = VariationalGate(1)
    with torch.no_grad():
        g.mu.fill_(2.0)
        g.log_sigma2.fill_(math.log(0.25))
    assert g.snr().item() == pytest.approx(4.0, rel=1e-6)
    c = ConcreteGate(1, init_drop=0.2, inverted=True)
    assert c.snr().item() == pytest.approx(math.sqrt(0.8 / 0.2), rel=1e-6)
